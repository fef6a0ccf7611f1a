"""Cross-modal alignment figures: dispersion sets (Fig. 2B–E, G–J), drop-25% with its
size-matched random sets (Supp. Fig. 1), the alignment grid, the layer-wise profiles (he2025
Fig. 2), the low − high contrasts and the held-out layer choice (docs/method.md, "Controls").

Each is drawn for one alignment metric (``FigureData.metric``). Values whose stability exceeds
the threshold of :func:`xmodal.summary.unstable` are marked (hatched bars, a dagger in heatmap
cells, open markers); values that are not numbers are never drawn as numbers (a cross, "n/a").
"""

from __future__ import annotations

import logging
import math
import textwrap
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import blended_transform_factory

from xmodal.summary import flag_column, require_unique_keys, unstable

from ._common import (
    COLORS,
    CONDITION_LABELS,
    DAGGER,
    LLM_AXIS_LABEL,
    SUMMARY_LABELS,
    SUMMARY_TITLES,
    UNDEFINED_NOTE,
    UNDEFINED_TEXT,
    UNSTABLE_HATCH,
    UNSTABLE_NOTE,
    FigureData,
    alignment_label,
    family_axis,
    interval,
    new_figure,
    panel_grid,
    panel_letter,
    pc1_title_note,
)
from ._names import metric_label

log = logging.getLogger(__name__)

PAIR = ["vision", "llm"]
CELL_COLUMNS = ["value", "lo", "hi", "stability", "n", "unstable"]
UNDEFINED_COLOR = "#555555"


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


def pair_cells(rows: pd.DataFrame, table: str = "grid") -> pd.DataFrame:
    """What each (vision, llm) pair shows for one condition, indexed by the pair.

    ``value``: the mean over the pair's rows (one row for a deterministic set, the draws for the
    random baseline; NaN when any row is not a number); ``lo``, ``hi``: the central 95% interval
    of the rows; ``stability``: the mean of the rows' stabilities, which bounds how far the mean
    can move (|Δ mean| ≤ mean |Δ_i|; docs/method.md, "Stability"); ``n``: the number of rows;
    ``unstable``: flagged by :func:`xmodal.summary.unstable`. With a ``draw`` column, a (vision,
    llm, draw) that appears twice is a ValueError naming ``table``, never averaged in; without
    one, every row of a pair is one of its draws.
    """
    if "draw" in rows.columns:
        require_unique_keys(rows, [*PAIR, "draw"], table)
    records = []
    for (v, ll), g in rows.groupby(PAIR, sort=False):
        mean, lo, hi = interval(g["value"])
        stab = g["stability"].to_numpy(float).mean() if "stability" in g.columns else math.nan
        records.append((str(v), str(ll), mean, lo, hi, stab, len(g)))
    cells = pd.DataFrame(records, columns=[*PAIR, *CELL_COLUMNS[:-1]])
    cells["unstable"] = unstable(cells)
    return cells.set_index(PAIR)


def _n_draws(rows: pd.DataFrame) -> int:
    """The largest number of rows (draws) of any pair."""
    return int(rows.groupby(PAIR).size().max()) if len(rows) else 0


def _set_size(rows: pd.DataFrame) -> str:
    """' (n = K)' from the grid's n_stimuli column, when it is one number."""
    if rows.empty or "n_stimuli" not in rows.columns:
        return ""
    n = rows["n_stimuli"].dropna().unique()
    return f" (n = {int(n[0])})" if len(n) == 1 else ""


def _pairs_layout(data: FigureData, table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Vision models and LLMs present in ``table``, in display order."""
    m = data.models
    return m.order(table["vision"].astype(str).unique()), m.order(table["llm"].astype(str).unique())


# --------------------------------------------------------------------------- marks
def _hatch(patch) -> None:
    """Mark one bar as unstable: white hatching over its own fill. The hatch takes the edge
    colour (matplotlib < 3.10 always; later with the default ``hatch.color`` 'edge'), and the
    edge itself is not drawn (width 0)."""
    patch.set_hatch(UNSTABLE_HATCH)
    patch.set_edgecolor("white")
    patch.set_linewidth(0)


def _flag_handles(n_unstable: int, n_undefined: int, kind: str) -> list:
    """Legend entries for the marks a figure drew (``kind``: 'bar', 'marker' or 'cell')."""
    handles: list = []
    if n_unstable:
        label = f"{UNSTABLE_NOTE} ({n_unstable})"
        if kind == "bar":
            h = Patch(facecolor="#9e9e9e", label=label)
            _hatch(h)
        elif kind == "marker":
            h = Line2D([], [], marker="o", ls="", mfc="white", mec="#9e9e9e", mew=1.2, label=label)
        else:
            h = Line2D([], [], marker=f"${DAGGER}$", ls="", color="black", label=label)
        handles.append(h)
    if n_undefined:
        label = f"{UNDEFINED_NOTE} ({n_undefined})"
        if kind == "cell":
            h = Line2D(
                [], [], marker="s", ls="", mfc="#eeeeee", mec="#bbbbbb", label=f"n/a: {label}"
            )
        else:
            h = Line2D([], [], marker="x", ls="", mew=1.6, color="black", label=label)
        handles.append(h)
    return handles


# --------------------------------------------------------------------------- bars
def _grouped_bars(
    ax: Axes, vision: str, llms: list[str], series: list[tuple[str, pd.DataFrame, bool]]
) -> tuple[int, int]:
    """Bars per LLM, one per series (condition name, its :func:`pair_cells`, whether to draw
    the 95% interval of its draws). An unstable value is hatched; a value that is not a number
    is a cross on the zero line; a pair absent from the table leaves a gap. Every mark has the
    gid ``<what>|<condition>|<vision>|<llm>`` (what: bar, undefined). Returns (hatched,
    undefined) counts."""
    n = len(series)
    width = 0.8 / max(n, 1)
    n_unstable = n_undefined = 0
    for i, (name, cells, whiskers) in enumerate(series):
        for j, ll in enumerate(llms):
            if (vision, ll) not in cells.index:
                continue
            c = cells.loc[(vision, ll)]
            pos = j + (i - (n - 1) / 2) * width
            gid = f"{name}|{vision}|{ll}"
            if not np.isfinite(c["value"]):
                ax.plot(pos, 0.0, marker="x", ms=6, mew=1.6, color="black", zorder=3,
                        clip_on=False, gid=f"undefined|{gid}")  # fmt: skip
                n_undefined += 1
                continue
            (bar,) = ax.bar(pos, c["value"], width * 0.92, color=COLORS[name], linewidth=0)
            bar.set_gid(f"bar|{gid}")
            if c["unstable"]:
                _hatch(bar)
                n_unstable += 1
            if whiskers and c["n"] > 1 and np.isfinite(c["lo"]) and np.isfinite(c["hi"]):
                # the interval from its ends: the draws' mean (the bar) can lie outside their
                # percentile interval (a skewed set of draws), and errorbar refuses the
                # negative length measuring from it would give
                ax.errorbar(
                    pos,
                    (c["lo"] + c["hi"]) / 2,
                    yerr=(c["hi"] - c["lo"]) / 2,
                    fmt="none",
                    ecolor="black",
                    elinewidth=0.8,
                    capsize=1.5,
                )
    ax.axhline(0, color="black", lw=0.6)
    return n_unstable, n_undefined


def _panel_width(n_llm: int) -> float:
    return max(3.0, 0.42 * n_llm + 1.3)


def _bar_panels(
    data: FigureData,
    visions: list[str],
    llms: list[str],
    series: list[tuple[str, pd.DataFrame, bool]],
    first_letter: str,
    ylabel_every_panel: bool,
) -> tuple[Figure, int, int]:
    """One bar panel per vision model (two columns); returns the figure and the mark counts."""
    ncols = 2 if len(visions) > 1 else 1
    nrows = math.ceil(len(visions) / ncols)
    fig = new_figure(_panel_width(len(llms)) * ncols, 2.7 * nrows + 0.9)
    axes = panel_grid(fig, len(visions), ncols, sharey=True)
    n_unstable = n_undefined = 0
    for i, (ax, v) in enumerate(zip(axes, visions, strict=True)):
        a, b = _grouped_bars(ax, v, llms, series)
        n_unstable, n_undefined = n_unstable + a, n_undefined + b
        ax.set_title(
            f"{panel_letter(i, first_letter)}   {data.models.label(v)}", loc="left", pad=12
        )
        family_axis(ax, llms, data.models)
        ax.set_xlabel(LLM_AXIS_LABEL)
        if ylabel_every_panel or i % ncols == 0:  # else one per row: it would hit the left panel
            ax.set_ylabel(alignment_label(data.metric))
        ax.tick_params(labelleft=True)
    return fig, n_unstable, n_undefined


# --------------------------------------------------------------------------- Fig. 2B–E / G–J
def _sets_figure(data: FigureData, summary: str, first_letter: str) -> Figure:
    grid = data.alignment("grid")
    visions, llms = _pairs_layout(data, grid)
    low_rows = condition_rows(grid, "low", summary)
    rnd_rows = condition_rows(grid, "random", summary)
    n_draws = _n_draws(rnd_rows)
    if 0 < n_draws < 20:
        log.info("random baseline has only %d draw(s): its interval is coarse", n_draws)
    series = [
        ("low", pair_cells(low_rows), False),
        ("random", pair_cells(rnd_rows), n_draws > 1),
        ("high", pair_cells(condition_rows(grid, "high", summary)), False),
    ]
    fig, n_unstable, n_undefined = _bar_panels(data, visions, llms, series, first_letter, False)

    if n_draws > 1:
        rnd_label = f"Random: mean and 95% interval of {n_draws} draws"
    elif n_draws == 1:
        rnd_label = "Random: 1 draw"
    else:
        rnd_label = "Random: no draws"
    handles = [
        Patch(color=COLORS["low"], label="Low dispersion" + _set_size(low_rows)),
        Patch(color=COLORS["random"], label=rnd_label),
        Patch(color=COLORS["high"], label="High dispersion"),
        *_flag_handles(n_unstable, n_undefined, "bar"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    # a question and the summary's counts: the paper's claim as the title stood over any data,
    # low < high in every pair included (audit)
    counts = _sets_line(data, summary)
    if counts:  # taller panels: their axis labels must stay below the longer title
        fig.set_figheight(fig.get_figheight() + 0.5 * math.ceil(len(visions) / 2))
    fig.suptitle(
        "Does stimulus-specific dispersion modulate vision–language alignment?\n"
        f"({metric_label(data.metric)}; sets selected by {SUMMARY_LABELS[summary]})"
        + counts
        + pc1_title_note(data, summary)
    )
    return fig


def _sets_line(data: FigureData, summary: str) -> str:
    """The title's counts from the summary table (read, never recomputed): pairs with low >
    high and with the interval of low − high above 0; empty without the table."""
    if data.get("summary") is None:
        return ""
    rows = data.alignment("summary")
    rows = rows[rows["summary"] == summary]
    if rows.empty:
        return ""
    r = rows.iloc[0]
    n_ci, n_valid = int(r.n_with_ci), int(r.n_valid)
    line = f"\nlow > high in {int(r.n_low_gt_high)}/{n_valid} pairs"
    if n_ci:
        line += f", interval above 0 in {int(r.n_diff_ci_above_zero)}/{n_ci}"
        line += " with an interval" if n_ci < n_valid else ""
    elif n_valid:  # none defined (bootstrap resamples out of range, or no bootstrap): said
        line += ", no interval of low − high"
    return line + _pair_notes(r)


def draw_sets_rank(data: FigureData) -> Figure:
    """Fig. 2B–E: alignment of low / random / high mean-dispersion sets per vision model, LLM."""
    return _sets_figure(data, "mean", "B")


def draw_sets_pc1(data: FigureData) -> Figure:
    """Fig. 2G–J: the same with sets selected along PC1 of the residual space."""
    return _sets_figure(data, "pc1", "G")


# --------------------------------------------------------------------------- Supp. Fig. 1
def _pair_notes(r: Any) -> str:
    """ " (N undefined, M unstable, L layer tied)" for a summary row's pairs left out of its
    counts (whose value is not a number) and counted but flagged (unstable values, or a layer
    chosen within the stabilities of another); empty when none."""
    notes = []
    n_valid = int(r.n_valid)
    if int(getattr(r, "n_pairs", n_valid)) > n_valid:
        notes.append(f"{int(r.n_pairs) - n_valid} undefined")
    if int(getattr(r, "n_unstable", 0)):
        notes.append(f"{int(r.n_unstable)} unstable")
    if int(getattr(r, "n_layer_tied", 0) or 0):
        notes.append(f"{int(r.n_layer_tied)} layer tied")
    return f" ({', '.join(notes)})" if notes else ""


def _drop_line(data: FigureData) -> str:
    """The subtitle's counts from the drop summary table (read, never recomputed)."""
    table = data.get("drop_summary")
    if table is None:
        return ""
    rows = data.alignment("drop_summary")
    rows = rows[rows["summary"] == "mean"]
    if rows.empty:
        return ""
    r = rows.iloc[0]
    line = (
        f"\ndrop high > random of the same size > drop low in "
        f"{int(r.n_drop_high_gt_random_gt_drop_low)}/{int(r.n_valid)} pairs"
        f"\noutside the random 95% interval: drop high above in "
        f"{int(r.n_drop_high_above_random_ci)}, drop low below in "
        f"{int(r.n_drop_low_below_random_ci)}"
    )
    return line + _pair_notes(r)


def draw_drop25(data: FigureData) -> Figure:
    """Supp. Fig. 1: alignment on the full set, on random sets of the drop sets' size (the
    size-matched control: mean and 95% interval of the draws) and after dropping the most and
    the least dispersed stimuli."""
    grid = data.alignment("grid")
    visions, llms = _pairs_layout(data, grid)
    conds = ["full", "random_drop", "drop_high", "drop_low"]
    rows = {c: condition_rows(grid, c) for c in conds}
    if rows["random_drop"].empty:  # sets made without analysis.drop_control
        conds.remove("random_drop")
    n_draws = _n_draws(rows["random_drop"])
    series = [(c, pair_cells(rows[c]), c == "random_drop" and n_draws > 1) for c in conds]
    fig, n_unstable, n_undefined = _bar_panels(data, visions, llms, series, "A", True)
    # taller panels: every panel's axis label must stay below the three-line title
    fig.set_figheight(fig.get_figheight() + 0.7 * math.ceil(len(visions) / 2))
    labels = dict(CONDITION_LABELS)
    labels["random_drop"] = (
        f"Random sets of the drop size: mean and 95% interval of {n_draws} draws"
        if n_draws > 1
        else "Random set of the drop size (1 draw)"
    )
    handles = [Patch(color=COLORS[c], label=labels[c] + _set_size(rows[c])) for c in conds]
    handles += _flag_handles(n_unstable, n_undefined, "bar")
    fig.legend(handles=handles, loc="outside lower center", ncols=2)
    note = (
        ""
        if "random_drop" in conds
        else "\n(no size-matched random sets: analysis.drop_control off)"
    )
    ranking = _drop_ranking(rows)
    fig.suptitle(
        f"Dropping the stimuli of highest vs lowest {SUMMARY_TITLES[ranking]} "
        f"({metric_label(data.metric)})"
        + _drop_line(data)
        + note
        + pc1_title_note(data, ranking)  # method.md, "Dispersion"
    )
    return fig


def _drop_ranking(rows: dict[str, pd.DataFrame]) -> str:
    """The summary the drop sets drawn were ranked by: ``mean`` (the rows
    :func:`condition_rows` prefers), ``pc1`` when only those rows exist."""
    drawn = {
        str(x)
        for c in ("drop_high", "drop_low")
        if "summary" in rows[c].columns
        for x in rows[c]["summary"]
    }
    return "pc1" if drawn == {"pc1"} else "mean"


# --------------------------------------------------------------------------- grid heatmaps
def _diff_matrix(
    data: FigureData, grid: pd.DataFrame, summary: str, visions: list[str], llms: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Low − high per pair (from contrasts, else from the grid), a significance mask (bootstrap
    95% interval excludes 0), an unstable mask (the low or the high value is flagged) and a
    mask of the pairs the table has a row for (a value, or NaN: undefined)."""
    diff = pd.DataFrame(np.nan, index=visions, columns=llms)
    sig = pd.DataFrame(False, index=visions, columns=llms)
    flag = pd.DataFrame(False, index=visions, columns=llms)
    present = pd.DataFrame(False, index=visions, columns=llms)
    con = data.alignment("contrasts") if data.get("contrasts") is not None else None
    if con is not None and summary in set(con["summary"].astype(str)):
        c = con[con["summary"] == summary]
        c = c.assign(flagged=unstable(c, ("low_stability", "high_stability")))
        for r in c.itertuples(index=False):
            if r.vision in diff.index and r.llm in diff.columns:
                diff.loc[r.vision, r.llm] = r.diff_low_high
                present.loc[r.vision, r.llm] = True
                lo, hi = getattr(r, "diff_ci_low", np.nan), getattr(r, "diff_ci_high", np.nan)
                sig.loc[r.vision, r.llm] = bool(lo > 0 or hi < 0)
                flag.loc[r.vision, r.llm] = bool(r.flagged)
        return diff, sig, flag, present
    low = pair_cells(condition_rows(grid, "low", summary))
    high = pair_cells(condition_rows(grid, "high", summary))
    for key in low.index.intersection(high.index):
        v, ll = key
        if v in diff.index and ll in diff.columns:
            diff.loc[v, ll] = low.at[key, "value"] - high.at[key, "value"]
            flag.loc[v, ll] = bool(low.at[key, "unstable"] or high.at[key, "unstable"])
            present.loc[v, ll] = True
    return diff, sig, flag, present


def _heatmap(
    ax: Axes,
    mat: pd.DataFrame,
    text: pd.DataFrame,
    data: FigureData,
    present: pd.DataFrame | None = None,
    **kw,
) -> int:
    """A vision × LLM heatmap annotated with ``text``; a cell that is not a number is left
    grey with "n/a" (gid ``undefined|<vision>|<llm>``), one whose pair has no row in the table
    (``present`` False) is a white gap (gid ``missing|<vision>|<llm>``), as a missing row is in
    every figure. Returns the number of undefined cells."""
    values = mat.astype(float)
    sns.heatmap(
        values,
        ax=ax,
        annot=text.to_numpy(object),
        fmt="",
        annot_kws={"fontsize": 6.5},
        linewidths=0.5,
        linecolor="white",
        square=False,
        **kw,
    )
    ax.set_facecolor("#eeeeee")
    n_undefined = 0
    for a, v in enumerate(mat.index):
        for b, ll in enumerate(mat.columns):
            if present is not None and not present.iat[a, b]:
                ax.add_patch(Rectangle((b, a), 1, 1, facecolor="white", edgecolor="white",
                                       lw=0.5, gid=f"missing|{v}|{ll}"))  # fmt: skip
            elif not np.isfinite(values.iat[a, b]):
                ax.text(b + 0.5, a + 0.5, UNDEFINED_TEXT, ha="center", va="center",
                        fontsize=6.5, color=UNDEFINED_COLOR, gid=f"undefined|{v}|{ll}")  # fmt: skip
                n_undefined += 1
    ax.set_yticklabels(data.models.labels(mat.index), rotation=0)
    ax.set_xticklabels(data.models.labels(mat.columns), rotation=55, ha="right")
    ax.set_ylabel("Vision model")
    ax.set_xlabel(LLM_AXIS_LABEL)
    return n_undefined


def _cell_text(mat: pd.DataFrame, flag: pd.DataFrame, fmt: str, sig=None) -> pd.DataFrame:
    """Cell annotations: the value, '*' when significant, the dagger when flagged unstable."""
    out = pd.DataFrame("", index=mat.index, columns=mat.columns, dtype=object)
    for a in range(mat.shape[0]):
        for b in range(mat.shape[1]):
            x = float(mat.iat[a, b])
            if np.isfinite(x):
                star = "*" if sig is not None and sig.iat[a, b] else ""
                out.iat[a, b] = format(x, fmt) + star + (DAGGER if flag.iat[a, b] else "")
    return out


def draw_grid_heatmap(data: FigureData) -> Figure:
    """Full-set alignment grid (vision × LLM) and the low − high difference grids, annotated."""
    grid = data.alignment("grid")
    label = metric_label(data.metric)
    visions, llms = _pairs_layout(data, grid)
    cells = pair_cells(condition_rows(grid, "full"))
    full = pd.DataFrame(np.nan, index=visions, columns=llms)
    full_flag = pd.DataFrame(False, index=visions, columns=llms)
    full_present = pd.DataFrame(False, index=visions, columns=llms)
    for (v, ll), c in cells.iterrows():
        full.loc[v, ll], full_flag.loc[v, ll] = c["value"], bool(c["unstable"])
        full_present.loc[v, ll] = True
    con = data.get("contrasts")
    summaries = [
        s
        for s in ("mean", "pc1")
        if not condition_rows(grid, "low", s).empty
        or (con is not None and s in set(con["summary"].astype(str)))
    ]
    n = 1 + len(summaries)
    width = max(5.0, 0.62 * len(llms) + 2.8)
    fig = new_figure(width, n * (0.42 * len(visions) + 1.6) + 0.6)
    axes = panel_grid(fig, n, 1)
    n_undefined = _heatmap(
        axes[0], full, _cell_text(full, full_flag, ".3f"), data, full_present, cmap="viridis",
        cbar_kws={"label": label},
    )  # fmt: skip
    axes[0].set_title(f"{panel_letter(0)}   Full stimulus set: {label}", loc="left")
    n_unstable = int(full_flag.to_numpy().sum())
    diffs = [_diff_matrix(data, grid, s, visions, llms) for s in summaries]
    finite = [np.abs(d.to_numpy(float)) for d, _, _, _ in diffs]
    vmax = max([float(np.nanmax(f)) for f in finite if np.isfinite(f).any()] or [1.0])
    any_sig = False
    for i, (s, (diff, sig, flag, present)) in enumerate(zip(summaries, diffs, strict=True), 1):
        shown = diff.notna()
        n_unstable += int((flag & shown).to_numpy().sum())
        any_sig |= bool((sig & shown).to_numpy().any())
        n_undefined += _heatmap(
            axes[i], diff, _cell_text(diff, flag, "+.3f", sig), data, present, cmap="vlag",
            vmin=-vmax, vmax=vmax, cbar_kws={"label": f"Δ {label} (low − high)"},
        )  # fmt: skip
        axes[i].set_title(
            f"{panel_letter(i)}   Low − high dispersion, {SUMMARY_LABELS[s]}"
            + pc1_title_note(data, s, 52),  # method.md, "Dispersion"
            loc="left",
        )
    handles = []
    if any_sig:
        handles.append(
            Line2D(
                [],
                [],
                marker="$*$",
                ls="",
                color="black",
                label="bootstrap 95% interval of low − high excludes 0",
            )  # fmt: skip
        )
    handles += _flag_handles(n_unstable, n_undefined, "cell")
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=1)
    return fig


# --------------------------------------------------------------------------- layer-wise
def _chosen(g: pd.DataFrame) -> np.ndarray:
    """The ``chosen`` column as booleans (False when absent)."""
    return flag_column(g, "chosen")


def _defined(g: pd.DataFrame) -> np.ndarray:
    """Layers whose value is a number and, when the table says, valid (docs/method.md,
    "Degenerate layers"): the others are never drawn as a value."""
    ok = np.isfinite(g["value"].to_numpy(float))
    if "valid" in g.columns:
        ok &= flag_column(g, "valid")
    return ok


def draw_layerwise(data: FigureData) -> Figure:
    """he2025 Fig. 2 analogue: alignment of each vision model with every layer of each LLM.

    A degenerate layer (``valid`` false or no value) is a gap in the line and a cross on the
    bottom edge; a value with no defined neighbour (a line of one point, which draws nothing) a
    small dot; an unstable value an open marker; the chosen layer a black-edged marker (open
    when unstable; a diamond when it is tied with another layer, ``layer_tied``). Marks have
    gids ``chosen|``, ``tied|``, ``unstable|``, ``isolated|``, ``undefined|<vision>|<llm>``.
    """
    layers = data.alignment("layers")
    models = data.models
    visions = models.order(layers["vision"].astype(str).unique())
    llms = models.order(layers["llm"].astype(str).unique())
    colors = models.colors(llms)
    ncols = min(len(visions), 4)
    nrows = math.ceil(len(visions) / ncols)
    fig = new_figure(3.0 * ncols + 1.6, 2.6 * nrows + 0.5)
    axes = panel_grid(fig, len(visions), ncols, sharey=True)
    n_unstable = n_undefined = n_tied = 0
    for i, (ax, v) in enumerate(zip(axes, visions, strict=True)):
        bottom = blended_transform_factory(ax.transData, ax.transAxes)
        for ll in llms:
            g = layers[(layers["vision"] == v) & (layers["llm"] == ll)]
            if g.empty:
                continue
            if "vision_layer" in g.columns and g["vision_layer"].nunique() > 1:
                chosen_vl = g.loc[_chosen(g), "vision_layer"]
                vl = chosen_vl.iloc[0] if len(chosen_vl) else g["vision_layer"].max()
                g = g[g["vision_layer"] == vl]
            g = g.sort_values("llm_layer")
            depth = g["llm_layer"].to_numpy(float)
            depth = depth / depth.max() if depth.max() > 0 else depth
            ok = _defined(g)
            y = np.where(ok, g["value"].to_numpy(float), np.nan)
            ch, flag = _chosen(g) & ok, unstable(g) & ok
            tied = flag_column(g, "layer_tied")
            tie, ch = ch & tied, ch & ~tied
            ax.plot(depth, y, color=colors[ll], lw=1.3, label=models.label(ll))
            # a value between gaps (or the line's ends) is a segment of one point: a dot shows it
            neighbour = np.zeros_like(ok)
            neighbour[1:] |= ok[:-1]
            neighbour[:-1] |= ok[1:]
            alone = ok & ~neighbour & ~ch & ~tie & ~flag
            if alone.any():
                ax.scatter(depth[alone], y[alone], s=9, color=colors[ll], zorder=3,
                           gid=f"isolated|{v}|{ll}")  # fmt: skip
            loose = flag & ~ch & ~tie
            if loose.any():
                ax.scatter(depth[loose], y[loose], s=14, facecolors="white",
                           edgecolors=[colors[ll]], linewidths=1.0, zorder=3,
                           gid=f"unstable|{v}|{ll}")  # fmt: skip
            for mark, kind, size in ((ch, "chosen", 20), (tie, "tied", 24)):
                if mark.any():
                    face = [("white" if f else colors[ll]) for f in flag[mark]]
                    ax.scatter(depth[mark], y[mark], s=size, c=face, edgecolors="black",
                               linewidths=0.7, zorder=4, marker="D" if kind == "tied" else "o",
                               gid=f"{kind}|{v}|{ll}")  # fmt: skip
            n_tied += int(tie.sum())
            if (~ok).any():
                ax.scatter(depth[~ok], np.full((~ok).sum(), 0.04), transform=bottom, marker="x",
                           s=16, color=colors[ll], linewidths=1.2, zorder=4, clip_on=False,
                           gid=f"undefined|{v}|{ll}")  # fmt: skip
            n_unstable += int(flag.sum())
            n_undefined += int((~ok).sum())
        ax.set_title(f"{panel_letter(i)}   {models.label(v)}", loc="left")
        ax.set_xlabel("LLM layer (relative depth)")
        ax.set_ylabel(alignment_label(data.metric))
        ax.set_xlim(-0.02, 1.02)
        ax.tick_params(labelleft=True)
    handles = [Line2D([], [], color=colors[ll], lw=1.5, label=models.label(ll)) for ll in llms]
    handles.append(
        Line2D([], [], marker="o", ls="", mfc="#9e9e9e", mec="black", label="chosen layer")
    )
    if n_tied:
        handles.append(
            Line2D([], [], marker="D", ls="", mfc="#9e9e9e", mec="black", ms=5,
                   label=f"chosen, tied with another layer ({n_tied})")
        )  # fmt: skip
    handles += _flag_handles(n_unstable, n_undefined, "marker")
    if n_undefined:
        handles[-1].set_label(f"degenerate layer: no value ({n_undefined})")
    fig.legend(handles=handles, loc="outside right center", title="Language model")
    fig.suptitle(
        f"Layer-wise vision–language alignment ({metric_label(data.metric)}, full stimulus set)"
    )
    return fig


# --------------------------------------------------------------------------- contrasts
def _summary_line(stats: pd.DataFrame, summary: str) -> str:
    """The panel title's counts from the summary table (never recomputed here)."""
    if summary not in stats.index:
        return ""
    r = stats.loc[summary]
    line = f"\nlow > random > high in {int(r.n_low_gt_random_gt_high)}/{int(r.n_valid)} pairs"
    line += _pair_notes(r)
    # the ratio is taken over the pairs with low > 0 and high > 0 only: their number is shown
    ratio = r.median_ratio_low_high
    line += f"\nmedian low/high = {ratio:.2f}×" if np.isfinite(ratio) else "\nmedian low/high: n/a"
    if "n_ratio" in stats.columns:
        line += f" (n = {int(r.n_ratio)} pairs with low, high > 0)"
    return line


def draw_contrasts(data: FigureData) -> Figure:
    """Forest plot of low − high per pair (bootstrap 95% CI) and the fraction of random ≥ low.

    A pair whose low or high value is flagged unstable has an open marker; a fraction whose low
    value or random draws (``random_stability``, the mean of the draws' stabilities) are
    flagged unstable is a hatched bar; a difference or a fraction that is not a number is
    written "n/a". Marks have gids ``<what>|<vision>|<llm>|<summary>`` (what: diff, unstable,
    undefined, frac, frac_undefined, and the self-selection diamonds' of :func:`_draw_others`).
    """
    con = data.alignment("contrasts").copy()
    label = metric_label(data.metric)
    con["_flag"] = unstable(con, ("low_stability", "high_stability"))
    con["_frac_flag"] = unstable(con, ("low_stability", "random_stability"))
    models = data.models
    visions = models.order(con["vision"].astype(str).unique())
    llms = models.order(con["llm"].astype(str).unique())
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
    stats = (
        data.alignment("summary").set_index("summary")
        if data.get("summary") is not None
        else pd.DataFrame()
    )
    has_ci = con.get("diff_ci_low", pd.Series(np.nan, index=con.index)).notna().any()
    # the self-selection control: each pair on the sets chosen without its vision model
    others = data.alignment("self_selection") if data.get("self_selection") is not None else None
    n_others = n_others_unstable = 0
    unoriented: dict[str, dict[str, None]] = {}  # summary -> labels of the models left out

    ratios = [3.2, 1.2] * len(summaries)
    fig = new_figure(2.0 + 4.6 * len(summaries), 0.17 * (y + 2) + 1.9)
    axes = fig.subplots(1, 2 * len(summaries), sharey=True, gridspec_kw={"width_ratios": ratios})
    axes = np.atleast_1d(axes)
    n_unstable = n_undefined = n_frac_unstable = 0
    for i, s in enumerate(summaries):
        ax, axf = axes[2 * i], axes[2 * i + 1]
        across = blended_transform_factory(ax.transAxes, ax.transData)
        c = con[con["summary"] == s].set_index(["vision", "llm"])
        for p in pairs:
            if p not in c.index:
                continue
            r, yy, tag = c.loc[p], ypos[p], f"{p[0]}|{p[1]}|{s}"
            d = float(r["diff_low_high"])
            lo, hi = float(r.get("diff_ci_low", np.nan)), float(r.get("diff_ci_high", np.nan))
            colr = COLORS["low"] if lo > 0 else COLORS["high"] if hi < 0 else COLORS["random"]
            if not np.isfinite(d):
                ax.text(0.5, yy, f"{UNDEFINED_TEXT} (undefined)", transform=across, ha="center",
                        va="center", fontsize=6.5, color=UNDEFINED_COLOR,
                        gid=f"undefined|{tag}")  # fmt: skip
                n_undefined += 1
            else:
                if np.isfinite(lo) and np.isfinite(hi):
                    ax.hlines(yy, lo, hi, color=colr, lw=1.2)
                flag = bool(r["_flag"])
                ax.plot(d, yy, "o", ms=3.5, mec=colr, mfc="white" if flag else colr,
                        mew=1.0, gid=f"{'unstable' if flag else 'diff'}|{tag}")  # fmt: skip
                n_unstable += flag
            marks = _draw_others(ax, others, s, p, yy + OTHERS_OFFSET, tag)
            n_others += "drawn" in marks
            n_others_unstable += "unstable" in marks
            if "unoriented" in marks:
                unoriented.setdefault(s, {})[models.label(p[0])] = None
            frac = float(r.get("frac_random_ge_low", np.nan))
            if np.isfinite(frac):
                (bar,) = axf.barh(yy, frac, height=0.7, color=COLORS["random"], gid=f"frac|{tag}")
                if bool(r["_frac_flag"]):
                    _hatch(bar)
                    n_frac_unstable += 1
                axf.plot(frac, yy, "o", ms=2.5, color="black")  # visible even at 0
            else:
                axf.text(0.02, yy, UNDEFINED_TEXT, ha="left", va="center", fontsize=6.5,
                         color=UNDEFINED_COLOR, gid=f"frac_undefined|{tag}")  # fmt: skip
                n_undefined += 1
        ax.axvline(0, color="black", lw=0.7)
        ax.set_xlabel(
            f"Δ {label}, low − high (bootstrap 95% CI)"
            if has_ci
            else f"Δ {label}, low − high (no bootstrap interval)"
        )
        title = f"{panel_letter(i)}   Low − high, {SUMMARY_LABELS.get(s, s)}"
        if s in unoriented:  # method.md, "Sets chosen without the scored model"
            title += "\n" + textwrap.fill(
                f"Grey diamonds ({', '.join(unoriented[s])}): without that model, PC1 hardly "
                "follows the mean dispersion: low and high may be swapped",
                60,
            )
        ax.set_title(
            title + _summary_line(stats, s) + pc1_title_note(data, s), loc="left"
        )  # method.md, "Dispersion"
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
        Line2D([], [], marker="o", color=COLORS["random"], label="CI includes 0 (or none)"),
        Line2D([], [], marker="o", color=COLORS["high"], label="CI below 0 (high > low)"),
    ]
    flags = _flag_handles(n_unstable, n_undefined, "marker")
    if n_unstable:
        flags[0].set_label(f"low or high value: {UNSTABLE_NOTE} ({n_unstable})")
    if n_undefined:
        flags[-1] = Line2D([], [], ls="", marker=r"$\mathrm{n/a}$", ms=12, color=UNDEFINED_COLOR,
                           label=f"{UNDEFINED_NOTE} ({n_undefined})")  # fmt: skip
    if n_frac_unstable:
        h = Patch(
            facecolor=COLORS["random"],
            label=f"fraction, low value or random draws: {UNSTABLE_NOTE} ({n_frac_unstable})",
        )
        _hatch(h)
        flags.append(h)
    if n_others:
        handles.append(
            Line2D([], [], marker="D", ms=3, color=OTHERS_COLOR, lw=0.8,
                   label="sets chosen without the scored vision model"
                   + (" (its 95% CI)" if has_ci else ""))
        )  # fmt: skip
    if n_others_unstable:
        flags.append(
            Line2D([], [], marker="D", ls="", ms=3, mfc="white", mec=OTHERS_COLOR, mew=0.8,
                   label=f"without it, low or high: {UNSTABLE_NOTE} ({n_others_unstable})")
        )  # fmt: skip
    fig.legend(handles=handles + flags, loc="outside lower center", ncols=3)
    fig.suptitle(f"Low − high dispersion contrast per pair ({label})")
    return fig


#: where a pair's self-selection mark sits below its main one (rows are 1 apart)
OTHERS_OFFSET = 0.34
OTHERS_COLOR = "black"


#: a self-selection mark whose PC1 sets may have low and high swapped
UNORIENTED_COLOR = "#9e9e9e"


def _draw_others(
    ax: Axes, others: pd.DataFrame | None, summary: str, pair: tuple[str, str], y: float, tag: str
) -> frozenset[str]:
    """The pair's low − high on the sets chosen without its vision model (docs/method.md, "Sets
    chosen without the scored model"): a small diamond and its interval just below the main
    mark, gid ``others|<tag>``; ``others_undefined|<tag>`` when not a number. Its face is open
    when its low or high value is unstable (``others_unstable|<tag>``, as the main marks), and
    it is grey when the PC1 of the fit without the model hardly follows that fit's mean
    dispersion (``others_unoriented|<tag>``: its low and high may be swapped). Returns what it
    drew: empty, or ``drawn`` with ``unstable`` and ``unoriented`` where they apply."""
    if others is None:
        return frozenset()
    row = others[
        (others["vision"] == pair[0]) & (others["llm"] == pair[1]) & (others["summary"] == summary)
    ]
    if row.empty:
        return frozenset()
    r = row.iloc[0]
    d = float(r["diff_low_high"])
    if not np.isfinite(d):
        across = blended_transform_factory(ax.transAxes, ax.transData)
        ax.text(0.5, y, UNDEFINED_TEXT, transform=across, ha="center", va="center",
                fontsize=5.5, color=UNDEFINED_COLOR, gid=f"others_undefined|{tag}")  # fmt: skip
        return frozenset({"drawn"})
    marks = {"drawn"}
    if bool(unstable(row.iloc[:1], ("low_stability", "high_stability"))[0]):
        marks.add("unstable")
    if not bool(r.get("pc1_oriented", True)):
        marks.add("unoriented")
    colour = UNORIENTED_COLOR if "unoriented" in marks else OTHERS_COLOR
    lo, hi = float(r.get("diff_ci_low", np.nan)), float(r.get("diff_ci_high", np.nan))
    if np.isfinite(lo) and np.isfinite(hi):
        ax.hlines(y, lo, hi, color=colour, lw=0.6)
    what = next((f"others_{m}" for m in ("unoriented", "unstable") if m in marks), "others")
    ax.plot(d, y, "D", ms=2.4, mec=colour, mfc="white" if "unstable" in marks else colour,
            mew=0.8, gid=f"{what}|{tag}")  # fmt: skip
    return frozenset(marks)


# --------------------------------------------------------------------------- held-out layer
RULES = ("heldout", "full")
RULE_LABELS = {
    "heldout": "layer chosen on the other half (held out)",
    "full": "layer chosen on the full set (saw these stimuli)",
}


def _heldout_line(stats: pd.DataFrame, summary: str) -> str:
    """The panel title's counts from the held-out summary table (read, never recomputed)."""
    lines = []
    for rule in RULES:
        key = (summary, rule)
        if key not in stats.index:
            continue
        r = stats.loc[key]
        diff = f"{r.median_diff:+.3f}" if np.isfinite(r.median_diff) else "n/a"
        lines.append(
            f"\n{'held-out' if rule == 'heldout' else 'full-set'} layer: low > high in "
            f"{int(r.n_low_gt_high)}/{int(r.n_valid)} pairs, median Δ {diff}"
        )
        if notes := _pair_notes(r):  # on a line of their own: the panel is narrow
            lines.append(f"\n    {notes.strip()}")
    return "".join(lines)


def draw_heldout(data: FigureData) -> Figure:
    """Does the low − high contrast survive a layer chosen without the evaluated stimuli?

    Per pair, the low − high difference on the sets inside half B of each split, at the layer
    chosen on half A (held out) and at the layer chosen on the full set: the mean over splits
    and the 95% interval over splits (``xmodal.summary.heldout_pairs``); right: the fraction of
    splits with low > high (bars: held out; ticks: full-set layer) and of splits whose
    half-A layer is the full-set layer. A mean whose low or high stability (the mean over
    splits) exceeds the threshold is an open marker; a mean or a fraction that is not a number
    (a split's low or high undefined) "n/a". Marks have gids ``<rule>|<vision>|<llm>|<summary>``,
    ``unstable|<rule>|…``, ``undefined|<rule>|…``, ``frac|<rule>|…``, ``frac_undefined|<rule>|…``.
    """
    from xmodal.summary import heldout_pairs

    table = data.alignment("heldout")
    pairs_t = heldout_pairs(table)
    pairs_t["_flag"] = unstable(pairs_t, ("low_stability", "high_stability"))
    label = metric_label(data.metric)
    models = data.models
    visions = models.order(pairs_t["vision"].astype(str).unique())
    llms = models.order(pairs_t["llm"].astype(str).unique())
    summaries = [s for s in ("mean", "pc1") if s in set(pairs_t["summary"])] + sorted(
        set(pairs_t["summary"]) - {"mean", "pc1"}
    )
    pairs = [
        (v, ll)
        for v in visions
        for ll in llms
        if ((pairs_t["vision"] == v) & (pairs_t["llm"] == ll)).any()
    ]
    ypos, y = {}, 0.0
    for i, (v, ll) in enumerate(pairs):
        if i and v != pairs[i - 1][0]:
            y += 0.8
        ypos[(v, ll)] = y
        y += 1.0
    stats = (
        data.alignment("heldout_summary").set_index(["summary", "layer_rule"])
        if data.get("heldout_summary") is not None
        else pd.DataFrame()
    )
    n_splits = int(pairs_t["n_splits"].max()) if len(pairs_t) else 0
    ratios = [3.2, 1.1, 1.1] * len(summaries)
    fig = new_figure(2.0 + 5.6 * len(summaries), 0.19 * (y + 2) + 2.4)
    axes = fig.subplots(1, 3 * len(summaries), sharey=True, gridspec_kw={"width_ratios": ratios})
    axes = np.atleast_1d(axes)
    offsets = {"heldout": -0.17, "full": 0.17}
    colors = {"heldout": COLORS["heldout"], "full": COLORS["full"]}
    n_unstable = n_undefined = 0
    for i, s in enumerate(summaries):
        ax, axf, axs = axes[3 * i], axes[3 * i + 1], axes[3 * i + 2]
        across = blended_transform_factory(ax.transAxes, ax.transData)
        c = pairs_t[pairs_t["summary"] == s].set_index(["vision", "llm", "layer_rule"])
        for p in pairs:
            for rule in RULES:
                key = (*p, rule)
                if key not in c.index:
                    continue
                r, yy = c.loc[key], ypos[p] + offsets[rule]
                tag = f"{rule}|{p[0]}|{p[1]}|{s}"
                d = float(r["diff_mean"])
                if not np.isfinite(d):
                    ax.text(0.5, yy, f"{UNDEFINED_TEXT} (undefined)", transform=across,
                            ha="center", va="center", fontsize=6, color=UNDEFINED_COLOR,
                            gid=f"undefined|{tag}")  # fmt: skip
                    n_undefined += 1
                else:
                    lo, hi = float(r["diff_lo"]), float(r["diff_hi"])
                    if np.isfinite(lo) and np.isfinite(hi):
                        ax.hlines(yy, lo, hi, color=colors[rule], lw=1.1)
                    flag = bool(r["_flag"])
                    ax.plot(d, yy, "o" if rule == "heldout" else "s", ms=3.5, mec=colors[rule],
                            mfc="white" if flag else colors[rule], mew=1.0,
                            gid=f"unstable|{tag}" if flag else tag)  # fmt: skip
                    n_unstable += flag
                frac = float(r["frac_splits_low_gt_high"])
                if not np.isfinite(frac):  # a split whose low or high is undefined
                    # on a white box, at the rule's offset: readable over the other rule's bar
                    axf.text(0.02, yy, UNDEFINED_TEXT, ha="left", va="center", fontsize=6,
                             color=UNDEFINED_COLOR, zorder=5, gid=f"frac_undefined|{tag}",
                             bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none"})  # fmt: skip
                    n_undefined += 1
                elif rule == "heldout":
                    axf.barh(ypos[p], frac, height=0.7, color=colors[rule], gid=f"frac|{tag}")
                else:
                    axf.plot(frac, ypos[p], "|", ms=7, mew=1.6, color=colors[rule],
                             gid=f"frac|{tag}")  # fmt: skip
                if rule == "heldout" and np.isfinite(float(r["frac_same_layer"])):
                    axs.barh(ypos[p], float(r["frac_same_layer"]), height=0.7,
                             color=COLORS["random"], gid=f"same|{p[0]}|{p[1]}|{s}")  # fmt: skip
        ax.axvline(0, color="black", lw=0.7)
        ax.set_xlabel(f"Δ {label}, low − high inside half B\n(mean and 95% interval over splits)")
        title = f"{panel_letter(i)}   Low − high, {SUMMARY_LABELS.get(s, s)}"
        ax.set_title(
            title + _heldout_line(stats, s) + pc1_title_note(data, s, 60), loc="left"
        )  # method.md, "Dispersion"
        for a, xlabel in (
            (axf, "Splits with\nlow > high"),
            (axs, "Splits: half-A layer\n= full-set layer"),
        ):
            a.set_xlim(0, 1)
            a.set_xlabel(xlabel)
            a.tick_params(labelleft=False)
        axf.axvline(0.5, color="black", lw=0.6, ls="--")
    axes[0].set_yticks([ypos[p] for p in pairs])
    axes[0].set_yticklabels([f"{models.label(v)} × {models.label(ll)}" for v, ll in pairs])
    axes[0].set_ylim(y - 0.2, -0.8)
    axes[0].set_ylabel("Vision × language model")
    handles = [
        Line2D([], [], marker="o", color=colors["heldout"], label=RULE_LABELS["heldout"]),
        Line2D([], [], marker="s", color=colors["full"], label=RULE_LABELS["full"]),
    ]
    flags = _flag_handles(n_unstable, n_undefined, "marker")
    if n_unstable:
        flags[0].set_label(f"low or high value: {UNSTABLE_NOTE} ({n_unstable})")
    if n_undefined:
        flags[-1] = Line2D([], [], ls="", marker=r"$\mathrm{n/a}$", ms=12, color=UNDEFINED_COLOR,
                           label=f"{UNDEFINED_NOTE} ({n_undefined})")  # fmt: skip
    fig.legend(handles=handles + flags, loc="outside lower center", ncols=2)
    sizes = table["n_stimuli"].dropna().unique() if "n_stimuli" in table.columns else []
    size = f", sets of {int(sizes[0])}" if len(sizes) == 1 else ""
    fig.suptitle(
        f"Layer choice without selection bias ({label}): the layer is chosen on half A of each of "
        f"{n_splits} random splits, the sets are drawn inside half B{size}"
    )
    return fig
