"""Does ambiguous content make the demo's trained vision models disagree? A probe.

Takes a finished demo run (a project folder after `make demo`) and its trained vision models.
Renders n clean scenes of the evaluation stream (no nuisance) whose objects are drawn with one
attribute the caption names (colour, size or position) blended towards another value of the
world by a ~ U(0, 0.5) per scene (0: as captioned; 0.5: halfway to another value), extracts the
analysis's vision layer, runs GPA over the models and prints, per attribute:

- ρ of the mean dispersion with a;
- per model, ρ of its distance from its centre with a (docs/method.md, "Dispersion and distance
  from the centre");
- ρ of the relative disagreement (mean over models of residual / distance) with a.

A question for #14 (docs/method.md, "The embedded demo"): would a world whose ν made content
ambiguous, instead of adding content the caption does not mention, raise dispersion with ν?

    python benchmarks/demo_ambiguity_probe.py RUN_DIR [--config config/demo.yaml] [--n 480]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_nuisance_probe import demo_vision_models, image_layers  # noqa: E402

from xmodal.demo import stimuli as world  # noqa: E402
from xmodal.dispersion import mean_dispersion  # noqa: E402
from xmodal.gpa import gpa  # noqa: E402

ATTRIBUTES = ("colour", "size", "position")


def render_blended(scene: world.Scene, attribute: str, a: float, seed: int) -> Image.Image:
    """``scene``'s objects on the plain background, ``attribute`` blended by ``a`` towards
    another value of the world (drawn per object), as the stimuli are saved (JPEG)."""
    rng = np.random.default_rng(seed)
    size = world.IMAGE_SIZE
    img = Image.new("RGB", (size, size), world.BACKGROUND)
    draw = ImageDraw.Draw(img)
    names = list(world.COLOURS)
    for o in scene.objects:
        cx, cy = (c * size for c in world.POSITIONS[o.position])
        r = world.SIZES[o.size] * size
        colour = np.array(world.COLOURS[o.colour], float)
        if attribute == "colour":
            other = [n for n in names if n != o.colour][rng.integers(0, len(names) - 1)]
            colour = (1 - a) * colour + a * np.array(world.COLOURS[other], float)
        elif attribute == "size":
            other = "large" if o.size == "small" else "small"
            r = (1 - a) * r + a * world.SIZES[other] * size
        else:
            others = [p for p in world.POSITIONS if p != o.position]
            ox, oy = (c * size for c in world.POSITIONS[others[rng.integers(0, len(others))]])
            cx, cy = (1 - a) * cx + a * ox, (1 - a) * cy + a * oy
        world._draw_shape(draw, o.shape, cx, cy, r, tuple(int(v + 0.5) for v in colour))
    return world._jpeg_round_trip(img)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a project folder where the demo has run")
    parser.add_argument("--config", default="config/demo.yaml", help="relative to RUN")
    parser.add_argument("--n", type=int, default=480, help="scenes (evaluation stream)")
    parser.add_argument("--seed", type=int, default=7, help="the evaluation stream's seed")
    args = parser.parse_args()

    models, layer = demo_vision_models(args.run, args.config)
    keys = list(models)
    scenes = [s.without_nuisances() for s in world.sample_scenes(args.n, args.seed, "eval")]
    a = np.random.default_rng(args.seed).uniform(0, 0.5, len(scenes))
    for attribute in ATTRIBUTES:
        pairs = enumerate(zip(scenes, a, strict=True))
        images = [render_blended(s, attribute, x, i) for i, (s, x) in pairs]
        feats = [x[layer].astype(np.float64) for x in image_layers(models, images)]
        fit = gpa(feats)
        rho = spearmanr(mean_dispersion(fit.residuals), a)[0]
        dist = {
            k: spearmanr(np.linalg.norm(f - f.mean(0), axis=1), a)[0]
            for k, f in zip(keys, feats, strict=True)
        }
        rel = spearmanr((fit.residuals / fit.distances).mean(axis=1), a)[0]
        print(
            f"{attribute:9s} rho(dispersion, a) {rho:+.3f}   distance: "
            + ", ".join(f"{k} {v:+.2f}" for k, v in dist.items())
            + f"   relative disagreement {rel:+.3f}"
        )


if __name__ == "__main__":
    main()
