"""Generalized Procrustes analysis (GPA) and per-stimulus Procrustes residuals (DESIGN §2.1).

All arithmetic is float64. Each model's representation ``N_i`` (m stimuli × n_i features) is
column-centred, zero-padded to the widest width n, scaled to unit Frobenius norm and (by default)
reduced exactly to r = min(m, n) columns (``N_i ← U_i S_i`` from its thin SVD; residuals are
unchanged because every later step is invariant to a right orthogonal factor). GPA then
alternates orthogonal Procrustes fits ``T_i = U Vᵀ`` with ``svd(N_iᵀ C) = U Σ Vᵀ`` and the
consensus update ``C = (1/M) Σ_i N_i T_i`` until ``‖C_t − C_{t−1}‖_F / ‖C_t‖_F ≤ tol``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

#: Below this reduced width GPA runs BLAS single-threaded: its SVDs (LAPACK gesdd, 1024² in the
#: paper regime) and small products gain
#: nothing from threads, and oversubscribed threads slowed them 100-fold on a shared 2-core host.
SMALL_WIDTH = 2048

__all__ = ["GPAResult", "gpa", "preprocess", "procrustes", "project"]


@dataclass
class GPAResult:
    """Outcome of :func:`gpa`; ``residuals[j, i] = ‖(N_i T_i)_j − C_j‖₂`` (m × M)."""

    consensus: np.ndarray
    transforms: list[np.ndarray]
    aligned: list[np.ndarray]
    residuals: np.ndarray
    objective: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    slow_regime: bool = False
    widths: list[int] = field(default_factory=list)
    padded_width: int = 0
    reduced_width: int = 0


def _as_2d_float64(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (stimuli × features) array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return a


def preprocess(reps: Sequence[np.ndarray], reduce: bool = True) -> list[np.ndarray]:
    """N_i ← (N_i − 1μ_iᵀ), zero-padded to max n_i, / ‖·‖_F; optionally exactly reduced to U_i S_i."""
    arrays = [_as_2d_float64(r, f"reps[{i}]") for i, r in enumerate(reps)]
    if len(arrays) < 2:
        raise ValueError(f"GPA needs at least 2 models, got {len(arrays)}")
    m = arrays[0].shape[0]
    for i, a in enumerate(arrays):
        if a.shape[0] != m:
            raise ValueError(f"reps[{i}] has {a.shape[0]} stimuli, reps[0] has {m}")
    if m < 2:
        raise ValueError("GPA needs at least 2 stimuli")
    n = max(a.shape[1] for a in arrays)
    r = min(m - 1, n)  # centred columns: rank ≤ m − 1, so U S keeps everything in m − 1 columns
    out = []
    for i, a in enumerate(arrays):
        c = a - a.mean(axis=0, keepdims=True)
        norm = np.linalg.norm(c)
        if norm == 0.0:
            raise ValueError(f"reps[{i}] is constant across stimuli (zero norm after centring)")
        c = c / norm
        if reduce and r < n:
            # Exact reduction: N = U S Vᵀ  →  N V = U S (m × r). Padding columns are zero, so the
            # SVD of the unpadded block gives the same U S; s_j = 0 beyond r = m − 1.
            u, s, _ = scipy.linalg.svd(c, full_matrices=False, lapack_driver="gesdd")
            red = u[:, :r] * s[:r]
            if red.shape[1] < r:
                red = np.pad(red, ((0, 0), (0, r - red.shape[1])))
            out.append(red)
        else:
            out.append(np.pad(c, ((0, 0), (0, n - c.shape[1]))))
    return out


#: polar factor via eigh(AᵀA) when λ_min(AᵀA) ≥ EIGH_MIN_RATIO · λ_max, else SVD. The polar
#: factor's error grows like ε·κ(A)², but residuals are insensitive to it in the ill-conditioned
#: directions: at κ(A)² ≈ 1e9 (1023-wide synthetic ViT-shaped features) GPA residuals from the
#: eigh route and from the SVD route agreed to 2e-14.
EIGH_MIN_RATIO = 1e-12


def _polar(a: np.ndarray, try_eigh: bool = True) -> tuple[np.ndarray, bool]:
    """Orthogonal polar factor U Vᵀ of a = U Σ Vᵀ; also whether the eigh route was usable."""
    if try_eigh and a.shape[0] == a.shape[1]:
        lam, vec = scipy.linalg.eigh(a.T @ a, driver="evd", check_finite=False)
        if lam[-1] > 0 and lam[0] >= EIGH_MIN_RATIO * lam[-1]:
            return (a @ (vec / np.sqrt(lam))) @ vec.T, True
    try:
        u, _, vt = scipy.linalg.svd(
            a, full_matrices=False, lapack_driver="gesdd", check_finite=False
        )
    except np.linalg.LinAlgError:  # gesdd can fail to converge on pathological input
        u, _, vt = scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesvd")
    return u @ vt, False


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Orthogonal T minimising ‖source·T − target‖_F: svd(sourceᵀ target) = U Σ Vᵀ, T = U Vᵀ.

    T is the polar factor of A = sourceᵀ target. When A is not too ill-conditioned (κ(A)² ≤ 1e12)
    it is computed as A V Λ^{-1/2} Vᵀ from eigh(AᵀA) (about twice as fast as an SVD), otherwise
    (and for rank-deficient A, e.g. with padding) from the SVD.
    """
    return _polar(source.T @ target)[0]


def _objective(aligned: Sequence[np.ndarray], consensus: np.ndarray) -> float:
    return float(sum(np.sum((y - consensus) ** 2) for y in aligned))


def gpa(
    reps: Sequence[np.ndarray],
    tol: float = 1e-10,
    max_iter: int = 1000,
    reduce: bool = True,
    n_jobs: int | None = None,
) -> GPAResult:
    """GPA: min over orthogonal T_i of Σ_i ‖N_i T_i − C‖²_F with C = (1/M) Σ_i N_i T_i (DESIGN §2.1).

    ``reps`` are M arrays of shape (m, n_i). ``transforms`` act on the preprocessed (and, with
    ``reduce``, reduced) matrices in ``aligned[i] = N_i T_i``. ``objective`` holds
    Σ_i ‖N_i T_i − C‖²_F after initialisation and after every iteration. The M Procrustes fits
    of an iteration run on ``n_jobs`` threads (default: one per available core, at most M), each
    with single-threaded BLAS; results do not depend on ``n_jobs``.
    """
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter ≥ 1, got tol={tol}, max_iter={max_iter}")
    widths = [int(np.shape(r)[1]) for r in reps]
    width = min(int(np.shape(reps[0])[0]) - 1, max(widths)) if reduce else max(widths)
    jobs = min(len(reps), available_cores()) if n_jobs is None else max(1, int(n_jobs))
    single = width < SMALL_WIDTH or jobs > 1
    with threadpool_limits(limits=1 if single else None, user_api="blas"):
        mats = preprocess(reps, reduce=reduce)
        if jobs == 1:
            return _iterate(mats, widths, tol, max_iter, map)
        with ThreadPoolExecutor(jobs) as pool:
            return _iterate(mats, widths, tol, max_iter, pool.map)


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _iterate(
    mats: list[np.ndarray], widths: list[int], tol: float, max_iter: int, pmap
) -> GPAResult:
    m = mats[0].shape[0]
    n_pad = max(widths)
    n_models = len(mats)
    slow = m > min(widths)
    if slow:
        log.info(
            "GPA in the slow regime: m=%d stimuli exceed the narrowest width %d (padded to %d); "
            "reduction cannot remove the padding and convergence may be slow and non-unique",
            m,
            min(widths),
            n_pad,
        )

    transforms = [np.eye(mats[0].shape[1])]
    transforms += list(pmap(lambda mat: procrustes(mat, mats[0]), mats[1:]))
    aligned = [mat @ t for mat, t in zip(mats, transforms, strict=True)]
    consensus = sum(aligned) / n_models
    objective = [_objective(aligned, consensus)]
    converged = False
    n_iter = 0
    use_eigh = [True] * n_models  # once a model's A is ill-conditioned, go straight to the SVD
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is used after the loop)

        def fit(i: int, c: np.ndarray = consensus, flags: list[bool] = use_eigh):
            return _polar(mats[i].T @ c, flags[i])

        fits = list(pmap(fit, range(n_models)))
        transforms = [t for t, _ in fits]
        use_eigh = [ok for _, ok in fits]
        aligned = [mat @ t for mat, t in zip(mats, transforms, strict=True)]
        new = sum(aligned) / n_models
        change = np.linalg.norm(new - consensus) / np.linalg.norm(new)
        consensus = new
        objective.append(_objective(aligned, consensus))
        if change <= tol:
            converged = True
            break
    if not converged:
        log.warning(
            "GPA did not converge: relative consensus change still above tol=%g after %d iterations",
            tol,
            max_iter,
        )
    else:
        log.debug("GPA converged in %d iterations", n_iter)
    residuals = np.stack([np.linalg.norm(y - consensus, axis=1) for y in aligned], axis=1)
    return GPAResult(
        consensus=consensus,
        transforms=transforms,
        aligned=aligned,
        residuals=residuals,
        objective=objective,
        n_iter=n_iter,
        converged=converged,
        slow_regime=slow,
        widths=widths,
        padded_width=n_pad,
        reduced_width=mats[0].shape[1],
    )


def project(rep: np.ndarray, consensus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Procrustes step of a held-out model onto C: N T with T = polar(Nᵀ C); dev_j = ‖(N T)_j − C_j‖₂.

    ``rep`` is preprocessed like GPA's inputs (centred, unit Frobenius norm) and zero-padded or
    exactly reduced to the consensus width; the consensus is used as given (not rescaled).
    """
    consensus = _as_2d_float64(consensus, "consensus")
    x = _as_2d_float64(rep, "rep")
    m, width = consensus.shape
    if x.shape[0] != m:
        raise ValueError(f"rep has {x.shape[0]} stimuli, consensus has {m}")
    x = x - x.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(x)
    if norm == 0.0:
        raise ValueError("rep is constant across stimuli (zero norm after centring)")
    x = x / norm
    if x.shape[1] > m - 1:
        # Exact reduction x = U S Vᵀ → U S (m − 1 columns, rank ≤ m − 1 after centring).
        u, s, _ = scipy.linalg.svd(x, full_matrices=False, lapack_driver="gesdd")
        x = u[:, : m - 1] * s[: m - 1]
    target = consensus
    if x.shape[1] < width:
        x = np.pad(x, ((0, 0), (0, width - x.shape[1])))
    elif x.shape[1] > width:
        target = np.pad(consensus, ((0, 0), (0, x.shape[1] - width)))
    aligned = x @ procrustes(x, target)
    deviation = np.linalg.norm(aligned - target, axis=1)
    return aligned, deviation
