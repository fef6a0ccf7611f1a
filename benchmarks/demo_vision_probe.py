"""The demo's vision side alone, over several training seeds: does dispersion follow ν?

A faster loop than `benchmarks/demo_seeds.py` (75–140 s per seed on 2 cores, depending on the
host: about half the pipeline's time) for trying changes to the demo's world or to its vision
models' training (#14). Per seed offset s (every vision model's ``build.seed`` and the training
scenes' seed shifted by s, as `demo_seeds.py` shifts them), it trains the tokenizer and the four
vision models of the config exactly as the `demo_model` rules do (two processes, one thread
each), extracts the analysis's vision layer for the evaluation stimuli (rendered as the stimuli
are), runs GPA and prints one row:

- ``rho``: Spearman ρ of the mean dispersion with the planted nuisance level ν (the pipeline's
  ``nuisance_rho`` for the same seeds, to rounding);
- ``rho_rel``: the same for the relative disagreement (mean over models of residual / distance);
- ``dist`` and ``res``: per vision model, ρ of its distance from its centre and of its residual
  with ν (docs/method.md, "Dispersion and distance from the centre");
- ``high/low``: median mean dispersion of the stimuli with ν > 0.5 over those with ν < 0.3;
- with ``--oracle``: ``rho_caption_clean``, ρ when the models trained against captions or
  labels (CLIP, CLIP+FT) are given the same scenes without any nuisance, the ceiling if they
  ignored the nuisances entirely; ``rho_pixel_only``, ρ of the GPA of the other models alone;
- with ``--llm-run``, the full-set CKNNA of every vision model with every language model of a
  finished demo run (its chosen layer, as the layer search picks it); the language models are
  that run's, whatever the offset.

A single seed says little: over offsets 0, 100, 200, 300, 400 and 10000 the pipeline's ρ
ranged from 0.10 to 0.42 with the same world (docs/method.md, "The embedded demo"). Compare
changes over several offsets. ``--untrained`` builds the randomly
initialised stand-ins instead (``config/demo_untrained.yaml``'s kind of model).

    python benchmarks/demo_vision_probe.py --offsets 0 100 200 [--llm-run DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_nuisance_probe import all_layers  # noqa: E402
from demo_seeds import cknna_with_llms, host_line, shifted_config  # noqa: E402

#: the ViT families trained against captions or labels (``--oracle``)
CAPTION = ("clip", "clip_ft")


def _build_chain(jobs: list[tuple]) -> list[tuple[str, float]]:
    """Build demo models one after another in this process (one torch thread)."""
    import torch

    from xmodal.demo.build import build_demo_model

    torch.set_num_threads(1)
    times = []
    for key, entry, out, tokenizer, scenes, init in jobs:
        t0 = time.perf_counter()
        build_demo_model(entry, out, tokenizer, scenes_path=scenes, init_dir=init)
        times.append((key, round(time.perf_counter() - t0, 1)))
    return times


def build_vision_models(cfg: dict, work: Path, untrained: bool) -> dict[str, Path]:
    """Tokenizer, training scenes and every vision model of ``cfg`` under ``work``."""
    from xmodal.demo.build import build_priority, demo_needs
    from xmodal.demo.models import train_tokenizer
    from xmodal.demo.stimuli import generate_training_scenes, sample_scenes

    train = cfg["stimuli"]["train"]
    tokenizer, scenes = work / "tokenizer", work / "training.npz"
    models = {k: dict(m) for k, m in cfg["models"].items() if m["modality"] == "vision"}
    if untrained:  # the stand-ins need neither the training scenes nor the tokenizer
        for m in models.values():
            m["build"] = {k: v for k, v in m["build"].items() if k not in ("train", "init")}
    else:
        captions = [s.caption for s in sample_scenes(int(train["n"]), int(train["seed"]), "train")]
        train_tokenizer(captions, tokenizer)
        generate_training_scenes(scenes, int(train["n"]), int(train["seed"]))
    dirs = {k: work / "models" / k for k in models}
    # one task per model that starts from no other, with the models that start from it after it
    # (CLIP, then CLIP+FT), on two processes as the demo profile runs two jobs at a time
    chains: list[list[tuple]] = []
    for key in sorted(models, key=lambda k: -build_priority(models, k)):
        init = demo_needs(models, key).init
        job = (key, models[key], dirs[key], tokenizer, scenes, init and dirs[init])
        owner = next((c for c in chains if init in {j[0] for j in c}), None)
        if owner is None:
            chains.append([job])
        else:
            owner.append(job)
    with get_context("spawn").Pool(min(2, len(chains))) as pool:
        for times in pool.imap(_build_chain, chains, chunksize=1):
            print("  built " + ", ".join(f"{k} {s} s" for k, s in times), flush=True)
    return dirs


def vision_layers(
    cfg: dict, dirs: dict[str, Path], clean: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ν of the evaluation stimuli and each model's features of all layers for them
    (``clean``: for the same scenes rendered with every nuisance component at 0)."""
    from xmodal.demo.stimuli import sample_scenes
    from xmodal.extract.vision import load_vision_model

    scenes = sample_scenes(int(cfg["stimuli"]["n"]), int(cfg["stimuli"]["seed"]), "eval")
    nu = np.array([s.nuisance for s in scenes])
    if clean:
        scenes = [s.without_nuisances() for s in scenes]
    models = {key: load_vision_model(str(path)) for key, path in dirs.items()}
    features = dict(zip(dirs, all_layers(models, scenes), strict=True))
    return nu, features


def full_cknna(features: dict[str, np.ndarray], layer: int, cfg: dict, run: Path) -> dict:
    """Full-set CKNNA per (vision, language) pair against the language models of ``run``."""
    from xmodal import metrics

    prepared = {}
    for key, x in features.items():
        idx = layer % len(x)
        prepared[key] = (idx, metrics.prepare(x)[idx].astype(np.float32))
    values = cknna_with_llms(prepared, run, cfg, int(cfg["analysis"]["knn_k"]))
    return {f"{v} / {lang}": round(float(x), 4) for (v, lang), x in values.items()}


def probe(
    cfg: dict, work: Path, untrained: bool, llm_run: Path | None, oracle: bool = False
) -> dict:
    """One seed: build, extract, GPA; the row described in the module docstring."""
    from scipy.stats import spearmanr

    from xmodal.gpa import gpa

    t0 = time.perf_counter()
    dirs = build_vision_models(cfg, work, untrained)
    nu, features = vision_layers(cfg, dirs)
    a = cfg["analysis"]
    layer = int(a["vision_layer"])

    def rho(v: np.ndarray) -> float:
        return round(float(spearmanr(v, nu)[0]), 3)

    def fit(xs: dict[str, np.ndarray]):
        res = gpa([x[layer].astype(np.float64) for x in xs.values()], **a["gpa"])
        return np.asarray(res.residuals), np.asarray(res.distances)

    r, d = fit(features)
    mean = r.mean(axis=1)

    row = {
        "rho": rho(mean),
        "rho_rel": rho((r / d).mean(axis=1)),
        "dist": {k: rho(d[:, i]) for i, k in enumerate(features)},
        "res": {k: rho(r[:, i]) for i, k in enumerate(features)},
        "high/low": round(float(np.median(mean[nu > 0.5]) / np.median(mean[nu < 0.3])), 3),
    }
    if oracle:
        # the ceiling if the caption-trained models ignored every nuisance, and the
        # pixel-trained models alone
        caption = [k for k in features if cfg["models"][k]["build"].get("family") in CAPTION]
        _, clean = vision_layers(cfg, {k: dirs[k] for k in caption}, clean=True)
        row["rho_caption_clean"] = rho(fit({**features, **clean})[0].mean(axis=1))
        pixel = {k: x for k, x in features.items() if k not in caption}
        row["rho_pixel_only"] = rho(fit(pixel)[0].mean(axis=1)) if len(pixel) > 1 else None
    if llm_run is not None:
        row["cknna"] = full_cknna(features, layer, cfg, llm_run)
    row["seconds"] = round(time.perf_counter() - t0)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 100, 200])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml")
    parser.add_argument("--untrained", action="store_true", help="untrained stand-ins")
    parser.add_argument("--llm-run", type=Path, help="a finished demo run (its LLM features)")
    parser.add_argument("--work", type=Path, help="keep the models here (default: temporary)")
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="also ρ with the CLIP models fed the clean renders, and the other models alone",
    )
    args = parser.parse_args()
    print(host_line(), flush=True)

    base = yaml.safe_load(args.config.read_text())
    rhos = []
    with tempfile.TemporaryDirectory(prefix="demo_vision_probe_") as tmp:
        for offset in args.offsets:
            work = (args.work or Path(tmp)) / f"offset-{offset}"
            work.mkdir(parents=True, exist_ok=True)
            cfg = shifted_config(base, offset)
            row = probe(cfg, work, args.untrained, args.llm_run, args.oracle)
            rhos.append(row["rho"])
            print(json.dumps({"offset": offset, "untrained": args.untrained, **row}), flush=True)
    print(
        f"rho over offsets {args.offsets}: mean {np.mean(rhos):.3f}, range {min(rhos)}–{max(rhos)}"
    )


if __name__ == "__main__":
    main()
