"""The stimulus manifest (``stimulus_id``, ``image``, ``caption``) and image decoding.

The manifest is a TSV next to its images: ``image`` paths are relative to the manifest's folder.
:func:`read_manifest` validates it; :class:`ImageDataset` decodes images for a DataLoader
(workers keep the GPU fed), converting any non-RGB mode to RGB and reducing huge images (both
logged, never rejected).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

log = logging.getLogger(__name__)

COLUMNS = ("stimulus_id", "image", "caption")
#: Images with a longer side are reduced (by an integer factor, box filter) before the model's
#: own preprocessing, which resizes to a few hundred pixels anyway; logged per stimulus.
MAX_SIDE = 4096
#: Images up to this many pixels are decoded even though PIL would call them a decompression bomb.
MAX_PIXELS = 1 << 30
_FIX_IMAGE = "replace the image file, or remove the stimulus from the manifest"
_PIL_LIMIT = threading.Lock()

__all__ = ["COLUMNS", "MAX_SIDE", "ImageDataset", "StimulusError", "load_rgb", "read_manifest"]


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
    _check_utf8(path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise StimulusError(
            f"{path}: cannot parse as a tab-separated manifest ({err}); it needs a header line "
            f"{'<TAB>'.join(COLUMNS)} and one tab-separated line per stimulus"
        ) from err
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
        # a full decode: a truncated JPEG passes PIL's header-only verify()
        bad_images = []
        for line, sid, img in zip(lines, df["stimulus_id"], df["image"], strict=True):
            try:
                load_rgb(root / img, sid, log_conversions=False)
            except StimulusError as err:
                bad_images.append((line, sid, root / img, err.__cause__ or err))
        if bad_images:
            line, sid, img, err = bad_images[0]
            raise StimulusError(
                f"{path}: {len(bad_images)} image(s) cannot be decoded, stimulus ids "
                f"{_preview([b[1] for b in bad_images])}; first: line {line}, stimulus {sid!r}: "
                f"image {img} ({err}); {_FIX_IMAGE}"
            )
    return df.reset_index(drop=True)


def _check_utf8(path: Path) -> None:
    """Raise a StimulusError naming the line (and stimulus id) of the first non-UTF-8 byte."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        start = data.rfind(b"\n", 0, err.start) + 1
        end = data.find(b"\n", err.start)
        text = data[start : end if end >= 0 else len(data)].decode("utf-8", errors="replace")
        sid = text.split("\t", 1)[0] if line_no > 1 else None
        raise StimulusError(
            f"{path}: line {line_no}"
            + (f" (stimulus {sid!r})" if sid else "")
            + f" is not valid UTF-8 (byte {data[err.start]:#04x} at offset {err.start}); "
            "save the manifest as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from err


def _open_image(path: str | os.PathLike, stimulus_id: str) -> Image.Image:
    """``Image.open`` that accepts huge images (up to MAX_PIXELS) instead of calling them bombs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            pass
        with _PIL_LIMIT:
            old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_PIXELS
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = old
    log.info(
        "stimulus %r: image %s has %d x %d pixels, more than PIL's decompression-bomb limit; "
        "decoding it anyway",
        stimulus_id,
        path,
        *im.size,
    )
    return im


def load_rgb(
    path: str | os.PathLike, stimulus_id: str = "?", *, log_conversions: bool = True
) -> Image.Image:
    """Decode one image as RGB, logging any conversion (CMYK, grayscale, palette, RGBA, ...).

    Images with a side longer than :data:`MAX_SIDE` are reduced by an integer factor (JPEGs are
    decoded at reduced scale) so that the longer side is at most ``MAX_SIDE``; that is logged.
    An image that cannot be decoded (missing, truncated, not an image) is a
    :class:`StimulusError` naming the stimulus and the file.
    """
    info = log.info if log_conversions else log.debug
    try:
        with _open_image(path, stimulus_id) as im:
            w, h = im.size
            factor = -(-max(w, h) // MAX_SIDE)  # ceil
            if factor > 1:
                im.draft("RGB", (w // factor, h // factor))  # JPEG: decode at reduced scale
            im.load()
            out: Image.Image = im
            if max(out.size) > MAX_SIDE:
                out = out.reduce(-(-max(out.size) // MAX_SIDE))
            if out.size != (w, h):
                info(
                    "stimulus %r: huge image %s (%d x %d) reduced to %d x %d before preprocessing",
                    stimulus_id, path, w, h, *out.size,
                )  # fmt: skip
            if out.mode != "RGB":
                info("stimulus %r: converting %s image %s to RGB", stimulus_id, out.mode, path)
                return out.convert("RGB")
            return out.copy() if out is im else out
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise StimulusError(
            f"stimulus {stimulus_id!r}: cannot decode image {path} ({err}); {_FIX_IMAGE}"
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
