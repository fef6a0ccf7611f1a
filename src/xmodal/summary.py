"""The summary of the experiment: in how many (vision, LLM) pairs is low > random > high?

Only pairs whose low, high and random-mean values are all finite numbers are counted: a pair
with a degenerate value is reported as such (``n_pairs`` − ``n_valid``), never as a failure of
the effect. Pairs whose low or high value can move by more than :data:`STABILITY_THRESHOLD` with
the tie-breaking of their nearest neighbours are counted in ``n_unstable`` (docs/method.md,
"Stability").
"""

from __future__ import annotations

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
    "n_low_gt_random_gt_high",
    "n_low_gt_high",
    "n_diff_ci_above_zero",
    "median_ratio_low_high",
    "max_ratio_low_high",
    "median_frac_random_ge_low",
]

__all__ = ["STABILITY_THRESHOLD", "SUMMARY_COLUMNS", "summary_table", "unstable"]


def unstable(table: pd.DataFrame, columns: tuple[str, ...] = ("stability",)) -> np.ndarray:
    """Rows whose stability columns exceed :data:`STABILITY_THRESHOLD` (missing columns: none)."""
    flags = np.zeros(len(table), dtype=bool)
    for c in columns:
        if c in table.columns:
            flags |= table[c].to_numpy(float) > STABILITY_THRESHOLD
    return flags


def _from_grid(grid: pd.DataFrame) -> pd.DataFrame:
    """low, high and random_mean per (vision, llm, metric, summary) from the grid table."""
    g = grid.copy()
    if "metric" not in g.columns:
        g["metric"] = "cknna"
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
    ``n_unstable`` (valid pairs whose low or high value is flagged unstable);
    ``n_low_gt_random_gt_high``; ``n_low_gt_high``; ``n_diff_ci_above_zero`` (bootstrap 95% CI
    of low − high entirely above 0); ``median_ratio_low_high`` and ``max_ratio_low_high`` (low /
    high over valid pairs with high > 0; the paper reports up to 2×);
    ``median_frac_random_ge_low``.

    ``low``, ``high`` and ``random_mean`` come from ``contrasts``; pairs or values missing there
    are taken from ``grid`` (the concatenated conditions tables) when it is given.
    """
    keys = [*PAIR, "metric", "summary"]
    con = contrasts.copy() if contrasts is not None else pd.DataFrame(columns=keys)
    if "metric" not in con.columns:
        con["metric"] = "cknna"
    for c in ("diff_ci_low", "frac_random_ge_low", "low", "high", "random_mean"):
        if c not in con.columns:
            con[c] = np.nan
    if grid is not None and not grid.empty:
        g = _from_grid(grid).set_index(keys)
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
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _summary_row(metric: str, summary: str, c: pd.DataFrame) -> dict:
    low, high, rnd = (c[k].to_numpy(float) for k in ("low", "high", "random_mean"))
    valid = np.isfinite(low) & np.isfinite(high) & np.isfinite(rnd)
    flagged = unstable(c, ("low_stability", "high_stability")) & valid
    low, high, rnd = low[valid], high[valid], rnd[valid]
    ci_low = c["diff_ci_low"].to_numpy(float)[valid]
    frac = c["frac_random_ge_low"].to_numpy(float)[valid]
    ratio = np.where(high > 0, low / np.where(high > 0, high, 1.0), np.nan)
    finite = ratio[np.isfinite(ratio)]
    frac = frac[np.isfinite(frac)]
    return {
        "metric": metric,
        "summary": summary,
        "n_pairs": int(len(c)),
        "n_valid": int(valid.sum()),
        "n_unstable": int(flagged.sum()),
        "n_low_gt_random_gt_high": int(np.sum((low > rnd) & (rnd > high))),
        "n_low_gt_high": int(np.sum(low > high)),
        "n_diff_ci_above_zero": int(np.sum(ci_low > 0)),
        "median_ratio_low_high": float(np.median(finite)) if finite.size else np.nan,
        "max_ratio_low_high": float(np.max(finite)) if finite.size else np.nan,
        "median_frac_random_ge_low": float(np.median(frac)) if frac.size else np.nan,
    }
