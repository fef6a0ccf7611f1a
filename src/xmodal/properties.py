"""What makes a stimulus dispersed: per-stimulus properties that need no extra model.

Exact definitions (docs/method.md, "Stimulus properties"), each on the image as
:func:`xmodal.stimuli.load_rgb` decodes it (8-bit RGB) unless said otherwise:

- ``caption_words``: words in the caption, a word being a maximal run of letters, digits or
  underscores and their combining marks, with apostrophes inside it (``don't``) joined, and
  each Han ideograph or Hiragana character one word (UAX #29): regex :data:`WORD`;
- ``caption_tokens`` (one value per LLM, column ``model``): the tokens the LLM's features are
  the mean over (its tokenizer, special tokens included, after truncation), as recorded in its
  feature file (``n_tokens``);
- ``image_pixels``: width · height as stored; ``aspect_ratio``: width / height as stored;
- ``bytes_per_pixel``: file size in bytes / (width · height);
- ``colourfulness`` (Hasler & Süsstrunk 2003): rg = R − G, yb = (R + G)/2 − B over all pixels,
  M = sqrt(σ_rg² + σ_yb²) + 0.3 · sqrt(μ_rg² + μ_yb²) (population SDs; 0..255 scale);
- ``edge_density``: the grey image (Pillow "L": ITU-R 601-2 luma, 0..1) resized (bilinear, with
  antialiasing) so that its shorter side is :data:`EDGE_SIDE` px; Sobel gradients (scipy.ndimage,
  mirrored border) g = sqrt(Sx² + Sy²) / 4 (1 at a step from black to white); the fraction of
  pixels with g > :data:`EDGE_THRESHOLD`;
- ``entropy``: Shannon entropy in bits of the 256-bin histogram of the grey image (full size);
- ``manifest:<column>``: the researcher's own per-stimulus annotations, every extra column of
  the manifest whose fields are all numbers (:data:`NUMBER`) or empty (:func:`annotations`).

``run_*`` functions are pipeline steps (files in, files out, written atomically).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import regex
from PIL import Image

from xmodal.config import ConfigError
from xmodal.logs import Progress, preview

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

__all__ = [
    "ANNOTATION_PREFIX",
    "CORRELATION_COLUMNS",
    "EDGE_SIDE",
    "EDGE_THRESHOLD",
    "IMAGE_PROPERTIES",
    "NOT_ANNOTATIONS",
    "NUMBER",
    "NUMBER_LIKE",
    "PROPERTIES",
    "PROPERTY_COLUMNS",
    "WORD",
    "annotations",
    "caption_words",
    "check_annotations",
    "colourfulness",
    "edge_density",
    "grey_entropy",
    "image_properties",
    "property_correlations",
    "stimulus_properties",
]

#: A word (Unicode's default word boundaries, UAX #29, as far as a regex goes): one Han
#: ideograph or Hiragana character (Chinese and Japanese put no spaces between words), or a
#: letter, digit or underscore followed by more of them and by combining marks (the vowel signs
#: of Devanagari or Tamil belong to their word; a variation selector or zero-width joiner
#: between emoji is no word), inner apostrophes (straight or typographic) joined. ``regex``
#: module (version 1 set syntax), for Unicode categories and scripts.
_IDEOGRAPH = r"[\p{Han}\p{Hiragana}]"
_WORD_START = rf"[[\p{{L}}\p{{N}}_]--{_IDEOGRAPH}]"  # a letter, digit or _, not an ideograph
_WORD_BODY = rf"[[\p{{L}}\p{{N}}\p{{M}}_]--{_IDEOGRAPH}]"  # and the combining marks after it
WORD = regex.compile(
    rf"{_IDEOGRAPH}|{_WORD_START}{_WORD_BODY}*(?:['’]{_WORD_START}{_WORD_BODY}*)*", regex.V1
)
#: Shorter side of the grey image on which edges are counted (as the ViTs' 224 px input).
EDGE_SIDE = 224
#: Normalised Sobel magnitude above which a pixel is an edge (a step of 10% of the grey range).
EDGE_THRESHOLD = 0.1
#: g > t in integers: Sx² + Sy² > (1020 t)² on the grey levels, with t read as the decimal it
#: is written as (:func:`edge_density`)
_EDGE_LIMIT = (1020 * Fraction(str(EDGE_THRESHOLD))) ** 2

#: Every property, in display order, with its label.
PROPERTIES: dict[str, str] = {
    "caption_words": "caption length (words)",
    "caption_tokens": "caption length (tokens)",
    "image_pixels": "image size (pixels)",
    "aspect_ratio": "aspect ratio (width / height)",
    "bytes_per_pixel": "compressed bytes per pixel",
    "colourfulness": "colourfulness (Hasler & Süsstrunk)",
    "edge_density": "edge density",
    "entropy": "grey-level entropy (bits)",
}
#: Properties computed from the image file.
IMAGE_PROPERTIES = (
    "image_pixels",
    "aspect_ratio",
    "bytes_per_pixel",
    "colourfulness",
    "edge_density",
    "entropy",
)
#: A manifest column's property is named ``manifest:<column>`` (never one of the above).
ANNOTATION_PREFIX = "manifest:"
#: A number as an annotation field writes it: optional sign, digits with an optional decimal
#: point ('.'), optional exponent (``3``, ``-0.25``, ``.5``, ``2.``, ``1e-3``), spaces around.
#: Not ``nan``, ``inf``, ``0x1f``, ``1_000`` or a decimal comma: unknown values are left empty.
NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
#: A number written in a form :data:`NUMBER` does not read: a decimal comma (``0,87``), digit
#: groups (``1,000``, ``1 000``), a typographic minus (``−0.5``), a currency sign (``$5``) or a
#: unit after it (``87%``, ``12 px``, ``3.5s``, ``12 pixels``); group ``unit`` holds what follows
#: the digits.
#: A file name (``001.jpg``) or a code with a letter before the digits (``img_001``) is none.
NUMBER_LIKE = re.compile(
    r"\s*[$€£¥]?\s*[+\-−]?\s*[$€£¥]?\s*\d(?:[\d.,'’ \u00a0\u202f]*\d)?"
    r"(?:[eE][+\-−]?\d+)?\s*(?P<unit>%|‰|°\s*[CF]?|[^\W\d_]{1,16})?\s*"
)
PROPERTY_COLUMNS = ["stimulus_id", "property", "model", "value"]
CORRELATION_COLUMNS = [
    "property",
    "model",
    "summary",
    "spearman_rho",
    "ci_low",
    "ci_high",
    "p_value",
    "n",
    "n_boot",
    "reason",
]


# ---------------------------------------------------------------- one stimulus


def caption_words(caption: str) -> int:
    """Number of words (:data:`WORD` matches) in a caption."""
    return len(WORD.findall(caption))


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {a.shape}")
    return a


def colourfulness(image: Image.Image | np.ndarray) -> float:
    """Hasler & Süsstrunk (2003): sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²), 0..255 scale."""
    a = _rgb_array(image).astype(np.float64)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _grey(image: Image.Image | np.ndarray) -> Image.Image:
    """Pillow's "L" conversion (L = R·299/1000 + G·587/1000 + B·114/1000)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_rgb_array(image).astype(np.uint8), "RGB")
    return image.convert("RGB").convert("L")


def edge_density(image: Image.Image | np.ndarray) -> float:
    """Fraction of pixels whose normalised Sobel magnitude exceeds :data:`EDGE_THRESHOLD`,
    on the grey image resized to a shorter side of :data:`EDGE_SIDE` px."""
    from scipy import ndimage

    grey = _grey(image)
    w, h = grey.size
    scale = EDGE_SIDE / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    # in integers: g = √(Sx² + Sy²)/(4·255) > t  ⇔  Sx² + Sy² > (1020 t)², with t read as the
    # decimal it is written as (in floats a pixel at g = 0.1 exactly came out above it or not,
    # by the grey levels around it)
    x = np.asarray(grey, dtype=np.int64)
    sx = ndimage.sobel(x, axis=1, mode="reflect")
    sy = ndimage.sobel(x, axis=0, mode="reflect")
    return float(np.mean((sx * sx + sy * sy) * _EDGE_LIMIT.denominator > _EDGE_LIMIT.numerator))


def grey_entropy(image: Image.Image | np.ndarray) -> float:
    """Shannon entropy (bits) of the 256-bin histogram of the grey image: −Σ p log₂ p."""
    counts = np.bincount(np.asarray(_grey(image)).reshape(-1), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(max(0.0, -(p * np.log2(p)).sum()))


# ---------------------------------------------------------------- tables


def _one_image(path: Path, stimulus_id: str, width: int, height: int) -> dict[str, float]:
    from xmodal.stimuli import load_rgb

    rgb = load_rgb(path, stimulus_id, log_conversions=False)
    pixels = int(width) * int(height)
    return {
        "image_pixels": float(pixels),
        "aspect_ratio": int(width) / int(height),
        "bytes_per_pixel": path.stat().st_size / pixels,
        "colourfulness": colourfulness(rgb),
        "edge_density": edge_density(rgb),
        "entropy": grey_entropy(rgb),
    }


def image_properties(
    manifest: pd.DataFrame,
    root: PathLike,
    images: pd.DataFrame | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """The image properties of every stimulus, long (:data:`PROPERTY_COLUMNS`, ``model`` empty).

    ``images``: the :func:`xmodal.stimuli.scan_images` table of the manifest (its ``width`` and
    ``height`` are the sizes as stored); scanned here when None. ``workers`` threads decode.
    """
    from xmodal.stimuli import scan_images

    root = Path(root)
    ids = [str(s) for s in manifest["stimulus_id"]]
    if images is None:
        images = scan_images(manifest, root, workers=workers)
    sizes = images.assign(stimulus_id=images["stimulus_id"].astype(str)).set_index("stimulus_id")
    missing = [s for s in ids if s not in sizes.index]
    if missing:
        raise ValueError(
            f"the image table lacks stimuli {missing[:5]} ({len(missing)} in all); it was made "
            "from another manifest: rerun the stimuli report (rule stimuli_report)"
        )
    jobs = [
        (root / str(img), sid, int(sizes.at[sid, "width"]), int(sizes.at[sid, "height"]))
        for sid, img in zip(ids, manifest["image"], strict=True)
    ]
    progress = Progress(log, "image properties", len(jobs))

    def one(job: tuple[Path, str, int, int]) -> dict[str, float]:
        try:
            return _one_image(*job)
        finally:
            progress.step()

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        values = list(pool.map(one, jobs))
    rows = [
        (sid, prop, "", v[prop])
        for sid, v in zip(ids, values, strict=True)
        for prop in IMAGE_PROPERTIES
    ]
    return pd.DataFrame(rows, columns=PROPERTY_COLUMNS)


def _number(field: str) -> float | None:
    """The finite number a manifest field writes (:data:`NUMBER`), else None."""
    if NUMBER.fullmatch(field):
        x = float(field)
        if math.isfinite(x):  # 1e999 overflows
            return x
    return None


#: Fields that spreadsheets, R and pandas write for a missing value (compared stripped and in
#: lower case): a column of numbers in another form with some of these is still a measure.
MISSING_MARKERS = frozenset(
    {"na", "n/a", "#n/a", "nan", "none", "null", "-", "–", "—", "?", ".", "missing"}
)


def _numbers_in_another_form(fields: Sequence[str]) -> bool:
    """Whether every filled field of a column without plain numbers writes a number in one of
    the forms of :data:`NUMBER_LIKE`, all with the same unit (``87%``, ``12%``; ``1 pixel``,
    ``12 pixels``; not the codes ``12A``, ``13B``), or says that the value is missing (:data:`MISSING_MARKERS`; at least one
    number): a measure the reader would lose, not a category (``0,87`` and ``NA`` were taken
    for a category and left out with an info line only, audit)."""
    filled = [f for f in fields if f.strip() and f.strip().lower() not in MISSING_MARKERS]
    matches = [NUMBER_LIKE.fullmatch(f) for f in filled]
    if not matches or not all(matches):
        return False
    return len({_unit(m["unit"]) for m in matches if m}) == 1


def _unit(text: str | None) -> str:
    """A unit as written after a number, without spaces, case or a plural's ``s`` (``pixels``
    and ``Pixel`` are one unit; ``ms`` and ``s`` are two)."""
    unit = (text or "").replace(" ", "").lower()
    return unit[:-1] if len(unit) > 2 and unit.endswith("s") else unit


#: Fewest stimuli for which a column rising by whole numbers is taken for ids (:func:`annotations`).
MIN_ROW_NUMBERS = 10


def _row_numbers(values: np.ndarray) -> bool:
    """Whether a column is whole numbers rising down the manifest for at least
    :data:`MIN_ROW_NUMBERS` stimuli, every one filled: an id or row number, not a measure."""
    return (
        values.size >= MIN_ROW_NUMBERS
        and bool(np.all(np.isfinite(values)))
        and bool(np.all(values == np.round(values)))
        and bool(np.all(np.diff(values) > 0))
    )


#: Manifest columns that are never annotations.
NOT_ANNOTATIONS = ("stimulus_id", "image", "caption")


def annotations(
    manifest: pd.DataFrame, columns: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The manifest's numeric annotation columns as floats (NaN for empty fields).

    ``columns`` None: every column other than :data:`NOT_ANNOTATIONS` whose non-empty fields
    are all finite numbers (:data:`NUMBER`), in column order. A column of numbers and other
    text (``n/a``, ``nan``), or of numbers in a form not read (:data:`NUMBER_LIKE`: ``0,87``,
    ``87%``), is left out with a warning naming it, such fields and their stimuli; a column of
    text only (a category) or of empty fields only with an info line. A column that looks like
    ids (whole numbers rising down the manifest) is kept, with a warning. ``columns`` a list
    (config ``analysis.annotations``): exactly those, in that order; a column that is missing,
    is one of :data:`NOT_ANNOTATIONS`, or holds a field that is not a number is a ValueError
    naming it.
    """
    ids = [str(s) for s in manifest["stimulus_id"]]
    chosen = columns is not None
    if chosen:
        for c in columns:
            if c in NOT_ANNOTATIONS:
                raise ValueError(
                    f"{c!r} is not an annotation column ({', '.join(NOT_ANNOTATIONS)} are the "
                    "stimuli themselves)"
                )
            if c not in manifest.columns:
                raise ValueError(
                    f"no column {c!r} in the manifest (its annotation columns: "
                    f"{[c for c in manifest.columns if c not in NOT_ANNOTATIONS]})"
                )
    out: dict[str, np.ndarray] = {}
    for col in columns if chosen else manifest.columns:
        if col in NOT_ANNOTATIONS:
            continue
        fields = [str(v) for v in manifest[col]]
        values = [_number(v) if v.strip() else math.nan for v in fields]
        bad = [i for i, x in enumerate(values) if x is None]
        numbers = any(x is not None and math.isfinite(x) for x in values)
        if numbers and not bad:
            out[str(col)] = np.array(values, dtype=np.float64)
            if not chosen and _row_numbers(out[str(col)]):
                log.warning(
                    "manifest column %r holds a whole number for every stimulus, rising down "
                    "the manifest, like an id or a row number; it is analysed as a stimulus "
                    "property. To analyse only the columns that measure something, list them "
                    "in config key 'analysis.annotations'",
                    col,
                )
            continue
        written = _numbers_in_another_form([fields[i] for i in bad])
        if not numbers and not written and not chosen:  # text or empty only: a category
            log.info("manifest column %r holds no numbers: not a property", col)
            continue
        n_filled = sum(1 for v in fields if v.strip())
        if numbers:
            problem = (
                f"manifest column {col!r}: {len(bad)} of its {n_filled} filled fields are not "
                f"finite numbers, e.g. {preview(f'{ids[i]}: {fields[i]!r}' for i in bad)}"
            )
        elif written:
            problem = (
                f"manifest column {col!r} holds numbers in a form that is not read (a decimal "
                f"comma, digit groups, a typographic minus, a unit or a currency sign), e.g. "
                f"{preview(f'{ids[i]}: {fields[i]!r}' for i in bad)}"
            )
        else:
            problem = f"manifest column {col!r} holds no numbers"
        advice = (
            "write plain numbers, with '.' as the decimal mark and without units or digit "
            "groups, and leave unknown values empty"
        )
        if chosen:
            raise ValueError(f"{problem}; {advice}")
        log.warning("%s; the column is left out of the stimulus properties: %s", problem, advice)
    return out


def check_annotations(
    manifest: pd.DataFrame, columns: Sequence[str] | None, path: PathLike
) -> None:
    """ConfigError naming ``analysis.annotations`` and the manifest ``path`` when a chosen
    column is missing or not numbers only (:func:`annotations`); None chooses nothing to check."""
    if columns is None:
        return
    try:
        annotations(manifest, columns)
    except ValueError as err:
        raise ConfigError(
            f"config key 'analysis.annotations' ({list(columns)}), manifest {path}: {err}"
        ) from None


def stimulus_properties(
    manifest: pd.DataFrame,
    image_table: pd.DataFrame,
    token_counts: Mapping[str, np.ndarray | None],
    columns: Sequence[str] | None = None,
    supplied: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Every property of every stimulus, long (:data:`PROPERTY_COLUMNS`), properties in
    :data:`PROPERTIES` order and then the manifest's numeric annotation columns
    (:func:`annotations` of ``columns``) as ``manifest:<column>``, stimuli in manifest order.

    ``token_counts[llm]``: tokens per caption in manifest order, or None when the LLM's feature
    file does not record them (its rows are NaN and a warning says to re-extract it, or, for an
    LLM in ``supplied`` (its supplied file's path: ``models.<llm>.features``, never extracted),
    to add the counts to that file).
    """
    ids = [str(s) for s in manifest["stimulus_id"]]
    parts = [
        pd.DataFrame(
            {
                "stimulus_id": ids,
                "property": "caption_words",
                "model": "",
                "value": [float(caption_words(str(c))) for c in manifest["caption"]],
            }
        )
    ]
    supplied = dict(supplied or {})
    for llm, counts in token_counts.items():
        if counts is None:
            if llm in supplied:
                log.warning(
                    "%s: the feature file supplied for it, %s (config key models.%s.features), "
                    "records no token counts: caption_tokens is NaN for it. Add a dataset "
                    "n_tokens to that file, the tokens each caption's features are the mean "
                    "over (docs/contracts.md, 'Feature file')",
                    llm,
                    supplied[llm],
                    llm,
                )
            else:
                log.warning(
                    "%s: the feature file records no token counts (n_tokens; written by "
                    "extraction since this version): caption_tokens is NaN for it. Delete the "
                    "file and rerun to re-extract",
                    llm,
                )
            values = np.full(len(ids), np.nan)
        else:
            values = np.asarray(counts, dtype=np.float64)
            if values.shape != (len(ids),):
                raise ValueError(f"{llm}: {values.size} token counts for {len(ids)} stimuli")
        parts.append(
            pd.DataFrame(
                {"stimulus_id": ids, "property": "caption_tokens", "model": llm, "value": values}
            )
        )
    img = image_table.assign(stimulus_id=image_table["stimulus_id"].astype(str))
    if set(img["stimulus_id"]) != set(ids):
        raise ValueError(
            "the image property table and the manifest list different stimuli; rerun the image "
            "properties (rule image_properties)"
        )
    position = {s: i for i, s in enumerate(ids)}
    for prop in IMAGE_PROPERTIES:
        sub = img[img["property"] == prop]
        parts.append(sub.iloc[np.argsort(sub["stimulus_id"].map(position).to_numpy())])
    for col, values in annotations(manifest, columns).items():
        parts.append(
            pd.DataFrame(
                {
                    "stimulus_id": ids,
                    "property": ANNOTATION_PREFIX + col,
                    "model": "",
                    "value": values,
                }
            )
        )
    out = pd.concat(parts, ignore_index=True)[PROPERTY_COLUMNS]
    out["model"] = out["model"].fillna("").astype(str)
    return out


def property_correlations(
    properties: pd.DataFrame, dispersion: pd.DataFrame, n_boot: int, seed: int
) -> pd.DataFrame:
    """Spearman ρ of each property (per LLM for tokens) with mean dispersion and with the PC1
    score, with bootstrap percentile intervals (:data:`CORRELATION_COLUMNS`; ``reason`` says why
    a ρ is NaN, e.g. a property constant across stimuli)."""
    from xmodal.correlate import correlation_ci

    disp = dispersion.assign(stimulus_id=dispersion["stimulus_id"].astype(str)).set_index(
        "stimulus_id"
    )
    props = properties.assign(
        stimulus_id=properties["stimulus_id"].astype(str),
        model=properties["model"].fillna("").astype(str),
    )
    lacking = sorted(set(disp.index) - set(props["stimulus_id"]))
    if lacking:
        raise ValueError(
            f"stimuli with a dispersion value but no properties: {lacking[:5]} ({len(lacking)} "
            "in all); the tables come from different manifests (rerun the properties)"
        )
    extra = sorted(set(props["stimulus_id"]) - set(disp.index))
    if extra:  # e.g. duplicates dropped before extraction (stimuli.drop_duplicates)
        log.info(
            "%d stimuli have properties but no dispersion value (not in the feature files, e.g. "
            "dropped duplicates); they are left out: %s",
            len(extra),
            extra[:5],
        )
        props = props[props["stimulus_id"].isin(disp.index)]
    rows = []
    groups = props.groupby(["property", "model"], sort=False)
    progress = Progress(log, "correlations with dispersion (mean and PC1)", 2 * groups.ngroups)
    for (prop, model), group in groups:
        x = group["value"].to_numpy(dtype=np.float64)
        for summary, col in (("mean", "mean_dispersion"), ("pc1", "pc1_score")):
            y = disp.loc[group["stimulus_id"], col].to_numpy(dtype=np.float64)
            res = correlation_ci(
                x, y, method="spearman", n_boot=n_boot, seed=seed, names=("property", "dispersion")
            )
            reason = str(res["reason"])
            if model and np.isnan(x).all():
                reason = "no token counts in the feature file (see the properties log)"
            rows.append(
                {
                    "property": prop,
                    "model": model,
                    "summary": summary,
                    "spearman_rho": res["estimate"],
                    "ci_low": res["ci_low"],
                    "ci_high": res["ci_high"],
                    "p_value": res["p_value"],
                    "n": res["n"],
                    "n_boot": res["n_boot"],
                    "reason": reason,
                }
            )
            progress.step()
    return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)
