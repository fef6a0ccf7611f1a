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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

#: Below this reduced width GPA runs BLAS single-threaded: its SVDs (LAPACK gesdd, 1024² in the
#: paper regime) and small products gain
#: nothing from threads, and oversubscribed threads slowed them 100-fold on a shared 2-core host.
SMALL_WIDTH = 2048

__all__ = ["GPAResult", "Preprocessed", "gpa", "preprocess", "procrustes", "project"]

#: ``map`` or a thread pool's ``map``: how the per-model steps are run.
Mapper = Callable[..., Iterable[Any]]


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


def _centre_scale(x: np.ndarray, name: str) -> np.ndarray:
    """N − 1μᵀ (column means over stimuli), divided by its Frobenius norm; float64."""
    a = _as_2d_float64(x, name)
    c = a - a.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(c)
    if norm == 0.0:
        raise ValueError(f"{name} is constant across stimuli (zero norm after centring)")
    return c / norm


def _svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD by LAPACK gesdd (numpy's, which releases the GIL), gesvd if gesdd fails."""
    try:
        return np.linalg.svd(a, full_matrices=False)
    except np.linalg.LinAlgError:  # gesdd can fail to converge on pathological input
        return scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesvd")


def _thin_us(c: np.ndarray) -> np.ndarray:
    """U S from the thin SVD of c (m × min(m, n)): c up to a right orthogonal factor."""
    u, s, _ = _svd(c)
    return u * s


def _to_width(a: np.ndarray, width: int) -> np.ndarray:
    """First ``width`` columns of a, zero-padded when a is narrower."""
    a = a[:, :width]
    return np.pad(a, ((0, 0), (0, width - a.shape[1]))) if a.shape[1] < width else a


class Preprocessed:
    """Every model's centred, unit-norm matrix, and its thin-SVD U·S computed at most once.

    :meth:`mats` assembles GPA's inputs for any subset of the models exactly as
    :func:`preprocess` would for that subset, so leave-one-model-out fits share one
    preprocessing (and one SVD per model) instead of repeating it per fit.
    """

    def __init__(
        self,
        reps: Sequence[np.ndarray],
        pmap: Mapper = map,
        names: Sequence[str] | None = None,
    ) -> None:
        if len(reps) < 1:
            raise ValueError("no models given")
        names = [f"reps[{i}]" for i in range(len(reps))] if names is None else list(names)
        self.centred = list(pmap(lambda i: _centre_scale(reps[i], names[i]), range(len(reps))))
        m = self.centred[0].shape[0]
        for i, c in enumerate(self.centred):
            if c.shape[0] != m:
                raise ValueError(f"{names[i]} has {c.shape[0]} stimuli, {names[0]} has {m}")
        if m < 2:
            raise ValueError("GPA needs at least 2 stimuli")
        self.m = m
        self.widths = [int(c.shape[1]) for c in self.centred]
        self._us: dict[int, np.ndarray] = {}

    def _reduced(self, indices: Sequence[int], pmap: Mapper) -> list[np.ndarray]:
        missing = [i for i in dict.fromkeys(indices) if i not in self._us]
        for i, us in zip(missing, pmap(lambda i: _thin_us(self.centred[i]), missing), strict=True):
            self._us[i] = us
        return [self._us[i] for i in indices]

    def mats(
        self, indices: Sequence[int] | None = None, reduce: bool = True, pmap: Mapper = map
    ) -> list[np.ndarray]:
        """GPA inputs for models ``indices``: padded to their widest width n, or reduced to min(m−1, n)."""
        indices = list(range(len(self.centred))) if indices is None else list(indices)
        if len(indices) < 2:
            raise ValueError(f"GPA needs at least 2 models, got {len(indices)}")
        n = max(self.widths[i] for i in indices)
        r = min(self.m - 1, n)  # centred columns: rank ≤ m − 1, so U S keeps everything in m − 1
        if reduce and r < n:
            # Exact reduction: N = U S Vᵀ → N V = U S (m × r). Padding columns are zero, so the
            # SVD of the unpadded block gives the same U S; s_j = 0 beyond r = m − 1.
            return [_to_width(us, r) for us in self._reduced(indices, pmap)]
        return [_to_width(self.centred[i], n) for i in indices]

    def held_out(self, index: int) -> np.ndarray:
        """Model ``index`` as :func:`project` prepares it: reduced to m − 1 columns when wider."""
        if self.widths[index] > self.m - 1:
            return _to_width(self._reduced([index], map)[0], self.m - 1)
        return self.centred[index]


def preprocess(reps: Sequence[np.ndarray], reduce: bool = True) -> list[np.ndarray]:
    """N_i ← (N_i − 1μ_iᵀ), zero-padded to max n_i, / ‖·‖_F; optionally exactly reduced to U_i S_i."""
    if len(reps) < 2:
        raise ValueError(f"GPA needs at least 2 models, got {len(reps)}")
    return Preprocessed(reps).mats(reduce=reduce)


#: polar factor via eigh(AᵀA) when λ_min(AᵀA) ≥ EIGH_MIN_RATIO · λ_max, else SVD. The polar
#: factor's error grows like ε·κ(A)², but residuals are insensitive to it in the ill-conditioned
#: directions: at κ(A)² ≈ 1e9 (1023-wide synthetic ViT-shaped features) GPA residuals from the
#: eigh route and from the SVD route agreed to 2e-14.
EIGH_MIN_RATIO = 1e-12


def _polar(a: np.ndarray, try_eigh: bool = True) -> tuple[np.ndarray, bool]:
    """Orthogonal polar factor U Vᵀ of a = U Σ Vᵀ; also whether the eigh route was usable.

    numpy's LAPACK calls release the GIL (scipy.linalg's hold it), so the fits of one GPA
    iteration run truly in parallel on threads.
    """
    if try_eigh and a.shape[0] == a.shape[1]:
        try:
            lam, vec = np.linalg.eigh(a.T @ a)
        except np.linalg.LinAlgError:  # syevd did not converge: the SVD below decides
            lam = None
        if lam is not None and lam[-1] > 0 and lam[0] >= EIGH_MIN_RATIO * lam[-1]:
            return (a @ (vec / np.sqrt(lam))) @ vec.T, True
    u, _, vt = _svd(a)
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
    _check_stopping(tol, max_iter)
    if len(reps) < 2:
        raise ValueError(f"GPA needs at least 2 models, got {len(reps)}")
    # width GPA will work at, to choose BLAS threads (shapes are checked by Preprocessed)
    n = max(int(np.shape(r)[1]) if np.ndim(r) == 2 else 0 for r in reps)
    m = int(np.shape(reps[0])[0]) if np.ndim(reps[0]) >= 1 else 0
    width = min(m - 1, n) if reduce else n
    jobs = min(len(reps), available_cores()) if n_jobs is None else max(1, int(n_jobs))
    single = width < SMALL_WIDTH or jobs > 1
    with threadpool_limits(limits=1 if single else None, user_api="blas"), mapper(jobs) as pmap:
        prep = Preprocessed(reps, pmap)
        mats = prep.mats(reduce=reduce, pmap=pmap)
        return fit_preprocessed(mats, tol, max_iter, pmap, prep.widths)


def _check_stopping(tol: float, max_iter: int) -> None:
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter ≥ 1, got tol={tol}, max_iter={max_iter}")


@contextmanager
def mapper(jobs: int) -> Iterator[Mapper]:
    """``map`` for one job, else the ``map`` of a pool of ``jobs`` threads (closed on exit)."""
    if jobs <= 1:
        yield map
        return
    with ThreadPoolExecutor(jobs) as pool:
        yield pool.map


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def fit_preprocessed(
    mats: list[np.ndarray],
    tol: float,
    max_iter: int,
    pmap: Mapper = map,
    widths: Sequence[int] | None = None,
) -> GPAResult:
    """GPA iterations (DESIGN §2.1 steps 2–4) on matrices from :meth:`Preprocessed.mats`.

    ``widths`` are the models' original widths (default: the matrices' widths).
    """
    _check_stopping(tol, max_iter)
    widths = [int(a.shape[1]) for a in mats] if widths is None else [int(w) for w in widths]
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

    def first(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = procrustes(mat, mats[0])
        return t, mat @ t

    transforms = [np.eye(mats[0].shape[1])]
    aligned = [mats[0]]
    for t, y in pmap(first, mats[1:]):
        transforms.append(t)
        aligned.append(y)
    consensus = sum(aligned) / n_models
    objective = [_objective(aligned, consensus)]
    converged = False
    n_iter = 0
    use_eigh = [True] * n_models  # once a model's A is ill-conditioned, go straight to the SVD
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is used after the loop)

        def fit(i: int, c: np.ndarray = consensus, flags: list[bool] = use_eigh):
            t, ok = _polar(mats[i].T @ c, flags[i])
            return t, ok, mats[i] @ t

        fits = list(pmap(fit, range(n_models)))
        transforms = [t for t, _, _ in fits]
        use_eigh = [ok for _, ok, _ in fits]
        aligned = [y for _, _, y in fits]
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
    x = np.asarray(rep)
    if x.ndim == 2 and x.shape[0] != consensus.shape[0]:
        raise ValueError(f"rep has {x.shape[0]} stimuli, consensus has {consensus.shape[0]}")
    return project_preprocessed(Preprocessed([rep], names=["rep"]).held_out(0), consensus)


def project_preprocessed(x: np.ndarray, consensus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`project` for a model already prepared by :meth:`Preprocessed.held_out`."""
    m, width = consensus.shape
    if x.shape[0] != m:
        raise ValueError(f"rep has {x.shape[0]} stimuli, consensus has {m}")
    target = consensus
    if x.shape[1] < width:
        x = _to_width(x, width)
    elif x.shape[1] > width:
        target = _to_width(consensus, x.shape[1])
    aligned = x @ procrustes(x, target)
    deviation = np.linalg.norm(aligned - target, axis=1)
    return aligned, deviation
