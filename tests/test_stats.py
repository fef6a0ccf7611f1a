"""Random baseline and the stimulus bootstrap (multiset CKNNA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xmodal import metrics as mt
from xmodal import stats


def pair(seed, m=30):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, 7))
    y = x @ rng.standard_normal((7, 5)) + rng.standard_normal((m, 5))
    return x, y


def brute_multiset_knn(kk, ll, w, k):
    """Copy-level kNN masks of a multiset (copies never neighbours, ties by copy order)."""
    copies = [i for i in range(len(w)) for _ in range(int(w[i]))]
    n = len(copies)
    same = np.equal.outer(copies, copies)

    def knn(g):
        mask = np.zeros((n, n))
        for a in range(n):
            cand = sorted((b for b in range(n) if not same[a, b]), key=lambda b: (-g[a, b], b))
            mask[a, cand[:k]] = 1
        return mask

    return knn(kk[np.ix_(copies, copies)]), knn(ll[np.ix_(copies, copies)])


def brute_multiset_cknna(kk, ll, w, k):
    """Copies of a stimulus are one point: never neighbours, excluded from the U-statistic."""
    copies = [i for i in range(len(w)) for _ in range(int(w[i]))]
    n = len(copies)
    kc, lc = kk[np.ix_(copies, copies)], ll[np.ix_(copies, copies)]
    same = np.equal.outer(copies, copies)

    def knn(g):
        mask = np.zeros((n, n))
        for a in range(n):
            cand = sorted((b for b in range(n) if not same[a, b]), key=lambda b: (-g[a, b], b))
            mask[a, cand[:k]] = 1
        return mask

    def hsic(a, b):
        a, b = a * ~same, b * ~same
        return (
            np.sum(a * b.T)
            + a.sum() * b.sum() / ((n - 1) * (n - 2))
            - 2 * (a.sum(0) @ b.sum(1)) / (n - 2)
        ) / (n * (n - 3))

    mk, ml = knn(kc), knn(lc)
    mm = mk * ml
    return hsic(mm * kc, mm * lc) / np.sqrt(hsic(mk * kc, mk * kc) * hsic(ml * lc, ml * lc))


def test_unit_weights_equal_cknna():
    x, y = pair(0)
    got = stats.weighted_cknna(x @ x.T, y @ y.T, np.ones((1, 30)), k=4)
    assert got[0] == pytest.approx(mt.cknna(x, y, 4), abs=1e-12)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(2, 6))
def test_multiset_cknna_matches_brute_force(seed, k):
    x, y = pair(seed)
    w = np.bincount(np.random.default_rng(seed).integers(0, 30, 30), minlength=30).astype(float)
    got = stats.weighted_cknna(x @ x.T, y @ y.T, w[None], k=k)
    assert got[0] == pytest.approx(brute_multiset_cknna(x @ x.T, y @ y.T, w, k), abs=1e-10)


def test_multiset_mutual_knn_matches_brute_force():
    x, y = pair(8)
    w = np.bincount(np.random.default_rng(8).integers(0, 30, 30), minlength=30).astype(float)
    mk, ml = brute_multiset_knn(x @ x.T, y @ y.T, w, 4)
    expected = (mk * ml).sum() / (4 * len(mk))
    plan = stats.BootstrapPlan.from_weights(np.arange(30), w[None], k=4)
    got = plan.values(plan.side(x @ x.T), plan.side(y @ y.T), "mutual_knn")
    assert got[0] == pytest.approx(expected, abs=1e-12)
    unit = stats.BootstrapPlan.from_weights(np.arange(30), np.ones((1, 30)), k=4)
    assert unit.values(unit.side(x @ x.T), unit.side(y @ y.T), "mutual_knn")[0] == pytest.approx(
        mt.mutual_knn(x, y, 4)
    )


def test_undefined_draws_are_refused():
    out = stats.random_baseline(np.array([0.1, np.nan, 0.3]), 0.2)
    assert np.isnan(out["random_mean"]) and np.isnan(out["random_ci_low"])
    assert np.isnan(out["frac_random_ge_low"]) and out["n_nonfinite"] == 1
    out = stats.random_baseline(np.array([0.1, 0.2, 0.3]), np.nan)
    assert np.isnan(out["frac_random_ge_low"]) and out["random_mean"] == pytest.approx(0.2)
    summ = stats.difference_summary(np.array([0.1, np.inf, 0.2]))
    assert np.isnan(summ["diff_ci_low"]) and summ["n_nonfinite"] == 1


def test_truncated_lists_equal_full_lists():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 20)).astype(np.float32)
    y = (x @ rng.standard_normal((20, 12)) + rng.standard_normal((300, 12))).astype(np.float32)
    kk, ll = mt.gram(x), mt.gram(y)
    plan = stats.BootstrapPlan(np.arange(300), 3, np.random.default_rng(0), k=10)
    side_k = plan.side(kk)
    assert side_k.depth < 299  # the truncated lists are in use
    vals = plan.cknna(side_k, plan.side(ll))
    k64, l64 = kk.astype(np.float64), ll.astype(np.float64)
    exact = [brute_multiset_cknna(k64, l64, w, 10) for w in plan.weights.numpy()]
    np.testing.assert_allclose(vals, exact, atol=2e-5)


def test_bootstrap_deterministic_and_sensible():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((120, 10))
    y = x + 0.5 * rng.standard_normal((120, 10))
    kk, ll = mt.gram(x), mt.gram(y)
    a = stats.bootstrap_difference(kk, ll, np.arange(60), np.arange(60, 120), n_boot=50, seed=3)
    b = stats.bootstrap_difference(kk, ll, np.arange(60), np.arange(60, 120), n_boot=50, seed=3)
    assert a == b
    assert a["diff_ci_low"] <= a["diff_ci_high"] and a["n_boot"] == 50
    vals = stats.bootstrap_cknna(kk, ll, np.arange(60), 50, np.random.default_rng(0), k=10)
    point = mt.cknna(x[:60], y[:60], 10)
    assert abs(np.median(vals) - point) < 0.15


def test_bootstrap_difference_draws_low_then_high_from_one_generator():
    """The high set's resamples continue the low set's generator (a fresh ``default_rng(seed)``
    would repeat its draws), and boot_sd is the sample SD (ddof = 1, not 0)."""
    x, y = pair(2, m=60)
    kk, ll = mt.gram(x), mt.gram(y)
    low, high = np.arange(0, 24), np.arange(30, 54)
    g = np.random.default_rng(5)
    d = stats.bootstrap_cknna(kk, ll, low, 50, g, 4) - stats.bootstrap_cknna(kk, ll, high, 50, g, 4)
    got = stats.bootstrap_difference(kk, ll, low, high, n_boot=50, seed=5, k=4)
    assert got["diff_ci_low"] == pytest.approx(np.percentile(d, 2.5), abs=1e-12)
    assert got["boot_sd"] == pytest.approx(np.std(d, ddof=1), rel=1e-12)


def test_random_baseline():
    out = stats.random_baseline(np.arange(100, dtype=float), 90.0)
    assert out["random_mean"] == pytest.approx(49.5)
    assert out["frac_random_ge_low"] == pytest.approx(0.10)
    assert out["random_ci_low"] == pytest.approx(2.475) and out["random_ci_high"] == pytest.approx(
        96.525
    )


def test_resample_blocks_do_not_change_values(monkeypatch):
    """Resamples are evaluated in blocks (cache-sized temporaries); the split never matters."""
    x, y = pair(4, m=40)
    kk, ll = x @ x.T, y @ y.T
    plan = stats.BootstrapPlan(np.arange(40), 300, np.random.default_rng(0), k=5)

    def values(block):
        monkeypatch.setattr(stats, "BLOCK", block)
        return plan.cknna(plan.side(kk), plan.side(ll))

    one = values(1000)
    for block in (7, 128):
        np.testing.assert_allclose(values(block), one, rtol=1e-12, atol=0)
    w = plan.weights.numpy()
    np.testing.assert_allclose(one[:3], stats.weighted_cknna(kk, ll, w[:3], k=5), rtol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 1e-6)])
def test_bootstrap_from_features_equals_kernel(dtype, tol, monkeypatch):
    """The blocked route (lists from features by row blocks, counts recomputed per block) gives
    the dense route's resampled values."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 9)).astype(dtype)
    y = (x @ rng.standard_normal((9, 6)) + rng.standard_normal((200, 6))).astype(dtype)
    pos = rng.choice(200, 90, replace=False)
    plan = stats.BootstrapPlan(pos, 60, np.random.default_rng(1), k=5)
    dense = plan.cknna(plan.side(mt.gram(x)), plan.side(mt.gram(y)))
    monkeypatch.setattr(mt, "BLOCK_ELEMS", 13 * 90)  # 13-row blocks
    monkeypatch.setattr(stats, "KEEP_COUNTS", 0)  # counts recomputed per block
    side_x = plan.side(features=x)
    assert side_x.counts is None
    blocked = plan.cknna(side_x, plan.side(features=y))
    np.testing.assert_allclose(blocked, dense, atol=tol, rtol=0)


def test_bootstrap_set_order_does_not_matter():
    """A set listed in any order gives the same resamples (weights follow their stimuli)."""
    x, y = pair(6, m=40)
    kk, ll = x @ x.T, y @ y.T
    pos = np.random.default_rng(0).choice(40, 25, replace=False)
    w = np.random.default_rng(1).integers(0, 3, (4, 25)).astype(float)
    perm = np.random.default_rng(2).permutation(25)
    a = stats.BootstrapPlan.from_weights(pos, w, k=4)
    b = stats.BootstrapPlan.from_weights(pos[perm], w[:, perm], k=4)
    np.testing.assert_allclose(
        a.cknna(a.side(kk), a.side(ll)), b.cknna(b.side(kk), b.side(ll)), rtol=1e-12
    )


def test_bootstrap_draws_depend_on_the_sets_members_not_their_listing_order():
    """Drawn resamples (not given weights) of one set listed in two orders are the same: sets
    are listed by dispersion rank, and rounding that swaps two near-equal dispersions moved
    an interval of low − high by up to 0.006 (n_boot 200, reviewer) while the set stayed."""
    x, y = pair(6, m=40)
    kk, ll = x @ x.T, y @ y.T
    pos = np.random.default_rng(0).choice(40, 25, replace=False)
    swapped = pos.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    a = stats.BootstrapPlan(pos, 50, np.random.default_rng(7), k=4)
    b = stats.BootstrapPlan(swapped, 50, np.random.default_rng(7), k=4)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.cknna(a.side(kk), a.side(ll)), b.cknna(b.side(kk), b.side(ll)))


def test_bootstrap_ties_by_stimulus_order():
    """Duplicated stimuli inside a set: exact ties, broken by stimulus order (brute force)."""
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, (30, 4)).astype(float)
    x[[5, 11, 20]] = x[2]
    y = rng.integers(-2, 3, (30, 3)).astype(float)
    w = np.bincount(rng.integers(0, 30, 30), minlength=30).astype(float)
    got = stats.weighted_cknna(x @ x.T, y @ y.T, w[None], k=4)
    assert got[0] == pytest.approx(brute_multiset_cknna(x @ x.T, y @ y.T, w, 4), abs=1e-10)


def test_stored_sides_are_taken_only_for_the_same_input(tmp_path):
    """A stored side is taken exactly when the set's kernel bytes, the resamples and k are
    those it was made from; anything else is rebuilt (and gives the uncached values)."""
    x, y = pair(8, m=60)
    kk, ll = x @ x.T, y @ y.T
    pos = np.random.default_rng(0).choice(60, 30, replace=False)
    plan = stats.BootstrapPlan(pos, 200, np.random.default_rng(4), k=5)
    cache: dict = {}
    built = plan.side(kk, cache=cache)
    expected = plan.cknna(built, plan.side(ll))
    assert len(cache) == 1
    stats.save_sides(cache, tmp_path / "sides.pt")
    stats.save_sides(cache, tmp_path / "again.pt")  # the same sides give the same bytes
    assert (tmp_path / "sides.pt").read_bytes() == (tmp_path / "again.pt").read_bytes()
    loaded = stats.load_sides(tmp_path / "sides.pt")
    (stored,) = loaded.values()
    assert stored.counts is None  # counts are not stored: recomputed from the lists

    same = stats.BootstrapPlan(pos, 200, np.random.default_rng(4), k=5)
    taken = same.side(kk, cache=loaded)
    assert taken.order is stored.order and len(loaded) == 1  # from the file, nothing added
    np.testing.assert_array_equal(same.cknna(taken, same.side(ll)), expected)

    nudged = kk.copy()
    nudged[pos[0], pos[1]] = nudged[pos[1], pos[0]] = kk[pos[0], pos[1]] + 1e-9
    others = [
        (same, nudged),  # one kernel entry of the set differs in its last bits
        (stats.BootstrapPlan(pos, 200, np.random.default_rng(5), k=5), kk),  # other draws
        (stats.BootstrapPlan(pos, 200, np.random.default_rng(4), k=6), kk),  # other k
        (stats.BootstrapPlan(pos[:-1], 200, np.random.default_rng(4), k=5), kk),  # other set
    ]
    for i, (p, kern) in enumerate(others, start=2):
        side = p.side(kern, cache=loaded)
        assert len(loaded) == i and side.order is not stored.order
        np.testing.assert_array_equal(p.cknna(side, p.side(ll)), p.cknna(p.side(kern), p.side(ll)))
    # stimuli outside the set do not enter the key: another kernel off the set is the same side
    outside = kk.copy()
    rest = np.setdiff1d(np.arange(60), pos)
    outside[rest[0], rest[1]] += 1.0
    assert same.key(torch.from_numpy(outside[np.ix_(same.positions, same.positions)])) in loaded


def test_a_file_of_other_sides_is_refused_naming_it(tmp_path):
    path = tmp_path / "vision_bootstrap.pt"
    torch.save({"format": "bootstrap-side-0", "sides": {}}, path)
    with pytest.raises(ValueError, match=r"vision_bootstrap\.pt.*rerun"):
        stats.load_sides(path)
    good = tmp_path / "good.pt"
    stats.save_sides({}, good)
    path.write_bytes(good.read_bytes()[:20])  # truncated
    with pytest.raises(ValueError, match=r"vision_bootstrap\.pt: cannot read .*delete it"):
        stats.load_sides(path)


def test_damaged_stored_sides_are_refused(tmp_path):
    """torch's zip reader checks no checksum: bits flipped in a stored side's values were read,
    and moved the intervals, exit 0 (audit). The file holds the SHA-256 of its tensors."""
    x, _ = pair(8, m=40)
    plan = stats.BootstrapPlan(np.arange(20), 50, np.random.default_rng(0), k=4)
    cache: dict = {}
    plan.side(x @ x.T, cache=cache)
    path = tmp_path / "vision_bootstrap.pt"
    stats.save_sides(cache, path)
    assert len(stats.load_sides(path)) == 1
    payload = torch.load(path, weights_only=True)
    (side,) = payload["sides"].values()
    side["values"][3, 1] = torch.nextafter(side["values"][3, 1], torch.tensor(np.inf))  # one ulp
    torch.save(payload, path)
    with pytest.raises(
        ValueError, match=r"vision_bootstrap\.pt: the prepared bootstrap sides are damaged"
    ):
        stats.load_sides(path)
    del payload["sha256"]  # a file written before the digest: read as it is
    torch.save(payload, path)
    assert len(stats.load_sides(path)) == 1


@pytest.mark.parametrize("k", [1, 2, 4])
def test_multiset_cknna_of_unrelated_kernels_matches_brute_force(k):
    """Lists that share few or no entries (the cross term visits only shared ones): independent
    features, and a kernel against its negation (no shared neighbour at all: CKNNA 0)."""
    rng = np.random.default_rng(k)
    x, y = rng.standard_normal((25, 3)), rng.standard_normal((25, 3))
    kk, ll = x @ x.T, y @ y.T
    w = np.stack([np.bincount(rng.integers(0, 25, 25), minlength=25) for _ in range(6)])
    got = stats.weighted_cknna(kk, ll, w.astype(float), k=k)
    want = [brute_multiset_cknna(kk, ll, wi, k) for wi in w]
    np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)
    np.testing.assert_array_equal(stats.weighted_cknna(kk, -kk, w.astype(float), k=k), 0.0)


def test_bootstrap_resample_with_two_negative_self_hsics_is_nan():
    """A resample whose kernels both have self-HSIC < 0 is undefined (docs/method.md,
    "Degenerate layers"), not the finite ratio of two negatives."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((80, 8)).astype(np.float32)
    y = (x + rng.standard_normal((80, 8))).astype(np.float32)
    plan = stats.BootstrapPlan(np.arange(80), 4, np.random.default_rng(0), k=5)
    sk, sl = plan.side(mt.gram(x)), plan.side(mt.gram(y))
    good = plan.cknna(sk, sl)
    assert np.isfinite(good).all()
    flip = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=sk.self_hsic.dtype)
    sk.self_hsic, sl.self_hsic = sk.self_hsic.abs() * flip, sl.self_hsic.abs() * flip
    got = plan.cknna(sk, sl)
    assert np.isnan(got[[0, 2]]).all()
    np.testing.assert_array_equal(got[[1, 3]], good[[1, 3]])


def test_bootstrap_resamples_are_draws_with_replacement_from_the_whole_set():
    """Each resample's multiplicities are the counts of n draws from all n stimuli
    (rng.integers(0, n), written out independently): draws from the first n − 1 only (never the
    set's last stimulus) passed every other test (mutation audit)."""
    n, n_boot = 12, 400
    pos = np.array([40, 3, 17, 8, 25, 1, 33, 12, 5, 29, 20, 9])  # a set listed in any order
    plan = stats.BootstrapPlan(pos, n_boot, np.random.default_rng(7), k=3)
    draws = np.random.default_rng(7).integers(0, n, size=(n_boot, n))
    want = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float32)
    np.testing.assert_array_equal(plan.weights.numpy(), want)
    assert plan.positions.tolist() == sorted(pos.tolist())  # column j: the j-th smallest
    assert (plan.weights.sum(dim=1) == n).all() and (plan.weights[:, -1] > 0).any()


def test_neighbour_lists_deepen_when_a_resample_drops_all_listed_neighbours():
    """A resample that keeps stimulus 0 but drops every stimulus in its first 4k + 8 list
    entries (by either kernel) needs deeper lists to find its k nearest kept copies; lists
    never deepened gave 0.3369867 where the copy-level brute force gives 0.3369814 (mutation
    audit: no other test reached the deepening)."""
    x, y = pair(0)
    kk, ll = x @ x.T, y @ y.T
    off = np.where(np.eye(30, dtype=bool), -np.inf, 0.0)
    near = set(np.argsort(-(kk + off)[0], kind="stable")[:12])
    near |= set(np.argsort(-(ll + off)[0], kind="stable")[:12])
    w = np.ones(30)
    w[list(near)] = 0
    w[[i for i in range(1, 30) if i not in near][:4]] = 2
    got = stats.weighted_cknna(kk, ll, w[None], k=1)
    assert got[0] == pytest.approx(brute_multiset_cknna(kk, ll, w, 1), abs=1e-10)


def test_random_baseline_counts_infinite_draws_as_undefined():
    """An infinite draw is not finite, like NaN: mean, interval and fraction are NaN and
    ``n_nonfinite`` counts it (counting NaN only gave mean inf and fraction 2/3)."""
    out = stats.random_baseline(np.array([0.1, np.inf, 0.3]), 0.2)
    assert out["n_nonfinite"] == 1
    assert np.isnan(out["random_mean"]) and np.isnan(out["frac_random_ge_low"])
    assert np.isnan(out["random_ci_low"]) and np.isnan(out["random_ci_high"])


def test_random_baseline_refuses_a_table_of_draws():
    """The draws must be a 1-D array; a 2-D one is refused, not flattened."""
    with pytest.raises(ValueError, match="non-empty 1-D array"):
        stats.random_baseline(np.array([[0.1, 0.2], [0.3, 0.4]]), 0.2)
    with pytest.raises(ValueError, match="non-empty 1-D array"):
        stats.random_baseline(np.array([]), 0.2)


def test_bootstrap_refuses_sets_of_three_and_zero_resamples():
    """CKNNA's U-statistic needs n ≥ 4 stimuli (a set of 3 gave NaN draws), and n_boot ≥ 1 is
    said as such (n_boot 0 failed inside torch.cat)."""
    x, _ = pair(0, m=40)
    kk = x @ x.T
    with pytest.raises(ValueError, match="n ≥ 4 .*got n=3, k=1"):
        stats.bootstrap_cknna(kk, kk, np.arange(3), 5, np.random.default_rng(0), k=1)
    assert np.isfinite(
        stats.bootstrap_cknna(kk, kk, np.arange(4), 5, np.random.default_rng(0), 1)
    ).all()
    with pytest.raises(ValueError, match="n_boot must be ≥ 1, got 0"):
        stats.bootstrap_difference(kk, kk, np.arange(20), np.arange(20, 40), n_boot=0, k=3)


def test_percentile_interval_of_no_values_is_nan():
    """No draws, no interval: (NaN, NaN), as the docstring says (not numpy's error)."""
    from xmodal.intervals import percentile_interval

    lo, hi = percentile_interval([])
    assert np.isnan(lo) and np.isnan(hi)
    assert percentile_interval([1.0, 2.0, 3.0]) == pytest.approx((1.05, 2.95))
