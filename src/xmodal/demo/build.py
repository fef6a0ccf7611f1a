"""Build (and, with a ``train`` block, train) one demo model from its config registry entry.

The ``build`` block of a model is its recipe: the architecture (``family`` for ViTs, ``arch``,
``hidden_size``, ``n_layers`` for language models), the ``seed``, and optionally ``train``
(:class:`xmodal.demo.train.TrainSettings`) and, for CLIP+FT, ``init`` (the key of the trained
CLIP model it is fine-tuned from). Without ``train`` the model is a randomly initialised
stand-in (``config/demo_untrained.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoNeeds", "build_demo_model", "build_priority", "demo_needs"]


@dataclass(frozen=True)
class DemoNeeds:
    """What building one demo model reads besides its recipe."""

    tokenizer: bool
    scenes: bool
    init: str | None


def demo_needs(
    models: Mapping[str, Mapping[str, Any]], key: str, n_train_scenes: int | None = None
) -> DemoNeeds:
    """The inputs of model ``key``'s build: the tokenizer, the training scenes, an init model.

    Language models need the tokenizer; a trained CLIP needs it for its text tower; a trained
    model needs the training scenes; ``init`` is read only by a ``clip_ft`` model and must name
    a trained ``clip``; ``train.n_scenes`` may not exceed ``n_train_scenes`` (config
    ``stimuli.train.n``) when that is given. Errors name the config key at fault.
    """
    entry = models[key]
    spec = dict(entry.get("build") or {})
    where = f"models.{key}.build"
    trained = "train" in spec
    init = spec.get("init")
    want = (spec.get("train") or {}).get("n_scenes")
    if trained and want is not None and n_train_scenes is not None and want > n_train_scenes:
        raise ValueError(
            f"{where}.train.n_scenes: {want} scenes asked for, and there are "
            f"{n_train_scenes} (stimuli.train.n); lower n_scenes or raise stimuli.train.n"
        )
    if init is not None:
        if spec.get("family") != "clip_ft":
            # before, it was accepted and ignored: the model trained from its own random start
            raise ValueError(
                f"{where}.init: only a clip_ft model starts from another (the trained clip it "
                f"is fine-tuned from); a {spec.get('family') or spec.get('arch')!r} model "
                "trains from its own random start, so remove init"
            )
        if not trained:
            raise ValueError(f"{where}.init: only a trained model starts from another (add train)")
        other = models.get(init)
        if other is None or "build" not in other:
            raise ValueError(
                f"{where}.init: {init!r} is not a demo model of this config "
                f"(demo models: {sorted(k for k, m in models.items() if 'build' in m)})"
            )
        base = {"clip_ft": "clip"}.get(spec.get("family"), spec.get("family"))
        if other["build"].get("family") != base or "train" not in other["build"]:
            raise ValueError(
                f"{where}.init: {init!r} must be a trained ViT of family {base!r} "
                f"(it has family {other['build'].get('family')!r})"
            )
    if entry["modality"] == "vision":
        tokenizer = trained and spec.get("family") == "clip"
    else:
        tokenizer = True
    return DemoNeeds(tokenizer=tokenizer, scenes=trained, init=init)


def build_priority(models: Mapping[str, Mapping[str, Any]], key: str) -> int:
    """The scheduling priority of a demo model's build: first the builds that other demo models
    start from, directly or in turn (``build.init``; twice their count), so that a chain of
    builds (CLIP, then CLIP+FT) starts first instead of after every independent build; then,
    among equals, vision before language models (+1), since the analysis waits for every vision
    model (GPA) but each language model gates only its own column of the grid."""
    starts = {k: (m.get("build") or {}).get("init") for k, m in models.items() if m.get("build")}

    def depth(k: str, seen: frozenset[str] = frozenset()) -> int:
        children = [c for c, init in starts.items() if init == k and c not in seen]
        return sum(1 + depth(c, seen | {k}) for c in children)

    return 2 * depth(key) + int(models[key].get("modality") == "vision")


def build_demo_model(
    entry: Mapping[str, Any],
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    scenes_path: str | Path | None = None,
    init_dir: str | Path | None = None,
) -> Path:
    """Build the model ``entry['build']`` describes into ``out_dir``; train it if it says so.

    ``scenes_path`` is the file of :func:`xmodal.demo.stimuli.generate_training_scenes`, needed
    with ``train``; ``init_dir`` the built model that ``init`` names. Its files get the modes
    the umask gives new files (safetensors writes its weights 0600, unreadable by the group).
    """
    from xmodal.io import chmod_like_new

    out = _build(entry, out_dir, tokenizer_dir, scenes_path=scenes_path, init_dir=init_dir)
    chmod_like_new(out)
    return out


def _build(
    entry: Mapping[str, Any],
    out_dir: str | Path,
    tokenizer_dir: str | Path | None,
    *,
    scenes_path: str | Path | None,
    init_dir: str | Path | None,
) -> Path:
    from xmodal.demo import models

    spec = dict(entry.get("build") or {})
    seed = int(spec.get("seed", 0))
    train = spec.get("train")
    where = f"model {entry.get('id', out_dir)!r}, build.train"
    if train is not None and scenes_path is None:
        raise ValueError(f"{where}: training needs the training scenes file")
    if entry["modality"] == "vision":
        family = spec.get("family", "mae")
        arch = {k: int(spec[k]) for k in ("embed_dim", "depth") if k in spec}
        out = models.build_tiny_vit(out_dir, family=family, seed=seed, **arch)
        if train is not None:
            from xmodal.demo.stimuli import load_training_scenes
            from xmodal.demo.train import TrainSettings, train_vision_model

            train_vision_model(
                out,
                family,
                load_training_scenes(scenes_path),
                TrainSettings.from_mapping(train, where),
                seed,
                tokenizer_dir=tokenizer_dir,
                init_dir=init_dir,
            )
        return out
    if tokenizer_dir is None:
        raise ValueError(f"demo language model {entry['id']!r} needs a tokenizer directory")
    kwargs = {k: int(spec[k]) for k in ("hidden_size", "n_layers") if k in spec}
    arch = spec.get("arch", "bloom")
    if train is None:
        return Path(
            models.build_tiny_lm(
                out_dir, arch=arch, tokenizer_dir=tokenizer_dir, seed=seed, **kwargs
            )
        )
    from xmodal.demo.stimuli import load_training_scenes
    from xmodal.demo.train import TrainSettings, train_language_model

    captions = [str(c) for c in load_training_scenes(scenes_path, ("captions",))["captions"]]
    train_language_model(
        out_dir,
        arch,
        tokenizer_dir,
        captions,
        TrainSettings.from_mapping(train, where),
        seed,
        **kwargs,
    )
    return Path(out_dir)
