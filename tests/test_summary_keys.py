"""Each key of a table the summaries and figures read appears once: a repeated pair, draw or split
is a ValueError naming the table and the key, never averaged in or counted twice."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xmodal.figures import render_figure
from xmodal.figures.alignment import pair_cells
from xmodal.figures.synthetic import synthetic_inputs
from xmodal.io import read_table
from xmodal.summary import (
    drop_summary_table,
    heldout_pairs,
    heldout_summary_table,
    require_unique_keys,
    self_selection_summary_table,
    summary_table,
)


def contrasts(rows: list[tuple]) -> pd.DataFrame:
    """(vision, llm, low, high) → contrasts rows of CKNNA, mean dispersion."""
    df = pd.DataFrame(rows, columns=["vision", "llm", "low", "high"])
    return df.assign(
        metric="cknna",
        summary="mean",
        random_mean=(df["low"] + df["high"]) / 2,
        diff_low_high=df["low"] - df["high"],
        diff_ci_low=0.01,
        diff_ci_high=0.2,
        frac_random_ge_low=0.0,
    )


def test_the_helper_names_the_table_and_the_repeated_keys():
    t = pd.DataFrame({"vision": ["a", "a", "b", "b", "b"], "llm": ["x", "y", "x", "x", "x"]})
    with pytest.raises(ValueError, match=r"the demo table holds 1 \(vision, llm\) key\(s\) .*\('b', 'x'\)"):  # fmt: skip
        require_unique_keys(t, ["vision", "llm"], "demo")
    require_unique_keys(t.iloc[:3], ["vision", "llm"], "demo")  # unique: no error
    with pytest.raises(ValueError, match="demo table has no column"):
        require_unique_keys(t, ["vision", "draw"], "demo")


def test_summary_table_refuses_a_repeated_contrasts_row():
    """Before, the repeated pair counted twice: n_pairs 3, n_low_gt_high 3."""
    con = contrasts([("v1", "l1", 0.4, 0.2), ("v1", "l2", 0.4, 0.2)])
    assert summary_table(con).iloc[0][["n_pairs", "n_low_gt_high"]].tolist() == [2, 2]
    twice = pd.concat([con, con.iloc[[0]]], ignore_index=True)
    with pytest.raises(ValueError, match=r"contrasts table .*\('v1', 'l1', 'cknna', 'mean'\)"):
        summary_table(twice)


def test_summary_table_refuses_a_repeated_grid_row():
    """Before, the two low rows of v1 × l1 were averaged: low 0.5, ratio 2.5."""
    grid = pd.DataFrame(
        [
            ("v1", "l1", "low", "mean", 0, 0.4),
            ("v1", "l1", "low", "mean", 0, 0.6),  # the same key again
            ("v1", "l1", "high", "mean", 0, 0.2),
            ("v1", "l1", "random", "none", 0, 0.3),
        ],
        columns=["vision", "llm", "condition", "summary", "draw", "value"],
    ).assign(metric="cknna")
    con = contrasts([]).iloc[0:0]
    assert summary_table(con, grid.drop(index=1)).iloc[0].median_ratio_low_high == 2.0
    with pytest.raises(ValueError, match=r"grid table .*\('v1', 'l1', 'cknna', 'low', 'mean', 0\)"):
        summary_table(con, grid)
    rnd = pd.concat([grid.drop(index=1), grid.iloc[[3]].assign(value=0.5)])  # a draw twice
    with pytest.raises(ValueError, match=r"grid table .*'random', 'none', 0\)"):
        summary_table(con, rnd)


def test_self_selection_summary_refuses_a_repeated_row():
    con = contrasts([("v1", "l1", 0.4, 0.2), ("v2", "l1", 0.3, 0.2)])
    own = con.copy()
    assert self_selection_summary_table(own, con)["n_pairs"].tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"self-selection table .*\('v2', 'l1'"):
        self_selection_summary_table(pd.concat([own, own.iloc[[1]]]), con)


def drop_rows(n: int) -> pd.DataFrame:
    """n pairs of the drop table: drop high 0.5 > random 0.4 > drop low 0.3, full 0.35."""
    return pd.DataFrame(
        {
            "vision": [f"v{i}" for i in range(n)],
            "llm": "l",
            "metric": "cknna",
            "summary": "mean",
            "full": 0.35,
            "drop_high": 0.5,
            "drop_low": 0.3,
            "random_mean": 0.4,
            "random_ci_low": 0.38,
            "random_ci_high": 0.42,
            "frac_random_ge_drop_high": 0.0,
            "frac_random_ge_drop_low": 1.0,
        }
    )


def test_drop_summary_refuses_a_repeated_pair():
    """Before, n_pairs was the number of rows: 3 for two pairs."""
    d = drop_rows(2)
    r = drop_summary_table(d).iloc[0]
    assert (r.n_pairs, r.n_valid, r.n_drop_high_gt_random_gt_drop_low) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"drop table .*\('v1', 'l', 'cknna', 'mean'\)"):
        drop_summary_table(pd.concat([d, d.iloc[[1]]], ignore_index=True))


def heldout_rows() -> pd.DataFrame:
    """One pair, two splits, both layer rules: low − high = 0.1 and 0.3."""
    rows = [
        (split, rule, low) for split, low in enumerate([0.5, 0.7]) for rule in ("heldout", "full")
    ]
    t = pd.DataFrame(rows, columns=["split", "layer_rule", "low"])
    return t.assign(vision="v", llm="l", metric="cknna", summary="mean", llm_layer=2, high=0.4,
                    random_mean=0.45, low_stability=0.0, high_stability=0.0,
                    diff_low_high=t["low"] - 0.4)  # fmt: skip


def test_heldout_tables_refuse_a_repeated_split():
    """Before, a split written twice was averaged in (mean low − high 0.233 instead of 0.2) and
    its layer taken from the first row."""
    t = heldout_rows()
    p = heldout_pairs(t).set_index("layer_rule")
    assert p.loc["heldout", "diff_mean"] == pytest.approx(0.2)
    assert heldout_summary_table(t).set_index("layer_rule").loc["heldout", "median_diff"] == (
        pytest.approx(0.2)
    )
    twice = pd.concat([t, t.iloc[[2]]], ignore_index=True)  # split 1, held out, again
    want = r"held-out table .*\('v', 'l', 'cknna', 'mean', 1, 'heldout'\)"
    with pytest.raises(ValueError, match=want):
        heldout_pairs(twice)
    with pytest.raises(ValueError, match=want):
        heldout_summary_table(twice)


def test_pair_cells_refuse_a_repeated_draw():
    """Rows with a draw column: a (vision, llm, draw) twice is an error. Before, the low bar of
    the pair was the mean of its two rows."""
    rows = pd.DataFrame(
        {"vision": "v", "llm": "l", "draw": [0, 1, 2], "value": [0.1, 0.2, 0.6], "stability": 0.0}
    )
    cells = pair_cells(rows)
    assert cells.loc[("v", "l"), "value"] == pytest.approx(0.3)
    assert cells.loc[("v", "l"), "n"] == 3
    with pytest.raises(ValueError, match=r"grid table .*\('v', 'l', 2\)"):
        pair_cells(rows.assign(draw=[0, 2, 2]))
    # without a draw column every row of a pair is one of its draws (as before)
    assert pair_cells(rows.drop(columns="draw")).loc[("v", "l"), "n"] == 3


def test_a_figure_refuses_a_grid_with_a_repeated_row(tmp_path):
    inp = synthetic_inputs(tmp_path, n_stimuli=20, set_size=5, n_random=4, images=False)
    grid = read_table(inp["grid"])
    low = grid[(grid["condition"] == "low") & (grid["summary"] == "mean")].iloc[[0]]
    bad = pd.concat([grid, low.assign(value=np.nan)], ignore_index=True)
    bad.to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    v, ll = low.iloc[0][["vision", "llm"]]
    with pytest.raises(ValueError, match=rf"grid table .*\('{v}', '{ll}', 0\)"):
        render_figure("sets_rank", {"grid": tmp_path / "bad.tsv", "models": inp["models"]})
