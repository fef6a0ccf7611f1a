"""Representation diagnostics against brute-force computations and planted structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmodal import diagnostics as dg
from xmodal import metrics as mt
from xmodal.io import read_table, write_table


def unit_rows(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def brute(x, k, tau):
    x64 = x.astype(np.float64)
    g = x64 @ x64.T
    m = len(g)
    off = g[~np.eye(m, dtype=bool)]
    gaps = []
    for i in range(m):
        v = sorted((g[i, j] for j in range(m) if j != i), reverse=True)
        gaps.append(v[k - 1] - v[k])
    lam = np.linalg.eigvalsh(np.cov(x64, rowvar=False, bias=True))
    return {
        "cos_mean": off.mean(),
        "cos_sd": off.std(ddof=1),
        "eff_dim": lam.sum() ** 2 / (lam**2).sum(),
        "unresolved": [i for i in range(m) if gaps[i] <= tau],
    }


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), d=st.sampled_from([3, 8, 70]))
def test_diagnose_matches_brute_force(seed, d):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng.standard_normal((50, d)) + rng.uniform(0, 2) * rng.standard_normal(d))
    x[[7, 30]] = x[4]  # one duplicate group of three
    x[[11]] = x[40]  # and one of two
    got = dg.diagnose(x, k=4, tau=1e-6)
    want = brute(x, 4, 1e-6)
    assert got.cos_mean == pytest.approx(want["cos_mean"], abs=1e-6)
    assert got.cos_sd == pytest.approx(want["cos_sd"], rel=1e-4, abs=1e-6)
    assert got.eff_dim == pytest.approx(want["eff_dim"], rel=1e-5)  # d > m or d < m
    assert got.unresolved.tolist() == want["unresolved"]
    assert [g.tolist() for g in got.duplicate_groups] == [[4, 7, 30], [11, 40]]
    assert got.n_duplicate_groups == 2 and got.n_in_duplicate_groups == 5


def test_blocked_equals_one_block(monkeypatch):
    rng = np.random.default_rng(1)
    x = unit_rows(rng.standard_normal((90, 12)))
    x[5] = x[6]
    one = dg.diagnose(x, k=5)
    monkeypatch.setattr(mt, "BLOCK_ELEMS", 11 * 90)  # 11-row blocks
    blocked = dg.diagnose(x, k=5)
    assert blocked.unresolved.tolist() == one.unresolved.tolist()
    assert blocked.cos_mean == pytest.approx(one.cos_mean, abs=1e-12)
    assert blocked.cos_sd == pytest.approx(one.cos_sd, rel=1e-9)


def test_collapsed_and_warn_flags():
    rng = np.random.default_rng(2)
    base = rng.standard_normal(64)
    collapsed = dg.diagnose(unit_rows(base + 1e-7 * rng.standard_normal((200, 64))))
    assert collapsed.cos_mean > 0.999 and collapsed.frac_unresolved > 0.9
    assert collapsed.collapsed and collapsed.warn
    healthy = dg.diagnose(unit_rows(rng.standard_normal((200, 64))))
    assert not healthy.collapsed and not healthy.warn
    assert healthy.frac_unresolved <= dg.WARN_UNRESOLVED


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_refused_not_reported_healthy(bad):
    x = np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="NaN or ±inf"):
        dg.diagnose(x, 5)


def test_table_and_ids(tmp_path):
    rng = np.random.default_rng(3)
    x = unit_rows(rng.standard_normal((30, 5)))
    x[[1, 2]] = x[0]  # copies: row 0's 2 nearest tie at k = 1
    diag = dg.diagnose(x, k=1)
    assert {0, 1, 2} <= set(diag.unresolved.tolist())
    ids = ["007", 'a "quoted", id', "déjà\tvu"] + [f"s{i}" for i in range(3, 30)]
    assert diag.unresolved_ids(ids)[:3] == ids[:3]
    table = dg.diagnostics_table([("clip", 3, "blocks.3", diag), ("mae", 1, "blocks.1", diag)], ids)
    assert list(table.columns) == dg.DIAGNOSTIC_COLUMNS
    # the first N_NAMED unresolved stimuli, named through a round trip of the TSV
    write_table(table, tmp_path / "d.tsv")
    named = json.loads(read_table(tmp_path / "d.tsv")["unresolved_ids"].iloc[0])
    assert named == diag.unresolved_ids(ids)[: dg.N_NAMED] and len(named) <= dg.N_NAMED
    assert table["n_duplicate_groups"].tolist() == [1, 1]
    assert table.loc[0, "frac_unresolved"] == pytest.approx(diag.n_unresolved / 30)
    with pytest.raises(ValueError, match="k"):
        dg.diagnose(x, k=29)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("case", ["random", "collapsed", "duplicates"])
def test_diagnostics_from_the_layer_search_kernel_equal_the_direct_ones(
    case: str, dense: bool, monkeypatch
) -> None:
    """The layer search hands its kNN structure over (no second kernel): same diagnostics.
    The dense side's kernel is read in float64 row blocks (here of 7 rows, no m × m float64
    copy); the blocked side's gaps are reused and the cosines' SD comes from XᵀX."""
    from xmodal.metrics import KernelKNN, prepare_layer

    monkeypatch.setattr(dg, "BLOCK_ELEMS", 8 * 7 * 120)

    rng = np.random.default_rng(7)
    x = rng.standard_normal((120, 24))
    if case == "collapsed":
        x = 50.0 + 1e-4 * x
    elif case == "duplicates":
        x[10], x[11], x[40] = x[3], x[3], x[7]
    x = prepare_layer(x.astype(np.float32), 1e9)
    direct = dg.diagnose(x, k=10)
    side = KernelKNN.from_features(x, 10, dense=dense)
    passes, real = [], dg.kernel_row_blocks
    monkeypatch.setattr(dg, "kernel_row_blocks", lambda t: passes.append(1) or real(t))
    shared = dg.diagnose(x, k=10, side=side)
    # a second pass over the kernel only where ‖XᵀX‖² − … would cancel (nearly equal cosines)
    assert len(passes) == (not dense and case == "collapsed")
    assert shared.cos_mean == direct.cos_mean
    assert shared.cos_sd == pytest.approx(direct.cos_sd, rel=1e-6, abs=1e-9)
    # from the kernel (healthy layers) or, where centring it would cancel, from the features
    assert shared.eff_dim == pytest.approx(direct.eff_dim, rel=1e-5)
    np.testing.assert_array_equal(shared.unresolved, direct.unresolved)
    assert [g.tolist() for g in shared.duplicate_groups] == [
        g.tolist() for g in direct.duplicate_groups
    ]
    assert shared.collapsed == direct.collapsed


@settings(max_examples=80, deadline=None)
@given(
    m=st.integers(0, 40),
    d=st.integers(0, 5),
    n_values=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float32, np.float64]),
    shared=st.integers(0, 20),
)
def test_duplicate_groups_are_the_bitwise_equal_rows(m, d, n_values, seed, dtype, shared):
    """Against grouping by each row's bytes: few distinct values make many repeated rows;
    0.0 and -0.0 are different bytes, so they are different rows. ``shared`` leading columns
    equal in every row make rows that agree in their first bytes (up to 160 of them) and differ
    only after them."""
    rng = np.random.default_rng(seed)
    values = np.array([0.0, -0.0, 1.5, np.nan][: n_values + 1], dtype=dtype)
    lead = np.tile(rng.standard_normal(shared), (m, 1))
    x = np.hstack([lead, rng.choice(values, size=(m, d))]).astype(dtype)
    by_bytes: dict[bytes, list[int]] = {}
    for i, row in enumerate(x):
        by_bytes.setdefault(row.tobytes(), []).append(i)
    expected = sorted((g for g in by_bytes.values() if len(g) > 1), key=lambda g: g[0])
    got = dg.duplicate_groups(x)
    assert [g.tolist() for g in got] == expected
    assert all(g.dtype == np.int64 for g in got)


def test_the_warning_for_a_used_layer_names_only_the_stimuli_it_has(tmp_path, caplog):
    """A layer collapsed by its cosines with no unresolved stimulus used to end its warning in
    "0 of 8 stimuli's kNN sets are decided by rounding ()"."""
    from xmodal.pipeline import gather_diagnostics

    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(8)]
    spread = rng.standard_normal((8, 16))
    tight = 1.0 + 2e-2 * rng.standard_normal((8, 16))  # every pair at cosine ≈ 1, yet ordered
    ties = np.repeat(spread[:2], 4, axis=0)  # two groups of identical rows: all unresolved
    rows = []
    for model, x in (("open", spread), ("tight", tight), ("tied", ties)):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        rows.append(dg.diagnose(x.astype(np.float32), k=2).row(model, 0, "l0", ids))
    import pandas as pd

    vision = tmp_path / "vision.tsv"
    write_table(pd.DataFrame(rows[:1]), vision)
    llm = tmp_path / "llm.tsv"
    write_table(pd.DataFrame(rows[1:]), llm)
    layers = tmp_path / "layers.tsv"
    chosen = {"llm": ["tight", "tied"], "llm_layer": [0, 0], "chosen": [True, True]}
    write_table(pd.DataFrame(chosen), layers)
    with caplog.at_level("WARNING"):
        gather_diagnostics(vision, [llm], layers, tmp_path / "all.tsv")
    tight_msg = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("tight"))
    tied_msg = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("tied"))
    assert "is collapsed" in tight_msg and "0 of 8 stimuli's kNN sets" in tight_msg
    assert "()" not in tight_msg and "rounding;" in tight_msg
    assert "8 of 8" in tied_msg and "(s0, s1, s2" in tied_msg
