"""Mutation audit of the core numerics (2026-12-06): three changes that moved the pipeline's
numbers while every test passed; each test here fails on its mutant."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from xmodal import gpa
from xmodal.correlate import bootstrap_coefficients, correlation_ci
from xmodal.dispersion import leave_one_model_out
from xmodal.intervals import percentile_interval


def test_a_held_out_model_wider_than_the_consensus_is_projected_onto_the_padded_consensus():
    """Mutant: the held-out model cut to the consensus's width instead of the consensus padded
    with zero columns to the model's (the demo's DINO stand-in, 48 wide against a consensus of
    40, takes this branch: its leave-one-model-out r moved from 0.247 to 0.257). Checked
    against an independent Procrustes step on the padded consensus."""
    rng = np.random.default_rng(0)
    rep = rng.standard_normal((30, 12)) @ rng.standard_normal((12, 12))
    consensus = rng.standard_normal((30, 8))

    def expected(rep: np.ndarray) -> np.ndarray:
        """Centred, unit Frobenius norm, both padded to the wider width, one Procrustes step."""
        n = rep - rep.mean(axis=0)
        n /= np.linalg.norm(n)
        width = max(n.shape[1], consensus.shape[1])
        n = np.pad(n, ((0, 0), (0, width - n.shape[1])))
        c = np.pad(consensus, ((0, 0), (0, width - consensus.shape[1])))
        return np.linalg.norm(n @ scipy.linalg.orthogonal_procrustes(n, c)[0] - c, axis=1)

    # wider than the consensus (the branch the mutant broke), then narrower (the model padded)
    for model in (rep, rep[:, :6]):
        got = gpa.project(model, consensus)[1]
        np.testing.assert_allclose(got, expected(model), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m, widths", [(60, (8, 10, 12, 9)), (24, (40, 36, 44, 30))])
def test_gpa_in_blocks_of_rows_equals_the_fit_in_one_block(monkeypatch, m, widths):
    """The fits walk rows (stimuli, or the stacked columns of the Gauss–Seidel sweeps) in
    blocks of ROW_CHUNK = 2048, so every test ran one block, where the paper's vision GPA
    (Σk ≈ 3837) runs two. Mutant: a block one row short (200 iterations without converging,
    dispersions moved in the 7th digit). With blocks of 7 rows, GPA (the Gauss–Seidel route
    with more stimuli than the narrowest width, then the plain one) and leave-one-model-out
    give the one-block numbers."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((m, 6))
    reps = [
        z @ rng.standard_normal((6, w))
        + 0.5 * rng.standard_normal((m, w)) * rng.gamma(2, 0.5, (m, 1))
        for w in widths
    ]
    one = gpa.gpa(reps, tol=1e-10, max_iter=500)
    one_loo = leave_one_model_out(reps, names=list("abcd"), n_jobs=1)
    monkeypatch.setattr(gpa, "ROW_CHUNK", 7)
    blocks = gpa.gpa(reps, tol=1e-10, max_iter=500)
    blocks_loo = leave_one_model_out(reps, names=list("abcd"), n_jobs=1)
    assert blocks.converged and blocks.n_iter == one.n_iter
    np.testing.assert_allclose(blocks.residuals, one.residuals, rtol=0, atol=1e-12)
    np.testing.assert_allclose(blocks.objective, one.objective, rtol=1e-12)
    np.testing.assert_allclose(
        blocks_loo.stimuli["deviation"], one_loo.stimuli["deviation"], rtol=0, atol=1e-10
    )
    np.testing.assert_allclose(
        blocks_loo.models["pearson_r"], one_loo.models["pearson_r"], atol=1e-12
    )


def test_a_resample_without_a_correlation_is_left_out_of_the_interval():
    """A binary property with 10 of 20 stimuli off its mode passes the outside-mode rule, yet a
    resample can draw it constant (no correlation: NaN). Mutant: the NaN kept, which made the
    whole interval NaN with no reason given. The interval is the percentile interval of the
    finite resamples, and n_boot counts them."""
    x = np.array([0.0] * 10 + [1.0] * 10)
    y = np.linspace(0, 1, 20) + np.r_[np.zeros(10), 0.3 * np.ones(10)]
    seed = next(
        s
        for s in range(3000)
        if not np.isfinite(bootstrap_coefficients(x, y, "spearman", 1000, s)).all()
    )
    boot = bootstrap_coefficients(x, y, "spearman", 1000, seed)
    finite = boot[np.isfinite(boot)]
    assert 0 < len(boot) - len(finite) < 10
    got = correlation_ci(x, y, method="spearman", n_boot=1000, seed=seed)
    lo, hi = percentile_interval(finite, 0.95)
    assert got["n_boot"] == len(finite)
    assert got["ci_low"] == pytest.approx(lo, abs=1e-12) and got["ci_high"] == pytest.approx(
        hi, abs=1e-12
    )
