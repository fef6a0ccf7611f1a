"""The one-line summary of the experiment: in how many (vision, LLM) pairs is low > random > high?"""

from __future__ import annotations

import numpy as np
import pandas as pd

PAIR = ["vision", "llm"]

SUMMARY_COLUMNS = [
    "summary",
    "n_pairs",
    "n_low_gt_random_gt_high",
    "n_low_gt_high",
    "n_diff_ci_above_zero",
    "median_ratio_low_high",
    "max_ratio_low_high",
    "median_frac_random_ge_low",
]


def _from_grid(grid: pd.DataFrame) -> pd.DataFrame:
    """low, high and random_mean per (vision, llm, summary) computed from the grid table."""
    g = grid[grid["metric"] == "cknna"] if "metric" in grid.columns else grid
    out = []
    summaries = sorted(set(g.loc[g["condition"].isin(["low", "high"]), "summary"].astype(str)))
    rnd = g[g["condition"] == "random"]
    for s in summaries:
        low = g[(g["condition"] == "low") & (g["summary"] == s)].groupby(PAIR)["value"].mean()
        high = g[(g["condition"] == "high") & (g["summary"] == s)].groupby(PAIR)["value"].mean()
        r = rnd[rnd["summary"] == s] if (rnd["summary"] == s).any() else rnd
        rmean = r.groupby(PAIR)["value"].mean()
        df = pd.concat({"low": low, "high": high, "random_mean": rmean}, axis=1).reset_index()
        df["summary"] = s
        out.append(df)
    cols = [*PAIR, "summary", "low", "high", "random_mean"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def summary_table(contrasts: pd.DataFrame, grid: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per dispersion summary (``mean``, then ``pc1``) over all (vision, LLM) pairs.

    Columns: ``summary``; ``n_pairs``; ``n_low_gt_random_gt_high`` (pairs whose low-set CKNNA
    exceeds the mean of the random draws, which exceeds the high-set CKNNA); ``n_low_gt_high``;
    ``n_diff_ci_above_zero`` (bootstrap 95% CI of low − high entirely above 0);
    ``median_ratio_low_high`` and ``max_ratio_low_high`` (low / high CKNNA, over pairs with
    high > 0 only; the paper reports up to 2×); ``median_frac_random_ge_low``.

    ``low``, ``high`` and ``random_mean`` come from ``contrasts``; pairs or values missing there
    are taken from ``grid`` (the concatenated conditions tables) when it is given.
    """
    cols = [*PAIR, "summary", "low", "high", "random_mean"]
    con = contrasts.copy() if contrasts is not None else pd.DataFrame(columns=cols)
    for c in ("diff_ci_low", "frac_random_ge_low", *cols):
        if c not in con.columns:
            con[c] = np.nan
    if grid is not None and not grid.empty:
        g = _from_grid(grid).set_index([*PAIR, "summary"])
        con = con.set_index([*PAIR, "summary"])
        con = con.combine_first(g[["low", "high", "random_mean"]])
        con = con.reset_index()
    rows = []
    order = [s for s in ("mean", "pc1") if s in set(con["summary"])]
    order += sorted(set(con["summary"].dropna().astype(str)) - set(order))
    for s in order:
        c = con[con["summary"] == s]
        low, high, rnd = (c[k].to_numpy(float) for k in ("low", "high", "random_mean"))
        ratio = np.where(high > 0, low / np.where(high > 0, high, 1.0), np.nan)
        finite = ratio[np.isfinite(ratio)]
        rows.append(
            {
                "summary": s,
                "n_pairs": int(len(c)),
                "n_low_gt_random_gt_high": int(np.sum((low > rnd) & (rnd > high))),
                "n_low_gt_high": int(np.sum(low > high)),
                "n_diff_ci_above_zero": int(np.sum(c["diff_ci_low"].to_numpy(float) > 0)),
                "median_ratio_low_high": float(np.median(finite)) if finite.size else np.nan,
                "max_ratio_low_high": float(np.max(finite)) if finite.size else np.nan,
                "median_frac_random_ge_low": float(np.nanmedian(c["frac_random_ge_low"]))
                if c["frac_random_ge_low"].notna().any()
                else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
