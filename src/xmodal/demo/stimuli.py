"""Synthetic paired stimuli for the embedded demo: rendered scenes of coloured shapes.

Each stimulus is drawn from one scene description (objects with shape, colour, size and
position, plus a background), and its caption is generated from the same description, so
images and captions share structure the way WIT's image/caption pairs do. A per-stimulus
``clutter`` level (random specks and blur, never mentioned in the caption) degrades some
images: a planted source of disagreement between vision models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from xmodal.io import write_table

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (150, 150, 150), "black": (20, 20, 20)}
POSITIONS = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the centre": (0.5, 0.5),
}
SIZES = {"small": 0.14, "large": 0.26}


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene."""

    shape: str
    colour: str
    size: str
    position: str


def random_scene(rng: np.random.Generator) -> tuple[list[SceneObject], str, float]:
    """Draw a scene: 1-3 objects at distinct positions, a background and a clutter level."""
    n_obj = int(rng.integers(1, 4))
    positions = rng.choice(list(POSITIONS), size=n_obj, replace=False)
    objects = [
        SceneObject(
            shape=str(rng.choice(SHAPES)),
            colour=str(rng.choice(list(COLOURS))),
            size=str(rng.choice(list(SIZES))),
            position=str(pos),
        )
        for pos in positions
    ]
    background = str(rng.choice(list(BACKGROUNDS)))
    clutter = float(rng.beta(1.2, 3.0))
    return objects, background, clutter


def caption_for(objects: list[SceneObject], background: str) -> str:
    """Describe a scene in one sentence, from the same description that rendered it."""
    parts = [f"a {o.size} {o.colour} {o.shape} {o.position}" for o in objects]
    if len(parts) == 1:
        body = parts[0]
    else:
        body = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body[0].upper()}{body[1:]}, on a {background} background."


def render_scene(
    objects: list[SceneObject],
    background: str,
    clutter: float,
    rng: np.random.Generator,
    size: int = 96,
) -> Image.Image:
    """Render a scene to an RGB image; ``clutter`` in [0, 1] adds specks and blur."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy = (c * size for c in POSITIONS[o.position])
        r = SIZES[o.size] * size
        box = (cx - r, cy - r, cx + r, cy + r)
        colour = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif o.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    n_specks = int(clutter * 60)
    for _ in range(n_specks):
        x, y = rng.uniform(0, size, 2)
        s = rng.uniform(1, 4 + 8 * clutter)
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x - s, y - s, x + s, y + s), fill=col)
    if clutter > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=2.5 * clutter))
    return img


def generate_stimuli(out_dir: str | Path, n: int = 240, seed: int = 0, size: int = 96) -> Path:
    """Write ``n`` synthetic image/caption pairs and their manifest; return the manifest path.

    Layout (the stimulus manifest contract): ``out_dir/stimuli.tsv`` with columns
    ``stimulus_id``, ``image`` (relative path), ``caption``, plus ``clutter`` (the planted,
    caption-independent image degradation), and ``out_dir/images/<id>.jpg``.
    """
    if n < 8:
        raise ValueError(f"demo stimuli: n={n} is too small (need at least 8)")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    width = len(str(n - 1))
    for i in range(n):
        objects, background, clutter = random_scene(rng)
        sid = f"demo{i:0{width}d}"
        rel = f"images/{sid}.jpg"
        render_scene(objects, background, clutter, rng, size=size).save(out / rel, quality=92)
        rows.append(
            {
                "stimulus_id": sid,
                "image": rel,
                "caption": caption_for(objects, background),
                "clutter": round(clutter, 4),
            }
        )
    manifest = out / "stimuli.tsv"
    write_table(pd.DataFrame(rows), manifest)
    log.info("wrote %d synthetic stimuli to %s", n, out)
    return manifest
