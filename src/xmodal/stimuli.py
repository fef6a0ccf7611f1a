"""The stimulus manifest (``stimulus_id``, ``image``, ``caption``) and image decoding.

The manifest is a TSV next to its images: ``image`` paths are relative to the manifest's folder.
:func:`read_manifest` validates it; :class:`ImageDataset` decodes images for a DataLoader
(workers keep the GPU fed), converting any non-RGB mode to RGB.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

log = logging.getLogger(__name__)

COLUMNS = ("stimulus_id", "image", "caption")

__all__ = ["COLUMNS", "ImageDataset", "StimulusError", "read_manifest"]


class StimulusError(ValueError):
    """A stimulus manifest or one of its images is invalid."""


def _preview(items: list[str], n: int = 5) -> str:
    head = ", ".join(repr(s) for s in items[:n])
    return f"[{head}{', ...' if len(items) > n else ''}] ({len(items)} in all)"


def read_manifest(path: str | os.PathLike, *, verify_images: bool = False) -> pd.DataFrame:
    """Read and validate a stimulus manifest; returns its rows in file order.

    Checks: the three columns exist; ids are unique and non-empty; captions are non-empty (after
    stripping whitespace); every image file exists. With ``verify_images`` each image header is
    also opened with PIL (a quick decodability check). Errors name the file, the rows (1-based
    line numbers, header = line 1) and the stimulus ids.
    """
    path = Path(path)
    if not path.is_file():
        raise StimulusError(f"{path}: stimulus manifest not found")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise StimulusError(f"{path}: cannot parse as a tab-separated manifest ({err})") from err
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise StimulusError(
            f"{path}: missing column(s) {missing}; a manifest needs {list(COLUMNS)}, "
            f"found {list(df.columns)}"
        )
    if len(df) == 0:
        raise StimulusError(f"{path}: the manifest has no stimuli")
    df = df.copy()
    for col in COLUMNS:
        df[col] = df[col].astype(str)
    lines = df.index + 2  # header is line 1

    empty_id = df["stimulus_id"].str.strip() == ""
    if empty_id.any():
        raise StimulusError(f"{path}: empty stimulus_id on line(s) {list(lines[empty_id])[:10]}")
    dup = df["stimulus_id"].duplicated(keep=False)
    if dup.any():
        ids = sorted(set(df.loc[dup, "stimulus_id"]))
        raise StimulusError(
            f"{path}: duplicate stimulus ids {_preview(ids)} on lines {list(lines[dup])[:10]}"
        )
    empty_cap = df["caption"].str.strip() == ""
    if empty_cap.any():
        raise StimulusError(
            f"{path}: empty caption on line(s) {list(lines[empty_cap])[:10]} "
            f"(stimulus ids {_preview(list(df.loc[empty_cap, 'stimulus_id']))})"
        )
    root = path.parent
    exists = df["image"].map(lambda p: p.strip() != "" and (root / p).is_file())
    if not exists.all():
        bad = ~exists
        raise StimulusError(
            f"{path}: image file(s) not found (relative to {root}) on line(s) "
            f"{list(lines[bad])[:10]}: stimulus ids {_preview(list(df.loc[bad, 'stimulus_id']))}, "
            f"images {_preview(list(df.loc[bad, 'image']))}"
        )
    if verify_images:
        for line, sid, img in zip(lines, df["stimulus_id"], df["image"], strict=True):
            try:
                with Image.open(root / img) as im:
                    im.verify()
            except Exception as err:
                raise StimulusError(
                    f"{path}: line {line}, stimulus {sid!r}: image {root / img} cannot be decoded ({err})"
                ) from err
    return df.reset_index(drop=True)


def load_rgb(path: str | os.PathLike, stimulus_id: str = "?") -> Image.Image:
    """Decode one image as RGB, logging any conversion (CMYK, grayscale, palette, RGBA, ...)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                log.info("stimulus %r: converting %s image %s to RGB", stimulus_id, im.mode, path)
                return im.convert("RGB")
            return im.copy()
    except (OSError, SyntaxError, ValueError) as err:
        raise StimulusError(
            f"stimulus {stimulus_id!r}: cannot decode image {path} ({err})"
        ) from err


class ImageDataset:
    """Map-style dataset over a manifest's images: item ``i`` is ``(transform(rgb_image), i)``.

    ``root`` is the folder the manifest's ``image`` paths are relative to (the manifest's folder).
    Use with ``torch.utils.data.DataLoader(..., num_workers=N)`` so decoding runs in workers.
    """

    def __init__(
        self,
        manifest_df: pd.DataFrame,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
    ):
        self.root = Path(root)
        self.ids = [str(s) for s in manifest_df["stimulus_id"]]
        self.images = [str(s) for s in manifest_df["image"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = load_rgb(self.root / self.images[i], self.ids[i])
        return (self.transform(img) if self.transform is not None else img), i
