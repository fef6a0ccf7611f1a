"""Figures beyond the paper: language-side dispersion (with the 2 × 2 sets) and the stimulus
properties that go with dispersion (docs/method.md, "Language-side dispersion", "Stimulus
properties"). Drawn from the tables only."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from xmodal.properties import ANNOTATION_PREFIX, PROPERTIES
from xmodal.summary import flag_column, mean_stability, unstable

from ._common import (
    ALIGNMENT_LABEL,
    COLORS,
    SUMMARY_TITLES,
    UNSTABLE_NOTE,
    FigureData,
    Models,
    literal,
    new_figure,
    panel_grid,
    panel_letter,
    pc1_caveat,
)
from .alignment import _flag_handles, _hatch

#: Property labels, in display order (one place: xmodal.properties).
PROPERTY_LABELS = PROPERTIES
#: Scatter panels per row in the properties figure (the built-in properties fill one row).
SCATTER_COLUMNS = 7


def _has_ci(row: pd.Series | None) -> bool:
    """Whether a correlation row has a bootstrap interval (none with ``analysis.n_boot: 0``)."""
    return row is not None and bool(np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"]))


def _fmt_ci(row: pd.Series | None, estimate: str = "estimate") -> str:
    if row is None or not np.isfinite(row[estimate]):
        reason = "" if row is None else str(row.get("reason", "") or "")
        return f"n/a ({reason})" if reason else "n/a"
    text = f"{row[estimate]:.2f}"
    if _has_ci(row):
        text += f" [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
    return text


def _corr_row(corr: pd.DataFrame | None, summary: str, method: str) -> pd.Series | None:
    if corr is None or corr.empty:
        return None
    sel = corr[(corr["summary"] == summary) & (corr["method"] == method)]
    return sel.iloc[0] if len(sel) else None


# --------------------------------------------------------------------------- language dispersion
def _scatter_panel(
    ax: Axes,
    vision: pd.DataFrame,
    language: pd.DataFrame,
    col: str,
    corr: pd.DataFrame | None,
    summary: str,
) -> str:
    """Language against vision dispersion per stimulus; returns the correlations' lines for
    the panel's title (a box inside the axes hid the most dispersed captions, audit)."""
    both = vision.assign(stimulus_id=vision["stimulus_id"].astype(str)).merge(
        language.assign(stimulus_id=language["stimulus_id"].astype(str)),
        on="stimulus_id",
        suffixes=("_vision", "_language"),
    )
    x = both[f"{col}_vision"].to_numpy(float)
    y = both[f"{col}_language"].to_numpy(float)
    ax.scatter(x, y, s=6, color=COLORS["point"], alpha=0.5 if len(x) > 200 else 0.8, linewidth=0)
    ax.set_xlabel(f"Vision {SUMMARY_TITLES[summary]}")
    ax.set_ylabel(f"Language {SUMMARY_TITLES[summary]}")
    sp, pe = _corr_row(corr, summary, "spearman"), _corr_row(corr, summary, "pearson")
    n = int(sp["n"]) if sp is not None else len(x)
    ci = " (95% bootstrap CI)" if any(_has_ci(r) for r in (sp, pe)) else ""  # n_boot: 0
    return f"\nSpearman ρ = {_fmt_ci(sp)}\nPearson r = {_fmt_ci(pe)}, n = {n}{ci}"


#: How much a "language dispersion high" bar is lightened towards white (its fill is
#: (1 − w)·colour + w·white): a lighter fill, not hatching, which marks unstable values.
LIGHTEN = 0.55
RANDOM_BAND = "#cfcfcf"


def _lighter(color: str, w: float = LIGHTEN) -> tuple[float, float, float]:
    r, g, b = to_rgb(color)
    return (r + (1 - r) * w, g + (1 - g) * w, b + (1 - b) * w)


def _cells_panel(ax: Axes, cells: pd.DataFrame, summary: str) -> tuple[int | None, int, int, int]:
    """Bars: mean alignment over (vision, LLM) pairs per 2 × 2 set (language dispersion high:
    a lighter fill); dots: pairs; dashed line: the mean over pairs of each pair's random-set
    mean; band: from the mean over pairs of the lower ends to that of the upper ends of each
    pair's 95% interval of its size-matched random sets (an average of intervals, not a 95%
    interval of anything). A bar, band or dot whose stability (a bar's and the band's: the mean
    of the pairs' stabilities) exceeds the threshold is marked as in every figure (hatched bar
    or band, open dot); a bar whose pairs are not all numbers is a cross on the zero line.
    Marks have gids ``bar|``, ``undefined|``, ``point|``, ``unstable|<summary>|<cell>`` and
    ``random|<summary>``. Returns (set size or None, hatched bars and bands, open dots,
    undefined bars)."""
    sub = cells[cells["summary"] == summary] if cells is not None and len(cells) else None
    if sub is None or sub.empty:
        ax.text(0.5, 0.5, "no 2 × 2 sets", ha="center", va="center", transform=ax.transAxes)
        return None, 0, 0, 0
    rng = np.random.default_rng(0)
    width = 0.38
    n_hatched = n_open = n_undefined = 0
    for vi, v_level in enumerate(("low", "high")):
        for li, l_level in enumerate(("low", "high")):
            g = sub[(sub["vision_level"] == v_level) & (sub["language_level"] == l_level)]
            if g.empty:
                continue
            gid = f"{summary}|{g['cell'].iloc[0]}"
            vals = g["value"].to_numpy(float)
            x = vi + (li - 0.5) * width
            color = COLORS[v_level] if li == 0 else _lighter(COLORS[v_level])
            if not np.isfinite(vals).all():
                ax.plot(x, 0.0, marker="x", ms=6, mew=1.6, color="black", zorder=3,
                        clip_on=False, gid=f"undefined|{gid}")  # fmt: skip
                n_undefined += 1
            else:
                (bar,) = ax.bar(
                    x, float(vals.mean()), width * 0.92, color=color, linewidth=0,
                    label=f"vision {v_level}, language {l_level}",
                )  # fmt: skip
                bar.set_gid(f"bar|{gid}")
                stab = mean_stability(g["stability"]) if "stability" in g.columns else np.nan
                if unstable(pd.DataFrame({"stability": [stab]}))[0]:
                    _hatch(bar)
                    n_hatched += 1
            flags = unstable(g)
            jitter = x + rng.uniform(-0.08, 0.08, vals.size)
            for sel, face, what in ((~flags, "black", "point"), (flags, "white", "unstable")):
                sel = sel & np.isfinite(vals)
                if sel.any():
                    ax.scatter(jitter[sel], vals[sel], s=9 if what == "point" else 12,
                               facecolors=face, edgecolors="black", linewidths=0.6, zorder=3,
                               alpha=0.8, gid=f"{what}|{gid}")  # fmt: skip
            n_open += int((flags & np.isfinite(vals)).sum())
    rmean, lo, hi = (
        sub[c].to_numpy(float) for c in ("random_mean", "random_ci_low", "random_ci_high")
    )
    if rmean.size and np.isfinite(rmean).all() and np.isfinite(lo).all() and np.isfinite(hi).all():
        band = ax.axhspan(lo.mean(), hi.mean(), facecolor=RANDOM_BAND, lw=0, zorder=0)
        band.set_gid(f"random|{summary}")
        if "random_stability" in sub.columns:
            band_stab = pd.DataFrame({"stability": [mean_stability(sub["random_stability"])]})
            if unstable(band_stab)[0]:
                _hatch(band)
                n_hatched += 1
        ax.axhline(rmean.mean(), color=COLORS["random"], ls="--", lw=1.0, zorder=1)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["Low vision dispersion", "High vision dispersion"])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylabel(ALIGNMENT_LABEL)
    n = sub["n_stimuli"].dropna()
    return (int(n.iloc[0]) if len(n) else None), n_hatched, n_open, n_undefined


def draw_language_dispersion(data: FigureData) -> Figure:
    """Language vs vision dispersion (mean, PC1) and alignment on the 2 × 2 sets."""
    vision, language = data["dispersion"], data["language_dispersion"]
    corr, cells = data.get("language_correlation"), data.get("joint_cells")
    fig = new_figure(8.6, 6.8)
    axes = panel_grid(fig, 4, 2)
    # docs/method.md, "Dispersion": a PC1 that does not follow its mean has a sign set by noise,
    # and so have the PC1 correlation (B) and the PC1 sets (D)
    caveats = [pc1_caveat(vision, "vision"), pc1_caveat(language, "language")]
    pc1_note = "".join(f"\n{textwrap.fill(c, 50)}" for c in caveats if c)
    for ax, (letter, summary, col) in zip(
        axes[:2], (("A", "mean", "mean_dispersion"), ("B", "pc1", "pc1_score")), strict=True
    ):
        stats = _scatter_panel(ax, vision, language, col, corr, summary)
        what = "mean" if summary == "mean" else "PC1"
        note = pc1_note if summary == "pc1" else ""
        ax.set_title(f"{letter}   Language vs vision dispersion ({what}){note}{stats}", loc="left")
    n_pairs = n_tied = n_hatched = n_open = n_undefined = 0
    if cells is not None and len(cells):
        n_pairs = cells.groupby(["vision", "llm"]).ngroups
        # pairs whose LLM layer the layer search could not tell from another (layer_tied)
        tied = cells.loc[flag_column(cells, "layer_tied"), ["vision", "llm"]]
        n_tied = len(tied.drop_duplicates())
    for ax, (letter, summary) in zip(axes[2:], (("C", "mean"), ("D", "pc1")), strict=True):
        n, a, b, c = _cells_panel(ax, cells, summary)
        n_hatched, n_open, n_undefined = n_hatched + a, n_open + b, n_undefined + c
        size = f", n = {n} each" if n is not None else ""
        what = "mean dispersion" if summary == "mean" else "PC1 score"
        note = pc1_note if summary == "pc1" else ""
        ax.set_title(f"{letter}   2 × 2 sets by {what}{size}{note}", loc="left")
    handles = [
        Patch(facecolor="#777777", label="language dispersion low"),
        Patch(facecolor=_lighter("#777777"), label="language dispersion high (lighter)"),
        Line2D(
            [],
            [],
            color=COLORS["random"],
            ls="--",
            label="size-matched random sets: mean of the pairs' means",
        ),
        Patch(
            facecolor=RANDOM_BAND,
            label="size-matched random sets: mean of the pairs' 95% intervals",
        ),
        *_flag_handles(n_hatched, n_undefined, "bar"),
    ]
    if n_open:
        handles.append(
            Line2D([], [], marker="o", ls="", mfc="white", mec="black",
                   label=f"pair: {UNSTABLE_NOTE} ({n_open})")
        )  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    fig.suptitle(
        "Language-side dispersion (GPA across language models)"
        + (f"; dots: {n_pairs} vision × language pairs" if n_pairs else "")
        + (f" ({n_tied} at an LLM layer tied with another)" if n_tied else "")
    )
    return fig


# --------------------------------------------------------------------------- properties
def property_label(prop: str, model: str, models: Models) -> str:
    """Readable label of a property as matplotlib draws it with math parsing on (token counts
    name their LLM by its label, as every figure draws it; a manifest column's,
    ``manifest:<column>``, is "<column> (manifest)", its ``$`` literal)."""
    if prop.startswith(ANNOTATION_PREFIX):
        return literal(f"{prop[len(ANNOTATION_PREFIX) :]} (manifest)")
    base = literal(PROPERTY_LABELS.get(prop, prop))
    if model:
        return base.replace("(tokens)", f"(tokens, {models.label(model)})")
    return base


def _property_rows(corr: pd.DataFrame, models: Models) -> list[tuple[str, str]]:
    """(property, model) in display order: PROPERTY_LABELS order, token rows by model order,
    then the other properties (the manifest's columns) in table order."""
    keys = corr[["property", "model"]].fillna("").astype(str).drop_duplicates()
    rank = {p: i for i, p in enumerate(PROPERTY_LABELS)}
    for p in keys["property"]:
        rank.setdefault(p, len(rank))
    order = {m: i for i, m in enumerate(models.order([m for m in keys["model"] if m]))}
    return sorted(map(tuple, keys.to_numpy()), key=lambda pm: (rank[pm[0]], order.get(pm[1], -1)))


def _forest(ax: Axes, corr: pd.DataFrame, rows: list[tuple[str, str]], summary: str, models):
    sub = corr[corr["summary"] == summary].copy()
    sub["model"] = sub["model"].fillna("").astype(str)
    sub = sub.set_index(["property", "model"])
    for i, key in enumerate(rows):
        if key not in sub.index:
            continue
        r = sub.loc[key]
        if np.isfinite(r["spearman_rho"]):
            if _has_ci(r):
                # the interval as its two ends: a percentile interval need not hold the estimate
                # (a skewed bootstrap), and errorbar refuses the negative lengths that gives
                ax.plot([r["ci_low"], r["ci_high"]], [i, i], color=COLORS["point"], lw=1,
                        marker="|", ms=5)  # fmt: skip
            ax.plot(r["spearman_rho"], i, "o", ms=4, color=COLORS["point"])
            if not _has_ci(r) and r["reason"]:  # e.g. too few stimuli differ (method.md)
                ax.annotate("no interval", (r["spearman_rho"], i), xytext=(5, 0),
                            textcoords="offset points", va="center", fontsize=6,
                            color="#777777", gid="no_interval")  # fmt: skip
        else:
            ax.text(0, i, f"n/a: {r['reason'] or 'undefined'}", ha="center", va="center",
                    fontsize=6.5, color="#777777")  # fmt: skip
    ax.axvline(0, color="#bbbbbb", lw=0.8, zorder=0)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([property_label(p, m, models) for p, m in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(-1, 1)
    ci = " (95% bootstrap CI)" if any(_has_ci(r) for _, r in sub.iterrows()) else ""  # n_boot: 0
    ax.set_xlabel(f"Spearman ρ with {SUMMARY_TITLES[summary]}{ci}")


def draw_properties(data: FigureData) -> Figure:
    """Spearman correlation of each property with vision dispersion, and each property against
    mean dispersion stimulus by stimulus."""
    corr, props, disp = data["property_correlations"], data["properties"], data["dispersion"]
    models = data.models
    rows = _property_rows(corr, models)
    # one scatter panel per property with one value per stimulus (not the token counts)
    present = set(props["property"])
    singles = [p for p, m in rows if not m and p != "caption_tokens" and p in present]
    ncols = min(max(1, len(singles)), SCATTER_COLUMNS)
    scatter_height = 2.4 * math.ceil(max(1, len(singles)) / ncols)
    fig = new_figure(10.5, 3.0 + 0.22 * len(rows) + scatter_height)
    top, bottom = fig.subfigures(2, 1, height_ratios=[0.6 + 0.22 * len(rows), scatter_height])
    ax1, ax2 = top.subplots(1, 2, sharey=True)
    _forest(ax1, corr, rows, "mean", models)
    _forest(ax2, corr, rows, "pc1", models)
    ax1.set_title("A   Properties vs mean dispersion", loc="left")
    # docs/method.md, "Dispersion": a PC1 that does not follow its mean has a sign set by noise,
    # and so has every correlation with it
    caveat = pc1_caveat(disp, consequence="the sign of every ρ here is noise")
    note = f"\n{textwrap.fill(caveat, 44)}" if caveat else ""
    ax2.set_title(f"B   Properties vs PC1 score{note}", loc="left")

    axes = panel_grid(bottom, len(singles), ncols, sharey=True)
    d = disp.assign(stimulus_id=disp["stimulus_id"].astype(str)).set_index("stimulus_id")
    mean_rows = corr[(corr["summary"] == "mean")].copy()
    mean_rows["model"] = mean_rows["model"].fillna("").astype(str)
    mean_rows = mean_rows.set_index(["property", "model"])
    for i, (ax, prop) in enumerate(zip(axes, singles, strict=True)):
        g = props[props["property"] == prop]
        g = g[g["stimulus_id"].astype(str).isin(d.index)]
        x = g["value"].to_numpy(float)
        y = d.loc[g["stimulus_id"].astype(str), "mean_dispersion"].to_numpy(float)
        ax.scatter(x, y, s=4, color=COLORS["point"], alpha=0.5 if len(x) > 200 else 0.8,
                   linewidth=0)  # fmt: skip
        r = mean_rows.loc[(prop, "")] if (prop, "") in mean_rows.index else None
        text = f"ρ = {r['spearman_rho']:.2f}" if r is not None and np.isfinite(r["spearman_rho"]) else (
            f"n/a: {r['reason']}" if r is not None and r["reason"] else "ρ n/a"
        )  # fmt: skip
        ax.set_xlabel(textwrap.fill(property_label(prop, "", models), 18), fontsize=7)
        ax.tick_params(labelsize=6)
        if i % ncols == 0:
            ax.set_ylabel("Mean dispersion")
        # ρ beside the letter, above the axes: a box over them hid points (audit)
        ax.set_title(textwrap.fill(f"{panel_letter(i, 'C')}   {text}", 18), loc="left")
    own = any(p.startswith(ANNOTATION_PREFIX) for p, _ in rows)
    fig.suptitle(
        "What goes with dispersion: stimulus properties (no extra model)"
        + (" and the manifest's numeric columns" if own else "")
    )
    return fig
