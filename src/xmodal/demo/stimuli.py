"""The demo's synthetic world: rendered scenes of coloured shapes, captions, planted nuisances.

A scene is a description (1–3 objects, each with a shape, colour, size and position) plus a
**nuisance level** ν ∈ [0, 1] and its four components, none of which the caption mentions:

- ``clutter``: up to 8 small distractor shapes anywhere in the image;
- ``occlusion``: a shape over part of every described object;
- ``background``: a striped texture blended into the plain background;
- ``blur``: a Gaussian blur of the whole image.

Nuisances are drawn from the world's own shapes and colours, so that they look like content the
caption does not mention (as clutter in a photograph does), not like noise. ν ~ Beta(1.3, 1.7)
and each component is c_k = min(1, ν·u_k) with u_k ~ U(0.8, 1.2) drawn per scene, so the
components move together with ν but not in lockstep. The caption is written from the
description alone, so images and captions share the content (what the vision and language
models can agree on) while the nuisances are a planted, caption-independent source of
disagreement between vision models (docs/method.md, "The embedded demo").

Two disjoint random streams draw scenes from this world: ``split="eval"`` for the stimuli the
pipeline analyses and ``split="train"`` for the scenes the demo's models are trained on
(:mod:`xmodal.demo.train`); the same seed never yields the same scenes in both, but the world
is small, so a stimulus's caption can caption a training scene too (docs/method.md, "The
embedded demo").
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from xmodal.config import nuisance_design
from xmodal.io import atomic_path
from xmodal.stimuli import write_manifest, write_manifest_settings

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
#: the plain background of a scene without nuisance
BACKGROUND = (200, 200, 200)
POSITIONS = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the centre": (0.5, 0.5),
}
SIZES = {"small": 0.14, "large": 0.26}
#: the nuisance components, in the order of the manifest's columns
NUISANCES = ("clutter", "occlusion", "background", "blur")
#: scene labels (the CLIP+FT fine-tuning task, multi-label): the colour–shape combinations present
LABELS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
#: size of the rendered images (pixels, square)
IMAGE_SIZE = 96
#: nuisance level ν ~ Beta(a, b)
NUISANCE_BETA = (1.3, 1.7)
#: spread of the components around the level: c_k = min(1, ν·u_k), u_k ~ U(low, high)
COMPONENT_SPREAD = (0.8, 1.2)
_SPLITS = {"eval": 0, "train": 1}

__all__ = [
    "IMAGE_SIZE",
    "LABELS",
    "NUISANCES",
    "Scene",
    "SceneObject",
    "caption_for",
    "generate_stimuli",
    "generate_training_scenes",
    "load_training_scenes",
    "render_scene",
    "sample_scenes",
]


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene."""

    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A scene description, its nuisance level and components, and its rendering seed."""

    objects: tuple[SceneObject, ...]
    nuisance: float
    clutter: float
    occlusion: float
    background: float
    blur: float
    render_seed: int

    @property
    def caption(self) -> str:
        """The caption: the objects only, never the nuisances."""
        return caption_for(self.objects)

    @property
    def labels(self) -> np.ndarray:
        """Multi-hot over :data:`LABELS`: which colour–shape combinations the scene contains."""
        out = np.zeros(len(LABELS), dtype=np.uint8)
        for o in self.objects:
            out[LABELS.index(f"{o.colour} {o.shape}")] = 1
        return out

    def without_nuisances(self) -> Scene:
        """The same scene (objects, rendering seed) with its nuisance level and every component
        at 0: rendered, only the objects on the plain background."""
        return replace(self, nuisance=0.0, **dict.fromkeys(NUISANCES, 0.0))

    def nuisances(self) -> dict[str, float]:
        """``nuisance`` and its components, rounded as the manifest records them."""
        keys = ("nuisance", *NUISANCES)
        return {k: round(float(getattr(self, k)), 4) for k in keys}


def _split_rng(seed: int, split: str) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"unknown scene split {split!r}; choose from {sorted(_SPLITS)}")
    return np.random.default_rng([int(seed), _SPLITS[split]])


def sample_scenes(
    n: int,
    seed: int,
    split: str = "eval",
    *,
    nuisance_beta: tuple[float, float] = NUISANCE_BETA,
) -> list[Scene]:
    """Draw ``n`` scene descriptions from the world (``split`` picks a disjoint random stream).

    Objects: 1–3 at distinct positions, shape, colour and size uniform. ν ~ Beta(1.3, 1.7), the
    world's design (``nuisance_beta``: another, for the stimuli only, config
    ``stimuli.nuisance_beta``; docs/method.md, "Dispersion is relative to the stimulus set");
    component c_k = min(1, ν·u_k), u_k ~ U(0.8, 1.2).
    """
    try:
        a, b = nuisance_design(nuisance_beta)
    except ValueError as err:
        raise ValueError(f"nuisance_beta: {err}") from None
    rng = _split_rng(seed, split)
    scenes = []
    for _ in range(int(n)):
        n_obj = int(rng.integers(1, 4))
        positions = rng.choice(list(POSITIONS), size=n_obj, replace=False)
        objects = tuple(
            SceneObject(
                shape=str(rng.choice(SHAPES)),
                colour=str(rng.choice(list(COLOURS))),
                size=str(rng.choice(list(SIZES))),
                position=str(pos),
            )
            for pos in positions
        )
        level = float(rng.beta(a, b))
        parts = np.minimum(1.0, level * rng.uniform(*COMPONENT_SPREAD, len(NUISANCES)))
        scenes.append(
            Scene(
                objects=objects,
                nuisance=level,
                **{k: float(v) for k, v in zip(NUISANCES, parts, strict=True)},
                render_seed=int(rng.integers(1 << 62)),
            )
        )
    return scenes


def caption_for(objects: tuple[SceneObject, ...] | list[SceneObject]) -> str:
    """Describe a scene's objects in one sentence, from the description that rendered them."""
    parts = [f"a {o.size} {o.colour} {o.shape} {o.position}" for o in objects]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{body[0].upper()}{body[1:]}."


def _palette(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    """``n`` colours drawn from the world's object colours."""
    names = list(COLOURS)
    return [COLOURS[names[i]] for i in rng.integers(0, len(names), n)]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def _background(scene: Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain background blended with a striped texture of weight ``scene.background``."""
    theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
    colours = np.array(_palette(rng, 2), dtype=np.float32)
    grid = np.arange(size, dtype=np.float32) / size
    proj = grid[None, :] * np.cos(theta) + grid[:, None] * np.sin(theta)
    wave = (0.5 + 0.5 * np.sin(2 * np.pi * freq * proj + phase))[..., None]
    w = np.float32(scene.background)
    plain = np.array(BACKGROUND, np.float32)
    out = (1 - w) * plain + w * (colours[1] + wave * (colours[0] - colours[1]))
    return (out + 0.5).astype(np.uint8)


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render a scene to an RGB image: background, objects, occluders, clutter, then blur.

    Every nuisance is drawn from the world's own vocabulary (its shapes and colours), so a
    nuisance looks like content that the caption does not mention. All randomness of the
    rendering comes from ``scene.render_seed``.
    """
    rng = np.random.default_rng(scene.render_seed)
    img = Image.fromarray(_background(scene, rng, size), "RGB")
    draw = ImageDraw.Draw(img)
    boxes = []
    for o in scene.objects:
        cx, cy = (c * size for c in POSITIONS[o.position])
        r = SIZES[o.size] * size
        boxes.append((cx, cy, r))
        _draw_shape(draw, o.shape, cx, cy, r, COLOURS[o.colour])
    # occlusion: a shape over every object, its area a fraction ~ occlusion of the object's box
    offsets = rng.uniform(-0.5, 0.5, (len(boxes), 2))
    shapes = rng.integers(0, len(SHAPES), len(boxes))
    for (cx, cy, r), (ox, oy), shape, col in zip(
        boxes, offsets, shapes, _palette(rng, len(boxes)), strict=True
    ):
        if scene.occlusion > 0:  # Pillow paints a pixel for a shape of radius 0
            _draw_shape(
                draw, SHAPES[shape], cx + ox * r, cy + oy * r, r * np.sqrt(scene.occlusion), col
            )
    # clutter: small distractor shapes anywhere, up to 8 of them
    n_clutter = int(round(8 * scene.clutter))
    centres = rng.uniform(0, size, (n_clutter, 2))
    radii = rng.uniform(0.04, 0.09, n_clutter) * size
    shapes = rng.integers(0, len(SHAPES), n_clutter)
    for (x, y), r, shape, col in zip(centres, radii, shapes, _palette(rng, n_clutter), strict=True):
        _draw_shape(draw, SHAPES[shape], x, y, r, col)
    radius = 3.0 * scene.blur * size / IMAGE_SIZE
    if radius > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(radius=radius))
    return img


def _jpeg_round_trip(img: Image.Image, quality: int = 92) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def generate_stimuli(
    out_dir: str | Path,
    n: int = 240,
    seed: int = 0,
    size: int = IMAGE_SIZE,
    nuisance_beta: Sequence[float] | None = None,
) -> Path:
    """Write ``n`` evaluation stimuli (the ``eval`` stream) and their manifest; return its path.

    ``nuisance_beta`` (config ``stimuli.nuisance_beta``): the stimuli's levels ν ~ Beta(a, b)
    instead of the world's :data:`NUISANCE_BETA`; recorded with ``n`` and ``seed`` in the
    manifest's settings when given.

    Layout (the stimulus manifest contract): ``out_dir/stimuli.tsv`` with ``stimulus_id``,
    ``image`` (relative path), ``caption``, plus the planted ``nuisance`` level and its
    components ``clutter``, ``occlusion``, ``background``, ``blur``; ``out_dir/images/<id>.jpg``.
    """
    if n < 8:
        raise ValueError(f"demo stimuli: n={n} is too small (need at least 8)")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    width = len(str(n - 1))
    settings: dict[str, object] = {"n": n, "seed": seed}
    design = NUISANCE_BETA
    if nuisance_beta is not None:
        design = nuisance_design(nuisance_beta)
        settings["nuisance_beta"] = list(design)
    for i, scene in enumerate(sample_scenes(n, seed, "eval", nuisance_beta=design)):
        sid = f"demo{i:0{width}d}"
        rel = f"images/{sid}.jpg"
        render_scene(scene, size=size).save(out / rel, quality=92)
        rows.append(
            {"stimulus_id": sid, "image": rel, "caption": scene.caption, **scene.nuisances()}
        )
    manifest = out / "stimuli.tsv"
    write_manifest(pd.DataFrame(rows), manifest)
    write_manifest_settings(manifest, settings)  # after it: what it was made from
    log.info("wrote %d synthetic stimuli to %s", n, out)
    return manifest


def generate_training_scenes(path: str | Path, n: int, seed: int, size: int = IMAGE_SIZE) -> Path:
    """Render ``n`` training scenes (the ``train`` stream) into one ``.npz`` file at ``path``.

    Arrays: ``images`` (n, size, size, 3) uint8 (JPEG round trip at the evaluation stimuli's
    quality, so that training and evaluation images have the same statistics), ``captions``,
    ``labels`` (n, len(LABELS)) multi-hot (:attr:`Scene.labels`), ``nuisance`` and one array
    per component.
    """
    scenes = sample_scenes(n, seed, "train")
    images = np.stack([np.asarray(_jpeg_round_trip(render_scene(s, size))) for s in scenes])
    arrays = {
        "images": images,
        "captions": np.array([s.caption for s in scenes]),
        "labels": np.stack([s.labels for s in scenes]),
        **{k: np.array([getattr(s, k) for s in scenes]) for k in ("nuisance", *NUISANCES)},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    log.info("wrote %d training scenes (%d px) to %s", n, size, path)
    return path


def load_training_scenes(
    path: str | Path, keys: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """The arrays written by :func:`generate_training_scenes` (only ``keys`` if given)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in (data.files if keys is None else keys)}
