"""Alignment metrics against brute-force implementations written straight from docs/method.md, "Alignment"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

from xmodal import metrics as mt

SETTINGS = settings(max_examples=5, deadline=None)


# ----------------------------------------------------------------------------- brute force


def bf_knn_mask(g, k):
    m = len(g)
    mask = np.zeros((m, m))
    for i in range(m):
        cand = sorted((j for j in range(m) if j != i), key=lambda j: -g[i][j])
        for j in cand[:k]:
            mask[i][j] = 1.0
    return mask


def bf_hsic(a, b):
    m = len(a)
    at = [[0.0 if i == j else a[i][j] for j in range(m)] for i in range(m)]
    bt = [[0.0 if i == j else b[i][j] for j in range(m)] for i in range(m)]
    t1 = sum(at[i][j] * bt[j][i] for i in range(m) for j in range(m))
    sa = sum(at[i][j] for i in range(m) for j in range(m))
    sb = sum(bt[i][j] for i in range(m) for j in range(m))
    t3 = sum(at[i][j] * bt[j][r] for i in range(m) for j in range(m) for r in range(m))
    return (t1 + sa * sb / ((m - 1) * (m - 2)) - 2 * t3 / (m - 2)) / (m * (m - 3))


def bf_cknna(x, y, k):
    kk, ll = x @ x.T, y @ y.T
    mk, ml = bf_knn_mask(kk, k), bf_knn_mask(ll, k)
    mm = mk * ml
    return bf_hsic(mm * kk, mm * ll) / np.sqrt(
        bf_hsic(mk * kk, mk * kk) * bf_hsic(ml * ll, ml * ll)
    )


def bf_cka(x, y):
    m = len(x)
    h = np.eye(m) - np.ones((m, m)) / m
    kk, ll = x @ x.T, y @ y.T
    tr = lambda a, b: sum((h @ a @ h)[i][j] * b[j][i] for i in range(m) for j in range(m))  # noqa: E731
    return tr(kk, ll) / np.sqrt(tr(kk, kk) * tr(ll, ll))


def pair(seed, m=24, p=6, q=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, p))
    y = x @ rng.standard_normal((p, q)) + rng.standard_normal((m, q))
    return x, y


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("k", [2, 5, 10])
def test_cknna_matches_brute_force(k):
    x, y = pair(k)
    assert mt.cknna(x, y, k) == pytest.approx(bf_cknna(x, y, k), abs=1e-12)


def test_hsic_cka_mutual_knn_match_brute_force():
    x, y = pair(1, m=14)
    kk, ll = x @ x.T, y @ y.T
    assert mt.hsic_unbiased(kk, ll) == pytest.approx(bf_hsic(kk, ll), rel=1e-10)
    asym_a, asym_b = bf_knn_mask(kk, 3) * kk, bf_knn_mask(ll, 3) * ll  # transpose matters here
    assert mt.hsic_unbiased(asym_a, asym_b) == pytest.approx(bf_hsic(asym_a, asym_b), rel=1e-10)
    assert mt.cka(x, y) == pytest.approx(bf_cka(x, y), rel=1e-10)
    ucka = bf_hsic(kk, ll) / np.sqrt(bf_hsic(kk, kk) * bf_hsic(ll, ll))
    assert mt.unbiased_cka(x, y) == pytest.approx(ucka, rel=1e-10)
    mk, ml = bf_knn_mask(kk, 4), bf_knn_mask(ll, 4)
    expected = np.mean([sum(mk[i][j] * ml[i][j] for j in range(14)) / 4 for i in range(14)])
    assert mt.mutual_knn(x, y, 4) == pytest.approx(expected)


def test_cknna_full_k_equals_unbiased_cka():
    x, y = pair(2, m=30)
    assert mt.cknna(x, y, k=29) == pytest.approx(mt.unbiased_cka(x, y), abs=1e-12)


@SETTINGS
@given(seed=st.integers(0, 2**16), k=st.integers(2, 8))
def test_cknna_rotation_scaling_identity(seed, k):
    x, y = pair(seed)
    base = mt.cknna(x, y, k)
    q = ortho_group.rvs(x.shape[1], random_state=seed)
    assert mt.cknna(x @ q, y, k) == pytest.approx(base, abs=1e-10)
    assert mt.cknna(x, y @ ortho_group.rvs(y.shape[1], random_state=seed + 1), k) == pytest.approx(
        base, abs=1e-10
    )
    assert mt.cknna(3.7 * x, 0.2 * y, k) == pytest.approx(base, abs=1e-10)
    assert mt.cknna(x, x, k) == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(seed=st.integers(0, 2**16), k=st.integers(2, 8))
def test_cknna_symmetry(seed, k):
    """CKNNA(X,Y) = CKNNA(Y,X) holds up to the one asymmetric HSIC_u term.

    With masked (non-symmetric) Ã = M∘K, B̃ = M∘L, HSIC_u's Σ Ã_ij B̃_ji and 1ᵀÃ1·1ᵀB̃1 are
    symmetric in (Ã, B̃) but 1ᵀÃB̃1 ≠ 1ᵀB̃Ã1, so the reference definition (docs/method.md "Alignment", the
    Platonic Representation code) is symmetric only when that term agrees (e.g. k = m−1).
    """
    x, y = pair(seed)
    kk, ll = x @ x.T, y @ y.T
    mk, ml = bf_knn_mask(kk, k), bf_knn_mask(ll, k)
    mm = mk * ml
    denom = np.sqrt(bf_hsic(mk * kk, mk * kk) * bf_hsic(ml * ll, ml * ll))
    assert mt.cknna(y, x, k) == pytest.approx(bf_hsic(mm * ll, mm * kk) / denom, abs=1e-12)
    a, b = mm * kk, mm * ll
    m = len(a)
    swap = 2 * (a.sum(0) @ b.sum(1) - b.sum(0) @ a.sum(1)) / ((m - 2) * m * (m - 3))
    assert mt.cknna(y, x, k) - mt.cknna(x, y, k) == pytest.approx(swap / denom, abs=1e-12)
    assert mt.cknna(y, x, m - 1) == pytest.approx(mt.cknna(x, y, m - 1), abs=1e-12)


def test_cknna_nearly_symmetric_at_scale():
    x, y = pair(3, m=600, p=50, q=40)
    assert abs(mt.cknna(x, y, 10) - mt.cknna(y, x, 10)) < 5e-3


def test_cka_properties():
    x, y = pair(4)
    q = ortho_group.rvs(x.shape[1], random_state=0)
    assert mt.cka(x @ q * 2.0, y) == pytest.approx(mt.cka(x, y), abs=1e-12)
    assert mt.cka(x, x) == pytest.approx(1.0)
    assert mt.unbiased_cka(x, x) == pytest.approx(1.0)
    assert mt.mutual_knn(x, x, 5) == 1.0


def test_float32_kernels_close_to_float64():
    x, y = pair(5, m=200, p=40, q=30)
    v64 = mt.cknna(x, y, 10)
    v32 = mt.cknna(x.astype(np.float32), y.astype(np.float32), 10)
    assert abs(v64 - v32) < 1e-5


def test_cknna_of_float32_features_sums_in_float64():
    """docs/method.md, "Alignment": the kernels may be float32, the HSIC sums are float64. Features
    on a grid of eighths make every float32 kernel entry exact, so a float64 brute force over
    the same entries is the answer to rounding; a sum kept in float32 drifts by ~1e-9 at m = 1024."""
    rng = np.random.default_rng(11)
    m, k = 1024, 10
    z = rng.integers(-16, 17, (m, 4))
    x = (z @ rng.integers(-2, 3, (4, 16)) + rng.integers(-8, 9, (m, 16))) / 8
    y = (z @ rng.integers(-2, 3, (4, 24)) + rng.integers(-12, 13, (m, 24))) / 8
    x, y = x.astype(np.float32), y.astype(np.float32)
    kk, ll = (
        x.astype(np.float64) @ x.T.astype(np.float64),
        y.astype(np.float64) @ y.T.astype(np.float64),
    )
    assert np.array_equal((x @ x.T).astype(np.float64), kk)  # exact in float32

    def mask(g):  # k largest off-diagonal per row, ties to the lower stimulus index
        h = g.copy()
        np.fill_diagonal(h, -np.inf)
        out = np.zeros_like(g)
        np.put_along_axis(out, np.argsort(-h, axis=1, kind="stable")[:, :k], 1.0, axis=1)
        return out

    def hsic(a, b):
        a, b = a.copy(), b.copy()
        np.fill_diagonal(a, 0)
        np.fill_diagonal(b, 0)
        t3 = a.sum(0) @ b.sum(1)
        return (np.sum(a * b.T) + a.sum() * b.sum() / ((m - 1) * (m - 2)) - 2 * t3 / (m - 2)) / (
            m * (m - 3)
        )

    mk, ml = mask(kk), mask(ll)
    both = mk * ml
    expected = hsic(both * kk, both * ll) / np.sqrt(hsic(mk * kk, mk * kk) * hsic(ml * ll, ml * ll))
    assert mt.cknna(x, y, k) == pytest.approx(expected, abs=1e-12)


def test_validation():
    x, y = pair(0)
    with pytest.raises(ValueError, match="k must be"):
        mt.cknna(x, y, k=24)
    with pytest.raises(ValueError, match="stimuli"):
        mt.cknna(x, y[:-1])


def reference_prepare(feats):
    """Reference code: feats (N, L, D); q = mean_n quantile(|x_n|, 0.95); clamp; l2 per layer."""
    f = torch.as_tensor(feats).float().permute(1, 0, 2)
    q = torch.quantile(f.abs().flatten(start_dim=1), 0.95, dim=1).mean()
    f = f.clamp(-q, q)
    return torch.nn.functional.normalize(f, dim=-1).permute(1, 0, 2).numpy(), float(q)


def test_prepare_matches_reference():
    rng = np.random.default_rng(0)
    feats = (rng.standard_t(3, size=(4, 50, 16)) * 3).astype(np.float32)  # (layers, m, dim)
    expected, q = reference_prepare(feats)
    assert mt.outlier_threshold(feats) == pytest.approx(q, rel=1e-6)
    got = mt.prepare(feats)
    assert got.dtype == np.float32 and got.shape == feats.shape
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    qs = mt.abs_quantiles(feats)
    assert mt.threshold_from_quantiles(qs) == pytest.approx(q, rel=1e-6)
    np.testing.assert_allclose(mt.prepare_layer(feats[1], q), expected[1], atol=1e-6)
    assert mt.prepare(feats[0]).shape == (50, 16)


# ----------------------------------------------------------------------------- ties and stability
#
# The rule (docs/method.md, "Ties"): knn(i) = the k largest off-diagonal entries of row i, exactly
# equal values taken in stimulus order (lower index first). Integer-valued features make every
# dot product exact, so duplicate rows give exactly equal kernel entries on every path.

CUDA = torch.cuda.is_available()


def bf_knn_sets(g, k):
    """The rule, by sorting each row on (−value, index)."""
    m = len(g)
    return [
        set(sorted((j for j in range(m) if j != i), key=lambda j: (-g[i][j], j))[:k])
        for i in range(m)
    ]


def bf_gaps(g, k):
    out = []
    for i in range(len(g)):
        v = sorted((g[i][j] for j in range(len(g)) if j != i), reverse=True)
        out.append(v[k - 1] - v[k] if k < len(v) else np.inf)
    return np.array(out)


def bf_alt_sets(g, k, tau):
    """The near-tie band of unresolved rows filled in the reverse of the rule's order: lowest
    value first, equal values higher index first (docs/method.md, "Stability")."""
    m = len(g)
    sets = bf_knn_sets(g, k)
    gaps = bf_gaps(g, k)
    out = []
    for i in range(m):
        if gaps[i] > tau:
            out.append(sets[i])
            continue
        vk = sorted((g[i][j] for j in range(m) if j != i), reverse=True)[k - 1]
        above = {j for j in range(m) if j != i and g[i][j] > vk + tau}
        band = [j for j in range(m) if j != i and abs(g[i][j] - vk) <= tau]
        band.sort(key=lambda j: (g[i][j], -j))
        out.append(above | set(band[: k - len(above)]))
    return out


def bf_cknna_sets(kk, ll, sk, sl):
    m = len(kk)
    mk, ml = np.zeros((m, m)), np.zeros((m, m))
    for i in range(m):
        mk[i, list(sk[i])] = 1
        ml[i, list(sl[i])] = 1
    mm = mk * ml
    return bf_hsic(mm * kk, mm * ll) / np.sqrt(
        bf_hsic(mk * kk, mk * kk) * bf_hsic(ml * ll, ml * ll)
    )


def sets_of(side, b=0):
    """kNN sets of a KernelKNN (or a Neighbours) batch element."""
    return [set(row.tolist()) for row in side.idx[b].cpu()]


def tied_features(seed, m=40, p=4, n_dup=6):
    """Small integer features with several exact duplicates (exact dot products, exact ties)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (m, p)).astype(np.float64)
    src = rng.integers(0, m, n_dup)
    dst = rng.choice(m, n_dup, replace=False)
    x[dst] = x[src]
    return x


@SETTINGS
@given(seed=st.integers(0, 2**16), k=st.integers(1, 8))
def test_ties_follow_stimulus_order_on_every_path(seed, k):
    x = tied_features(seed)
    g = x @ x.T
    expected = bf_knn_sets(g, k)
    assert sets_of(mt.KernelKNN.build(torch.from_numpy(g), k)) == expected
    assert sets_of(mt.KernelKNN.from_features(x, k, dense=True)) == expected
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mt, "BLOCK_ELEMS", 7 * len(x))  # 7-row blocks
        assert sets_of(mt.KernelKNN.from_features(x, k, dense=False)) == expected
        x32 = x.astype(np.float32)
        assert sets_of(mt.KernelKNN.from_features(x32, k, dense=False)) == expected
        if CUDA:
            dev = torch.device("cuda")
            assert sets_of(mt.KernelKNN.from_features(x, k, dense=True, device=dev)) == expected
            assert sets_of(mt.KernelKNN.from_features(x, k, dense=False, device=dev)) == expected
    # ordered lists (the bootstrap's): sorted by (−value, index), every row
    masked = torch.from_numpy(g.copy())
    masked.fill_diagonal_(float("-inf"))
    val, idx, _ = mt.top_lists(masked, 12)
    for i in range(len(g)):
        order = sorted((j for j in range(len(g)) if j != i), key=lambda j: (-g[i][j], j))[:12]
        assert idx[i].tolist() == order


def test_ties_in_batches_follow_subset_order():
    from xmodal.alignment import subset_sides

    x = tied_features(3, m=50)
    g = x @ x.T
    rng = np.random.default_rng(0)
    subsets = np.sort(np.stack([rng.choice(50, 20, replace=False) for _ in range(5)]), axis=1)
    sides = subset_sides(torch.from_numpy(g), subsets, 4)
    got = [sets_of(part, b) for part in sides for b in range(part.idx.shape[0])]
    assert got == [bf_knn_sets(g[np.ix_(s, s)], 4) for s in subsets]


def repeated_rows(seed=0, m=300, p=37, groups=40):
    """float32 unit rows, ``groups`` of them repeated 2–4 times at scattered positions (as a
    repeated caption repeats an LLM's row), and the float64 kernel with one dot product per
    entry (equal rows give bit-equal entries there)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, p)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(m)
    at = 0
    for _ in range(groups):
        n = int(rng.integers(2, 5))
        x[order[at + 1 : at + n]] = x[order[at]]
        at += n
    x64 = x.astype(np.float64)
    g = np.array([[float(np.dot(a, b)) for b in x64] for a in x64])
    return x, g


@settings(max_examples=200, deadline=None)  # cheap: small matrices
@given(
    seed=st.integers(0, 2**16),
    m=st.integers(1, 30),
    p=st.integers(1, 24),
    levels=st.integers(1, 3),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_equal_row_representatives_is_the_first_equal_row(seed, m, p, levels, dtype):
    """Few distinct values make rows that share their leading 64 bytes (the screen of
    :func:`metrics.duplicate_groups`, passed by rows wider than 16 float32 or 8 float64 values)
    but differ further on, as well as equal rows: the representative is the first row equal to
    each row, or None when every row is its own."""
    x = np.random.default_rng(seed).integers(0, levels, (m, p)).astype(dtype)
    first = [next(j for j in range(m) if (x[j] == x[i]).all()) for i in range(m)]
    rep = mt.equal_row_representatives(torch.from_numpy(x))
    if first == list(range(m)):
        assert rep is None
    else:
        assert rep.tolist() == first


@pytest.mark.parametrize(
    "path",
    [
        "dense",
        "blocked",
        "subsets",
        "kernel",
        pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device")),
    ],
)
def test_equal_float32_rows_tie_exactly_and_follow_stimulus_order(monkeypatch, path):
    """Equal rows have equal kernel entries in the data, but BLAS rounds XXᵀ by position: in the
    demo's BLOOM-m layer 1038 entries of its 37 groups of equal rows (repeated captions)
    differed in the last bit, so rounding, not the tie rule, chose which copy was a neighbour,
    and the value moved with the machine's BLAS (CLIP × BLOOM-m on the drop-low PC1 set: 7.5e-4
    from the float64 kernel's, the stability 1.3e-5). Every path now gives the copies' columns
    one value, so the rule decides: the kNN sets equal the float64 kernel's (lower index first)."""
    x, g = repeated_rows()
    k, m = 4, len(x)
    gaps = bf_gaps(g, k)
    tau = mt.kernel_resolution(x.shape[1], np.float32)
    assert ((gaps == 0) | (gaps > tau)).all()  # only exact ties are near ties: the rule decides
    assert (gaps == 0).sum() >= 20  # many rows whose k-th neighbour is one of several copies
    expected = bf_knn_sets(g, k)
    if path == "dense":
        assert sets_of(mt.KernelKNN.from_features(x, k, dense=True)) == expected
    elif path == "blocked":
        monkeypatch.setattr(mt, "BLOCK_ELEMS", 7 * m)  # 7-row blocks
        assert sets_of(mt.KernelKNN.from_features(x, k, dense=False)) == expected
    elif path == "cuda":  # cuBLAS rounds by position too
        dev = torch.device("cuda")
        assert sets_of(mt.KernelKNN.from_features(x, k, dense=True, device=dev)) == expected
        assert sets_of(mt.KernelKNN.from_features(x, k, dense=False, device=dev)) == expected
    elif path == "subsets":
        from xmodal.alignment import kernel, subset_sides

        rng = np.random.default_rng(1)
        subsets = np.sort(np.stack([rng.choice(m, 150, replace=False) for _ in range(6)]), axis=1)
        sides = subset_sides(kernel(x), subsets, k)
        got = [sets_of(part, b) for part in sides for b in range(part.idx.shape[0])]
        assert got == [bf_knn_sets(g[np.ix_(s, s)], k) for s in subsets]
    else:
        kk = mt.gram(x)
        rep = mt.equal_row_representatives(torch.from_numpy(x)).numpy()
        assert (rep != np.arange(m)).sum() > 40
        np.testing.assert_array_equal(kk, kk[np.ix_(rep, rep)])
        assert mt.equal_row_representatives(torch.from_numpy(np.unique(x, axis=0))) is None


def plant_gaps(gaps, k=5, m=60, p=16, seed=0):
    """float64 features where rows 0, 1, 2, ... get a kNN boundary gap of exactly gaps[r]:
    a new row j' is put at x_i·x_j' = v_k − gap (v_k: row i's k-th value), off x_i's direction."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, p))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for r, gap in enumerate(gaps):
        g = x @ x.T
        order = sorted((j for j in range(m) if j != r), key=lambda j: -g[r, j])
        jk, jnew = order[k - 1], m - 1 - r
        u = rng.standard_normal(p)
        u -= (u @ x[r]) * x[r]
        x[jnew] = x[jk] + 0.05 * u / np.linalg.norm(u) - gap * x[r]
    return x


def test_unresolved_rows_counted_exactly():
    tau = mt.kernel_resolution(16, np.float32)
    assert 1e-7 < tau < 1e-4
    gaps = [1e-9, 1e-7, 1e-4]
    x = plant_gaps(gaps)
    bf = bf_gaps(x @ x.T, 5)
    np.testing.assert_allclose(bf[:3], gaps, rtol=1e-5)  # the planted gaps hold
    side = mt.KernelKNN.from_features(x, 5, tau=tau)
    assert side.unresolved[0].tolist() == (bf <= tau).tolist()
    assert side.unresolved[0, :3].tolist() == [True, True, False]
    np.testing.assert_allclose(side.gap[0].numpy(), bf, atol=1e-12)
    blocked = mt.KernelKNN.from_features(x, 5, tau=tau, dense=False)
    assert blocked.unresolved[0].tolist() == side.unresolved[0].tolist()
    alt = bf_alt_sets(x @ x.T, 5, tau)  # the near-tie band within τ, filled in reverse order
    assert sets_of(side.alt) == alt and sets_of(blocked.alt) == alt
    assert alt[0] != bf_knn_sets(x @ x.T, 5)[0]


def test_kernel_resolution_covers_float32_kernel_error():
    """τ bounds twice the float32 kernel error of unit-norm rows (what makes a gap trustworthy)."""
    rng = np.random.default_rng(0)
    for p in (16, 256, 2048):
        a = rng.standard_normal((300, p))
        a[:, :2] += 200.0  # a few massive dimensions
        x = torch.nn.functional.normalize(torch.from_numpy(a).float(), dim=1).numpy()
        err = np.abs(mt.gram(x).astype(np.float64) - mt.gram(x.astype(np.float64))).max()
        assert 2 * err < mt.kernel_resolution(p, np.float32)
    assert mt.kernel_resolution(16, np.float64) < 1e-14


def test_kernel_resolution_takes_the_values_in_method_md():
    """τ = 4·√dim·eps: another RESOLUTION_FACTOR (2.0) would move the values docs/method.md
    quotes for float32 kernels of width 16, 1280 and 4096."""
    eps = np.finfo(np.float32).eps
    assert mt.kernel_resolution(16, np.float32) == pytest.approx(4 * 4 * eps)
    assert mt.kernel_resolution(16, np.float32) == pytest.approx(1.9e-6, rel=0.01)
    assert mt.kernel_resolution(1280, np.float32) == pytest.approx(1.7e-5, rel=0.02)
    assert mt.kernel_resolution(4096, np.float32) == pytest.approx(3.1e-5, rel=0.02)


@SETTINGS
@given(seed=st.integers(0, 2**16), k=st.integers(2, 6))
def test_stability_matches_brute_force(seed, k):
    x = tied_features(seed, m=24)
    y = tied_features(seed + 1, m=24, p=3)
    kk, ll = x @ x.T, y @ y.T
    xs, ys = mt.KernelKNN.from_features(x, k, tau=0.0), mt.KernelKNN.from_features(y, k, tau=0.0)
    for side, g in ((xs, kk), (ys, ll)):
        assert side.unresolved[0].tolist() == (bf_gaps(g, k) <= 0).tolist()
        if side.alt is not None:
            assert [set(r.tolist()) for r in side.alt.idx[0]] == bf_alt_sets(g, k, 0.0)
    sk, sl = bf_knn_sets(kk, k), bf_knn_sets(ll, k)
    ak, al_ = bf_alt_sets(kk, k, 0.0), bf_alt_sets(ll, k, 0.0)
    base = bf_cknna_sets(kk, ll, sk, sl)
    expected = max(
        abs(bf_cknna_sets(kk, ll, a, b) - base) for a, b in ((ak, sl), (sk, al_), (ak, al_))
    )
    # at least half of a side's rows unresolved: rounding decides, the stability is ∞
    collapsed = any((bf_gaps(g, k) <= 0).mean() >= 0.5 for g in (kk, ll))
    if collapsed:
        expected = np.inf
    value, stability = mt.knn_metric("cknna", xs, ys)
    assert float(value[0]) == pytest.approx(base, abs=1e-12)
    assert float(stability[0]) == pytest.approx(expected, abs=1e-12)
    mutual = [len(sk[i] & sl[i]) / k for i in range(24)]
    alt_mutual = [
        np.mean([len(a[i] & b[i]) / k for i in range(24)])
        for a, b in ((ak, sl), (sk, al_), (ak, al_))
    ]
    v, s = mt.knn_metric("mutual_knn", xs, ys)
    assert float(v[0]) == pytest.approx(np.mean(mutual))
    expected = max(abs(a - np.mean(mutual)) for a in alt_mutual)
    assert float(s[0]) == pytest.approx(np.inf if collapsed else expected)


def test_stability_zero_when_separated_positive_when_tied():
    x, y = pair(7, m=40)
    xs, ys = mt.KernelKNN.from_features(x, 5), mt.KernelKNN.from_features(y, 5)
    assert not xs.unresolved.any() and xs.alt is None
    value, stability = mt.knn_metric("cknna", xs, ys)
    assert float(stability[0]) == 0.0
    xt = x / np.linalg.norm(x, axis=1, keepdims=True)
    xt[[3, 9, 17]] = xt[0]  # 4 copies: each one's 3 nearest are exact ties, so k = 2 splits them
    tied, ys2 = mt.KernelKNN.from_features(xt, 2), mt.KernelKNN.from_features(y, 2)
    assert tied.unresolved[0, [0, 3, 9, 17]].all()
    assert float(mt.knn_metric("cknna", tied, ys2)[1][0]) > 0
    assert float(mt.knn_metric("mutual_knn", tied, ys2)[1][0]) > 0


@pytest.mark.parametrize("dense", [True, False])
def test_values_of_a_layer_whose_neighbours_rounding_decides_have_infinite_stability(dense):
    """Rows one direction up to 1e-7 noise: every kNN set is rounding's choice, and one
    alternative tie-break (a lower bound) can move the value by less than the flag threshold."""
    rng = np.random.default_rng(0)
    m, k = 120, 10
    healthy = rng.standard_normal((m, 32)).astype(np.float32)
    v = rng.standard_normal(24)
    collapsed = (v + 1e-7 * rng.standard_normal((m, 24))).astype(np.float32)
    sides = {
        name: mt.KernelKNN.from_features(mt.prepare_layer(x, threshold=1e30), k, dense=dense)
        for name, x in (("healthy", healthy), ("collapsed", collapsed))
    }
    assert float(sides["collapsed"].unresolved.float().mean()) >= mt.ROUNDING_DECIDES
    for metric in ("cknna", "mutual_knn"):
        for a, b in (("healthy", "collapsed"), ("collapsed", "healthy")):
            value, stability = mt.knn_metric(metric, sides[a], sides[b])
            assert np.isfinite(float(value[0])) and float(stability[0]) == np.inf
        _, ok = mt.knn_metric(metric, sides["healthy"], sides["healthy"])
        assert np.isfinite(float(ok[0]))


def test_collapsed_representation_is_unresolved():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(64)
    x = (base + 1e-7 * rng.standard_normal((200, 64))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    side = mt.KernelKNN.from_features(x, 10)
    assert side.unresolved.float().mean() > 0.95


def test_exactly_half_the_rows_unresolved_is_rounding_decides():
    """Rounding decides from *at least* half of a side's rows unresolved: ``>`` in place of
    ``>= ROUNDING_DECIDES`` would miss exactly half (4 of 8) and give a finite stability."""
    rng = np.random.default_rng(0)
    g = rng.permutation(64).reshape(8, 8).astype(float)  # distinct values
    for i in range(4):  # rows 0-3: an exact tie at the top
        a, b = [j for j in range(8) if j != i][:2]
        g[i, a] = g[i, b] = 100.0
    side = mt.KernelKNN.build(torch.from_numpy(g.copy()), 1, tau=0.0)
    assert side.unresolved[0].tolist() == [True] * 4 + [False] * 4
    assert bool(mt.rounding_decides(side)[0])
    other = rng.permutation(64).reshape(8, 8).astype(float)
    other_side = mt.KernelKNN.build(torch.from_numpy(other), 1, 0.0)
    _, stability = mt.knn_metric("mutual_knn", side, other_side)
    assert float(stability[0]) == np.inf


def test_alternative_fill_takes_the_band_within_tau_of_the_kth_value():
    """The near-tie band is |v − v_k| ≤ τ and only v > v_k + τ is certain: ``> v_k`` would
    take 0.62 (inside the band) as certain and leave 7 out of the alternative set."""
    rng = np.random.default_rng(1)
    g = rng.uniform(0, 0.2, (8, 8))
    g[0, [1, 2, 5, 7]] = [0.9, 0.62, 0.58, 0.5]
    side = mt.KernelKNN.build(torch.from_numpy(g.copy()), 3, tau=0.1)
    assert bool(side.unresolved[0, 0])
    assert set(side.idx[0, 0].tolist()) == {1, 2, 5}
    # band = {2, 5, 7} (within 0.1 of 0.58), filled lowest value first; 1 is above the band
    assert set(side.alt.idx[0, 0].tolist()) == {1, 7, 5}


def test_the_alternative_differs_where_rounding_ordered_the_band_by_descending_index():
    """Row 0's k-th and (k+1)-th values differ by 2e-7 < τ, the higher column (3) the larger,
    as float32 rounding can leave two entries that are equal in the data. Filling the band
    highest index first (the rule before 2026-12-07) took column 3 again: the alternative equalled
    the default and the stability was exactly 0 for a value that rounding decided (the demo's
    DINO × LLaMA-s random draw 17: stability 0, the float64 kernel's value 1.8e-5 away). Filled
    in the reverse of the default's order, it takes column 2 and the stability is the move."""
    rng = np.random.default_rng(3)
    g = rng.uniform(0, 0.2, (6, 6))
    g[0, 1:] = [0.9, 0.5, 0.5 + 2e-7, 0.1, 0.05]
    xs = mt.KernelKNN.build(torch.from_numpy(g.copy()), 2, tau=1e-6)
    assert xs.unresolved[0].tolist() == [True] + [False] * 5
    assert set(xs.idx[0, 0].tolist()) == {1, 3}
    assert set(xs.alt.idx[0, 0].tolist()) == {1, 2}
    ll = rng.uniform(0, 0.2, (6, 6))
    ll[0, [1, 2]] = 1.0  # Y's neighbours of stimulus 0 are 1 and 2, well separated
    ys = mt.KernelKNN.build(torch.from_numpy(ll), 2, tau=1e-6)
    assert not ys.unresolved.any()
    value, stability = mt.knn_metric("mutual_knn", xs, ys)
    # row 0 shares 1 of 2 neighbours by default and 2 of 2 in the alternative: 1/2 over 6 rows
    assert float(stability[0]) == pytest.approx(1 / 12)


def test_stability_includes_both_sides_flipped_together():
    """Stability is the largest change over X's alternative, Y's, and both together: without
    the pair (X's alternative, Y's alternative) it would be 1/6, not 2/6."""
    rng = np.random.default_rng(0)
    kk = rng.permutation(36).reshape(6, 6).astype(float) / 36
    ll = rng.permutation(36).reshape(6, 6).astype(float) / 36
    kk[0, [1, 2]] = 10.0  # row 0: K ties 1|2 (picks 1, alternative 2); L picks 2
    ll[0, 2] = 10.0
    kk[1, 4] = 10.0  # row 1: K picks 4; L ties 3|4 (picks 3, alternative 4)
    ll[1, [3, 4]] = 10.0
    xs = mt.KernelKNN.build(torch.from_numpy(kk), 1, 0.0)
    ys = mt.KernelKNN.build(torch.from_numpy(ll), 1, 0.0)
    _, stability = mt.knn_metric("mutual_knn", xs, ys)
    # X alone or Y alone adds one hit (+1/6); both flipped add two (+2/6): stability = 2/6
    assert float(stability[0]) == pytest.approx(2 / 6)


def test_stability_is_nan_where_the_value_is_for_a_layer_rounding_decides():
    """A NaN value (a negative self-HSIC) has stability NaN, also where rounding decides
    (stability ∞ otherwise): without the last ``torch.where(isfinite(value), …)`` it was ∞."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal(24)
    col = mt.prepare_layer((v + 1e-7 * rng.standard_normal((120, 24))).astype(np.float32), 1e30)
    xs = mt.KernelKNN.from_features(col, 10)
    ys = mt.KernelKNN.from_features(rng.standard_normal((120, 32)).astype(np.float32), 10)
    assert bool(mt.rounding_decides(xs)[0])
    xs.knn.self_hsic = -xs.knn.self_hsic.abs()
    value, stability = mt.knn_metric("cknna", xs, ys)
    assert np.isnan(float(value[0])) and np.isnan(float(stability[0]))


def test_stability_is_nan_where_the_value_is_without_unresolved_rows():
    """A NaN value has stability NaN also when neither side has an unresolved row (no
    alternative sets): the early return gave stability 0 there."""
    rng = np.random.default_rng(0)
    xs, ys = (
        mt.KernelKNN.from_features(
            mt.prepare_layer(rng.standard_normal((60, p)).astype(np.float32), 1e30), 5
        )
        for p in (16, 12)
    )
    assert xs.alt is None and ys.alt is None
    xs.knn.self_hsic = -xs.knn.self_hsic.abs()
    value, stability = mt.knn_metric("cknna", xs, ys)
    assert np.isnan(float(value[0])) and np.isnan(float(stability[0]))


# ----------------------------------------------------------------------------- blocked == dense


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 1e-6)])
def test_blocked_equals_dense(dtype, tol, monkeypatch):
    monkeypatch.setattr(mt, "BLOCK_ELEMS", 37 * 300)  # 37-row blocks
    x, y = pair(11, m=300, p=20, q=12)
    x, y = x.astype(dtype), y.astype(dtype)
    dense = [mt.KernelKNN.from_features(a, 10, dense=True) for a in (x, y)]
    blocked = [mt.KernelKNN.from_features(a, 10, dense=False) for a in (x, y)]
    assert blocked[0].kernel is None
    for metric in ("cknna", "mutual_knn"):
        vd, sd = mt.knn_metric(metric, *dense)
        vb, sb = mt.knn_metric(metric, *blocked)
        assert float(vb[0]) == pytest.approx(float(vd[0]), abs=tol)
    for d, b in zip(dense, blocked, strict=True):
        same = ~(d.unresolved[0] | b.unresolved[0])
        assert [set(r) for r in d.idx[0][same].tolist()] == [
            set(r) for r in b.idx[0][same].tolist()
        ]
    assert mt.cknna(x, y, 10) == float(mt.knn_metric("cknna", *dense)[0][0])
    u, c = mt.feature_cka(torch.from_numpy(x), torch.from_numpy(y))
    assert u == pytest.approx(mt.unbiased_cka(x.astype(np.float64), y.astype(np.float64)), abs=tol)
    assert c == pytest.approx(mt.cka(x.astype(np.float64), y.astype(np.float64)), abs=tol)


def test_list_membership_equals_dense_masks():
    """The two membership routes of Neighbours (dense mask, short lists) give identical HSICs."""
    x, y = pair(12, m=80)
    xs, ys = mt.KernelKNN.from_features(x, 6), mt.KernelKNN.from_features(y, 6)
    bare = [mt.Neighbours.from_lists(s.idx, s.val) for s in (xs, ys)]
    assert torch.equal(bare[0].self_hsic, xs.self_hsic)
    assert torch.equal(mt.cknna_sides(xs, ys), mt._cknna_lists(*bare))


def test_prepare_layer_without_overflow_or_underflow():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 16)).astype(np.float32)
    x[1] *= 1e19  # the float32 norm overflows
    x[2] *= 1e-30  # the squares underflow
    x[3] = 0.0  # a zero row stays zero
    x[4, :] = 0.0
    x[4, 3] = 3e-39  # subnormal entry
    got = mt.prepare_layer(x, threshold=1e30)
    np.testing.assert_allclose(np.linalg.norm(got[[0, 1, 2, 4, 5]], axis=1), 1.0, rtol=1e-6)
    assert not got[3].any()
    ref = torch.nn.functional.normalize(torch.from_numpy(x).clamp(-1e30, 1e30), dim=-1).numpy()
    assert np.array_equal(got[[0, 5]], ref[[0, 5]])  # ordinary rows: bit-identical
    np.testing.assert_allclose(got[1], x[1] / np.linalg.norm(x[1].astype(float)), rtol=1e-6)
    np.testing.assert_allclose(got[2], x[2] / np.linalg.norm(x[2].astype(float)), rtol=1e-6)
    assert np.array_equal(mt.prepare_layer(x[[0, 5]], 1e30), ref[[0, 5]])


def test_tiny_but_representable_row_is_normalised_to_unit_norm():
    """A row of norm ~4e-14 (below 1e-12, its squares still representable) is divided by its
    norm: a lower cut-off (1e-30) would divide it by the 1e-12 floor, to norm ~0.04."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    x[1] *= 1e-14
    got = mt.prepare_layer(x, threshold=1e30)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("fn", [mt.cknna, mt.mutual_knn])
def test_undefined_neighbours_are_refused_not_scored(fn):
    """A NaN row (top-k ranks NaN first) or identical rows (every neighbour a tie) gave a
    plausible number (0.17) when called directly; the workflow screens such layers first."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(30, 6))
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="X has non-finite"):
        fn(bad, y, 5)
    with pytest.raises(ValueError, match="Y has the same features for every stimulus"):
        fn(x, np.ones_like(y), 5)


def test_two_negative_self_similarities_give_nan_not_a_value():
    """Both self-HSICs < 0 (a degenerate kernel on each side, docs/method.md "Degenerate
    layers") used to divide into a finite CKNNA; now NaN as when one of them is ≤ 0."""
    x, y = pair(3, m=40)
    xs, ys = mt.KernelKNN.from_features(x, 5), mt.KernelKNN.from_features(y, 5)
    value = float(mt.knn_metric("cknna", xs, ys)[0][0])
    assert np.isfinite(value)
    for sx, sy in [(-1.0, -1.0), (-1.0, 1.0), (0.0, 0.0), (1.0, 0.0)]:
        xs.knn.self_hsic = xs.knn.self_hsic.abs() * sx
        ys.knn.self_hsic = ys.knn.self_hsic.abs() * sy
        assert np.isnan(float(mt.knn_metric("cknna", xs, ys)[0][0])), (sx, sy)
    cross, sx, sy = torch.tensor([0.3, 0.3]), torch.tensor([-0.5, 0.5]), torch.tensor([-2.0, 2.0])
    got = mt.normalised_hsic(cross, sx, sy)
    assert np.isnan(float(got[0])) and float(got[1]) == pytest.approx(0.3)


def test_the_clamp_threshold_does_not_overflow_where_the_features_are_huge():
    """The mean of 4000 per-stimulus percentiles of 2.6e35 overflowed float32 to inf, and no
    value was clamped (features stay within float32's range): now the mean of the percentiles,
    and the prepared layer is that of the same features scaled down by 1e30 (the clamp and the
    l2 normalisation do not depend on scale)."""
    from xmodal.metrics import abs_quantiles, prepare_layer, threshold_from_quantiles

    x = np.random.default_rng(0).standard_normal((4000, 8)).astype(np.float32)
    big = (x.astype(np.float64) * 1e35).astype(np.float32)
    t = threshold_from_quantiles(abs_quantiles(big))
    assert np.isfinite(t)
    assert t == pytest.approx(np.mean(abs_quantiles(big), dtype=np.float64), rel=1e-6)
    small_t = threshold_from_quantiles(abs_quantiles(x))
    assert t == pytest.approx(small_t * 1e35, rel=1e-5)
    np.testing.assert_allclose(prepare_layer(big, t), prepare_layer(x, small_t), atol=1e-5)
    q = np.array([0.5, 0.25, 1.0], np.float32)  # no overflow: the float32 mean, as before
    assert threshold_from_quantiles(q) == float(torch.from_numpy(q).mean())
