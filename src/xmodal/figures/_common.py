"""Shared pieces of every figure: the style, the palette, model labels/order, table helpers."""

from __future__ import annotations

import contextlib
import math
import re
import textwrap
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import blended_transform_factory

from xmodal.io import read_table
from xmodal.summary import STABILITY_THRESHOLD

from ._names import DEFAULT_METRIC, metric_label

#: Text properties for words that come from the data (captions, manifest column names): never
#: mathtext, so "a $5 and a $10 bill" is drawn as written and a stray "$\frac{$" cannot stop
#: the figure job (matplotlib reads text between two unescaped "$" as mathtext).
PLAIN_TEXT: dict[str, bool] = {"parse_math": False}

# One palette for the whole report. Low-dispersion stimuli (and "drop high", which keeps them)
# are blue; high-dispersion stimuli (and "drop low") warm; the random baseline and the full set
# grey. Colour-blind safe (seaborn "colorblind").
COLORS: dict[str, str] = {
    "low": "#0173b2",
    "high": "#d55e00",
    "random": "#8c8c8c",
    "full": "#555555",
    "drop_high": "#0173b2",
    "drop_low": "#de8f05",
    "random_drop": "#b0b0b0",
    "heldout": "#029e73",
    "fit": "#c0392b",
    "point": "#4a4a4a",
}

CONDITION_LABELS: dict[str, str] = {
    "low": "Low dispersion",
    "high": "High dispersion",
    "random": "Random",
    "full": "Full set",
    "drop_high": "Drop high-dispersion",
    "drop_low": "Drop low-dispersion",
    "random_drop": "Random, drop-set size",
}

SUMMARY_LABELS: dict[str, str] = {
    "mean": "rank of mean dispersion",
    "pc1": "PC1 of dispersion",
}
# what a summary's scores are, for axis labels and titles
SUMMARY_TITLES: dict[str, str] = {"mean": "mean dispersion", "pc1": "PC1 score of dispersion"}

# Marks of the values the data do not decide (docs/method.md, "Stability"): hatched bars, a
# dagger in heatmap cells, open markers on lines and forest plots. Values that are not numbers
# (degenerate layers, undefined draws) are never drawn as numbers: a cross, or "n/a" in a cell.
UNSTABLE_HATCH = "////"
DAGGER = "†"
UNDEFINED_TEXT = "n/a"
UNSTABLE_NOTE = (
    f"stability > {STABILITY_THRESHOLD:g}: nearest-neighbour sets decided by rounding or ties"
)
UNDEFINED_NOTE = "undefined value (not a number): not drawn"


def alignment_label(metric: str) -> str:
    """The y-axis label of an alignment value: 'Vision–language alignment (CKNNA)'."""
    return f"Vision–language alignment ({metric_label(metric)})"


#: The CKNNA axis label (figures drawn for CKNNA only: figures/extensions.py).
ALIGNMENT_LABEL = alignment_label(DEFAULT_METRIC)


LLM_AXIS_LABEL = "Language model"
FAMILY_PALETTES = ["Blues", "Oranges", "Greens", "Purples", "Reds", "Greys", "YlOrBr", "RdPu"]


#: Fonts the figures fall back on for characters DejaVu Sans lacks (Chinese, Japanese, Korean,
#: Indic, Thai, ...), where installed: matplotlib takes each missing glyph from the first of
#: them that has it. None is shipped; a character no installed font has is drawn as an empty
#: box, and :func:`missing_glyphs_reported` says so once per figure.
FALLBACK_FONTS: tuple[str, ...] = (
    "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR",
    "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback",
    "Noto Sans Devanagari", "Noto Sans Bengali", "Noto Sans Tamil", "Noto Sans Telugu",
    "Noto Sans Thai", "Noto Sans Arabic", "Noto Sans Hebrew", "Noto Sans Symbols2",
    "Hiragino Sans", "PingFang SC", "Apple SD Gothic Neo", "Microsoft YaHei", "Malgun Gothic",
    "Nirmala UI", "Arial Unicode MS",
)  # fmt: skip
#: A glyph warning of matplotlib's text drawing ("Glyph 21271 (…) missing from font(s) …").
_GLYPH_WARNING = re.compile(r"Glyph (\d+) .*missing from (current )?font")


def installed_fallbacks() -> list[str]:
    """The :data:`FALLBACK_FONTS` that matplotlib's font manager finds on this machine."""
    from matplotlib import font_manager

    have = {f.name for f in font_manager.fontManager.ttflist}
    return [name for name in FALLBACK_FONTS if name in have]


@contextlib.contextmanager
def missing_glyphs_reported(fig: Figure, what: str) -> Iterator[None]:
    """While ``fig`` is drawn, gather matplotlib's warnings of characters that no font has
    (one per character and file format) into one warning naming the characters, texts that
    hold them and the fonts to install; other warnings pass through unchanged."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:  # also when drawing fails: its other warnings are not lost
        _report_missing_glyphs(fig, what, caught)


def _report_missing_glyphs(fig: Figure, what: str, caught: list[warnings.WarningMessage]) -> None:
    """:func:`missing_glyphs_reported`'s one warning; the other warnings ``caught`` again."""
    missing: dict[str, None] = {}
    for w in caught:
        found = _GLYPH_WARNING.match(str(w.message))
        if found:
            missing[chr(int(found.group(1)))] = None
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if not missing:
        return
    texts = [
        t.get_text()
        for t in fig.findobj(Text)
        if t.get_visible() and any(c in t.get_text() for c in missing)
    ]
    shown = [repr(textwrap.shorten(" ".join(t.split()), 40, placeholder=" …")) for t in texts]
    fallbacks = installed_fallbacks()
    warnings.warn(
        f"{what}: {len(missing)} character(s) that no installed font has are drawn as empty "
        f"boxes ({''.join(list(missing)[:20])}{' …' if len(missing) > 20 else ''}) in "
        f"{len(texts)} text(s), e.g. {', '.join(shown[:3])}; install a font that has them "
        "(Noto Sans CJK for Chinese, Japanese and Korean, Noto Sans <script> for others): "
        f"the figures use the first of {list(FALLBACK_FONTS[:4])} … that is installed "
        f"({fallbacks or 'none is'})",
        stacklevel=3,
    )


def _rc() -> dict:
    """The rcParams of the single figure style (seaborn 'ticks' + 'paper', embedded fonts)."""
    rc: dict = {}
    rc.update(sns.axes_style("ticks"))
    rc.update(sns.plotting_context("paper", font_scale=1.0))
    rc.update(
        {
            "font.family": ["sans-serif", *installed_fallbacks()],
            "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
            "axes.titlesize": 9,
            "axes.titleweight": "bold",
            "axes.labelsize": 8.5,
            "xtick.labelsize": 7.5,
            "ytick.labelsize": 7.5,
            "legend.fontsize": 7.5,
            "legend.frameon": False,
            "figure.titlesize": 11,
            "figure.titleweight": "bold",
            "axes.spines.right": False,
            "axes.spines.top": False,
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "pdf.fonttype": 42,
            "ps.fonttype": 42,
            "svg.fonttype": "none",
            "image.interpolation": "antialiased",
        }
    )
    return rc


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """Context in which every figure is drawn: one style for the whole report."""
    with mpl.rc_context(_rc()):
        yield


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with an Agg canvas (no global state, safe in workers)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def panel_grid(fig: Figure, n: int, ncols: int, **kwargs) -> list[Axes]:
    """``n`` axes on a grid of ``ncols`` columns; unused cells are removed."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs).ravel()
    for ax in axes[n:]:
        ax.remove()
    return list(axes[:n])


def panel_letter(i: int, start: str = "A") -> str:
    """Panel letter ``start``, ``start+1``, ... (wraps to AA etc. past Z)."""
    k = ord(start) - ord("A") + i
    return chr(ord("A") + k) if k < 26 else f"{chr(ord('A') + k // 26 - 1)}{chr(ord('A') + k % 26)}"


#: a ``$`` that no backslash escapes (matplotlib.cbook.is_math_text counts these)
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def literal(text: str) -> str:
    """``text`` as matplotlib draws it with math parsing on: every ``$`` escaped, so that
    user text (a manifest column's name) can be joined to model labels, which may be math."""
    return str(text).replace("$", r"\$")


@dataclass(frozen=True)
class Models:
    """Model metadata from ``models.tsv``: labels, families, sizes and the display order.

    Keys absent from the table keep their raw key as label and sort after the known ones.
    """

    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    @classmethod
    def from_table(cls, df: pd.DataFrame | None) -> Models:
        """Index the table by ``model``; a missing table gives raw keys everywhere."""
        if df is None or df.empty or "model" not in df.columns:
            return cls(pd.DataFrame(columns=["modality", "label", "family", "size_b", "order"]))
        t = df.copy()
        t["model"] = t["model"].astype(str)
        return cls(t.drop_duplicates("model").set_index("model"))

    def _get(self, key: str, col: str):
        if key in self.table.index and col in self.table.columns:
            v = self.table.at[key, col]
            if not (isinstance(v, float) and math.isnan(v)):
                return v
        return None

    def label(self, key: str) -> str:
        """Readable label (the raw key only when models.tsv has none), as matplotlib draws it.

        A label with an odd number of unescaped ``$`` is plain text to matplotlib, and its
        ``$`` are escaped here, so that a text joining it to another such label (the pair
        ticks ``CLIP $5 × BLOOM $10``) is not read as math: that one lost both ``$`` and set
        the text between them in math italics, and ``$\\frac{`` with another ``$`` stopped
        the figure job (audit). Math labels (an even number, ``$\\alpha$-CLIP``) are kept.
        """
        v = self._get(str(key), "label")
        text = str(v) if v is not None and str(v) != "" else str(key)
        if len(_UNESCAPED_DOLLAR.findall(text)) % 2:
            text = _UNESCAPED_DOLLAR.sub(r"\\$", text)
        return text

    def labels(self, keys: Iterable[str]) -> list[str]:
        """Labels of several keys."""
        return [self.label(k) for k in keys]

    def family(self, key: str) -> str:
        """Model family ('' when unknown)."""
        v = self._get(str(key), "family")
        return str(v) if v is not None else ""

    def size(self, key: str) -> float:
        """Parameters in billions (NaN when unknown)."""
        v = self._get(str(key), "size_b")
        return float(v) if v is not None else float("nan")

    def order(self, keys: Iterable[str]) -> list[str]:
        """``keys`` (deduplicated) in display order: the ``order`` column, else family then size."""
        keys = list(dict.fromkeys(str(k) for k in keys))
        fam_rank: dict[str, int] = {}
        if "family" in self.table.columns:
            for f in self.table["family"].astype(str):
                fam_rank.setdefault(f, len(fam_rank))

        def sort_key(k: str) -> tuple:
            known = k in self.table.index
            o = self._get(k, "order")
            o = float(o) if o is not None else math.inf
            fam = fam_rank.get(self.family(k), len(fam_rank))
            size = self.size(k)
            return (not known, o, fam, math.inf if math.isnan(size) else size, k)

        return sorted(keys, key=sort_key)

    def colors(self, keys: Sequence[str]) -> dict[str, tuple]:
        """One colour per model: a sequential palette per family, darker = larger; beyond the
        :data:`FAMILY_PALETTES`, families get light-to-dark palettes of further hues (before,
        the ninth family's colours were the first's, so two models shared a colour)."""
        out: dict[str, tuple] = {}
        by_family: dict[str, list[str]] = {}
        for k in keys:
            by_family.setdefault(self.family(k), []).append(k)
        extra = max(0, len(by_family) - len(FAMILY_PALETTES))
        hues = sns.color_palette("husl", extra) if extra else []
        for i, (_, members) in enumerate(by_family.items()):
            if i < len(FAMILY_PALETTES):
                pal = sns.color_palette(FAMILY_PALETTES[i], len(members) + 2)
            else:
                pal = sns.light_palette(hues[i - len(FAMILY_PALETTES)], len(members) + 2)
            for j, k in enumerate(members):
                out[k] = pal[j + 2]
        return out


def metric_rows(df: pd.DataFrame, metric: str, table: str) -> pd.DataFrame:
    """Rows of one alignment metric (docs/contracts.md: every alignment table has ``metric``).

    A table without the column predates the other metrics and holds CKNNA. A metric the table
    does not hold is an error naming the table and the metrics it has (never another metric's
    rows drawn under this one's name).
    """
    if "metric" not in df.columns:
        if metric == DEFAULT_METRIC:
            return df
        raise ValueError(
            f"{table} table has no 'metric' column (CKNNA only): cannot draw metric {metric!r}; "
            "rerun the alignment rules"
        )
    rows = df[df["metric"].astype(str) == metric]
    if rows.empty:
        held = sorted(set(df["metric"].astype(str)))
        raise ValueError(
            f"{table} table holds no rows of metric {metric!r} (it has {held}); the figure's "
            "metric must be one of analysis.metrics in the config the tables were made with"
        )
    return rows


def interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and central ``level`` percentile interval of draws (degenerate for one draw).

    Any non-finite draw makes all three NaN: an undefined draw is never dropped as if the
    others were the whole baseline (docs/method.md, "Degenerate layers").
    """
    v = np.asarray(list(values), dtype=float)
    if v.size == 0 or not np.isfinite(v).all():
        return (math.nan, math.nan, math.nan)
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(v, [a, 100 - a])
    return (float(v.mean()), float(lo), float(hi))


def family_axis(ax: Axes, keys: Sequence[str], models: Models, rotate: float = 55) -> None:
    """LLM x axis: readable labels, thin separators between families, family names on top."""
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(models.labels(keys), rotation=rotate, ha="right" if rotate else "center")
    ax.set_xlim(-0.6, len(keys) - 0.4)
    fams = [models.family(k) for k in keys]
    if len(set(fams)) <= 1:
        return
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or fams[i] != fams[start]:
            if i < len(keys):
                ax.axvline(i - 0.5, color="#cccccc", lw=0.6, zorder=0)
            ax.text(
                (start + i - 1) / 2,
                1.0,
                fams[start],
                transform=trans,
                ha="center",
                va="bottom",
                fontsize=6.5,
                color="#555555",
                style="italic",
            )
            start = i


def format_p(p: float) -> str:
    """'p < 0.001' or 'p = 0.012' (the paper's reporting)."""
    if p is None or not np.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def read_tsv(path: str | Path, name: str = "") -> pd.DataFrame:
    """Read one contract table: the stimulus manifest with its own reader (every column text, no
    image check: the gallery shows a placeholder for a missing image), the dispersion and sets
    tables with their checked readers, every other table with the pipeline's table reader
    (identifiers stay text: xmodal.io.read_table)."""
    if name == "manifest":
        from xmodal.stimuli import read_manifest

        return read_manifest(path, check_images=False)
    if name in ("dispersion", "language_dispersion"):
        from xmodal.dispersion import read_dispersion_table

        return read_dispersion_table(path)
    if name == "sets":
        from xmodal.selection import read_sets

        return read_sets(path)
    return read_table(path)


def pc1_caveat(
    dispersion: pd.DataFrame | None,
    side: str = "",
    consequence: str = "low and high may be swapped",
) -> str | None:
    """A warning for figures of PC1 sets when PC1 does not follow the mean dispersion
    (:func:`xmodal.dispersion.pc1_orientation`): its sign, and so which set is low, is noise.
    ``side`` ("language", "vision") names whose dispersion it is; ``consequence`` says what the
    noise sign does to the panel."""
    from xmodal.dispersion import pc1_orientation

    if dispersion is None:
        return None
    r, oriented = pc1_orientation(dispersion)
    if oriented:
        return None
    whose = f"{side} " if side else ""
    return (
        f"{whose.capitalize()}PC1 hardly follows the {whose}mean dispersion (r = {r:.3f}): "
        f"{consequence}"
    )


def pc1_title_note(data: FigureData, summary: str, width: int | None = None) -> str:
    """The :func:`pc1_caveat` as a title's next lines (wrapped at ``width`` characters), for a
    panel or figure of sets chosen by ``summary`` (empty unless it is ``pc1`` and PC1 does not
    follow the mean dispersion)."""
    caveat = pc1_caveat(data.get("dispersion")) if summary == "pc1" else None
    if not caveat:
        return ""
    return "\n" + (textwrap.fill(caveat, width) if width else caveat)


@dataclass(frozen=True)
class FigureData:
    """What a drawing function gets: the tables it asked for, their paths and model metadata."""

    tables: dict[str, pd.DataFrame]
    paths: dict[str, Path]
    models: Models
    metric: str = DEFAULT_METRIC

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    def alignment(self, name: str) -> pd.DataFrame:
        """The rows of alignment table ``name`` (layers, grid, contrasts, summary) that hold
        this figure's metric; an error names the file when it has none."""
        return metric_rows(self.tables[name], self.metric, str(self.paths.get(name, name)))

    def get(self, name: str) -> pd.DataFrame | None:
        """A table, or None when it was not given."""
        return self.tables.get(name)
