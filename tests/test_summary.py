"""The one-line summary: pairs with low > random > high, and the low / high ratio."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xmodal.figures.synthetic import synthetic_inputs
from xmodal.summary import SUMMARY_COLUMNS, summary_table


def contrasts_rows(rows: list[tuple]) -> pd.DataFrame:
    """(vision, llm, summary, low, high, random_mean, diff_ci_low, frac) → contrasts table."""
    df = pd.DataFrame(
        rows,
        columns=[
            "vision",
            "llm",
            "summary",
            "low",
            "high",
            "random_mean",
            "diff_ci_low",
            "frac_random_ge_low",
        ],
    )
    df["diff_low_high"] = df["low"] - df["high"]
    return df


def test_counts_and_ratios_per_summary():
    con = contrasts_rows(
        [
            ("v1", "l1", "pc1", 0.40, 0.20, 0.30, 0.10, 0.00),  # ordered, ratio 2
            ("v1", "l1", "mean", 0.30, 0.20, 0.25, 0.05, 0.00),  # ordered, ratio 1.5
            ("v1", "l2", "mean", 0.30, 0.10, 0.35, -0.01, 0.60),  # low > high, random above low
            ("v2", "l1", "mean", 0.10, 0.20, 0.15, -0.20, 1.00),  # reversed, ratio 0.5
            ("v2", "l2", "mean", 0.10, -0.05, 0.00, 0.02, 0.10),  # ordered; high ≤ 0: no ratio
        ]
    )
    out = summary_table(con, grid=None)
    assert list(out.columns) == SUMMARY_COLUMNS
    assert list(out["summary"]) == ["mean", "pc1"]
    mean = out.set_index("summary").loc["mean"]
    assert mean.n_pairs == 4
    assert mean.n_low_gt_random_gt_high == 2
    assert mean.n_low_gt_high == 3
    assert mean.n_diff_ci_above_zero == 2
    assert mean.median_ratio_low_high == pytest.approx(1.5)  # of 1.5, 3.0, 0.5
    assert mean.max_ratio_low_high == pytest.approx(3.0)
    assert mean.median_frac_random_ge_low == pytest.approx(0.35)
    pc1 = out.set_index("summary").loc["pc1"]
    assert (pc1.n_pairs, pc1.n_low_gt_random_gt_high, pc1.max_ratio_low_high) == (1, 1, 2.0)


def test_grid_fills_pairs_and_values_missing_from_contrasts():
    grid = pd.DataFrame(
        [
            ("v1", "l1", "low", "mean", 0, 0.4),
            ("v1", "l1", "high", "mean", 0, 0.2),
            ("v1", "l1", "random", "none", 0, 0.2),
            ("v1", "l1", "random", "none", 1, 0.4),  # random mean 0.3
            ("v1", "l1", "full", "none", 0, 0.3),
        ],
        columns=["vision", "llm", "condition", "summary", "draw", "value"],
    )
    grid["metric"] = "cknna"
    out = summary_table(contrasts_rows([]), grid).set_index("summary")
    assert out.loc["mean", "n_pairs"] == 1
    assert out.loc["mean", "n_low_gt_random_gt_high"] == 1
    assert out.loc["mean", "median_ratio_low_high"] == pytest.approx(2.0)
    assert np.isnan(out.loc["mean", "median_frac_random_ge_low"])


def test_synthetic_tables_agree_with_and_without_grid(tmp_path):
    inp = synthetic_inputs(tmp_path, n_stimuli=20, set_size=5, n_random=4, images=False)
    con = pd.read_csv(inp["contrasts"], sep="\t")
    grid = pd.read_csv(inp["grid"], sep="\t")
    a, b = summary_table(con, grid), summary_table(con)
    pd.testing.assert_frame_equal(a, b)
    assert list(a["summary"]) == ["mean", "pc1"]
    assert (a["n_pairs"] == 12).all()
    ratio = con["low"] / con["high"]
    assert a.set_index("summary").loc["mean", "max_ratio_low_high"] == pytest.approx(
        ratio[con["summary"] == "mean"].max()
    )


def test_metric_without_bootstrap_has_no_ci_count(tmp_path):
    """CKA metrics have no bootstrap (diff_ci_low missing): their CI count is missing, not 0,
    and survives the table's write and read; a bootstrapped metric's count stays an integer."""
    from xmodal.io import read_table, write_table

    rows = [("v1", "l1", "mean", 0.40, 0.20, 0.30, 0.10, 0.00)]
    con = pd.concat(
        [
            contrasts_rows(rows).assign(metric="cknna"),
            contrasts_rows(rows).assign(metric="cka", diff_ci_low=np.nan),
        ],
        ignore_index=True,
    )
    out = summary_table(con).set_index("metric")
    assert out.loc["cknna", "n_diff_ci_above_zero"] == 1
    assert pd.isna(out.loc["cka", "n_diff_ci_above_zero"])
    write_table(out.reset_index(), tmp_path / "s.tsv")
    text = (tmp_path / "s.tsv").read_text().splitlines()
    col = text[0].split("\t").index("n_diff_ci_above_zero")
    assert [line.split("\t")[col] for line in text[1:]] == ["1", "NaN"]
    back = read_table(tmp_path / "s.tsv").set_index("metric")
    assert back.loc["cknna", "n_diff_ci_above_zero"] == 1
    assert np.isnan(back.loc["cka", "n_diff_ci_above_zero"])


def test_a_pair_missing_from_the_contrasts_is_refused_not_counted(tmp_path):
    """Before, a pair the grid has but the contrasts lack (a stale or partial table) was filled
    from the grid and its missing interval counted as one that does not exclude 0."""
    inp = synthetic_inputs(tmp_path, n_stimuli=20, set_size=5, n_random=4, images=False)
    con = pd.read_csv(inp["contrasts"], sep="\t")
    grid = pd.read_csv(inp["grid"], sep="\t")
    vision, llm = con.iloc[-1][["vision", "llm"]]
    partial = con[(con["vision"] != vision) | (con["llm"] != llm)]
    with pytest.raises(ValueError, match=rf"lacks 2 .*\('{vision}', '{llm}', 'cknna', 'mean'\)"):
        summary_table(partial, grid)
    assert summary_table(partial)["n_pairs"].tolist() == [11, 11]  # without the grid: as given
