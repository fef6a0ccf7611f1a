"""The summary of the experiment: in how many (vision, LLM) pairs is low > random > high?

Only pairs whose low, high and random-mean values are all finite numbers are counted: a pair
with a degenerate value is reported as such (``n_pairs`` − ``n_valid``), never as a failure of
the effect. Pairs whose low or high value can move by more than :data:`STABILITY_THRESHOLD` with
the tie-breaking of their nearest neighbours are counted in ``n_unstable`` (docs/method.md,
"Stability"). Every count states its denominator: ``n_with_ci`` pairs have a bootstrap
interval, ``n_ratio`` pairs a low / high ratio. Every table read here must hold each key once
(:func:`require_unique_keys`): a repeated key is an error, never averaged or counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

PAIR = ["vision", "llm"]

#: A value whose stability (how far it moves when near-tied neighbours are broken the other way)
#: exceeds this is flagged in tables, figures and the report.
STABILITY_THRESHOLD = 1e-3

SUMMARY_COLUMNS = [
    "metric",
    "summary",
    "n_pairs",
    "n_valid",
    "n_unstable",
    "n_layer_tied",
    "n_low_gt_random_gt_high",
    "n_low_gt_high",
    "n_with_ci",
    "n_diff_ci_above_zero",
    "n_ratio",
    "median_ratio_low_high",
    "max_ratio_low_high",
    "n_ratio_random",
    "median_ratio_low_random",
    "max_ratio_low_random",
    "median_frac_random_ge_low",
]

__all__ = [
    "STABILITY_THRESHOLD",
    "SUMMARY_COLUMNS",
    "flag_column",
    "mean_stability",
    "require_unique_keys",
    "self_selection_summary_table",
    "summary_table",
    "unstable",
]


def mean_stability(stabilities: np.ndarray) -> float:
    """Stability of a mean of draws: the mean of the draws' stabilities, the most the mean can
    move when each draw moves by its own stability (|Δ mean| ≤ mean |Δ_i|; docs/method.md,
    "Stability"). NaN when there are no draws or any draw's stability is NaN (its value is)."""
    s = np.asarray(stabilities, dtype=np.float64)
    return float(s.mean()) if s.size else float("nan")


def require_unique_keys(table: pd.DataFrame, keys: Sequence[str], name: str) -> None:
    """Refuse a table in which a key (the values of ``keys``) appears more than once: a repeated
    pair, draw or split would be averaged in or counted twice. The ValueError names the table
    ``name`` and the repeated keys (the first five)."""
    keys = list(keys)
    missing = [k for k in keys if k not in table.columns]
    if missing:
        raise ValueError(f"the {name} table has no column(s) {missing}: its keys are {keys}")
    repeated = table.loc[table.duplicated(keys, keep=False), keys].drop_duplicates()
    if len(repeated):
        shown = [tuple(r) for r in repeated.itertuples(index=False)][:5]
        raise ValueError(
            f"the {name} table holds {len(repeated)} ({', '.join(keys)}) key(s) more than once: "
            f"{shown}{' …' if len(repeated) > 5 else ''}; each must appear once: the table is "
            "stale or was concatenated twice, rerun the jobs that write it"
        )


def unstable(table: pd.DataFrame, columns: tuple[str, ...] = ("stability",)) -> np.ndarray:
    """Rows whose stability columns exceed :data:`STABILITY_THRESHOLD` (missing columns: none)."""
    flags = np.zeros(len(table), dtype=bool)
    for c in columns:
        if c in table.columns:
            flags |= table[c].to_numpy(float) > STABILITY_THRESHOLD
    return flags


def flag_column(table: pd.DataFrame, column: str) -> np.ndarray:
    """A True/False column as booleans, as written or as read back from a table (``True``,
    ``true``, ``1``); all False when the table has no such column."""
    if column not in table.columns:
        return np.zeros(len(table), dtype=bool)
    return table[column].astype(str).str.lower().isin(["true", "1"]).to_numpy()


def _from_grid(grid: pd.DataFrame) -> pd.DataFrame:
    """low, high and random_mean per (vision, llm, metric, summary) from the grid table."""
    g = grid.copy()
    if "metric" not in g.columns:
        g["metric"] = "cknna"
    # without a draw column, the rows of a random family are its draws: only the fixed sets'
    # keys can be checked
    draw = ["draw"] if "draw" in g.columns else []
    checked = g if draw else g[g["condition"].isin(["low", "high"])]
    require_unique_keys(checked, [*PAIR, "metric", "condition", "summary", *draw], "grid")
    out = []
    summaries = sorted(set(g.loc[g["condition"].isin(["low", "high"]), "summary"]))
    rnd = g[g["condition"] == "random"]
    keys = [*PAIR, "metric"]
    for s in summaries:
        low = g[(g["condition"] == "low") & (g["summary"] == s)].groupby(keys)["value"].mean()
        high = g[(g["condition"] == "high") & (g["summary"] == s)].groupby(keys)["value"].mean()
        r = rnd[rnd["summary"] == s] if (rnd["summary"] == s).any() else rnd
        # a non-finite draw makes the mean non-finite: never averaged as if it were a number
        rmean = r.groupby(keys)["value"].agg(lambda v: v.mean() if np.isfinite(v).all() else np.nan)
        df = pd.concat({"low": low, "high": high, "random_mean": rmean}, axis=1).reset_index()
        df["summary"] = s
        out.append(df)
    cols = [*keys, "summary", "low", "high", "random_mean"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def summary_table(contrasts: pd.DataFrame, grid: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (metric, dispersion summary) over all (vision, LLM) pairs.

    Columns: ``metric``; ``summary`` (``mean``, then ``pc1``); ``n_pairs``; ``n_valid`` (pairs
    whose low, high and random mean are finite; the counts below are over these);
    ``n_unstable`` (valid pairs whose low or high value is flagged unstable); ``n_layer_tied``
    (valid pairs whose LLM layer the layer search chose within the stabilities of another
    layer: ``layer_tied``, docs/method.md, "Layer choice and statistics");
    ``n_low_gt_random_gt_high``; ``n_low_gt_high``; ``n_with_ci`` (valid pairs whose bootstrap
    95% interval of low − high has two finite ends); ``n_diff_ci_above_zero`` (of those, the
    pairs whose interval lies entirely above 0; missing for a metric without a bootstrap, or
    where no pair has an interval);
    ``n_ratio`` (valid pairs with low > 0 and high > 0, the only ones whose ratio is defined);
    ``median_ratio_low_high`` and ``max_ratio_low_high`` (low / high over those ``n_ratio``
    pairs, NaN when there are none; the paper reports up to 2×); ``n_ratio_random``,
    ``median_ratio_low_random`` and ``max_ratio_low_random`` (the same for low / random mean,
    over the valid pairs with low > 0 and random mean > 0: the paper's "twofold" is over the
    random and the high sets); ``median_frac_random_ge_low``.

    Each (vision, llm, metric, summary) must appear once in ``contrasts`` and each (vision, llm,
    metric, condition, summary, draw) once in ``grid`` (ValueError otherwise).

    ``low``, ``high`` and ``random_mean`` come from ``contrasts``; values missing there, and the
    pairs of a metric it has no rows for, are taken from ``grid`` (the concatenated conditions
    tables) when it is given. A pair of a metric it has rows for but not that pair's is a
    ValueError: the two tables come from the same jobs, so one is stale.
    """
    keys = [*PAIR, "metric", "summary"]
    con = contrasts.copy() if contrasts is not None else pd.DataFrame(columns=keys)
    if "metric" not in con.columns:
        con["metric"] = "cknna"
    for c in ("diff_ci_low", "diff_ci_high", "frac_random_ge_low", "low", "high", "random_mean"):
        if c not in con.columns:
            con[c] = np.nan
    require_unique_keys(con, keys, "contrasts")
    if grid is not None and not grid.empty:
        g = _from_grid(grid).set_index(keys)
        # a pair the conditions measured but whose contrasts row is missing (a stale or partial
        # table) would count as an interval that does not exclude 0: refused, naming the pairs
        measured = g.index[g.index.get_level_values("metric").isin(set(con["metric"]))]
        missing = measured.difference(con.set_index(keys).index)
        if len(missing):
            raise ValueError(
                f"the contrasts table lacks {len(missing)} (vision, llm, metric, summary) row(s) "
                f"that the conditions table has: {[tuple(m) for m in missing[:5]]}; the two come "
                "from the same conditions jobs, so one of them is stale: rerun those jobs"
            )
        con = con.set_index(keys)
        con = con.combine_first(g[["low", "high", "random_mean"]]).reset_index()
    rows = []
    metrics = list(dict.fromkeys(["cknna", *sorted(set(con["metric"]))]))
    for metric in metrics:
        cm = con[con["metric"] == metric]
        order = [s for s in ("mean", "pc1") if s in set(cm["summary"])]
        order += sorted(set(cm["summary"].dropna()) - set(order))
        for s in order:
            rows.append(_summary_row(metric, s, cm[cm["summary"] == s]))
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return table.astype({"n_diff_ci_above_zero": "Int64"})


def _fold(low: np.ndarray, other: np.ndarray) -> tuple[int, float, float]:
    """How many pairs have a ratio low / other, and its median and maximum over them (NaN when
    none). A ratio of two alignments is a fold only when both are positive: a negative low over
    a positive other, or anything over other ≤ 0, is no "fold" and is left out."""
    both_positive = (low > 0) & (other > 0)
    ratio = low[both_positive] / other[both_positive]
    if not ratio.size:
        return 0, np.nan, np.nan
    return int(both_positive.sum()), float(np.median(ratio)), float(np.max(ratio))


def _summary_row(metric: str, summary: str, c: pd.DataFrame) -> dict:
    low, high, rnd = (c[k].to_numpy(float) for k in ("low", "high", "random_mean"))
    valid = np.isfinite(low) & np.isfinite(high) & np.isfinite(rnd)
    flagged = unstable(c, ("low_stability", "high_stability")) & valid
    tied = flag_column(c, "layer_tied") & valid
    low, high, rnd = low[valid], high[valid], rnd[valid]
    ci_low = c["diff_ci_low"].to_numpy(float)[valid]
    has_ci = np.isfinite(ci_low) & np.isfinite(c["diff_ci_high"].to_numpy(float)[valid])
    frac = c["frac_random_ge_low"].to_numpy(float)[valid]
    n_ratio, median_ratio, max_ratio = _fold(low, high)
    n_ratio_random, median_ratio_random, max_ratio_random = _fold(low, rnd)
    frac = frac[np.isfinite(frac)]
    return {
        "metric": metric,
        "summary": summary,
        "n_pairs": int(len(c)),
        "n_valid": int(valid.sum()),
        "n_unstable": int(flagged.sum()),
        "n_layer_tied": int(tied.sum()),
        "n_low_gt_random_gt_high": int(np.sum((low > rnd) & (rnd > high))),
        "n_low_gt_high": int(np.sum(low > high)),
        "n_with_ci": int(has_ci.sum()),
        # over the pairs with an interval; missing (not 0) for a metric without a bootstrap
        # (the CKA metrics: n_boot = 0) and where no pair has one (resamples out of range)
        "n_diff_ci_above_zero": int(np.sum(ci_low[has_ci] > 0)) if has_ci.any() else pd.NA,
        "n_ratio": n_ratio,
        "median_ratio_low_high": median_ratio,
        "max_ratio_low_high": max_ratio,
        "n_ratio_random": n_ratio_random,
        "median_ratio_low_random": median_ratio_random,
        "max_ratio_low_random": max_ratio_random,
        "median_frac_random_ge_low": float(np.median(frac)) if frac.size else np.nan,
    }


# ---------------------------------------------------------------- the controls

DROP_SUMMARY_COLUMNS = [
    "metric",
    "summary",
    "n_pairs",
    "n_valid",
    "n_unstable",
    "n_drop_high_gt_random_gt_drop_low",
    "n_drop_high_above_random_ci",
    "n_drop_low_below_random_ci",
    "n_drop_high_gt_full",
    "n_drop_low_gt_full",
    "median_frac_random_ge_drop_high",
    "median_frac_random_ge_drop_low",
    "median_random_minus_full",
]

HELDOUT_PAIR_COLUMNS = [
    "vision",
    "llm",
    "metric",
    "summary",
    "layer_rule",
    "n_splits",
    "low_mean",
    "high_mean",
    "random_mean",
    "diff_mean",
    "diff_lo",
    "diff_hi",
    "low_stability",
    "high_stability",
    "frac_splits_low_gt_high",
    "frac_same_layer",
]

HELDOUT_SUMMARY_COLUMNS = [
    "metric",
    "summary",
    "layer_rule",
    "n_pairs",
    "n_splits",
    "n_valid",
    "n_unstable",
    "n_low_gt_high",
    "n_low_gt_random_gt_high",
    "median_diff",
    "median_frac_splits_low_gt_high",
    "median_frac_same_layer",
]

__all__ += [
    "DROP_SUMMARY_COLUMNS",
    "HELDOUT_PAIR_COLUMNS",
    "HELDOUT_SUMMARY_COLUMNS",
    "drop_summary_table",
    "heldout_pairs",
    "heldout_summary_table",
]


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else np.nan


def _groups(table: pd.DataFrame, extra: tuple[str, ...] = ()) -> list[tuple[tuple, pd.DataFrame]]:
    """(metric, summary, *extra) groups: CKNNA first, then the others; mean before pc1."""
    t = table.copy()
    if "metric" not in t.columns:
        t["metric"] = "cknna"
    metrics = list(dict.fromkeys(["cknna", *sorted(set(t["metric"]))]))
    out = []
    for metric in metrics:
        tm = t[t["metric"] == metric]
        order = [s for s in ("mean", "pc1") if s in set(tm["summary"])]
        order += sorted(set(tm["summary"]) - set(order))
        for s in order:
            ts = tm[tm["summary"] == s]
            if not extra:
                out.append(((metric, s), ts))
                continue
            for key, g in ts.groupby(list(extra), sort=False):
                key = key if isinstance(key, tuple) else (key,)
                out.append(((metric, s, *key), g))
    return out


def drop_summary_table(drop: pd.DataFrame) -> pd.DataFrame:
    """One row per (metric, summary) of the drop sets against the size-matched random draws
    (docs/method.md, "Size-matched drop control"): :data:`DROP_SUMMARY_COLUMNS`.

    ``drop``: ``xmodal.alignment.drop_table`` rows of every pair. ``n_valid`` counts pairs whose
    drop_high, drop_low and random mean are finite; every count and median is over these.
    ``n_unstable``: valid pairs whose drop_high, drop_low or random stability (the mean of the
    draws') exceeds :data:`STABILITY_THRESHOLD`. ``n_drop_high_above_random_ci`` /
    ``n_drop_low_below_random_ci``: the drop set outside the draws' 95% interval on its side;
    ``n_drop_*_gt_full``: the comparison the control replaces (different set sizes);
    ``median_random_minus_full``: how much the set size alone moves the value. Each (vision,
    llm, metric, summary) must appear once (ValueError otherwise; rows without the pair columns
    are taken as one pair each).
    """
    if set(PAIR) <= set(drop.columns):
        d = drop if "metric" in drop.columns else drop.assign(metric="cknna")
        require_unique_keys(d, [*PAIR, "metric", "summary"], "drop")
    rows = []
    for (metric, summary), c in _groups(drop):
        hi, lo, rnd = (c[k].to_numpy(float) for k in ("drop_high", "drop_low", "random_mean"))
        valid = np.isfinite(hi) & np.isfinite(lo) & np.isfinite(rnd)
        cols = ("drop_high_stability", "drop_low_stability", "random_stability")
        flagged = unstable(c, cols) & valid
        v = c[valid]
        hi, lo, rnd = hi[valid], lo[valid], rnd[valid]
        full = v["full"].to_numpy(float)
        rows.append(
            {
                "metric": metric,
                "summary": summary,
                "n_pairs": int(len(c)),
                "n_valid": int(valid.sum()),
                "n_unstable": int(flagged.sum()),
                "n_drop_high_gt_random_gt_drop_low": int(np.sum((hi > rnd) & (rnd > lo))),
                "n_drop_high_above_random_ci": int(
                    np.sum(hi > v["random_ci_high"].to_numpy(float))
                ),
                "n_drop_low_below_random_ci": int(np.sum(lo < v["random_ci_low"].to_numpy(float))),
                "n_drop_high_gt_full": int(np.sum(hi > full)),
                "n_drop_low_gt_full": int(np.sum(lo > full)),
                "median_frac_random_ge_drop_high": _median(
                    v["frac_random_ge_drop_high"].to_numpy(float)
                ),
                "median_frac_random_ge_drop_low": _median(
                    v["frac_random_ge_drop_low"].to_numpy(float)
                ),
                "median_random_minus_full": _median(rnd - full),
            }
        )
    return pd.DataFrame(rows, columns=DROP_SUMMARY_COLUMNS)


def _mean_or_nan(x: np.ndarray) -> float:
    """The mean of all values, NaN when any is not finite (an undefined split is never dropped)."""
    return float(x.mean()) if x.size and np.isfinite(x).all() else np.nan


def heldout_pairs(heldout: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per (vision, LLM, metric, summary, layer_rule), the held-out splits summarised
    (docs/method.md, "Held-out layer choice"): :data:`HELDOUT_PAIR_COLUMNS`.

    Means over splits of low, high, the random mean and low − high (NaN when any split's is);
    ``diff_lo``/``diff_hi``: the central ``level`` percentile interval of low − high over splits
    (linear interpolation; NaN when any split's is); ``low_stability``/``high_stability``: the
    mean of the splits' stabilities (the most each mean can move); ``frac_splits_low_gt_high``:
    the fraction of splits with low > high, NaN when any split's low or high is not a number (as
    for the means: an undefined split is never left out); ``frac_same_layer``: splits whose
    held-out layer is the full-set layer (the same for both rules). Each (vision, llm, metric,
    summary, split, layer_rule) must appear once (ValueError otherwise).
    """
    from xmodal.intervals import percentile_interval

    t = heldout.copy()
    keys = ["vision", "llm", "metric", "summary", "split"]
    require_unique_keys(t, [*keys, "layer_rule"], "held-out")
    layer = t.pivot_table(index=keys, columns="layer_rule", values="llm_layer", aggfunc="first")
    same = (
        (layer["heldout"] == layer["full"]).groupby(level=[0, 1, 2, 3]).mean()
        if {"heldout", "full"} <= set(layer.columns)
        else None
    )
    rows = []
    group_keys = ["vision", "llm", "metric", "summary", "layer_rule"]
    for key, g in t.groupby(group_keys, sort=False):
        low, high = g["low"].to_numpy(float), g["high"].to_numpy(float)
        diff = g["diff_low_high"].to_numpy(float)
        lo, hi = percentile_interval(diff, level)
        defined = bool(low.size) and bool(np.isfinite(low).all() and np.isfinite(high).all())
        rows.append(
            {
                **dict(zip(group_keys, key, strict=True)),
                "n_splits": int(g["split"].nunique()),
                "low_mean": _mean_or_nan(low),
                "high_mean": _mean_or_nan(high),
                "random_mean": _mean_or_nan(g["random_mean"].to_numpy(float)),
                "diff_mean": _mean_or_nan(diff),
                "diff_lo": lo,
                "diff_hi": hi,
                "low_stability": float(g["low_stability"].to_numpy(float).mean()),
                "high_stability": float(g["high_stability"].to_numpy(float).mean()),
                "frac_splits_low_gt_high": float(np.mean(low > high)) if defined else np.nan,
                "frac_same_layer": float(same.loc[tuple(key[:4])]) if same is not None else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=HELDOUT_PAIR_COLUMNS)


def heldout_summary_table(heldout: pd.DataFrame) -> pd.DataFrame:
    """One row per (metric, summary, layer_rule) over pairs (:data:`HELDOUT_SUMMARY_COLUMNS`),
    from :func:`heldout_pairs`: ``n_valid`` counts pairs whose mean low, high and random over
    splits are finite (the counts and medians are over these); ``n_unstable`` valid pairs whose
    mean low or high stability exceeds :data:`STABILITY_THRESHOLD`; ``n_low_gt_high`` pairs
    whose mean low − high over splits is > 0; ``n_low_gt_random_gt_high`` on the means over
    splits; medians over pairs of the mean difference, of the fraction of splits with low > high
    and of the fraction of splits whose held-out layer is the full-set layer."""
    pairs = heldout_pairs(heldout)
    rows = []
    for (metric, summary, rule), c in _groups(pairs, ("layer_rule",)):
        low, high, rnd = (c[k].to_numpy(float) for k in ("low_mean", "high_mean", "random_mean"))
        valid = np.isfinite(low) & np.isfinite(high) & np.isfinite(rnd)
        flagged = unstable(c, ("low_stability", "high_stability")) & valid
        v = c[valid]
        low, high, rnd = low[valid], high[valid], rnd[valid]
        rows.append(
            {
                "metric": metric,
                "summary": summary,
                "layer_rule": rule,
                "n_pairs": int(len(c)),
                "n_splits": int(c["n_splits"].max()) if len(c) else 0,
                "n_valid": int(valid.sum()),
                "n_unstable": int(flagged.sum()),
                "n_low_gt_high": int(np.sum(low > high)),
                "n_low_gt_random_gt_high": int(np.sum((low > rnd) & (rnd > high))),
                "median_diff": _median(v["diff_mean"].to_numpy(float)),
                "median_frac_splits_low_gt_high": _median(
                    v["frac_splits_low_gt_high"].to_numpy(float)
                ),
                "median_frac_same_layer": _median(v["frac_same_layer"].to_numpy(float)),
            }
        )
    return pd.DataFrame(rows, columns=HELDOUT_SUMMARY_COLUMNS)


def self_selection_summary_table(
    self_selection: pd.DataFrame, contrasts: pd.DataFrame
) -> pd.DataFrame:
    """:func:`summary_table` of the sets chosen with every vision model (``sets`` = ``all``,
    from the main contrasts) and of the sets chosen without the scored one (``others``, from
    ``self_selection.tsv``), per metric and dispersion summary (mean, then PC1), ``all`` then
    ``others`` (docs/method.md, "Sets chosen without the scored model"). Columns ``sets`` and
    :data:`SUMMARY_COLUMNS`.
    A repeated (vision, llm, metric, summary) in either table is a ValueError."""
    require_unique_keys(self_selection, [*PAIR, "metric", "summary"], "self-selection")
    metrics = list(dict.fromkeys(self_selection["metric"]))
    summaries = set(self_selection["summary"])
    main = contrasts[contrasts["summary"].isin(summaries) & contrasts["metric"].isin(metrics)]
    parts = [
        summary_table(main).assign(sets="all"),
        summary_table(self_selection).assign(sets="others"),
    ]
    out = pd.concat(parts, ignore_index=True)
    out["_order"] = out["metric"].map({m: i for i, m in enumerate(metrics)})
    out["_summary"] = out["summary"].map({"mean": 0, "pc1": 1})
    out = out.sort_values(["_order", "_summary", "sets"], kind="stable")
    return out[["sets", *SUMMARY_COLUMNS]].reset_index(drop=True)
