"""Build one demo model from its config registry entry (its ``build`` block)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def build_demo_model(
    entry: Mapping[str, Any], out_dir: str | Path, tokenizer_dir: str | Path | None = None
) -> Path:
    """Build the tiny, untrained stand-in described by ``entry['build']`` into ``out_dir``."""
    from xmodal.demo import models

    spec = dict(entry.get("build") or {})
    seed = int(spec.get("seed", 0))
    if entry["modality"] == "vision":
        return models.build_tiny_vit(out_dir, family=spec.get("family", "mae"), seed=seed)
    if tokenizer_dir is None:
        raise ValueError(f"demo language model {entry['id']!r} needs a tokenizer directory")
    kwargs = {k: int(spec[k]) for k in ("hidden_size", "n_layers") if k in spec}
    return models.build_tiny_lm(
        out_dir, arch=spec.get("arch", "bloom"), tokenizer_dir=tokenizer_dir, seed=seed, **kwargs
    )
