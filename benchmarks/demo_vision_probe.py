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
  that run's, whatever the offset;
- with ``--stimuli-beta A B``, the stimuli's ν drawn from Beta(A, B) instead of the world's
  Beta(1.3, 1.7) (the training scenes unchanged), and with ``--stimuli-seeds``, one row per
  stimulus set; ``--reuse-models`` analyses the models an earlier run left under ``--work``
  without training them again (seconds per row instead of minutes);
- with ``--composition``, per design, ρ for subsets of uniform-ν stimuli shaped like it, with
  GPA refitted on each subset and with the GPA of all of them (:func:`composition`;
  docs/method.md, "Dispersion is relative to the stimulus set").

A single seed says little: over offsets 0, 100, 200, 300, 400 and 10000 the pipeline's ρ
ranged from 0.10 to 0.42 with the same world (docs/method.md, "The embedded demo"). Compare
changes over several offsets. ``--untrained`` builds the randomly
initialised stand-ins instead (``config/demo_untrained.yaml``'s kind of model).

    python benchmarks/demo_vision_probe.py --offsets 0 100 200 [--llm-run DIR] [--work DIR]
    python benchmarks/demo_vision_probe.py --offsets 0 100 --work DIR --reuse-models \
        --stimuli-seeds 0 1 2 --stimuli-beta 1.3 4 --composition
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
from demo_seeds import (  # noqa: E402
    add_stimuli_beta,
    cknna_with_llms,
    host_line,
    shifted_config,
)

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


def model_dirs(cfg: dict, work: Path) -> dict[str, Path]:
    """Where the vision models of ``cfg`` are built under ``work``."""
    return {k: work / "models" / k for k, m in cfg["models"].items() if m["modality"] == "vision"}


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
    dirs = model_dirs(cfg, work)
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
    cfg: dict,
    dirs: dict[str, Path],
    clean: bool = False,
    design: tuple[float, float] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ν of the evaluation stimuli and each model's features of all layers for them
    (``clean``: for the same scenes rendered with every nuisance component at 0; ``design``:
    the stimuli's levels drawn from that Beta instead of the world's, the training unchanged)."""
    from xmodal.demo.stimuli import NUISANCE_BETA, sample_scenes
    from xmodal.extract.vision import load_vision_model

    st = cfg["stimuli"]
    scenes = sample_scenes(
        int(st["n"]), int(st["seed"]), "eval", nuisance_beta=design or NUISANCE_BETA
    )
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


def _gpa_fit(xs: list[np.ndarray], cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Residuals and distances (stimuli × models) of GPA on the analysis's settings."""
    from xmodal.gpa import gpa

    res = gpa([x.astype(np.float64) for x in xs], **cfg["analysis"]["gpa"])
    return np.asarray(res.residuals), np.asarray(res.distances)


def composition(cfg: dict, dirs: dict[str, Path], designs: dict, repeats: int = 5) -> dict:
    """Does the stimulus set's mix of ν act through the GPA fit? Stimuli with ν uniform (three
    times the set size) are subsampled to each Beta ``design`` (rejection sampling, sets of
    the configured size); per design, mean over ``repeats`` subsets of ρ(mean dispersion, ν)
    with GPA refitted on the subset (``refit``) and with the residuals of the GPA fitted on all
    the uniform stimuli (``fit_on_uniform``)."""
    from scipy.stats import beta, spearmanr

    n = int(cfg["stimuli"]["n"])
    big = {**cfg, "stimuli": {**cfg["stimuli"], "n": 3 * n}}
    nu, features = vision_layers(big, dirs, design=(1.0, 1.0))
    layer = int(cfg["analysis"]["vision_layer"])
    xs = [x[layer] for x in features.values()]
    whole = _gpa_fit(xs, cfg)[0].mean(axis=1)
    rng = np.random.default_rng(0)
    out = {}
    for name, (a, b) in designs.items():
        p = beta.pdf(nu, a, b)
        refit, fixed = [], []
        for _ in range(repeats):
            pool = np.flatnonzero(rng.uniform(size=len(nu)) < p / p.max())
            keep = np.sort(rng.choice(pool, min(n, len(pool)), replace=False))
            sub = _gpa_fit([x[keep] for x in xs], cfg)[0].mean(axis=1)
            refit.append(spearmanr(sub, nu[keep])[0])
            fixed.append(spearmanr(whole[keep], nu[keep])[0])
        out[name] = {
            "refit": round(float(np.mean(refit)), 3),
            "fit_on_uniform": round(float(np.mean(fixed)), 3),
        }
    return out


def probe(
    cfg: dict,
    dirs: dict[str, Path],
    llm_run: Path | None,
    oracle: bool = False,
    design: tuple[float, float] | None = None,
) -> dict:
    """One seed's models, one stimulus set: extract, GPA; the row of the module docstring."""
    from scipy.stats import spearmanr

    t0 = time.perf_counter()
    nu, features = vision_layers(cfg, dirs, design=design)
    layer = int(cfg["analysis"]["vision_layer"])

    def rho(v: np.ndarray) -> float:
        return round(float(spearmanr(v, nu)[0]), 3)

    def fit(xs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return _gpa_fit([x[layer] for x in xs.values()], cfg)

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
        _, clean = vision_layers(cfg, {k: dirs[k] for k in caption}, clean=True, design=design)
        row["rho_caption_clean"] = rho(fit({**features, **clean})[0].mean(axis=1))
        pixel = {k: x for k, x in features.items() if k not in caption}
        row["rho_pixel_only"] = rho(fit(pixel)[0].mean(axis=1)) if len(pixel) > 1 else None
    if llm_run is not None:
        row["cknna"] = full_cknna(features, layer, cfg, llm_run)
    row["seconds"] = round(time.perf_counter() - t0)
    return row


def built_models(cfg: dict, work: Path, untrained: bool, reuse: bool) -> dict[str, Path]:
    """The vision models of ``cfg`` under ``work``: built (and trained) there, or with
    ``reuse`` the ones an earlier run of this script left there."""
    if not reuse:
        return build_vision_models(cfg, work, untrained)
    dirs = model_dirs(cfg, work)
    missing = [str(p) for p in dirs.values() if not (p / "config.json").is_file()]
    if missing:
        raise SystemExit(f"--reuse-models: no model built at {missing}; run without it first")
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 100, 200])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "demo.yaml")
    parser.add_argument("--untrained", action="store_true", help="untrained stand-ins")
    parser.add_argument("--llm-run", type=Path, help="a finished demo run (its LLM features)")
    parser.add_argument("--work", type=Path, help="keep the models here (default: temporary)")
    parser.add_argument(
        "--reuse-models",
        action="store_true",
        help="with --work: use the models an earlier run built there (no training)",
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="also ρ with the CLIP models fed the clean renders, and the other models alone",
    )
    add_stimuli_beta(parser)
    parser.add_argument(
        "--stimuli-seeds",
        type=int,
        nargs="+",
        help="one stimulus set per seed (default: the config's stimuli.seed)",
    )
    parser.add_argument(
        "--composition",
        action="store_true",
        help="also ρ for subsets of uniform-ν stimuli, GPA refitted or not (see composition())",
    )
    args = parser.parse_args()
    if args.reuse_models and args.work is None:
        parser.error("--reuse-models needs --work")
    if args.llm_run is not None and (args.stimuli_beta or args.stimuli_seeds):
        parser.error("--llm-run needs the run's own stimuli (no --stimuli-beta or --stimuli-seeds)")
    print(host_line(), flush=True)

    base = yaml.safe_load(args.config.read_text())
    design = args.stimuli_beta  # None: the world's
    rhos = []
    with tempfile.TemporaryDirectory(prefix="demo_vision_probe_") as tmp:
        for offset in args.offsets:
            work = (args.work or Path(tmp)) / f"offset-{offset}"
            if not args.reuse_models:
                work.mkdir(parents=True, exist_ok=True)
            cfg = shifted_config(base, offset)
            dirs = built_models(cfg, work, args.untrained, args.reuse_models)
            for seed in args.stimuli_seeds or [int(cfg["stimuli"]["seed"])]:
                cfg["stimuli"]["seed"] = seed
                row = probe(cfg, dirs, args.llm_run, args.oracle, design)
                rhos.append(row["rho"])
                head = {"offset": offset, "untrained": args.untrained, "stimuli_seed": seed}
                print(json.dumps({**head, "stimuli_beta": design, **row}), flush=True)
            if args.composition:
                designs = {"Beta(1.3,1.7)": (1.3, 1.7), "Beta(1.3,4)": (1.3, 4.0)}
                designs["uniform"] = (1.0, 1.0)
                found = composition(cfg, dirs, designs)
                print(json.dumps({"offset": offset, "composition": found}), flush=True)
    print(
        f"rho over offsets {args.offsets}: mean {np.mean(rhos):.3f}, range {min(rhos)}–{max(rhos)}"
    )


if __name__ == "__main__":
    main()
