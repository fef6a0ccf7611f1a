"""Cross-modal alignment figures: dispersion sets (Fig. 2B–E, G–J), drop-25% (Supp. Fig. 1),
the CKNNA grid, the layer-wise profiles (he2025 Fig. 2) and the low − high contrasts."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ._common import (
    ALIGNMENT_LABEL,
    COLORS,
    CONDITION_LABELS,
    LLM_AXIS_LABEL,
    SUMMARY_LABELS,
    FigureData,
    family_axis,
    interval,
    new_figure,
    only_metric,
    panel_grid,
    panel_letter,
)

log = logging.getLogger(__name__)

PAIR = ["vision", "llm"]


# --------------------------------------------------------------------------- grid selection
def condition_rows(grid: pd.DataFrame, condition: str, summary: str | None = None) -> pd.DataFrame:
    """Rows of one condition of the grid table.

    ``summary`` selects ``mean``/``pc1`` sets. Conditions that are not tied to a summary in the
    table (``full``, ``random`` with summary ``none``) are returned whatever ``summary`` is; for
    ``drop_*`` without a requested summary, the mean-dispersion rows are preferred.
    """
    rows = grid[grid["condition"] == condition]
    if rows.empty or "summary" not in rows.columns:
        return rows
    summaries = set(rows["summary"].astype(str))
    if summary is not None and summary in summaries:
        return rows[rows["summary"] == summary]
    if summary is None and len(summaries) > 1:
        for pref in ("mean", "none"):
            if pref in summaries:
                return rows[rows["summary"] == pref]
    if summary is not None and summaries - {"none"}:
        return rows.iloc[0:0]
    return rows


def pair_values(rows: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Mean value per (vision, llm) pair (deterministic conditions have one row per pair)."""
    if rows.empty:
        return {}
    s = rows.groupby(PAIR)["value"].mean()
    return {(str(v), str(ll)): float(x) for (v, ll), x in s.items()}


def random_intervals(rows: pd.DataFrame) -> tuple[dict[tuple[str, str], tuple[float, ...]], int]:
    """(mean, 2.5 %, 97.5 %) of the random draws per pair, and the largest number of draws."""
    if rows.empty:
        return {}, 0
    out = {(str(v), str(ll)): interval(g["value"]) for (v, ll), g in rows.groupby(PAIR)}
    return out, int(rows.groupby(PAIR).size().max())


def _set_size(rows: pd.DataFrame) -> str:
    """' (n = K)' from the grid's n_stimuli column, when it is one number."""
    if rows.empty or "n_stimuli" not in rows.columns:
        return ""
    n = rows["n_stimuli"].dropna().unique()
    return f" (n = {int(n[0])})" if len(n) == 1 else ""


def _pairs_layout(data: FigureData, grid: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Vision models and LLMs present in ``grid``, in display order."""
    m = data.models
    return m.order(grid["vision"].astype(str).unique()), m.order(grid["llm"].astype(str).unique())


def _grouped_bars(
    ax: Axes,
    llms: list[str],
    series: list[tuple[str, dict[str, float], dict[str, tuple[float, float]] | None]],
) -> None:
    """Bars per LLM, one per series (name, values by llm, optional (lo, hi) interval by llm)."""
    n = len(series)
    width = 0.8 / max(n, 1)
    x = np.arange(len(llms))
    for i, (name, vals, ivals) in enumerate(series):
        pos = x + (i - (n - 1) / 2) * width
        h = np.array([vals.get(ll, np.nan) for ll in llms], dtype=float)
        ax.bar(pos, np.nan_to_num(h), width * 0.92, color=COLORS[name], label=name, linewidth=0)
        if ivals:
            lo = np.array([ivals.get(ll, (np.nan, np.nan))[0] for ll in llms])
            hi = np.array([ivals.get(ll, (np.nan, np.nan))[1] for ll in llms])
            ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(h)
            if ok.any():
                ax.errorbar(
                    pos[ok],
                    h[ok],
                    yerr=[h[ok] - lo[ok], hi[ok] - h[ok]],
                    fmt="none",
                    ecolor="black",
                    elinewidth=0.8,
                    capsize=1.5,
                )
    ax.axhline(0, color="black", lw=0.6)


def _panel_width(n_llm: int) -> float:
    return max(3.0, 0.42 * n_llm + 1.3)


# --------------------------------------------------------------------------- Fig. 2B–E / G–J
def _sets_figure(data: FigureData, summary: str, first_letter: str) -> Figure:
    grid = only_metric(data["grid"])
    visions, llms = _pairs_layout(data, grid)
    low = pair_values(condition_rows(grid, "low", summary))
    high = pair_values(condition_rows(grid, "high", summary))
    rnd_rows = condition_rows(grid, "random", summary)
    rnd, n_draws = random_intervals(rnd_rows)
    if 0 < n_draws < 20:
        log.info("random baseline has only %d draw(s): its interval is coarse", n_draws)

    ncols = 2 if len(visions) > 1 else 1
    nrows = math.ceil(len(visions) / ncols)
    fig = new_figure(_panel_width(len(llms)) * ncols, 2.7 * nrows + 0.9)
    axes = panel_grid(fig, len(visions), ncols, sharey=True)
    for i, (ax, v) in enumerate(zip(axes, visions, strict=True)):
        series = [
            ("low", {ll: low.get((v, ll), np.nan) for ll in llms}, None),
            (
                "random",
                {ll: rnd.get((v, ll), (np.nan,) * 3)[0] for ll in llms},
                {ll: rnd.get((v, ll), (np.nan,) * 3)[1:] for ll in llms} if n_draws > 1 else None,
            ),
            ("high", {ll: high.get((v, ll), np.nan) for ll in llms}, None),
        ]
        _grouped_bars(ax, llms, series)
        ax.set_title(
            f"{panel_letter(i, first_letter)}   {data.models.label(v)}", loc="left", pad=12
        )
        family_axis(ax, llms, data.models)
        ax.set_xlabel(LLM_AXIS_LABEL)
        if i % ncols == 0:  # one y label per row: a second would run into the left panel
            ax.set_ylabel(ALIGNMENT_LABEL)
        ax.tick_params(labelleft=True)

    if n_draws > 1:
        rnd_label = f"Random: mean and 95% interval of {n_draws} draws"
    elif n_draws == 1:
        rnd_label = "Random: 1 draw"
    else:
        rnd_label = "Random: no draws"
    handles = [
        Patch(
            color=COLORS["low"],
            label="Low dispersion" + _set_size(condition_rows(grid, "low", summary)),
        ),
        Patch(color=COLORS["random"], label=rnd_label),
        Patch(color=COLORS["high"], label="High dispersion"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    fig.suptitle(
        "Stimulus-specific dispersion modulates vision–language alignment\n"
        f"(sets selected by {SUMMARY_LABELS[summary]})"
    )
    return fig


def draw_sets_rank(data: FigureData) -> Figure:
    """Fig. 2B–E: CKNNA of low / random / high mean-dispersion sets, per vision model and LLM."""
    return _sets_figure(data, "mean", "B")


def draw_sets_pc1(data: FigureData) -> Figure:
    """Fig. 2G–J: the same with sets selected along PC1 of the residual space."""
    return _sets_figure(data, "pc1", "G")


# --------------------------------------------------------------------------- Supp. Fig. 1
def draw_drop25(data: FigureData) -> Figure:
    """Supp. Fig. 1: CKNNA on the full set, after dropping the most and the least dispersed."""
    grid = only_metric(data["grid"])
    visions, llms = _pairs_layout(data, grid)
    conds = ["full", "drop_high", "drop_low"]
    rows = {c: condition_rows(grid, c) for c in conds}
    vals = {c: pair_values(rows[c]) for c in conds}

    ncols = 2 if len(visions) > 1 else 1
    nrows = math.ceil(len(visions) / ncols)
    fig = new_figure(_panel_width(len(llms)) * ncols, 2.7 * nrows + 0.9)
    axes = panel_grid(fig, len(visions), ncols, sharey=True)
    for i, (ax, v) in enumerate(zip(axes, visions, strict=True)):
        series = [(c, {ll: vals[c].get((v, ll), np.nan) for ll in llms}, None) for c in conds]
        _grouped_bars(ax, llms, series)
        ax.set_title(f"{panel_letter(i)}   {data.models.label(v)}", loc="left", pad=12)
        family_axis(ax, llms, data.models)
        ax.set_xlabel(LLM_AXIS_LABEL)
        ax.set_ylabel("Local alignment (CKNNA)")
        ax.tick_params(labelleft=True)
    handles = [
        Patch(color=COLORS[c], label=CONDITION_LABELS[c] + _set_size(rows[c])) for c in conds
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    fig.suptitle("Dropping the highest- vs lowest-dispersion stimuli")
    return fig


# --------------------------------------------------------------------------- grid heatmaps
def _diff_matrix(
    data: FigureData, grid: pd.DataFrame, summary: str, visions: list[str], llms: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Low − high per pair (from contrasts, else from the grid) and a significance mask."""
    diff = pd.DataFrame(np.nan, index=visions, columns=llms)
    sig = pd.DataFrame(False, index=visions, columns=llms)
    con = data.get("contrasts")
    if con is not None and not con.empty and summary in set(con["summary"].astype(str)):
        for r in con[con["summary"] == summary].itertuples(index=False):
            if r.vision in diff.index and r.llm in diff.columns:
                diff.loc[r.vision, r.llm] = r.diff_low_high
                lo, hi = getattr(r, "diff_ci_low", np.nan), getattr(r, "diff_ci_high", np.nan)
                sig.loc[r.vision, r.llm] = bool(lo > 0 or hi < 0)
        return diff, sig
    low = pair_values(condition_rows(grid, "low", summary))
    high = pair_values(condition_rows(grid, "high", summary))
    for (v, ll), x in low.items():
        if (v, ll) in high and v in diff.index and ll in diff.columns:
            diff.loc[v, ll] = x - high[(v, ll)]
    return diff, sig


def _heatmap(ax: Axes, mat: pd.DataFrame, annot: np.ndarray, data: FigureData, **kw) -> None:
    sns.heatmap(
        mat.astype(float),
        ax=ax,
        annot=annot,
        fmt="",
        annot_kws={"fontsize": 6.5},
        linewidths=0.5,
        linecolor="white",
        square=False,
        **kw,
    )
    ax.set_yticklabels(data.models.labels(mat.index), rotation=0)
    ax.set_xticklabels(data.models.labels(mat.columns), rotation=55, ha="right")
    ax.set_ylabel("Vision model")
    ax.set_xlabel(LLM_AXIS_LABEL)


def draw_grid_heatmap(data: FigureData) -> Figure:
    """Full-set CKNNA grid (vision × LLM) and the low − high difference grids, annotated."""
    grid = only_metric(data["grid"])
    visions, llms = _pairs_layout(data, grid)
    full = pd.DataFrame(np.nan, index=visions, columns=llms)
    for (v, ll), x in pair_values(condition_rows(grid, "full")).items():
        full.loc[v, ll] = x
    summaries = [
        s
        for s in ("mean", "pc1")
        if not condition_rows(grid, "low", s).empty
        or (
            data.get("contrasts") is not None and s in set(data["contrasts"]["summary"].astype(str))
        )
    ]
    n = 1 + len(summaries)
    width = max(5.0, 0.62 * len(llms) + 2.8)
    fig = new_figure(width, n * (0.42 * len(visions) + 1.6) + 0.3)
    axes = panel_grid(fig, n, 1)
    annot = np.vectorize(lambda x: "" if not np.isfinite(x) else f"{x:.3f}")(full.to_numpy(float))
    _heatmap(axes[0], full, annot, data, cmap="viridis", cbar_kws={"label": "CKNNA"})
    axes[0].set_title(f"{panel_letter(0)}   Full stimulus set: CKNNA", loc="left")
    diffs = [_diff_matrix(data, grid, s, visions, llms) for s in summaries]
    vmax = max(
        [np.nanmax(np.abs(d.to_numpy(float))) for d, _ in diffs if d.notna().any().any()] or [1.0]
    )
    for i, (s, (diff, sig)) in enumerate(zip(summaries, diffs, strict=True), start=1):
        txt = np.empty(diff.shape, dtype=object)
        for a in range(diff.shape[0]):
            for b in range(diff.shape[1]):
                x = diff.iat[a, b]
                txt[a, b] = (
                    "" if not np.isfinite(x) else f"{x:+.3f}" + ("*" if sig.iat[a, b] else "")
                )
        _heatmap(
            axes[i],
            diff,
            txt,
            data,
            cmap="vlag",
            vmin=-vmax,
            vmax=vmax,
            cbar_kws={"label": "Δ CKNNA (low − high)"},
        )
        axes[i].set_title(
            f"{panel_letter(i)}   Low − high dispersion, {SUMMARY_LABELS[s]}", loc="left"
        )
    return fig


# --------------------------------------------------------------------------- layer-wise
def draw_layerwise(data: FigureData) -> Figure:
    """he2025 Fig. 2 analogue: CKNNA of each vision model against every layer of each LLM."""
    layers = only_metric(data["layers"]).copy()
    models = data.models
    visions = models.order(layers["vision"].astype(str).unique())
    llms = models.order(layers["llm"].astype(str).unique())
    colors = models.colors(llms)
    ncols = min(len(visions), 4)
    nrows = math.ceil(len(visions) / ncols)
    fig = new_figure(3.0 * ncols + 1.6, 2.6 * nrows + 0.5)
    axes = panel_grid(fig, len(visions), ncols, sharey=True)
    for i, (ax, v) in enumerate(zip(axes, visions, strict=True)):
        for ll in llms:
            g = layers[(layers["vision"] == v) & (layers["llm"] == ll)]
            if g.empty:
                continue
            if "vision_layer" in g.columns and g["vision_layer"].nunique() > 1:
                chosen_vl = g.loc[g["chosen"].astype(bool), "vision_layer"] if "chosen" in g else []
                vl = chosen_vl.iloc[0] if len(chosen_vl) else g["vision_layer"].max()
                g = g[g["vision_layer"] == vl]
            g = g.sort_values("llm_layer")
            depth = g["llm_layer"].to_numpy(float)
            depth = depth / depth.max() if depth.max() > 0 else depth
            ax.plot(depth, g["value"], color=colors[ll], lw=1.3, label=models.label(ll))
            if "chosen" in g.columns:
                ch = g["chosen"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
                if ch.any():
                    ax.scatter(
                        depth[ch], g["value"].to_numpy()[ch], s=18, color=colors[ll],
                        edgecolor="black", linewidth=0.6, zorder=3,
                    )  # fmt: skip
        ax.set_title(f"{panel_letter(i)}   {models.label(v)}", loc="left")
        ax.set_xlabel("LLM layer (relative depth)")
        ax.set_ylabel(ALIGNMENT_LABEL)
        ax.set_xlim(-0.02, 1.02)
        ax.tick_params(labelleft=True)
    handles = [Line2D([], [], color=colors[ll], lw=1.5, label=models.label(ll)) for ll in llms]
    handles.append(
        Line2D(
            [], [], marker="o", ls="", color="white", markeredgecolor="black", label="chosen layer"
        )
    )
    fig.legend(handles=handles, loc="outside right center", title="Language model")
    fig.suptitle("Layer-wise vision–language alignment (full stimulus set)")
    return fig


# --------------------------------------------------------------------------- contrasts
def draw_contrasts(data: FigureData) -> Figure:
    """Forest plot of low − high per pair (bootstrap 95% CI) and the fraction of random ≥ low."""
    con = only_metric(data["contrasts"]).copy()
    models = data.models
    visions = models.order(con["vision"].unique())
    llms = models.order(con["llm"].unique())
    summaries = [s for s in ("mean", "pc1") if s in set(con["summary"])] + sorted(
        set(con["summary"]) - {"mean", "pc1"}
    )
    pairs = [
        (v, ll) for v in visions for ll in llms if ((con["vision"] == v) & (con["llm"] == ll)).any()
    ]
    ypos, y = {}, 0.0
    for k, (v, ll) in enumerate(pairs):
        if k and v != pairs[k - 1][0]:
            y += 0.8
        ypos[(v, ll)] = y
        y += 1.0
    summ = data.get("summary")
    stats = only_metric(summ).set_index("summary") if summ is not None else pd.DataFrame()

    ratios = [3.2, 1.2] * len(summaries)
    fig = new_figure(2.0 + 4.6 * len(summaries), 0.17 * (y + 2) + 1.6)
    axes = fig.subplots(1, 2 * len(summaries), sharey=True, gridspec_kw={"width_ratios": ratios})
    axes = np.atleast_1d(axes)
    for i, s in enumerate(summaries):
        ax, axf = axes[2 * i], axes[2 * i + 1]
        c = con[con["summary"] == s].set_index(["vision", "llm"])
        yy = np.array([ypos[p] for p in pairs if p in c.index])
        cc = c.loc[[p for p in pairs if p in c.index]]
        d = cc["diff_low_high"].to_numpy(float)
        lo = cc.get("diff_ci_low", pd.Series(np.nan, index=cc.index)).to_numpy(float)
        hi = cc.get("diff_ci_high", pd.Series(np.nan, index=cc.index)).to_numpy(float)
        col = np.where(lo > 0, COLORS["low"], np.where(hi < 0, COLORS["high"], COLORS["random"]))
        has_ci = np.isfinite(lo) & np.isfinite(hi)
        for colr in np.unique(col):
            m = col == colr
            ax.hlines(yy[m & has_ci], lo[m & has_ci], hi[m & has_ci], color=colr, lw=1.2)
            ax.plot(d[m], yy[m], "o", ms=3.5, color=colr)
        ax.axvline(0, color="black", lw=0.7)
        ax.set_xlabel("Δ CKNNA, low − high (bootstrap 95% CI)")
        title = f"{panel_letter(i)}   Low − high, {SUMMARY_LABELS.get(s, s)}"
        if s in stats.index:
            r = stats.loc[s]
            title += (
                f"\nlow > random > high in {int(r.n_low_gt_random_gt_high)}/{int(r.n_valid)} pairs"
                f"\nmedian low/high = {r.median_ratio_low_high:.2f}×"
            )
        ax.set_title(title, loc="left")
        frac = cc.get("frac_random_ge_low", pd.Series(np.nan, index=cc.index)).to_numpy(float)
        axf.barh(yy, np.nan_to_num(frac), height=0.7, color=COLORS["random"])
        axf.plot(frac, yy, "o", ms=2.5, color="black")  # visible even at 0
        axf.axvline(0.05, color="black", lw=0.7, ls="--")
        axf.set_xlim(0, 1)
        axf.set_xlabel("Fraction of random\ndraws ≥ low")
        axf.tick_params(labelleft=False)
    axes[0].set_yticks([ypos[p] for p in pairs])
    axes[0].set_yticklabels([f"{models.label(v)} × {models.label(ll)}" for v, ll in pairs])
    axes[0].set_ylim(y - 0.2, -0.8)
    axes[0].set_ylabel("Vision × language model")
    handles = [
        Line2D([], [], marker="o", color=COLORS["low"], label="CI above 0 (low > high)"),
        Line2D([], [], marker="o", color=COLORS["random"], label="CI includes 0"),
        Line2D([], [], marker="o", color=COLORS["high"], label="CI below 0 (high > low)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    return fig
