"""Which of the demo's nuisances makes its trained vision models disagree? A paired probe.

Takes a finished demo run (a project folder after `make demo`, or a `--keep` folder of
`benchmarks/demo_seeds.py`) and its trained vision models. Renders n evaluation scenes clean
(every nuisance 0) and, per nuisance component, the same scenes with only that component at
``--level`` (and once with all of them), and runs GPA over the clean and disturbed copies
together (2n stimuli; the analysis's vision layer). Prints per condition:

- the median over scenes of each model's distance ratio, disturbed / clean (distance from the
  centre of the model's GPA input, docs/method.md "Dispersion and distance from the centre"):
  above 1, the model moves disturbed images away from its centre; below 1, towards it;
- the median mean dispersion of the clean and of the disturbed copies, and in how many scenes
  the disturbed copy's is the higher;
- the same medians of the relative disagreement (mean over models of residual / distance).

    python benchmarks/demo_nuisance_probe.py RUN_DIR [--config config/demo.yaml] [--n 150]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xmodal.demo.stimuli import NUISANCES, _jpeg_round_trip, render_scene, sample_scenes  # noqa: E402
from xmodal.extract.vision import extract_vision_features, load_vision_model  # noqa: E402
from xmodal.gpa import gpa  # noqa: E402


def demo_vision_models(run: Path, config: str) -> tuple[dict, int]:
    """The trained vision models of a finished demo run (key → what ``load_vision_model``
    returns), in the config's order, and the analysis's vision layer."""
    cfg = yaml.safe_load((run / config).read_text())
    vision = {k: m for k, m in cfg["models"].items() if m["modality"] == "vision"}
    models = {k: load_vision_model(str(run / m["id"])) for k, m in vision.items()}
    return models, int(cfg["analysis"]["vision_layer"])


def all_layers(models: dict, scenes: list) -> list[np.ndarray]:
    """Each model's CLS features, every layer (layers × scenes × dim), for ``scenes`` rendered
    as the stimuli are."""
    return image_layers(models, [_jpeg_round_trip(render_scene(s)) for s in scenes])


def image_layers(models: dict, images: list) -> list[np.ndarray]:
    """Each model's CLS features, every layer (layers × images × dim), for PIL ``images``."""
    ids = [str(i) for i in range(len(images))]
    out = []
    for model, transform, _ in models.values():
        x = torch.stack([transform(im) for im in images])
        res = extract_vision_features(
            model, [(x, np.arange(len(ids)))], stimulus_ids=ids, progress=False
        )
        out.append(np.stack([np.asarray(layer) for layer in res.features]))
    return out


def vision_features(models: dict, scenes: list, layer: int) -> list[np.ndarray]:
    """Each model's CLS features at ``layer`` for ``scenes`` rendered as the stimuli are."""
    return [x[layer].astype(np.float64) for x in all_layers(models, scenes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a project folder where the demo has run")
    parser.add_argument("--config", default="config/demo.yaml", help="relative to RUN")
    parser.add_argument("--n", type=int, default=150, help="scenes (evaluation stream)")
    parser.add_argument("--level", type=float, default=0.9, help="the disturbed component's")
    parser.add_argument("--seed", type=int, default=0, help="the evaluation stream's seed")
    args = parser.parse_args()

    models, layer = demo_vision_models(args.run, args.config)
    clean = [s.without_nuisances() for s in sample_scenes(args.n, args.seed, "eval")]
    conditions = {k: {k: args.level} for k in NUISANCES}
    conditions["all"] = {"nuisance": args.level, **{k: args.level for k in NUISANCES}}
    base = vision_features(models, clean, layer)
    n = len(clean)
    print(f"models: {', '.join(models)}; {n} scenes; disturbed component at {args.level}")
    print("condition    distance ratio per model | mean dispersion clean → disturbed | relative")
    for name, change in conditions.items():
        disturbed = vision_features(
            models, [dataclasses.replace(s, **change) for s in clean], layer
        )
        res = gpa([np.vstack(pair) for pair in zip(base, disturbed, strict=True)], tol=1e-8)
        dist, r = res.distances, res.residuals
        ratio = np.median(dist[n:] / dist[:n], axis=0)
        mean, rel = r.mean(axis=1), (r / dist).mean(axis=1)
        print(
            f"{name:11s}  "
            + " ".join(f"{x:.2f}" for x in ratio)
            + f" | {np.median(mean[:n]):.4f} → {np.median(mean[n:]):.4f}"
            + f" (higher in {np.mean(mean[n:] > mean[:n]):.0%})"
            + f" | {np.median(rel[:n]):.3f} → {np.median(rel[n:]):.3f}"
            + f" (higher in {np.mean(rel[n:] > rel[:n]):.0%})"
        )


if __name__ == "__main__":
    main()
