"""GPA properties (docs/method.md, "Generalized Procrustes Analysis"): invariances, M=2 identities, monotone objective, planted noise."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from _planted import planted_reps
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

import xmodal.gpa as gpa_module
from xmodal.gpa import (
    CROSS,
    GAUSS_SEIDEL,
    PLAIN,
    Preprocessed,
    cross_products,
    fit_preprocessed,
    gpa,
    preprocess,
    procrustes,
    project,
)

SETTINGS = settings(max_examples=5, deadline=None)


def models(seed: int, m: int = 20, widths=(24, 30, 28), d: int = 12, noise: float = 0.3):
    """Rotated views of one m × d configuration with noise and offsets (widths ≥ d)."""
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
    # the reference design: m=1024, M=4, noise ≤ 0.3 of signal (widths of the prototype, 64/64/80/80)
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


def _ill_conditioned(seed: int = 0) -> list[np.ndarray]:
    """8 shared dimensions under widths 48–64, m = 480 (slow regime): A_i near rank-deficient,
    so Gauss–Seidel's change stalls at rounding level (5e-10 here, above tol = 1e-10)."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((480, 8))
    return [
        s @ rng.standard_normal((8, w)) + 0.1 * rng.standard_normal((480, w)) for w in (48, 64, 64)
    ]


def test_change_stalled_at_rounding_level_is_converged(caplog):
    """A tol no float64 change can meet: the fit stops at the rounding floor, converged, with
    the residuals of a fit that met an attainable tol (docs/method.md, GPA step 3)."""
    reps = _ill_conditioned()
    with caplog.at_level(logging.INFO, logger="xmodal.gpa"):
        res = gpa(reps, tol=1e-30, max_iter=500)
    assert res.converged and res.n_iter < 150, res.n_iter
    assert "converged to float64 precision" in caplog.text
    assert "did not converge" not in caplog.text
    attainable = gpa(reps, tol=1e-8)
    assert attainable.converged
    np.testing.assert_allclose(res.residuals, attainable.residuals, atol=1e-8)
    assert res.objective[-1] <= attainable.objective[-1] + 1e-14
    assert np.all(np.diff(res.objective) <= 1e-14)


def test_change_still_falling_is_not_stopped_early():
    """A crawling fit (change ≈ 1e-5, falling slowly) is far above the rounding floor: it runs
    to max_iter and is reported as not converged."""
    reps = _ill_conditioned()
    prep = Preprocessed(reps)
    res = fit_preprocessed(prep.mats(), 1e-30, 60, prep.widths, method="plain", depth=0)
    assert not res.converged and res.n_iter == 60


def test_slow_regime_flag_and_log(caplog):
    with caplog.at_level(logging.INFO, logger="xmodal.gpa"):
        assert gpa(models(1, m=40, widths=(20, 24))).slow_regime
    assert "slow regime" in caplog.text
    assert not gpa(models(1, m=20, widths=(24, 30))).slow_regime


def test_width_between_the_smallest_and_largest_is_already_the_slow_regime():
    """Gauss–Seidel from m above the *smallest* width: ``m > max(widths)`` would run the plain
    iteration for m = 30 stimuli between widths 20 and 40."""
    assert gpa_module.plan(30, [20, 29], [20, 40]) == (GAUSS_SEIDEL, CROSS)
    rng = np.random.default_rng(0)
    res = gpa([rng.standard_normal((30, 20)), rng.standard_normal((30, 40))])
    assert res.slow_regime and res.method == GAUSS_SEIDEL


def test_result_fields_consistent():
    reps = models(2, widths=(24, 30, 28, 26))
    for res in (gpa(reps), gpa(reps, reduce=False)):
        mats = preprocess(reps, reduce=res.reduced_width < res.padded_width)
        aligned = []
        for mat, t in zip(mats, res.transforms, strict=True):
            assert t.shape == (mat.shape[1], res.reduced_width)
            np.testing.assert_allclose(t @ t.T, np.eye(t.shape[0]), atol=1e-12)
            aligned.append(mat @ t)
        consensus = sum(aligned) / len(aligned)
        np.testing.assert_allclose(res.consensus, consensus, atol=1e-12)
        for j in range(consensus.shape[0]):
            for i, y in enumerate(aligned):
                assert res.residuals[j, i] == pytest.approx(
                    np.sqrt(np.sum((y[j] - consensus[j]) ** 2)), abs=1e-12
                )
        objective = sum(np.sum((y - consensus) ** 2) for y in aligned)
        assert res.objective[-1] == pytest.approx(objective, abs=1e-12)
        assert res.residuals.shape == (20, 4)


@pytest.mark.parametrize("m", [20, 60])  # widths 24–30: the paper's regime, then the slow one
def test_distances_are_row_norms_of_the_centred_input(m):
    reps = models(3, m=m, widths=(24, 30, 28))
    res = gpa(reps)
    assert res.slow_regime == (m > 24)
    for i, x in enumerate(reps):
        c = x - x.mean(axis=0)
        np.testing.assert_allclose(
            res.distances[:, i], np.linalg.norm(c, axis=1) / np.linalg.norm(c), rtol=1e-12
        )
    # T_i keeps row norms, so a residual is at most the distance plus the consensus row's norm
    bound = res.distances + np.linalg.norm(res.consensus, axis=1)[:, None]
    assert np.all(res.residuals <= bound + 1e-12)


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


@pytest.mark.parametrize("m", [20, 30])  # plain steps in parallel; Gauss–Seidel on BLAS threads
def test_threads_do_not_change_results(m):
    reps = models(9, m=m, widths=(24, 30, 28, 26))
    one, many = gpa(reps, n_jobs=1), gpa(reps, n_jobs=3)
    if one.method == PLAIN:  # every fit single-threaded: bit for bit
        np.testing.assert_array_equal(one.residuals, many.residuals)
        assert one.objective == many.objective
    else:  # multi-threaded BLAS rounds differently (docs/method.md)
        np.testing.assert_allclose(one.residuals, many.residuals, rtol=0, atol=1e-12)
        np.testing.assert_allclose(one.objective[-1], many.objective[-1], rtol=1e-12)


# ----------------------------------------------------------------- the same GPA as the plain one


def plain_gpa(reps, tol=1e-10, max_iter=1000):
    """The plain algorithm as it was before the cross-product route, written out: zero-pad,
    scale, reduce to U S when wider than m − 1, align every model to model 0, then plain steps
    T_i = polar(N_iᵀ C) with SVD polar factors. Returns (residuals, objective trace, converged)."""
    m = reps[0].shape[0]
    n = max(r.shape[1] for r in reps)
    mats = []
    for r in reps:
        c = np.pad(r - r.mean(axis=0), ((0, 0), (0, n - r.shape[1])))
        c = c / np.linalg.norm(c)
        if m - 1 < n:
            u, s, _ = np.linalg.svd(c, full_matrices=False)
            c = (u * s)[:, : m - 1]
        mats.append(c)

    def polar(a):
        u, _, vt = np.linalg.svd(a)
        return u @ vt

    def objective(aligned, c):
        return sum(np.sum((y - c) ** 2) for y in aligned)

    aligned = [mats[0]] + [x @ polar(x.T @ mats[0]) for x in mats[1:]]
    c = sum(aligned) / len(mats)
    trace, converged = [objective(aligned, c)], False
    for _ in range(max_iter):
        aligned = [x @ polar(x.T @ c) for x in mats]
        new = sum(aligned) / len(mats)
        change = np.linalg.norm(new - c) / np.linalg.norm(new)
        c = new
        trace.append(objective(aligned, c))
        if change <= tol:
            converged = True
            break
    return np.stack([np.linalg.norm(y - c, axis=1) for y in aligned], axis=1), trace, converged


VARIANTS = [  # iteration, products from the cross-products, Anderson depth
    (method, cross, depth)
    for method in ("plain", "gauss-seidel")
    for cross in (False, True)
    for depth in (0, 3)
    if cross or method == "plain"  # Gauss–Seidel always uses the cross-products
]


@functools.cache
def variant(name: str, method: str, cross: bool, depth: int):
    """fit_preprocessed on PAPER or SLOW with one iteration, route and acceleration."""
    reps = {"paper": PAPER, "slow": SLOW}[name]
    prep = Preprocessed(reps)
    mats = prep.mats()
    gram = cross_products(mats) if cross else None
    return fit_preprocessed(mats, 1e-10, 5000, prep.widths, cross=gram, method=method, depth=depth)


PAPER = models(21, m=40, widths=(48, 56, 48, 52), d=10)  # every model keeps m − 1 = 39 columns


def test_paper_regime_equals_plain_algorithm():
    ref, ref_objective, ref_converged = plain_gpa(PAPER)
    assert ref_converged
    res = gpa(PAPER)
    assert (res.method, res.route, res.slow_regime) == ("plain", "data", False)
    assert res.converged and res.n_iter < len(ref_objective) - 1
    assert np.max(np.abs(res.residuals - ref)) <= 1e-8
    assert res.objective[-1] <= ref_objective[-1] + 1e-12
    assert res.objective[0] == pytest.approx(ref_objective[0], abs=1e-12)  # same initialisation
    for v in VARIANTS:
        fit = variant("paper", *v)
        assert fit.converged, v
        assert np.max(np.abs(fit.residuals - ref)) <= 1e-8, v
        assert fit.objective[-1] <= ref_objective[-1] + 1e-12, v
        assert (fit.route == "cross-products") == v[1]


SLOW = models(5, m=60, widths=(20, 24, 24, 30))  # slow regime where the plain algorithm converges


def test_slow_regime_equals_plain_algorithm_where_it_converges():
    ref, ref_objective, ref_converged = plain_gpa(SLOW)
    assert ref_converged
    res = gpa(SLOW)
    assert (res.method, res.route, res.slow_regime) == ("gauss-seidel", "cross-products", True)
    assert res.converged and 3 * res.n_iter < len(ref_objective) - 1
    assert np.max(np.abs(res.residuals - ref)) <= 1e-6
    assert res.objective[-1] <= ref_objective[-1] + 1e-12
    for v in VARIANTS:
        fit = variant("slow", *v)
        assert fit.converged, v
        assert np.max(np.abs(fit.residuals - ref)) <= 1e-6, v
        assert fit.objective[-1] <= ref_objective[-1] + 1e-12, v


def stationarity(reps, res) -> float:
    """Largest change of a residual when one plain step, or one Gauss–Seidel sweep (SVD polar
    factors, written out), is taken from the fit's transforms: ~1e-11 at a stationary point
    of the objective, 3e-10 for the fit of CROSSED_OPTIMA stopped after 8 of its 11 iterations."""
    mats = preprocess(reps)

    def polar(a):
        u, _, vt = np.linalg.svd(a, full_matrices=False)
        return u @ vt

    def residuals(aligned):
        c = sum(aligned) / len(aligned)
        return np.stack([np.linalg.norm(y - c, axis=1) for y in aligned], axis=1)

    aligned = [x @ t for x, t in zip(mats, res.transforms, strict=True)]
    c = sum(aligned) / len(aligned)
    plain = [x @ polar(x.T @ c) for x in mats]
    sweep = list(aligned)
    for i, x in enumerate(mats):
        sweep[i] = x @ polar(x.T @ sum(y for j, y in enumerate(sweep) if j != i))
    before = residuals(aligned)
    return max(np.max(np.abs(residuals(f) - before)) for f in (plain, sweep))


#: (seed, m, widths) where GPA's Gauss–Seidel sweeps and the plain algorithm, from the same
#: start, end at different stationary points, GPA's higher by 2.7e-5, 9.4e-6 and 2.8e-5
#: (relative 1.6e-5 to 2e-5): the objective is not convex, and either iteration can end above
#: the other (docs/method.md, GPA, "Local optima"). Found by the hypothesis test below (one in
#: about 400); random starts reach a third, lower point for the second.
CROSSED_OPTIMA = [
    (0, 72, [3, 7, 35, 35]),
    (41103, 54, [37, 38, 38, 35, 37]),
    (0, 62, [34, 35, 31, 18, 3]),
]


@pytest.mark.parametrize(("seed", "m", "widths"), CROSSED_OPTIMA)
def test_iterations_can_end_at_different_stationary_points(seed, m, widths):
    reps = models(seed, m=m, widths=widths, d=min(widths), noise=0.5)
    ref_residuals, ref_objective, ref_converged = plain_gpa(reps, max_iter=3000)
    res = gpa(reps)
    assert res.converged and ref_converged
    assert res.objective[-1] > ref_objective[-1] + 1e-6  # not rounding: another optimum
    assert stationarity(reps, res) <= 1e-9  # GPA stopped at one, not on the way to the other
    early = gpa(reps, max_iter=res.n_iter - 3)
    assert stationarity(reps, early) > 1e-10  # (the check sees a fit stopped early)
    # the two optima rank the stimuli alike
    rho = scipy.stats.spearmanr(res.residuals.mean(axis=1), ref_residuals.mean(axis=1))[0]
    assert rho > 0.99


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    m=st.integers(6, 90),
    widths=st.lists(st.integers(3, 40), min_size=2, max_size=5),
)
def test_fit_ends_at_a_stationary_point(seed, m, widths):
    """In either regime: converged, to a point where neither a plain step nor a Gauss–Seidel
    sweep moves the residuals. Its objective may be above the plain algorithm's (another
    stationary point: CROSSED_OPTIMA), so that comparison is made only where the optimum is
    shared (test_slow_regime_equals_plain_algorithm_where_it_converges and
    test_crawling_plain_algorithm_is_beaten)."""
    reps = models(seed, m=m, widths=widths, d=min(widths), noise=0.5)
    res = gpa(reps)
    assert res.converged
    assert np.all(np.diff(res.objective) <= 1e-14)
    assert stationarity(reps, res) <= 1e-9


def test_crawling_plain_algorithm_is_beaten():
    """Many more stimuli than dimensions: the plain algorithm crawls, the new one converges."""
    rng = np.random.default_rng(3)
    reps, sigma = planted_reps(rng, 400, 6, (12, 16, 12, 12), max_noise=1.0)
    _, ref_objective, ref_converged = plain_gpa(reps, max_iter=200)
    assert not ref_converged
    res = gpa(reps)
    assert res.converged and res.n_iter < 100
    assert res.objective[-1] <= ref_objective[-1]
    assert np.all(np.diff(res.objective) <= 1e-14)


@pytest.mark.parametrize("v", VARIANTS)
def test_objective_never_increases_in_any_variant(v):
    assert np.all(np.diff(variant("paper", *v).objective) <= 1e-14)
    # The plain step from the data skips the Newton–Schulz step (its objective is summed from
    # the aligned rows); out of its regime its trace wobbles at 1e-14 near convergence.
    bound = 1e-13 if v[:2] == ("plain", False) else 1e-14
    assert np.all(np.diff(variant("slow", *v).objective) <= bound)


def test_safeguard_rejects_bad_accelerated_steps(monkeypatch):
    """Accelerated points that raise the objective are replaced by plain steps."""
    good = gpa(SLOW)

    def overshoot(self, g, fx, fs):  # 30 steps further along the last one (S = G T still holds)
        last, self.last = self.last, (fx, fs)
        return None if last is None else (fx + 30 * (fx - last[0]), fs + 30 * (fs - last[1]))

    monkeypatch.setattr(gpa_module._Anderson, "propose", overshoot)
    res = gpa(SLOW)
    assert res.converged and res.n_rejected > 0
    assert np.all(np.diff(res.objective) <= 1e-14)
    assert np.max(np.abs(res.residuals - good.residuals)) <= 1e-6


def random_transforms(rng, sizes, r):
    """Stacked k_i × r blocks with orthonormal rows."""
    return np.concatenate([ortho_group.rvs(r, random_state=rng)[:k] for k in sizes])


@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_objective_and_change_without_own_terms_match_the_data(seed):
    """Gauss–Seidel's S leaves out the own terms G_ii T_i; its objective and consensus change,
    which add them in closed form, equal Σ‖N_i T_i − C‖² and ‖C' − C‖/‖C'‖ from the data."""
    rng = np.random.default_rng(seed)
    mats = Preprocessed(models(seed, m=40, widths=(20, 24, 24, 30))).mats()
    sizes = [a.shape[1] for a in mats]
    r, g = max(sizes), cross_products(mats)
    problem = gpa_module._Problem(mats, g, None, exclude_own=True)
    t, t_new = random_transforms(rng, sizes, r), random_transforms(rng, sizes, r)
    s, s_new = problem.apply(t)[0], problem.apply(t_new)[0]
    off = np.cumsum([0, *sizes])

    def aligned(tt):
        return [a @ tt[off[i] : off[i + 1]] for i, a in enumerate(mats)]

    ys = aligned(t_new)
    c_new, c_old = np.mean(ys, axis=0), np.mean(aligned(t), axis=0)
    direct = sum(float(np.sum((y - c_new) ** 2)) for y in ys)
    np.testing.assert_allclose(problem.objective(t_new, s_new)[0], direct, rtol=1e-12)
    want = np.linalg.norm(c_new - c_old) / np.linalg.norm(c_new)
    np.testing.assert_allclose(problem.change(t, s, t_new, s_new), want, rtol=1e-10)
    # S itself: every model's A_i = Σ_{j≠i} G_ij T_j = N_iᵀ Σ_{j≠i} N_j T_j
    for i, a in enumerate(mats):
        others = sum(y for j, y in enumerate(ys) if j != i)
        np.testing.assert_allclose(s_new[off[i] : off[i + 1]], a.T @ others, atol=1e-13)


def anderson_from_scratch(history, depth):
    """Anderson type II written out: γ = argmin ‖g_n − Σ_j γ_j Δg_j‖ over the last ``depth``
    differences, x = F(x_n) − Σ_j γ_j ΔF_j (and the same mix of S)."""
    if depth == 0 or len(history) < 2:
        return None
    window = history[-(depth + 1) :]
    diffs = [[b[i] - a[i] for a, b in zip(window, window[1:], strict=False)] for i in range(3)]
    dg, df, ds = diffs
    gram = np.array([[np.vdot(u, v) for v in dg] for u in dg])
    rhs = np.array([np.vdot(u, history[-1][0]) for u in dg])
    gamma = np.linalg.lstsq(gram, rhs, rcond=1e-12)[0]
    _, fx, fs = history[-1]
    mix = [sum(c * d for c, d in zip(gamma, part, strict=True)) for part in (df, ds)]
    return fx - mix[0], fs - mix[1]


@SETTINGS
@given(seed=st.integers(0, 2**16))
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_anderson_keeps_its_gram_matrix_up_to_date(depth, seed):
    """The mixer's stored Gram matrix and in-place differences give the proposals of the
    formula written out, also once the history is full (and overflows) and after a reset."""
    rng = np.random.default_rng(seed)
    mixer, history, steps = gpa_module._Anderson(depth), [], 12
    for step in range(steps):
        g, fx, fs = (rng.standard_normal((7, 5)) for _ in range(3))
        if step == 7:  # a rejected step drops the history
            mixer.reset()
            history = []
        history.append((g.copy(), fx.copy(), fs.copy()))
        want = anderson_from_scratch(history, depth)
        got = mixer.propose(g, fx, fs)
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)
        # the newest F(x) is still held by the caller: never changed in place
        np.testing.assert_array_equal(fx, history[-1][1])
        np.testing.assert_array_equal(fs, history[-1][2])


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    m=st.integers(4, 30),
    extra=st.integers(0, 12),
    n_dup=st.integers(0, 3),
)
def test_reduction_keeps_the_stimulus_gram(seed, m, extra, n_dup):
    """A model wider than m − 1 becomes m × (m − 1) with the same N Nᵀ (docs/method.md, GPA
    step 1), also at width exactly m and with duplicated stimuli (a rank below m − 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, m + extra)) * rng.uniform(0.1, 10, m + extra)
    for j in range(min(n_dup, m - 2)):
        x[j + 1] = x[0]  # stimuli 0..n_dup share one feature vector
    prep = Preprocessed([x, x[:, : m - 1]])
    reduced = prep.mats()[0]
    centred = (x - x.mean(axis=0)) / np.linalg.norm(x - x.mean(axis=0))
    assert reduced.shape == (m, m - 1)
    np.testing.assert_allclose(reduced @ reduced.T, centred @ centred.T, atol=1e-13)
    assert prep.mats()[1].shape == (m, m - 1)  # narrow enough: kept as it is
    np.testing.assert_array_equal(prep.held_out(0), reduced)


def test_cross_products_and_subsets():
    reps = models(6, m=26, widths=(24, 30, 22, 20))
    prep = Preprocessed(reps)
    mats = prep.mats()
    assert [a.shape[1] for a in mats] == [24, 25, 22, 20]  # min(n_i, m − 1)
    g = prep.cross_products()
    off = np.cumsum([0] + [a.shape[1] for a in mats])
    for i, a in enumerate(mats):
        for j, b in enumerate(mats):
            np.testing.assert_allclose(g[off[i] : off[i + 1], off[j] : off[j + 1]], a.T @ b)
    for subset in ([0, 2, 3], [3, 1], [1, 2, 3]):
        np.testing.assert_array_equal(
            prep.cross_products(subset), cross_products(prep.mats(subset))
        )


def test_logs_route_and_progress(caplog, monkeypatch):
    monkeypatch.setattr(gpa_module, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="xmodal.gpa"):
        gpa(SLOW)
    assert "gauss-seidel iteration, Anderson acceleration depth 3" in caplog.text
    assert "products from the cross-products" in caplog.text
    assert "GPA iteration 2: objective" in caplog.text


class _ScriptedChanges:
    """A stand-in for GPA's problem whose consensus change follows a given sequence and whose
    objective is flat: exercises the stopping rules of ``gpa_module._iterate`` alone."""

    def __init__(self, changes):
        self.changes = iter(changes)

    def initial(self):
        return np.zeros((2, 2))

    def apply(self, t):
        return np.zeros((2, 2)), None

    def objective(self, t, s, direct):
        return 1.0, 1e-15

    def change(self, *_):
        return next(self.changes)


@pytest.mark.parametrize(
    ("changes", "stops_at"),
    [
        # falling by 1% per step below the floor: a new minimum every step, never a stall
        ([1e-8 * 0.99**i for i in range(200)], None),
        # a noisy plateau at 5e-9: the last new minimum at step 2, a stall 20 steps later
        ([1e-8, 5e-9, 4e-9] + [5e-9 + 1e-10 * (i % 3) for i in range(197)], 23),
        # a plateau above the floor is not rounding: never a stall
        ([1e-5] * 200, None),
    ],
)
def test_rounding_floor_stop_only_on_a_plateau(changes, stops_at):
    def sweep(t, s):
        return t, s, None

    _, _, n_iter, converged, _ = gpa_module._iterate(
        _ScriptedChanges(changes), sweep, tol=1e-30, max_iter=len(changes), depth=0
    )
    if stops_at is None:
        assert not converged and n_iter == len(changes)
    else:
        assert converged and n_iter == stops_at


@pytest.mark.parametrize("factor", [1e160, 1e-200])
def test_a_model_at_an_extreme_scale_gives_the_same_residuals(factor):
    """GPA is scale-invariant per model; the Frobenius norm's squares overflowed at 1e160 (the
    model became all zeros, silently) and underflowed at 1e-200 ("constant across stimuli")."""
    rng = np.random.default_rng(0)
    reps = [rng.normal(size=(30, w)) for w in (8, 10, 12)]
    ref = gpa(reps).residuals
    scaled = [reps[0] * factor, *reps[1:]]
    np.testing.assert_allclose(gpa(scaled).residuals, ref, atol=1e-9)


def test_a_rank_deficient_polar_factor_takes_the_completion_nearest_the_last_iterate() -> None:
    """When a is wide and rank-deficient every completion of U₁V₁ᵀ on its null space maximises
    tr(Qᵀa); the one closest to ``near`` keeps the iterations from wandering. Taking another
    (the farthest, say) was caught by no assertion, only by a test running for minutes."""
    from xmodal.gpa import _polar

    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 2)) @ rng.standard_normal((2, 7))  # 4 × 7, rank 2
    near = np.linalg.qr(rng.standard_normal((7, 4)))[0].T  # orthonormal rows
    q, _ = _polar(a, near=near, try_eigh=False)
    np.testing.assert_allclose(q @ q.T, np.eye(4), atol=1e-12)
    nuclear = np.linalg.svd(a, compute_uv=False).sum()
    assert np.trace(q.T @ a) == pytest.approx(nuclear, rel=1e-12)
    u, sv, vt = np.linalg.svd(a)
    u1, v1, u2 = u[:, :2], vt[:2], u[:, 2:]
    z = scipy.linalg.null_space(v1)  # 7 × 5
    for _ in range(50):  # other maximisers: U₁V₁ᵀ + U₂ W Zᵀ, W any 2 × 5 partial isometry
        w = np.linalg.qr(rng.standard_normal((5, 2)))[0].T
        other = u1 @ v1 + u2 @ w @ z.T
        assert np.trace(other.T @ a) == pytest.approx(nuclear, rel=1e-12)
        assert np.linalg.norm(q - near) <= np.linalg.norm(other - near) + 1e-12


def test_a_rank_deficient_wide_model_is_fitted_as_a_narrow_one(caplog):
    """A model wider than m whose features span few dimensions (duplicate stimuli, a degenerate
    layer) holds the plain step back as a narrow model does; the width alone chose the plain
    step, which crawled (43 iterations here, 159 at m = 300, against 9). Its numerical rank now
    chooses Gauss–Seidel, which reaches the same fit."""
    rng = np.random.default_rng(0)
    m, width = 120, 160
    base = np.hstack([rng.normal(size=(m, 12)), np.zeros((m, width - 12))])
    reps = [
        0.3 * rng.normal(size=(m, width)) + base @ rng.normal(size=(width, width)) for _ in range(3)
    ]
    reps.append(rng.normal(size=(m, 15)) @ rng.normal(size=(15, width)))  # rank 15, width 160
    prep = gpa_module.Preprocessed(reps)
    centred = [r - r.mean(axis=0) for r in reps]
    assert prep.ranks() == [np.linalg.matrix_rank(c) for c in centred] == [119, 119, 119, 15]
    with caplog.at_level(logging.INFO, logger="xmodal.gpa"):
        res = gpa_module.gpa(reps, tol=1e-10, max_iter=2000)
    assert res.method == gpa_module.GAUSS_SEIDEL and res.slow_regime and res.converged
    assert "model 3 rank 15 of width 160" in caplog.text
    plain = gpa_module.fit_preprocessed(
        prep.mats(), 1e-10, 2000, prep.widths, method=gpa_module.PLAIN
    )
    assert plain.converged and res.n_iter < plain.n_iter / 2
    np.testing.assert_allclose(res.objective[-1], plain.objective[-1], rtol=1e-12)
    np.testing.assert_allclose(res.residuals, plain.residuals, atol=1e-6)
    # full-rank models of the same widths keep the plain step (the paper's regime)
    assert gpa_module.gpa(reps[:3], tol=1e-10, max_iter=2000).method == gpa_module.PLAIN
