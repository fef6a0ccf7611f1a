"""Extraction on a CUDA device: the same features as on the CPU, and no step of xmodal's own
that makes the host wait for the GPU between batches (such a wait leaves the GPU idle while
the host prepares the next batch; benchmarks/extract_gpu.py measures the cost)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import xmodal
from xmodal.extract.language import extract_language_features, load_language_model
from xmodal.extract.vision import extract_vision_features, load_vision_model
from xmodal.stimuli import ImageDataset, read_manifest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SRC = str(Path(xmodal.__file__).parent)


def _syncs(fn: Callable[[], object]) -> list[str]:
    """``file:line`` of every synchronizing CUDA call made from xmodal's code while ``fn`` runs
    (torch's sync debug mode attributes each to the Python line that made it)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sorted(
        {
            f"{Path(w.filename).name}:{w.lineno}"
            for w in caught
            if "synchroniz" in str(w.message) and w.filename.startswith(SRC)
        }
    )


def _image_batches(manifest: Path, transform, bs: int):
    df = read_manifest(manifest)
    ds = ImageDataset(df, manifest.parent, transform)
    items = [ds[i] for i in range(len(ds))]
    chunks = [items[s : s + bs] for s in range(0, len(items), bs)]
    batches = [(torch.stack([x for x, _ in c]).pin_memory(), [i for _, i in c]) for c in chunks]
    return df["stimulus_id"].tolist(), batches


@pytest.mark.parametrize("family", ["mae", "dinov2"])
def test_vision_on_cuda_equals_cpu_without_waiting(family, tiny_vits, tiny_manifest):
    out = {}
    for dev in ("cpu", "cuda"):
        model, transform, _ = load_vision_model(str(tiny_vits[family]), device=dev)
        ids, batches = _image_batches(tiny_manifest, transform, 3)
        ids = [*ids, "again-00", "again-04"]  # images two stimuli name take the copy path
        copies = {0: [0, 12], 4: [4, 13]}

        def run(model=model, ids=ids, batches=batches, dev=dev, copies=copies) -> None:
            out[dev] = extract_vision_features(
                model, batches, stimulus_ids=ids, progress=False, copies=copies
            )

        if dev == "cuda":
            run()  # warm-up: first calls may initialise CUDA state
            assert _syncs(run) == []
        else:
            run()
    np.testing.assert_allclose(out["cuda"].features, out["cpu"].features, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["cuda"].abs_q95, out["cpu"].abs_q95, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(
        out["cuda"].features[:, [12, 13]], out["cuda"].features[:, [0, 4]]
    )


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_language_on_cuda_equals_cpu_without_waiting(arch, tiny_lms, captions):
    ids = [f"c{i}" for i in range(len(captions) + 2)]
    texts = [*captions, captions[0], captions[3]]  # repeats take the copy path
    out = {}
    for dev in ("cpu", "cuda"):
        model, tok, _ = load_language_model(str(tiny_lms[arch]), device=dev, dtype=torch.float32)

        def run(model=model, tok=tok, dev=dev) -> None:
            out[dev] = extract_language_features(
                model, tok, texts, stimulus_ids=ids, batch_size=3, progress=False
            )

        if dev == "cuda":
            run()
            assert _syncs(run) == []
        else:
            run()
    np.testing.assert_allclose(out["cuda"].features, out["cpu"].features, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["cuda"].features[:, -2], out["cuda"].features[:, 0])
    np.testing.assert_array_equal(out["cuda"].n_tokens, out["cpu"].n_tokens)
