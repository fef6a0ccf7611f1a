"""The one-line summary: pairs with low > random > high, and the low / high ratio."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xmodal.figures.synthetic import synthetic_inputs
from xmodal.summary import (
    STABILITY_THRESHOLD,
    SUMMARY_COLUMNS,
    heldout_pairs,
    heldout_summary_table,
    mean_stability,
    self_selection_summary_table,
    summary_table,
    unstable,
)


def contrasts_rows(rows: list[tuple]) -> pd.DataFrame:
    """(vision, llm, summary, low, high, random_mean, diff_ci_low, frac) → contrasts table; the
    interval's upper end is diff_ci_low + 0.1 (NaN with it)."""
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
    df["diff_ci_high"] = df["diff_ci_low"] + 0.1
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
    assert mean.n_with_ci == 4 and mean.n_diff_ci_above_zero == 2
    assert mean.n_ratio == 3
    assert mean.median_ratio_low_high == pytest.approx(1.5)  # of 1.5, 3.0, 0.5
    assert mean.max_ratio_low_high == pytest.approx(3.0)
    assert mean.median_frac_random_ge_low == pytest.approx(0.35)
    # low / random mean (the paper's "twofold over random"): 1.2, 0.857, 0.667; random 0 has none
    assert mean.n_ratio_random == 3
    assert mean.median_ratio_low_random == pytest.approx(0.30 / 0.35)
    assert mean.max_ratio_low_random == pytest.approx(1.2)
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


def test_ratio_only_over_pairs_with_low_and_high_positive():
    """low / high is taken over valid pairs with low > 0 and high > 0 only (``n_ratio``), median
    and max alike. Before, a negative (or zero) low over a positive high entered as a ratio ≤ 0,
    and a summary whose pairs all had low < 0 got a negative "fold" as its maximum."""
    con = contrasts_rows(
        [
            ("v1", "l1", "mean", 0.30, 0.20, 0.25, 0.05, 0.0),  # 1.5
            ("v1", "l2", "mean", 0.40, 0.10, 0.20, 0.05, 0.0),  # 4.0
            ("v1", "l3", "mean", -0.10, 0.20, 0.00, -0.4, 1.0),  # low < 0: no ratio (was -0.5)
            ("v2", "l1", "mean", 0.00, 0.20, 0.10, -0.3, 1.0),  # low = 0: no ratio (was 0.0)
            ("v2", "l2", "mean", 0.30, -0.05, 0.10, 0.05, 0.0),  # high < 0: no ratio
            ("v2", "l3", "mean", 0.20, 0.00, 0.10, 0.05, 0.0),  # high = 0: no ratio
            ("v3", "l1", "mean", 0.50, 0.10, np.nan, 0.05, 0.0),  # not valid: 5.0 left out
            ("v1", "l1", "pc1", -0.10, 0.20, 0.00, -0.4, 1.0),  # every pc1 pair: low < 0
            ("v1", "l2", "pc1", -0.30, 0.10, 0.00, -0.4, 1.0),
        ]
    )
    out = summary_table(con).set_index("summary")
    mean, pc1 = out.loc["mean"], out.loc["pc1"]
    assert mean.median_ratio_low_high == pytest.approx(2.75)  # of 1.5 and 4.0 (was 0.75)
    assert mean.max_ratio_low_high == pytest.approx(4.0)
    assert np.isnan(pc1.median_ratio_low_high) and np.isnan(pc1.max_ratio_low_high)  # was -0.5
    assert (mean.n_valid, mean.n_ratio) == (6, 2)
    assert (pc1.n_valid, pc1.n_ratio) == (2, 0)


def test_ci_count_over_pairs_with_a_finite_interval():
    """``n_diff_ci_above_zero`` counts among the ``n_with_ci`` valid pairs whose interval has two
    finite ends; a valid pair without one is in neither count. Before, a lower end alone counted
    and the count had no stated denominator."""
    con = contrasts_rows(
        [
            ("v1", "l1", "mean", 0.40, 0.20, 0.30, 0.05, 0.0),  # interval above 0
            ("v1", "l2", "mean", 0.40, 0.30, 0.35, -0.01, 0.2),  # includes 0
            ("v1", "l3", "mean", 0.40, 0.30, 0.35, np.nan, 0.2),  # no interval
            ("v2", "l1", "mean", 0.40, 0.20, 0.30, 0.02, 0.0),  # upper end missing below
            ("v2", "l2", "mean", 0.40, 0.20, np.nan, 0.03, 0.0),  # not valid
        ]
    )
    con.loc[(con["vision"] == "v2") & (con["llm"] == "l1"), "diff_ci_high"] = np.nan
    r = summary_table(con).iloc[0]
    assert r.n_diff_ci_above_zero == 1  # was 2: the half interval counted
    assert (r.n_pairs, r.n_valid, r.n_with_ci) == (5, 4, 2)
    assert SUMMARY_COLUMNS.index("n_with_ci") == SUMMARY_COLUMNS.index("n_diff_ci_above_zero") - 1


def test_random_below_high_is_not_between_low_and_high():
    """Random 0.2 below high 0.3 is not between low and high: ``(low > random) & (low >
    high)`` would count the pair in n_low_gt_random_gt_high."""
    out = summary_table(contrasts_rows([("v", "l", "mean", 0.5, 0.3, 0.2, 0.1, 0.0)])).iloc[0]
    assert out.n_low_gt_high == 1 and out.n_low_gt_random_gt_high == 0


def test_interval_touching_zero_is_not_above_it():
    """An interval touching 0 is not above it: ``>= 0`` would count it."""
    out = summary_table(contrasts_rows([("v", "l", "mean", 0.5, 0.3, 0.4, 0.0, 0.0)])).iloc[0]
    assert out.n_with_ci == 1 and out.n_diff_ci_above_zero == 0


def test_unstable_count_is_over_valid_pairs_only():
    """A pair without a random mean (not valid) is left out of n_unstable even when its low
    is unstable: without ``& valid`` it would be counted."""
    rows = [
        ("v", "l", "mean", 0.5, 0.3, np.nan, 0.1, 0.0),
        ("w", "l", "mean", 0.5, 0.3, 0.4, 0.1, 0.0),
    ]
    con = contrasts_rows(rows).assign(low_stability=[0.5, 0.0], high_stability=[0.0, 0.0])
    out = summary_table(con).iloc[0]
    assert (out.n_valid, out.n_unstable) == (1, 0)


def test_a_stability_equal_to_the_threshold_is_not_unstable():
    """Docs: flagged when the stability *exceeds* 1e-3; ``>=`` flagged a stability of exactly
    1e-3 (mutation audit of the tables)."""
    con = contrasts_rows([(v, "l", "mean", 0.5, 0.3, 0.4, 0.01, 0.0) for v in "abc"])
    con["low_stability"] = [STABILITY_THRESHOLD, np.nextafter(STABILITY_THRESHOLD, 1), 0.0]
    con["high_stability"] = 0.0
    assert unstable(con, ("low_stability",)).tolist() == [False, True, False]
    assert summary_table(con).iloc[0].n_unstable == 1


@pytest.mark.parametrize("flags", [[1, 0, 1], ["1", "0", "1"], ["True", "False", "true"]])
def test_layer_tied_counts_a_true_written_as_1(flags):
    """``layer_tied`` as written or read back (True, true, 1) counts: a column of 1/0 read as
    ``true`` alone gave n_layer_tied 0 (mutation audit of the tables)."""
    rows = [
        ("a", "l", "mean", 0.5, 0.3, 0.4, 0.01, 0.0),
        ("b", "l", "mean", 0.5, 0.3, 0.4, 0.01, 0.0),
        ("c", "l", "mean", 0.5, 0.3, np.nan, 0.01, 0.0),
    ]
    con = contrasts_rows(rows)
    con["layer_tied"] = flags
    # pair c is not valid (no random mean): only a is counted
    assert summary_table(con).iloc[0].n_layer_tied == 1


def test_a_grid_pair_with_an_undefined_random_draw_is_not_valid():
    """A pair filled from the grid whose random draws include a NaN has no random mean (never
    averaged over the other draws): it is not valid and not counted. The grid's random mean
    over the finite draws (0.3) counted it as low > random > high (mutation audit)."""
    grid = pd.DataFrame(
        [
            ("v", "l", "low", "mean", 0, 0.4),
            ("v", "l", "high", "mean", 0, 0.2),
            ("v", "l", "random", "none", 0, 0.3),
            ("v", "l", "random", "none", 1, np.nan),
        ],
        columns=["vision", "llm", "condition", "summary", "draw", "value"],
    ).assign(metric="cknna")
    r = summary_table(contrasts_rows([]), grid).iloc[0]
    assert (r.n_pairs, r.n_valid, r.n_low_gt_random_gt_high, r.n_low_gt_high) == (1, 0, 0, 0)


def test_low_equal_to_random_or_to_high_is_not_above_it():
    """Strict orders: low = random (0.4) is not low > random > high, and low = high (0.3) is
    not low > high; ``>=`` counted them (mutation audit of the tables)."""
    rows = [
        ("a", "l", "mean", 0.4, 0.2, 0.4, 0.01, 0.0),
        ("b", "l", "mean", 0.3, 0.3, 0.3, 0.01, 0.0),
        ("c", "l", "mean", 0.5, 0.2, 0.3, 0.01, 0.0),
    ]
    r = summary_table(contrasts_rows(rows)).iloc[0]
    assert r.n_low_gt_random_gt_high == 1  # c only
    assert r.n_low_gt_high == 2  # a and c


def test_median_fraction_is_over_the_valid_pairs_only():
    """``median_frac_random_ge_low`` is over the n_valid pairs: a pair without a high value has
    a finite fraction (0.9) that must be left out; over every pair the median of 0.1, 0.3 and
    0.9 is 0.3, not 0.2 (mutation audit of the tables)."""
    rows = [
        ("a", "l", "mean", 0.5, 0.3, 0.4, 0.01, 0.1),
        ("b", "l", "mean", 0.5, 0.3, 0.4, 0.01, 0.3),
        ("c", "l", "mean", 0.5, np.nan, 0.4, 0.01, 0.9),
    ]
    r = summary_table(contrasts_rows(rows)).iloc[0]
    assert r.n_valid == 2
    assert r.median_frac_random_ge_low == pytest.approx(0.2)


def test_self_selection_summary_keeps_the_metrics_of_the_self_selection_table():
    """The ``all`` rows are the main contrasts restricted to the self-selection table's metrics
    and summaries: without the metric filter the contrasts' CKA rows appeared as ``all`` rows
    with no ``others`` row beside them (mutation audit of the tables)."""
    con = pd.concat(
        [
            contrasts_rows([("a", "l", "mean", 0.5, 0.3, 0.4, 0.01, 0.0)]).assign(metric="cknna"),
            contrasts_rows([("a", "l", "mean", 0.2, 0.3, 0.25, 0.01, 0.0)]).assign(metric="cka"),
        ],
        ignore_index=True,
    )
    own = contrasts_rows([("a", "l", "mean", 0.45, 0.35, 0.4, 0.01, 0.0)]).assign(metric="cknna")
    out = self_selection_summary_table(own, con)
    assert out[["sets", "metric", "summary"]].values.tolist() == [
        ["all", "cknna", "mean"],
        ["others", "cknna", "mean"],
    ]
    assert out["n_low_gt_high"].tolist() == [1, 1]


def test_mean_stability_is_nan_when_a_draw_is():
    """One draw's undefined stability makes the mean undefined: ``np.nanmean`` would report
    0.05 over the other draws."""
    assert np.isnan(mean_stability(np.array([0.1, np.nan, 0.0])))


def test_heldout_fraction_undefined_when_a_split_is():
    """The fraction of splits with low > high is NaN when any split's low or high is, as the
    means are (an undefined split is never left out); before, it was taken over the other
    splits (1.0 here) and drawn beside an "n/a" difference."""
    rows = [
        # pair a: three defined splits, low > high in two
        *[("a", s, low, 0.40) for s, low in enumerate([0.5, 0.3, 0.6])],
        # pair b: split 1's low undefined; pair c: split 0's high undefined
        *[("b", s, low, 0.40) for s, low in enumerate([0.5, np.nan, 0.6])],
        *[("c", s, 0.5, high) for s, high in enumerate([np.nan, 0.4, 0.4])],
    ]
    t = pd.DataFrame(rows, columns=["vision", "split", "low", "high"])
    t = t.assign(llm="l", metric="cknna", summary="mean", layer_rule="heldout", llm_layer=1,
                 random_mean=0.45, low_stability=0.0, high_stability=0.0)  # fmt: skip
    t["diff_low_high"] = t["low"] - t["high"]
    p = heldout_pairs(t).set_index("vision")
    assert p.loc["a", "frac_splits_low_gt_high"] == pytest.approx(2 / 3)
    assert np.isnan(p.loc["b", "frac_splits_low_gt_high"])  # was 1.0
    assert np.isnan(p.loc["c", "frac_splits_low_gt_high"])  # was 1.0
    s = heldout_summary_table(t).iloc[0]
    assert (s.n_pairs, s.n_valid) == (3, 1)
    assert s.median_frac_splits_low_gt_high == pytest.approx(2 / 3)


def test_heldout_split_with_low_equal_to_high_is_not_low_gt_high():
    """A split whose low equals its high (0.4) is not one with low > high: ``>=`` would give
    3/4 of the splits, not 2/4."""
    rows = [("a", s, low, 0.4) for s, low in enumerate([0.5, 0.4, 0.3, 0.6])]
    t = pd.DataFrame(rows, columns=["vision", "split", "low", "high"])
    t = t.assign(llm="l", metric="mutual_knn", summary="mean", layer_rule="heldout", llm_layer=1,
                 random_mean=0.45, low_stability=0.0, high_stability=0.0)  # fmt: skip
    t["diff_low_high"] = t["low"] - t["high"]
    assert heldout_pairs(t).iloc[0].frac_splits_low_gt_high == pytest.approx(0.5)


def heldout_splits(low, high, random_mean, low_stability=(0.0, 0.0)) -> pd.DataFrame:
    """Held-out table of one pair (v, l) over two splits with the given values per split."""
    t = pd.DataFrame(
        {
            "vision": "v",
            "split": [0, 1],
            "low": low,
            "high": high,
            "random_mean": random_mean,
            "low_stability": low_stability,
            "high_stability": 0.0,
        }
    )
    t = t.assign(llm="l", metric="cknna", summary="mean", layer_rule="heldout", llm_layer=1)
    t["diff_low_high"] = t["low"] - t["high"]
    return t


def test_heldout_random_below_high_is_not_between_low_and_high():
    """As in the main summary: random 0.2 below high 0.3 is not between the split means of low
    and high, which ``(low > random) & (low > high)`` would count."""
    t = heldout_splits([0.5, 0.5], [0.3, 0.3], [0.2, 0.2])
    s = heldout_summary_table(t).iloc[0]
    assert s.n_low_gt_high == 1 and s.n_low_gt_random_gt_high == 0


def test_heldout_stability_is_the_mean_over_splits():
    """A pair's low_stability is the mean of its splits' (0.005), not their largest (0.01)."""
    t = heldout_splits([0.5, 0.5], [0.3, 0.3], [0.4, 0.4], low_stability=(0.0, 0.01))
    assert heldout_pairs(t).iloc[0].low_stability == pytest.approx(0.005)


def test_heldout_unstable_counts_the_high_side():
    """``n_unstable`` of the held-out summary: valid pairs whose mean low *or high* stability
    exceeds 1e-3; the low side alone gave 0, not 1 (mutation audit of the tables)."""
    t = heldout_splits([0.5, 0.5], [0.3, 0.3], [0.4, 0.4]).assign(high_stability=[0.0, 0.004])
    assert heldout_pairs(t).iloc[0].high_stability == pytest.approx(0.002)
    assert heldout_summary_table(t).iloc[0].n_unstable == 1


def test_heldout_mean_stability_is_nan_when_a_split_has_none():
    """A pair's low_stability is the mean of its splits' (docs: ``mean_stability``, NaN when a
    draw's is), never the mean over the splits that have one (``np.nanmean``: 0.002; mutation
    audit of the tables)."""
    t = heldout_splits([0.5, 0.5], [0.3, 0.3], [0.4, 0.4], low_stability=(0.002, np.nan))
    assert np.isnan(heldout_pairs(t).iloc[0].low_stability)


def test_heldout_random_equal_to_high_is_not_between():
    """Mean random 0.3 equal to mean high 0.3 is not low > random > high, which ``rnd >= high``
    counted (mutation audit of the tables)."""
    t = pd.concat(
        [
            heldout_splits([0.5, 0.5], [0.3, 0.3], [0.3, 0.3]).assign(vision="a"),
            heldout_splits([0.5, 0.5], [0.3, 0.3], [0.4, 0.4]).assign(vision="b"),
        ],
        ignore_index=True,
    )
    s = heldout_summary_table(t).iloc[0]
    assert (s.n_low_gt_high, s.n_low_gt_random_gt_high) == (2, 1)
