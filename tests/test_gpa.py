"""GPA properties (DESIGN §2.1): invariances, M=2 identities, monotone objective, planted noise."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.stats
from _planted import planted_reps
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

from xmodal.gpa import gpa, preprocess, procrustes, project

SETTINGS = settings(max_examples=5, deadline=None)


def models(seed: int, m: int = 20, widths=(24, 30, 28), d: int = 12, noise: float = 0.3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d))
    out = []
    for w in widths:
        q = ortho_group.rvs(w, random_state=rng)[:d]
        out.append(x @ q + noise * rng.standard_normal((m, w)) + rng.standard_normal(w))
    return out


@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_rotation_reflection_translation_invariance(seed):
    reps = models(seed)
    base = gpa(reps).residuals
    rng = np.random.default_rng(seed + 1)
    changed = []
    for r in reps:
        q = ortho_group.rvs(r.shape[1], random_state=rng)  # includes reflections
        if rng.random() < 0.5:
            q[:, 0] *= -1
        changed.append(r @ q + rng.standard_normal(r.shape[1]) * 5)
    assert np.max(np.abs(gpa(changed).residuals - base)) <= 1e-10


@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_model_order_and_stimulus_permutation(seed):
    reps = models(seed)
    base = gpa(reps).residuals
    order = [2, 0, 1]
    reordered = gpa([reps[i] for i in order]).residuals
    assert np.max(np.abs(reordered - base[:, order])) <= 1e-10
    perm = np.random.default_rng(seed).permutation(reps[0].shape[0])
    permuted = gpa([r[perm] for r in reps]).residuals
    assert np.max(np.abs(permuted - base[perm])) <= 1e-10


def test_two_models_identities():
    reps = models(3, widths=(24, 30))
    res = gpa(reps)
    np.testing.assert_allclose(res.residuals[:, 0], res.residuals[:, 1], atol=1e-12)
    n1, n2 = preprocess(reps)
    nuclear = np.linalg.svd(n1.T @ n2, compute_uv=False).sum()
    assert res.objective[-1] == pytest.approx(1 - nuclear, abs=1e-12)


def test_objective_never_increases():
    res = gpa(models(5, m=60, widths=(20, 24, 24, 30)))  # slow regime: many iterations
    diffs = np.diff(res.objective)
    assert res.n_iter > 3
    assert np.all(diffs <= 1e-14)
    assert len(res.objective) == res.n_iter + 1


def test_planted_noise_recovery():
    # DESIGN §2.1: m=1024, M=4, noise ≤ 0.3 of signal (widths of the prototype, 64/64/80/80)
    rng = np.random.default_rng(0)
    reps, sigma = planted_reps(rng, 1024, 64, (64, 64, 80, 80), max_noise=0.3)
    res = gpa(reps)
    assert res.converged and res.slow_regime
    assert scipy.stats.spearmanr(res.residuals.mean(axis=1), sigma).statistic > 0.98


def test_zero_padding_of_unequal_widths():
    reps = models(7, widths=(24, 30, 28))
    padded = [np.pad(r, ((0, 0), (0, 30 - r.shape[1]))) for r in reps]
    np.testing.assert_allclose(gpa(reps).residuals, gpa(padded).residuals, atol=1e-10)
    assert gpa(reps).padded_width == 30


def test_full_width_equals_exact_reduction():
    reps = models(11, m=15, widths=(24, 30, 28))
    full, red = gpa(reps, reduce=False), gpa(reps, reduce=True)
    assert red.reduced_width == 14 and full.reduced_width == 30
    np.testing.assert_allclose(full.residuals, red.residuals, atol=1e-10)


def test_non_converging_reports(caplog):
    with caplog.at_level(logging.WARNING, logger="xmodal.gpa"):
        res = gpa(models(5, m=60, widths=(20, 24, 24, 30)), max_iter=2)
    assert not res.converged and res.n_iter == 2
    assert "did not converge" in caplog.text


def test_slow_regime_flag_and_log(caplog):
    with caplog.at_level(logging.INFO, logger="xmodal.gpa"):
        assert gpa(models(1, m=40, widths=(20, 24))).slow_regime
    assert "slow regime" in caplog.text
    assert not gpa(models(1, m=20, widths=(24, 30))).slow_regime


def test_result_fields_consistent():
    reps = models(2)
    res = gpa(reps)
    mats = preprocess(reps)
    for mat, t, y in zip(mats, res.transforms, res.aligned, strict=True):
        np.testing.assert_allclose(t.T @ t, np.eye(t.shape[0]), atol=1e-10)
        np.testing.assert_allclose(mat @ t, y, atol=1e-12)
    np.testing.assert_allclose(res.consensus, sum(res.aligned) / 3, atol=1e-12)
    assert res.residuals.shape == (20, 3)


def test_procrustes_matches_svd_formula():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((30, 8)), rng.standard_normal((30, 8))
    u, _, vt = np.linalg.svd(a.T @ b)
    np.testing.assert_allclose(procrustes(a, b), u @ vt, atol=1e-12)
    a[:, 0] = 0  # rank deficient: SVD path, still orthogonal
    t = procrustes(a, b)
    np.testing.assert_allclose(t.T @ t, np.eye(8), atol=1e-12)


def test_procrustes_falls_back_to_svd_when_eigh_fails(monkeypatch):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((30, 8)), rng.standard_normal((30, 8))
    u, _, vt = np.linalg.svd(a.T @ b)

    def failing_eigh(_):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(np.linalg, "eigh", failing_eigh)
    np.testing.assert_allclose(procrustes(a, b), u @ vt, atol=1e-12)


def test_project_is_one_procrustes_step():
    reps = models(4)
    res = gpa(reps[:2])
    aligned, dev = project(reps[2], res.consensus)
    x = reps[2] - reps[2].mean(axis=0)
    x /= np.linalg.norm(x)
    c = np.pad(res.consensus, ((0, 0), (0, x.shape[1] - res.consensus.shape[1])))
    u, _, vt = np.linalg.svd(x.T @ c)
    np.testing.assert_allclose(dev, np.linalg.norm(x @ u @ vt - c, axis=1), atol=1e-10)
    q = ortho_group.rvs(28, random_state=1)
    np.testing.assert_allclose(project(reps[2] @ q + 3.0, res.consensus)[1], dev, atol=1e-10)


def test_input_validation():
    with pytest.raises(ValueError, match="at least 2 models"):
        gpa([np.ones((5, 3))])
    with pytest.raises(ValueError, match="stimuli"):
        gpa([np.random.rand(5, 3), np.random.rand(6, 3)])
    with pytest.raises(ValueError, match="constant"):
        gpa([np.ones((5, 3)), np.random.rand(5, 3)])


def test_threads_do_not_change_results():
    reps = models(9, m=30, widths=(24, 30, 28, 26))
    one, many = gpa(reps, n_jobs=1), gpa(reps, n_jobs=3)
    np.testing.assert_array_equal(one.residuals, many.residuals)
    assert one.objective == many.objective
