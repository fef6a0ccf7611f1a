"""Representation diagnostics figure: which alignment values the data decide.

Drawn from ``diagnostics.tsv`` (docs/method.md, "Diagnostics"), and ``duplicates.tsv`` when
given. Top row: every layer in use (each vision model's analysed layer, every chosen LLM layer):
mean ± SD of the pairwise cosines, effective dimensionality and the fraction of stimuli whose
nearest-neighbour set the kernel's rounding decides. Bottom row: the same across the depth of
each LLM. Collapsed and warned layers are named by the table (``collapsed``, ``warn``), never
recomputed here.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from xmodal.summary import flag_column

from ._common import FigureData, new_figure, panel_letter

STATUS_COLORS = {"ok": "#4a4a4a", "warn": "#de8f05", "collapsed": "#c0392b"}
DIAGNOSTICS_COLUMNS = (
    "model", "modality", "layer", "layer_name", "m", "cos_mean", "cos_sd", "eff_dim",
    "n_unresolved", "frac_unresolved", "collapsed", "warn", "used",
)  # fmt: skip


#: inches per row of the footer's legend (a marker row at the legend's font size and spacing)
FOOTER_ROW_IN = 0.17


def layer_status(diag: pd.DataFrame) -> np.ndarray:
    """'collapsed', 'warn' or 'ok' per row, from the table's ``collapsed`` and ``warn``."""
    collapsed, warn = flag_column(diag, "collapsed"), flag_column(diag, "warn")
    return np.where(collapsed, "collapsed", np.where(warn, "warn", "ok"))


def _check(diag: pd.DataFrame, path: str) -> None:
    missing = [c for c in DIAGNOSTICS_COLUMNS if c not in diag.columns]
    if missing:
        raise ValueError(
            f"{path}: diagnostics table lacks column(s) {missing}; rerun the diagnostics rule"
        )


def _used_rows(diag: pd.DataFrame, data: FigureData) -> pd.DataFrame:
    """The layers in use, vision models first, each group in display order, LLM layers by depth."""
    used = diag[flag_column(diag, "used")].copy()
    used["model"] = used["model"].astype(str)
    order = {k: i for i, k in enumerate(data.models.order(used["model"].unique()))}
    used["_vision"] = used["modality"].astype(str) != "vision"
    used["_order"] = used["model"].map(order)
    return used.sort_values(["_vision", "_order", "layer"]).reset_index(drop=True)


def status_labels(thresholds: tuple[float, float, float]) -> dict[str, str]:
    """Legend text of each status, with the thresholds of xmodal.diagnostics."""
    collapsed_cos, warn_unresolved, collapsed_unresolved = thresholds
    return {
        "ok": f"≤ {warn_unresolved:.0%} of stimuli with unresolved neighbours",
        "warn": f"warning: > {warn_unresolved:.0%} unresolved",
        "collapsed": (
            f"collapsed: mean cosine ≥ {collapsed_cos:g} or ≥ {collapsed_unresolved:.0%} unresolved"
        ),
    }


def _dimension_scale(ax: Axes, which: str, values: np.ndarray) -> None:
    """Effective dimensionalities spanning more than a decade on a log axis labelled with plain
    numbers (1, 2, 5, 10, ...); a linear axis otherwise."""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size == 0 or v.max() / v.min() <= 10:
        return
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _row_label(r, data: FigureData, status: str) -> str:
    text = f"{data.models.label(r.model)} · {r.layer_name}"
    return text + {"ok": "", "warn": "  [warning]", "collapsed": "  [collapsed]"}[status]


def _in_use_panels(axes: list[Axes], used: pd.DataFrame, data: FigureData, thresholds) -> None:
    """Three panels, one row per layer in use; points coloured by status, gid
    ``<status>|<model>|<layer>``."""
    collapsed_cos, warn_unresolved, collapsed_unresolved = thresholds
    status = layer_status(used)
    y = np.arange(len(used))
    ax_cos, ax_dim, ax_unres = axes
    for j, r in enumerate(used.itertuples(index=False)):
        colr, gid = STATUS_COLORS[status[j]], f"{status[j]}|{r.model}|{int(r.layer)}"
        ax_cos.errorbar(r.cos_mean, y[j], xerr=r.cos_sd if np.isfinite(r.cos_sd) else None,
                        fmt="o", ms=4, color=colr, elinewidth=1.0, capsize=2, gid=gid)  # fmt: skip
        ax_dim.plot(r.eff_dim, y[j], "o", ms=4, color=colr, gid=gid)
        ax_unres.plot(r.frac_unresolved, y[j], "o", ms=4, color=colr, gid=gid)
        note = f"{int(r.n_unresolved)}/{int(r.m)}"
        if "n_in_duplicate_groups" in used.columns and r.n_in_duplicate_groups > 0:
            note += f"; {int(r.n_in_duplicate_groups)} stimuli with identical features"
        ax_unres.annotate(note, (r.frac_unresolved, y[j]), xytext=(5, 0), fontsize=6.5,
                          textcoords="offset points", va="center", color=colr)  # fmt: skip
    ax_cos.axvline(collapsed_cos, color=STATUS_COLORS["collapsed"], lw=0.7, ls="--")
    ax_cos.set_xlabel("Pairwise cosine (mean ± SD)")
    _dimension_scale(ax_dim, "x", used["eff_dim"].to_numpy(float))
    ax_dim.set_xlabel("Effective dimensionality\n(participation ratio)")
    ax_unres.axvline(warn_unresolved, color=STATUS_COLORS["warn"], lw=0.7, ls="--")
    ax_unres.axvline(collapsed_unresolved, color=STATUS_COLORS["collapsed"], lw=0.7, ls="--")
    ax_unres.set_xlim(-0.02, 1.6)
    ax_unres.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax_unres.set_xlabel("Fraction of stimuli with\nunresolved neighbours")
    ax_cos.set_yticks(y)
    rows = zip(used.itertuples(), status, strict=True)
    ax_cos.set_yticklabels([_row_label(r, data, s) for r, s in rows])
    for tick, s in zip(ax_cos.get_yticklabels(), status, strict=True):
        tick.set_color(STATUS_COLORS[s])
    ax_cos.set_ylim(len(used) - 0.5, -0.5)
    n_vision = int((used["modality"].astype(str) == "vision").sum())
    for ax in axes:
        if 0 < n_vision < len(used):
            ax.axhline(n_vision - 0.5, color="#cccccc", lw=0.6)
        ax.tick_params(axis="y", labelleft=ax is ax_cos)


def _depth_handles(keys: list[str], data: FigureData) -> list:
    """Legend handles of the depth panels: each LLM's line, the layers in use, collapsed ones."""
    colors = data.models.colors(keys)
    return [
        *(Line2D([], [], color=colors[k], lw=1.5, label=data.models.label(k)) for k in keys),
        Line2D([], [], marker="o", ls="", mfc="none", mec="black", label="layer in use (chosen)"),
        Line2D(
            [], [], marker="x", ls="", color=STATUS_COLORS["collapsed"], label="collapsed layer"
        ),
    ]


def _depth_panels(
    axes: list[Axes], diag: pd.DataFrame, keys: list[str], data: FigureData, thresholds
) -> None:
    """The same three measures across the depth of each LLM of ``keys``; the layers in use
    circled, collapsed layers crossed (gid ``depth_collapsed|<model>``)."""
    collapsed_cos, warn_unresolved, collapsed_unresolved = thresholds
    llm = diag[diag["modality"].astype(str) != "vision"].copy()
    llm["model"] = llm["model"].astype(str)
    colors = data.models.colors(keys)
    for key in keys:
        g = llm[llm["model"] == key].sort_values("layer")
        depth = g["layer"].to_numpy(float)
        depth = depth / depth.max() if depth.max() > 0 else depth
        used, collapsed = flag_column(g, "used"), flag_column(g, "collapsed")
        for ax, col in zip(axes, ("cos_mean", "eff_dim", "frac_unresolved"), strict=True):
            v = g[col].to_numpy(float)
            ax.plot(depth, v, color=colors[key], lw=1.2)
            if used.any():
                ax.scatter(depth[used], v[used], s=22, facecolors="none", edgecolors="black",
                           linewidths=0.8, zorder=3)  # fmt: skip
            if collapsed.any():
                ax.scatter(depth[collapsed], v[collapsed], marker="x", s=18, linewidths=1.1,
                           color=STATUS_COLORS["collapsed"], zorder=4,
                           gid=f"depth_collapsed|{key}")  # fmt: skip
    axes[0].axhline(collapsed_cos, color=STATUS_COLORS["collapsed"], lw=0.7, ls="--")
    axes[0].set_ylabel("Pairwise cosine (mean)")
    _dimension_scale(axes[1], "y", llm["eff_dim"].to_numpy(float))
    axes[1].set_ylabel("Effective dimensionality")
    axes[2].axhline(warn_unresolved, color=STATUS_COLORS["warn"], lw=0.7, ls="--")
    axes[2].axhline(collapsed_unresolved, color=STATUS_COLORS["collapsed"], lw=0.7, ls="--")
    axes[2].set_ylim(-0.03, 1.03)
    axes[2].set_ylabel("Fraction unresolved")
    for ax in axes:
        ax.set_xlabel("LLM layer (relative depth)")
        ax.set_xlim(-0.03, 1.03)


def duplicates_note(dup: pd.DataFrame | None) -> str:
    """One line on the duplicate stimuli: groups and stimuli per kind (empty: none found)."""
    if dup is None:
        return ""
    if dup.empty:
        return "Duplicate stimuli: none found (identical files, pixels or captions)."
    parts = []
    names = {
        "image_bytes": "identical files",
        "pixels": "identical pixels",
        "caption": "identical captions",
    }
    for kind, g in dup.groupby("kind", sort=False):
        parts.append(
            f"{names.get(str(kind), str(kind))}: {g['group'].nunique()} group(s), {len(g)} stimuli"
        )
    return "Duplicate stimuli in the manifest: " + "; ".join(parts) + "."


def draw_diagnostics(data: FigureData) -> Figure:
    """Which values to trust: the geometry of every layer in use and of every LLM layer.

    Reading it: a mean cosine near 1 with a small SD, a low effective dimensionality and a large
    fraction of stimuli with unresolved neighbours mean that the layer's kNN sets, hence its
    CKNNA and mutual-kNN values, are decided by rounding or ties (their stability is large).
    """
    from xmodal.diagnostics import COLLAPSED_COS, COLLAPSED_UNRESOLVED, WARN_UNRESOLVED

    thresholds = (COLLAPSED_COS, WARN_UNRESOLVED, COLLAPSED_UNRESOLVED)
    diag = data["diagnostics"]
    _check(diag, str(data.paths.get("diagnostics", "diagnostics")))
    used = _used_rows(diag, data)
    llm_keys = data.models.order(
        diag.loc[diag["modality"].astype(str) != "vision", "model"].astype(str).unique()
    )
    has_llm = bool(llm_keys)
    labels = status_labels(thresholds)
    handles = [
        Line2D([], [], marker="o", ls="", color=STATUS_COLORS[s], label=labels[s])
        for s in ("ok", "warn", "collapsed")
    ] + (_depth_handles(llm_keys, data) if has_llm else [])
    note = duplicates_note(data.get("duplicates"))
    # the footer holds the legend (in 3 columns) and, under it, the note: its height grows
    # with the legend's rows so that they never overlap
    footer_height = 0.3 + FOOTER_ROW_IN * math.ceil(len(handles) / 3) + 0.25 * bool(note)
    heights = [0.26 * len(used) + 1.7] + ([2.8] if has_llm else []) + [footer_height]
    fig = new_figure(12.0, sum(heights) + 0.4)
    subs = list(fig.subfigures(len(heights), 1, height_ratios=heights))
    titles = ("Pairwise cosine", "Effective dimensionality", "Unresolved neighbours")
    top = list(subs[0].subplots(1, 3, sharey=True, gridspec_kw={"width_ratios": [1.3, 1, 1.3]}))
    _in_use_panels(top, used, data, thresholds)
    for i, (ax, t) in enumerate(zip(top, titles, strict=True)):
        ax.set_title(f"{panel_letter(i)}   {t}", loc="left")
    subs[0].suptitle("Layers in use (each vision model's analysed layer, every chosen LLM layer)",
                     fontsize=9, fontweight="normal")  # fmt: skip
    if has_llm:
        bottom = list(subs[1].subplots(1, 3))
        _depth_panels(bottom, diag, llm_keys, data, thresholds)
        for i, (ax, t) in enumerate(zip(bottom, titles, strict=True), start=3):
            ax.set_title(f"{panel_letter(i)}   {t}", loc="left")
        subs[1].suptitle("Every layer of each language model", fontsize=9, fontweight="normal")
    footer = subs[-1]
    footer.legend(handles=handles, loc="upper center", ncols=3)
    if note:
        footer.text(0.5, 0.02, note, fontsize=7.5, ha="center", va="bottom", gid="duplicates")
    m = diag["m"].dropna().unique()
    k = diag["k"].dropna().unique() if "k" in diag.columns else []
    size = ""
    if len(m) == 1:
        size = f" (m = {int(m[0])} stimuli" + (f", k = {int(k[0])})" if len(k) == 1 else ")")
    fig.suptitle("Representation diagnostics: which alignment values the data decide" + size)
    return fig
