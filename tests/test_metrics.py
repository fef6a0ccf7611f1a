"""Alignment metrics against brute-force implementations written straight from DESIGN §2.5."""

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
    symmetric in (Ã, B̃) but 1ᵀÃB̃1 ≠ 1ᵀB̃Ã1, so the reference definition (DESIGN §2.5, the
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
