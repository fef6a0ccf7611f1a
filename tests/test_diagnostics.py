"""Representation diagnostics against brute-force computations and planted structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
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
        "gaps": gaps,
    }


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), d=st.sampled_from([3, 8, 70]))
def test_diagnose_matches_brute_force(seed, d):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng.standard_normal((50, d)) + rng.uniform(0, 2) * rng.standard_normal(d))
    x[[7, 30]] = x[4]  # one duplicate group of three
    x[[11]] = x[40]  # and one of two
    want = brute(x, 4, 1e-6)
    # diagnose ranks float32 cosines, rounded by up to about √d·eps₃₂ each (docs/method.md,
    # "Resolution τ"): a gap that close to τ without being an exact tie goes either way (seed
    # 171, d = 70: 1.12e-6 in float64, 9.5e-7 in float32), so such draws are not judged here
    margin = 4 * np.sqrt(d) * np.finfo(np.float32).eps
    assume(all(gap == 0 or abs(gap - 1e-6) > margin for gap in want["gaps"]))
    got = dg.diagnose(x, k=4, tau=1e-6)
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
    ids = ["s0", "s1, s2", " s3", *(f"s{i}" for i in range(4, 9))]  # ids may hold ", " (audit)
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
    assert "()" not in tight_msg and "stimulus order;" in tight_msg
    assert "identical rows" not in tight_msg
    assert "8 of 8" in tied_msg and "('s0', 's1, s2', ' s3', 's4'" in tied_msg
    # two images shown 4 times each (one image, several captions): collapsed by its ties, not
    # by its cosines, which the message said ("nearly all stimuli alike") before 2026-12-07
    assert "alike" not in tied_msg
    assert "8 stimuli are in 2 groups of identical rows" in tied_msg


@pytest.mark.parametrize(("spread", "collapsed"), [(0.07, False), (0.02, True)])
def test_collapsed_from_a_mean_cosine_of_0_999(spread, collapsed):
    """docs/method.md: collapsed = mean cosine ≥ 0.999 (or half the rows unresolved). Layers at
    0.9952 and 0.9996 with no unresolved row fall on either side of 0.999 (a threshold of 0.99
    called the first collapsed)."""
    rng = np.random.default_rng(1)
    x = 1.0 + spread * rng.standard_normal((30, 40))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = dg.diagnose(x, k=3, tau=1e-12)
    cos_mean = brute(x, 3, 1e-12)["cos_mean"]
    assert got.cos_mean == pytest.approx(cos_mean, abs=1e-12)
    assert bool(cos_mean >= 0.999) == collapsed and 0.995 < cos_mean < 0.9997
    assert got.n_unresolved == 0
    assert bool(got.collapsed) == collapsed and bool(got.warn) == collapsed


@pytest.mark.parametrize(("seed", "n_unresolved"), [(2, 3), (0, 4)])
def test_warn_above_5_percent_unresolved(seed, n_unresolved):
    """docs/method.md: warn = more than 5 % of the rows unresolved. Three copies of one row
    (k = 1) leave 3 of 60 rows unresolved (5 %: no warning) or 4 of 60 (6.7 %: a warning; a
    threshold of 10 % gave none)."""
    rng = np.random.default_rng(seed)
    x = unit_rows(rng.standard_normal((60, 30)))
    x[[1, 2]] = x[0]
    got = dg.diagnose(x, k=1, tau=1e-6)
    assert got.unresolved.tolist() == brute(x, 1, 1e-6)["unresolved"]
    assert got.n_unresolved == n_unresolved and not got.collapsed
    assert bool(got.warn) == (n_unresolved / 60 > 0.05)


def test_the_table_names_the_first_10_unresolved_stimuli():
    """docs/method.md: unresolved_ids are the first 10 unresolved stimuli (all 30 rows of a
    collapsed layer are)."""
    rng = np.random.default_rng(2)
    x = unit_rows(rng.standard_normal(64) + 1e-7 * rng.standard_normal((30, 64)))
    diag = dg.diagnose(x, k=3)
    assert diag.n_unresolved > 10
    ids = [f"s{i:02d}" for i in range(30)]
    table = dg.diagnostics_table([("clip", 3, "blocks.3", diag)], ids)
    assert json.loads(table.loc[0, "unresolved_ids"]) == diag.unresolved_ids(ids)[:10]
    assert len(json.loads(table.loc[0, "unresolved_ids"])) == 10


def test_participation_ratio_centres_features_wider_than_the_set():
    """d = 50 > m = 20 with a shared mean direction: (Σλ)²/Σλ² of the covariance, 12.96 (without
    centring, 1.28); the property test reaches d > m only when it draws d = 70."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 50)) + 3 * rng.standard_normal(50)
    x = unit_rows(x)
    lam = np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False, bias=True))
    want = lam.sum() ** 2 / (lam**2).sum()
    assert dg.participation_ratio(x) == pytest.approx(want, rel=1e-6)
    assert dg.diagnose(x, k=3).eff_dim == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dense", [True, False])
def test_a_layer_search_structure_of_another_k_is_refused_or_ignored(dense):
    """A kNN structure built with k = 5 handed to diagnose(k = 2): the dense one (its kernel
    kept) is refused naming both; the blocked one is not used, and the unresolved rows are
    those of k = 2 (brute force), not of k = 5."""
    rng = np.random.default_rng(7)
    x = mt.prepare_layer(rng.standard_normal((120, 24)).astype(np.float32), 1e9)
    x[5] = x[6]
    x[9] = x[6]
    side = mt.KernelKNN.from_features(x, 5, dense=dense)
    tau = mt.kernel_resolution(24, x.dtype)
    want = brute(x, 2, tau)["unresolved"]
    assert want != brute(x, 5, tau)["unresolved"]
    if dense:
        with pytest.raises(ValueError, match=r"has k=5, .*asked for k=2"):
            dg.diagnose(x, k=2, side=side)
    else:
        assert dg.diagnose(x, k=2, side=side).unresolved.tolist() == want
