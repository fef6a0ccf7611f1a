"""Shared fixtures: tiny models (built once per session) and a tiny stimulus manifest.

Everything is built locally (no network): four tiny timm ViTs of the paper's families, a BPE
tokenizer trained on the captions, and tiny BLOOM and LLaMA models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CAPTIONS = [
    "a red cube on a wooden table",
    "two dogs running in the park",
    "a small blue sphere next to a large green pyramid on the floor",
    "cat",
    "an old man reading a newspaper on a bench while pigeons gather around his feet",
    "a yellow taxi",
    "three red apples in a white bowl",
    "a mountain lake at sunrise with mist over the water and pine trees on the shore",
    "a child flying a kite",
    "the skyline of a city at night",
    "a bicycle leaning against a brick wall",
    "two cups of coffee",
]
# image modes the manifest exercises (conversion to RGB is logged)
MODES = ["RGB", "L", "CMYK", "RGBA", "P", "RGB", "RGB", "RGB", "L", "RGB", "RGB", "RGB"]


def _save_image(path: Path, mode: str, rng: np.random.Generator, size: tuple[int, int]) -> str:
    from PIL import Image

    h, w = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
    name = path.with_suffix(".jpg" if mode in ("RGB", "L", "CMYK") else ".png")
    img.save(name)
    return name.name


@pytest.fixture(scope="session", autouse=True)
def _extract_on_the_cpu():
    """Extraction's "auto" device is the CPU in tests, also on a machine with a GPU: the tests'
    expected values are the CPU's float32 ones (on CUDA "auto" means bfloat16). Tests of
    CUDA ask for it by name (test_extract_gpu.py)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XMODAL_DEVICE", "cpu")
    yield
    patch.undo()


@pytest.fixture(scope="session")
def captions() -> list[str]:
    """The 12 captions of ``tiny_manifest``, in manifest order."""
    return list(CAPTIONS)


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``stimuli.tsv`` with 12 stimuli: images of mixed modes and sizes, captions of mixed lengths."""
    root = tmp_path_factory.mktemp("stimuli")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = ["stimulus_id\timage\tcaption"]
    for i, (cap, mode) in enumerate(zip(CAPTIONS, MODES, strict=True)):
        name = _save_image(root / "img" / f"s{i:02d}", mode, rng, (40 + 3 * i, 64 - 2 * i))
        lines.append(f"stim-{i:02d}\timg/{name}\t{cap}")
    path = root / "stimuli.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_vits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> timm local directory, for mae, dinov2, clip, clip_ft."""
    from xmodal.demo.models import VIT_FAMILIES, build_tiny_vit

    root = tmp_path_factory.mktemp("vits")
    return {f: build_tiny_vit(root / f, f, seed=i) for i, f in enumerate(VIT_FAMILIES)}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (BOS added, no pad token) trained on the captions."""
    from xmodal.demo.models import train_tokenizer

    return train_tokenizer(CAPTIONS * 4, tmp_path_factory.mktemp("tokenizer"), vocab_size=300)


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path) -> dict[str, Path]:
    """arch -> ``save_pretrained`` directory, for bloom and llama (LLaMA context: 48 tokens)."""
    from xmodal.demo.models import build_tiny_lm

    root = tmp_path_factory.mktemp("lms")
    return {
        "bloom": build_tiny_lm(
            root / "bloom", "bloom", tiny_tokenizer, seed=1, hidden_size=32, n_layers=2
        ),
        "llama": build_tiny_lm(
            root / "llama",
            "llama",
            tiny_tokenizer,
            seed=2,
            hidden_size=32,
            n_layers=3,
            max_position_embeddings=48,
        ),
    }


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """``HF_HUB_OFFLINE=1`` for this test (also patched into huggingface_hub, which reads it at import)."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


@pytest.fixture
def fresh_root_logging():
    """Undo what xmodal.logs.log_to does to the root logger, sys.excepthook and SIGTERM."""
    import logging
    import signal
    import sys

    root = logging.getLogger()
    handlers, level, hook = list(root.handlers), root.level, sys.excepthook
    on_term = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, on_term)
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    sys.excepthook = hook


# ---------------------------------------------------------------- the demo, run once per session


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory):
    """A copy of the project in which the embedded demo has run to completion locally
    (`snakemake --profile profiles/demo`, config/demo.yaml: its tiny models are trained inside
    the demo); shared by the workflow tests and the demo's end-to-end scientific test. The one
    trained demo run of the suite."""
    from _project import copy_project, run_snakemake

    wd = copy_project(tmp_path_factory.mktemp("demo") / "project")
    run_snakemake(wd, "--profile", "profiles/demo", "--cores", "2")
    return wd


@pytest.fixture(scope="session")
def demo_untrained_project(tmp_path_factory):
    """A copy of the project in which the demo with untrained stand-ins
    (config/demo_untrained.yaml, dataset ``demo-untrained``) has run to completion locally: the
    fastest full run, for tests where training adds nothing and for the trained-vs-untrained
    comparison."""
    from _project import copy_project, run_snakemake

    wd = copy_project(tmp_path_factory.mktemp("demo_untrained") / "project")
    run_snakemake(
        wd,
        "--profile",
        "profiles/demo",
        "--configfile",
        "config/demo_untrained.yaml",
        "--cores",
        "2",
    )
    return wd


@pytest.fixture(scope="session")
def tiny_hf_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers ``ViTModel`` saved with ``save_pretrained``: neither a timm model nor a
    text model (what a wrong id in the config can point at)."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("hf") / "vit"
    config = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4,
    )  # fmt: skip
    ViTModel(config).save_pretrained(folder)
    return folder
