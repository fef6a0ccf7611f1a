"""Generalized Procrustes analysis (GPA) and per-stimulus Procrustes residuals (docs/method.md).

All arithmetic is float64. Each model's representation ``N_i`` (m stimuli × n_i features) is
column-centred and scaled to unit Frobenius norm; a model wider than m − 1 is reduced exactly to
an m × (m − 1) matrix ``L_i`` with ``L_i L_iᵀ = N_i N_iᵀ`` (from the QR decomposition of
``N_iᵀ``), so model i has width k_i = min(n_i, m − 1) and the consensus has width r = max k_i.
Zero-padding every model to width r is the same as letting a narrower model's transform ``T_i``
be k_i × r with orthonormal rows, which is how it is stored.

GPA maximises ``Σ_ij tr(T_iᵀ G_ij T_j)`` with ``G_ij = N_iᵀ N_j``: the objective
``Σ_i ‖N_i T_i − C‖²_F = Σ_i ‖N_i‖²_F − (1/M) Σ_ij tr(T_iᵀ G_ij T_j)`` with
``C = (1/M) Σ_i N_i T_i``. Every quantity of an iteration is a product ``S = G T`` (the M
blocks ``S_i = N_iᵀ (M C)``), computed from the cross-products G (Σk × Σk, computed once; a
step then costs the same whatever m) or from the data, whichever is cheaper. Iterations are
Procrustes steps ``T_i = polar(·)``, for all models at once (plain) or one model after the
other (Gauss–Seidel, when m exceeds the narrowest width), accelerated by Anderson mixing with
a safeguard that keeps the objective non-increasing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

from xmodal.parallel import Mapper, executor, n_workers

log = logging.getLogger(__name__)

#: Below this reduced width GPA runs BLAS single-threaded: its SVDs (LAPACK gesdd, 1024² in the
#: paper regime) and small products gain
#: nothing from threads, and oversubscribed threads slowed them 100-fold on a shared 2-core host.
SMALL_WIDTH = 2048

#: Anderson acceleration keeps this many past steps (on planted data with m = 5000 and widths
#: 160–192, 2 took 56 iterations and 3, 5 and 8 took 39; each step kept costs 3 arrays of
#: Σk_i × r floats).
ANDERSON_DEPTH = 3

#: An accelerated step that moves the consensus more than GROWTH times the previous step is
#: rejected (the safeguard in :func:`_iterate`).
GROWTH = 2.0

#: Rounding floor of the consensus change: when a near rank-deficient A_i makes its polar factor
#: ill-conditioned, each step moves T_i by rounding alone (seen: 5e-10 to 7e-9 on m = 480 with
#: widths 48–64, residuals equal to 2e-12 to those of a run that met tol). A fit whose change has
#: not reached a new minimum for STALL_ITERATIONS iterations, that minimum at or below
#: CHANGE_FLOOR, with the objective within its rounding error of its value then, has
#: converged as far as float64 allows (docs/method.md, GPA step 3). A change that keeps falling,
#: however slowly, never stops the fit this way.
CHANGE_FLOOR = 1e-7
STALL_ITERATIONS = 20

#: Rows per block when the m-row consensus and residuals are assembled at the end of a fit.
ROW_CHUNK = 2048

#: A progress line is logged at most this often (seconds) during a fit.
LOG_EVERY_S = 30.0

__all__ = [
    "GPAResult",
    "Preprocessed",
    "cross_products",
    "gpa",
    "gpa_memory_mb",
    "preprocess",
    "procrustes",
    "project",
    "twin_rows",
]

PLAIN = "plain"
GAUSS_SEIDEL = "gauss-seidel"
DATA = "data"
CROSS = "cross-products"


@dataclass
class GPAResult:
    """Outcome of :func:`gpa`; ``residuals[j, i] = ‖(N_i T_i)_j − C_j‖₂`` (m × M).

    ``transforms[i]`` is k_i × r with orthonormal rows and acts on the model's preprocessed
    matrix (:func:`preprocess`), so that ``N_i T_i`` is model i aligned to the consensus
    (m × r). ``objective`` holds Σ_i ‖N_i T_i − C‖²_F after initialisation and after every
    iteration. ``method`` is the iteration used (``plain`` or ``gauss-seidel``), ``route`` how
    its products were computed (``data`` or ``cross-products``); ``n_rejected`` counts
    accelerated steps the safeguard replaced by a plain step; ``seconds`` the wall time of
    each stage. ``distances[j, i]`` is ‖N_i[j]‖₂, stimulus j's distance from the centre of
    model i's preprocessed matrix (m × M; set by :func:`gpa`): a residual is a difference of
    such rows, so it grows with it (docs/method.md, "Dispersion and distance from the centre").
    ``ranks[i]`` is model i's numerical rank (:meth:`Preprocessed.ranks`; set by :func:`gpa`).
    """

    consensus: np.ndarray
    transforms: list[np.ndarray]
    residuals: np.ndarray
    objective: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    slow_regime: bool = False
    widths: list[int] = field(default_factory=list)
    padded_width: int = 0
    reduced_width: int = 0
    method: str = PLAIN
    route: str = DATA
    n_rejected: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    distances: np.ndarray | None = None
    ranks: list[int] = field(default_factory=list)


def _as_2d_float64(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (stimuli × features) array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return a


def _centre_scale(x: np.ndarray, name: str) -> np.ndarray:
    """N − 1μᵀ (column means over stimuli), divided by its Frobenius norm; float64, one copy."""
    c = np.array(_as_2d_float64(x, name), dtype=np.float64, copy=True)
    c -= c.mean(axis=0, keepdims=True)
    with np.errstate(over="ignore", under="ignore"):
        norm = np.linalg.norm(c)
    if not np.isfinite(norm) or (norm < 1e-150 and np.any(c)):  # squares over/underflow
        c /= np.max(np.abs(c))  # exact scaling first (features from files never need it)
        norm = np.linalg.norm(c)
    if norm == 0.0:
        raise ValueError(f"{name} is constant across stimuli (zero norm after centring)")
    c /= norm
    return c


def _svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD by LAPACK gesdd (numpy's, which releases the GIL), gesvd if gesdd fails."""
    try:
        return np.linalg.svd(a, full_matrices=False)
    except np.linalg.LinAlgError:  # gesdd can fail to converge on pathological input
        return scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesvd")


def _row_factor(c: np.ndarray) -> np.ndarray:
    """Rᵀ (m × m, lower triangular) from the QR decomposition cᵀ = Q R of a wide c (n ≥ m):
    c = Rᵀ Qᵀ, so Rᵀ is c up to a right orthogonal factor (Rᵀ R = c cᵀ)."""
    return np.ascontiguousarray(np.linalg.qr(c.T, mode="r").T)


def _to_width(a: np.ndarray, width: int) -> np.ndarray:
    """First ``width`` columns of a, zero-padded when a is narrower."""
    a = a[:, :width]
    return np.pad(a, ((0, 0), (0, width - a.shape[1]))) if a.shape[1] < width else a


def _offsets(sizes: Sequence[int]) -> list[int]:
    return [0, *np.cumsum(sizes).tolist()]


def cross_products(mats: Sequence[np.ndarray], pmap: Mapper = map) -> np.ndarray:
    """G = [N_iᵀ N_j]: the models' (Σ k_i) × (Σ k_i) cross-products, block (i, j) = N_iᵀ N_j."""
    sizes = [a.shape[1] for a in mats]
    off = _offsets(sizes)
    g = np.empty((off[-1], off[-1]))
    pairs = [(i, j) for i in range(len(mats)) for j in range(i, len(mats))]

    def block(pair: tuple[int, int]) -> None:
        i, j = pair
        b = mats[i].T @ mats[j]
        g[off[i] : off[i + 1], off[j] : off[j + 1]] = b
        if i != j:
            g[off[j] : off[j + 1], off[i] : off[i + 1]] = b.T

    for _ in pmap(block, pairs):
        pass
    return g


class Preprocessed:
    """Every model's centred, unit-norm matrix, its reduction to m − 1 columns and the
    cross-products, each computed at most once.

    :meth:`mats` gives GPA's inputs for any subset of the models exactly as :func:`preprocess`
    would for that subset, and :meth:`cross_products` their cross-products (sub-blocks of the
    full set's), so leave-one-model-out fits share one preprocessing instead of repeating it.
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
        shapes = [np.shape(r) for r in reps]
        for i, s in enumerate(shapes):  # before any copy is made
            if len(s) == 2 and s[0] != shapes[0][0]:
                raise ValueError(f"{names[i]} has {s[0]} stimuli, {names[0]} has {shapes[0][0]}")
        self.centred = list(pmap(lambda i: _centre_scale(reps[i], names[i]), range(len(reps))))
        m = self.centred[0].shape[0]
        if m < 2:
            raise ValueError("GPA needs at least 2 stimuli")
        self.m = m
        self.widths = [int(c.shape[1]) for c in self.centred]
        self._factor: dict[int, np.ndarray] = {}
        self._gram: np.ndarray | None = None
        self._rank: dict[int, int] = {}
        self._row_keys: dict[int, list[bytes]] = {}

    def twins(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """:func:`twin_rows` of the centred matrices of models ``indices`` (default: all), each
        model's rows digested once."""
        indices = list(range(len(self.centred))) if indices is None else list(indices)
        for i in indices:
            if i not in self._row_keys:
                self._row_keys[i] = _row_digests(self.centred[i])
        return _first_twins(
            [self._row_keys[i] for i in indices], [self.centred[i] for i in indices]
        )

    def _reduced(self, indices: Sequence[int], pmap: Mapper) -> list[np.ndarray]:
        missing = [i for i in dict.fromkeys(indices) if i not in self._factor]
        for i, f in zip(
            missing, pmap(lambda i: _row_factor(self.centred[i]), missing), strict=True
        ):
            self._factor[i] = f
        return [self._factor[i] for i in indices]

    def _mat(self, i: int, reduce: bool, pmap: Mapper = map) -> np.ndarray:
        if reduce and self.widths[i] > self.m - 1:
            # Exact reduction (docs/method.md, GPA step 1): Nᵀ = Q R → N Q = Rᵀ. The rows of a
            # centred N sum to zero, so Nᵀ's last column is minus the sum of the others,
            # R_mm = 0 and row m of R is zero: Rᵀ keeps everything in its first m − 1 columns.
            return self._reduced([i], pmap)[0][:, : self.m - 1]
        return self.centred[i]

    def mats(
        self, indices: Sequence[int] | None = None, reduce: bool = True, pmap: Mapper = map
    ) -> list[np.ndarray]:
        """GPA inputs for models ``indices``, each at width min(n_i, m − 1) (``reduce``) or n_i."""
        indices = list(range(len(self.centred))) if indices is None else list(indices)
        if len(indices) < 2:
            raise ValueError(f"GPA needs at least 2 models, got {len(indices)}")
        if reduce:
            self._reduced([i for i in indices if self.widths[i] > self.m - 1], pmap)
        return [self._mat(i, reduce) for i in indices]

    def cross_products(
        self, indices: Sequence[int] | None = None, pmap: Mapper = map
    ) -> np.ndarray:
        """:func:`cross_products` of ``mats(indices)``: sub-blocks of the full set's, made once."""
        every = list(range(len(self.centred)))
        if self._gram is None:
            self._gram = cross_products(self.mats(every, pmap=pmap), pmap)
        indices = every if indices is None else list(indices)
        if indices == every:
            return self._gram
        sizes = [self._mat(i, True).shape[1] for i in every]
        off = _offsets(sizes)
        rows = np.concatenate([np.arange(off[i], off[i + 1]) for i in indices])
        return self._gram[np.ix_(rows, rows)]

    def ranks(self, indices: Sequence[int] | None = None, pmap: Mapper = map) -> list[int]:
        """Numerical rank of each model's centred matrix (singular values above
        σ_max · max(m, k) · ε, as numpy.linalg.matrix_rank), each computed once."""
        indices = list(range(len(self.centred))) if indices is None else list(indices)
        missing = [i for i in dict.fromkeys(indices) if i not in self._rank]
        for i, r in zip(missing, pmap(lambda i: _rank(self._mat(i, True)), missing), strict=True):
            self._rank[i] = r
        return [self._rank[i] for i in indices]

    def held_out(self, index: int) -> np.ndarray:
        """Model ``index`` as :func:`project` prepares it: reduced to m − 1 columns when wider."""
        return self._mat(index, True)


def twin_rows(mats: Sequence[np.ndarray]) -> np.ndarray:
    """For each stimulus j, the first stimulus whose row equals row j bit for bit in every one
    of ``mats`` (m × n_i each): j itself when there is none.

    Such twins (a stimulus listed twice, or an image or caption shared by two ids) have equal
    residuals in exact arithmetic, since GPA moves every row of a model by one map; in floating
    point the reduction to m − 1 columns and the products gave them residuals that differed in
    the last bits, so rounding, not the manifest order, decided which of them a set took
    (docs/method.md, "Dispersion").
    """
    return _first_twins([_row_digests(a) for a in mats], mats)


def _row_digests(a: np.ndarray) -> list[bytes]:
    rows = np.ascontiguousarray(a)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def _first_twins(keys: Sequence[list[bytes]], mats: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`twin_rows` from each matrix's row digests."""
    first: dict[tuple[bytes, ...], int] = {}
    out = np.array(
        [first.setdefault(k, j) for j, k in enumerate(zip(*keys, strict=True))], dtype=np.int64
    )
    for j in np.flatnonzero(out != np.arange(out.size)):  # a digest collision is not a twin
        if not all(np.array_equal(a[j], a[out[j]]) for a in mats):
            out[j] = j
    return out


def _rank(a: np.ndarray) -> int:
    return _numerical_rank(scipy.linalg.svdvals(a, check_finite=False), a.shape)


def _numerical_rank(sv: np.ndarray, shape: tuple[int, ...]) -> int:
    """How many of a matrix's singular values ``sv`` (descending) exceed σ_max · max(shape) · ε
    (numpy.linalg.matrix_rank's tolerance)."""
    return (
        int(np.sum(sv > sv[0] * max(shape) * np.finfo(float).eps)) if sv.size and sv[0] > 0 else 0
    )


def preprocess(reps: Sequence[np.ndarray], reduce: bool = True) -> list[np.ndarray]:
    """N_i ← (N_i − 1μ_iᵀ) / ‖·‖_F; with ``reduce``, exactly reduced to m − 1 columns when wider."""
    if len(reps) < 2:
        raise ValueError(f"GPA needs at least 2 models, got {len(reps)}")
    return Preprocessed(reps).mats(reduce=reduce)


#: polar factor via eigh of the smaller Gram matrix of A when λ_min ≥ EIGH_MIN_RATIO · λ_max,
#: else SVD. The polar factor's error grows like ε·κ(A)², but residuals are insensitive to it in
#: the ill-conditioned directions: at κ(A)² ≈ 1e9 (1023-wide synthetic ViT-shaped features) GPA
#: residuals from the eigh route and from the SVD route agreed to 2e-14.
EIGH_MIN_RATIO = 1e-12

#: The same bound for Gauss–Seidel steps, T_i = polar(Σ_{j≠i} G_ij T_j): without the model's own
#: term the matrix can be far worse conditioned, and the eigh route's error (ε·κ² in its weak
#: directions) then moved the consensus by more than tol = 1e-10 at every step (κ² ≈ 8e10 on a
#: 14-stimulus example), while on planted data at m = 4096 (κ² up to 4e8) it converged as usual.
EIGH_MIN_RATIO_GS = 1e-10


def _polar(
    a: np.ndarray,
    try_eigh: bool = True,
    near: np.ndarray | None = None,
    min_ratio: float = EIGH_MIN_RATIO,
    polish: bool = True,
) -> tuple[np.ndarray, bool]:
    """Orthogonal polar factor U Vᵀ of a = U Σ Vᵀ (orthonormal rows or columns, a's shape); also
    whether the eigh route is worth trying next time (it was usable, or the SVD found a well
    enough conditioned after all).

    Wide a (k ≤ r): (a aᵀ)^{-1/2} a from eigh(a aᵀ); tall a: a (aᵀ a)^{-1/2}. numpy's LAPACK
    calls release the GIL (scipy.linalg's hold it), so polar factors run in parallel on threads.
    When a wide a is rank-deficient every completion of U Vᵀ on its null space maximises
    tr(Qᵀ a); with ``near`` (same shape) the completion closest to ``near`` is taken, so that
    iterations do not wander between equally good answers. ``polish`` makes the eigh route's
    rows (columns) orthonormal to rounding instead of to ε·κ(a)².
    """
    wide = a.shape[0] <= a.shape[1]
    if try_eigh:
        try:
            lam, vec = np.linalg.eigh(a @ a.T if wide else a.T @ a)
        except np.linalg.LinAlgError:  # syevd did not converge: the SVD below decides
            lam = None
        if lam is not None and lam[-1] > 0 and lam[0] >= min_ratio * lam[-1]:
            half = vec / np.sqrt(np.sqrt(lam))
            w = half @ half.T  # V Λ^{-1/2} Vᵀ
            q = w @ a if wide else a @ w
            if polish:  # one Newton–Schulz step, q ← q (3I − qᵀq) / 2
                q = 1.5 * q - 0.5 * ((q @ q.T) @ q if wide else q @ (q.T @ q))
            return q, True
    u, sv, vt = _svd(a)
    conditioned = bool(sv[0] > 0 and sv[-1] ** 2 >= min_ratio * sv[0] ** 2)
    rank = _numerical_rank(sv, a.shape)
    if near is None or not wide or rank == a.shape[0]:
        return u @ vt, conditioned
    # Rank-deficient: U₁V₁ᵀ on a's range, and from its null space U₂ the partial isometry into
    # the complement Z of V₁ that is closest to ``near``: polar(U₂ᵀ near Z) Zᵀ.
    u1, v1, u2 = u[:, :rank], vt[:rank], u[:, rank:]
    z = scipy.linalg.null_space(v1) if rank > 0 else np.eye(a.shape[1])
    w, _ = _polar((u2.T @ near) @ z, try_eigh=False)
    return u1 @ v1 + (u2 @ w) @ z.T, conditioned


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Orthogonal T minimising ‖source·T − target‖_F: svd(sourceᵀ target) = U Σ Vᵀ, T = U Vᵀ.

    T is the polar factor of A = sourceᵀ target. When A is not too ill-conditioned (κ(A)² ≤ 1e12)
    it is computed from eigh of A's smaller Gram matrix (about twice as fast as an SVD),
    otherwise (and for rank-deficient A) from the SVD.
    """
    return _polar(source.T @ target)[0]


def gpa(
    reps: Sequence[np.ndarray],
    tol: float = 1e-10,
    max_iter: int = 1000,
    reduce: bool = True,
    n_jobs: int | None = None,
) -> GPAResult:
    """GPA: min over orthogonal T_i of Σ_i ‖N_i T_i − C‖²_F with C = (1/M) Σ_i N_i T_i (docs/method.md).

    ``reps`` are M arrays of shape (m, n_i). Stops when a step moves the consensus by
    ‖C_t − C_{t−1}‖_F / ‖C_t‖_F ≤ ``tol`` or after ``max_iter`` iterations. Work runs on
    ``n_jobs`` threads (default: one per available core, at most M), each with single-threaded
    BLAS; Gauss–Seidel sweeps, one model at a time, run BLAS on that many threads instead.
    """
    _check_stopping(tol, max_iter)
    if len(reps) < 2:
        raise ValueError(f"GPA needs at least 2 models, got {len(reps)}")
    # width GPA will work at, to choose BLAS threads (shapes are checked by Preprocessed)
    n = max(int(np.shape(r)[1]) if np.ndim(r) == 2 else 0 for r in reps)
    m = int(np.shape(reps[0])[0]) if np.ndim(reps[0]) >= 1 else 0
    width = min(m - 1, n) if reduce else n
    jobs = n_workers(len(reps), n_jobs)
    single = width < SMALL_WIDTH or jobs > 1
    with threadpool_limits(limits=1 if single else None, user_api="blas"), executor(jobs) as pool:
        pmap = pool.map if pool is not None else map
        t0 = time.perf_counter()
        prep = Preprocessed(reps, pmap)
        mats = prep.mats(reduce=reduce, pmap=pmap)
        t1 = time.perf_counter()
        ranks = prep.ranks(pmap=pmap)
        method, route = plan(prep.m, [a.shape[1] for a in mats], prep.widths, ranks)
        gram = None
        if route == CROSS:
            gram = prep.cross_products(pmap=pmap) if reduce else cross_products(mats, pmap)
        t2 = time.perf_counter()
        if method == GAUSS_SEIDEL:
            # One model at a time: the sweep's polar factors and products use every thread
            # through BLAS (faster than two single-threaded workers: docs/method.md, GPA).
            with threadpool_limits(limits=jobs, user_api="blas"):
                res = fit_preprocessed(
                    mats, tol, max_iter, prep.widths, cross=gram, method=method, ranks=ranks
                )
        else:
            res = fit_preprocessed(
                mats, tol, max_iter, prep.widths, cross=gram, pool=pool, method=method, ranks=ranks
            )
    res.seconds = {"preprocess": t1 - t0, "cross-products": t2 - t1, **res.seconds}
    # the exact reduction keeps N N^T, hence the row norms: take them from the centred input
    res.distances = np.stack([np.linalg.norm(c, axis=1) for c in prep.centred], axis=1)
    twins = prep.twins()  # equal inputs, equal outputs (docs/method.md, "Dispersion")
    res.residuals, res.distances = res.residuals[twins], res.distances[twins]
    res.ranks = ranks
    return res


def _check_stopping(tol: float, max_iter: int) -> None:
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"need tol > 0 and max_iter ≥ 1, got tol={tol}, max_iter={max_iter}")


def effective_widths(
    m: int, widths: Sequence[int], ranks: Sequence[int] | None = None
) -> list[int]:
    """The widths that decide the iteration: a model whose numerical rank is below
    min(width, m − 1) (duplicate stimuli, a degenerate layer) spans only that many dimensions
    and holds the plain step back as a model that narrow would (docs/method.md, GPA step 3)."""
    if ranks is None:
        return [int(w) for w in widths]
    return [int(r) if r < min(w, m - 1) else int(w) for w, r in zip(widths, ranks, strict=True)]


def plan(
    m: int, sizes: Sequence[int], widths: Sequence[int], ranks: Sequence[int] | None = None
) -> tuple[str, str]:
    """Iteration and route for m stimuli, model widths k_i (``sizes``), original widths and
    (when given) the models' numerical ranks (:func:`effective_widths`).

    When every model keeps m − 1 columns (m ≤ the narrowest width: the paper's regime) the plain
    GPA step converges fast and its M Procrustes fits run in parallel. With more stimuli than
    the narrowest width the plain step crawls (each model's own term N_iᵀ N_i T_i dominates
    N_iᵀ C and damps its step) and Gauss–Seidel sweeps over the models are used instead.
    Products S = G T cost 2 (Σk)² r from the cross-products and 4 m r Σk from the data; Gauss–
    Seidel's per-model updates always use the cross-products (2 (Σk − k_i) k_i r against
    2 m r (k_i + Σk)).
    """
    method = GAUSS_SEIDEL if m > min(effective_widths(m, widths, ranks)) else PLAIN
    route = CROSS if method == GAUSS_SEIDEL or sum(sizes) < 2 * m else DATA
    return method, route


class _Problem:
    """The products of one GPA fit: S = G T for stacked transforms T (Σk × r).

    With ``exclude_own`` (Gauss–Seidel, from the cross-products) S leaves out every model's
    own term, S_i = Σ_{j≠i} G_ij T_j: that is the matrix a Gauss–Seidel step needs, and the
    own terms enter the objective and the consensus change in closed form instead.
    """

    def __init__(
        self,
        mats: Sequence[np.ndarray],
        cross: np.ndarray | None,
        pool: ThreadPoolExecutor | None,
        exclude_own: bool = False,
    ) -> None:
        self.mats = list(mats)
        self.sizes = [a.shape[1] for a in mats]
        self.off = _offsets(self.sizes)
        self.blocks = [slice(self.off[i], self.off[i + 1]) for i in range(len(mats))]
        self.n = len(mats)
        self.r = max(self.sizes)
        self.m = mats[0].shape[0]
        self.g = cross
        self.exclude_own = bool(exclude_own) and cross is not None
        self.pmap: Mapper = pool.map if pool is not None else map
        # Σ_i ‖N_i T_i‖² = Σ_i tr(G_ii) for transforms with orthonormal rows
        self.total = float(sum(np.einsum("ij,ij->", a, a) for a in mats))
        # eigh route, or the SVD while a model's A is ill-conditioned (see _polar)
        self.use_eigh = [True] * self.n

    def apply(self, t: np.ndarray) -> tuple[np.ndarray, float | None]:
        """S = G T (without the own terms G_ii T_i with ``exclude_own``), from the
        cross-products, or as S_i = N_iᵀ Σ_j N_j T_j from the data; from the data also the
        objective Σ_i ‖N_i T_i − C‖²_F, summed from the aligned rows."""
        blocks = self.blocks
        if self.g is not None:
            g = self.g

            def row(i: int) -> np.ndarray:
                if not self.exclude_own:
                    return g[blocks[i]] @ t
                out = np.zeros((self.sizes[i], t.shape[1]))
                for j, b in enumerate(blocks):
                    if j != i:
                        out += g[blocks[i], b] @ t[b]
                return out

            return np.concatenate(list(self.pmap(row, range(self.n)))), None
        ys = list(self.pmap(lambda i: self.mats[i] @ t[blocks[i]], range(self.n)))
        total = ys[0].copy()
        for y in ys[1:]:
            total += y
        consensus = total / self.n
        direct = sum(float(np.sum((y - consensus) ** 2)) for y in ys)
        return np.concatenate(list(self.pmap(lambda a: a.T @ total, self.mats))), direct

    def objective(
        self, t: np.ndarray, s: np.ndarray, direct: float | None = None
    ) -> tuple[float, float]:
        """Σ_i ‖N_i T_i − C‖²_F (``direct`` when given, else Σ_i ‖N_i‖² − ⟨T, S⟩ / M, which
        holds for transforms with orthonormal rows), and a bound on its rounding error,
        4ε (Σ_i ‖N_i‖² + Σ |T ∘ S| / M). Without the own terms in S (``exclude_own``) they
        add Σ_i tr(T_iᵀ G_ii T_i) = Σ_i tr(G_ii) = Σ_i ‖N_i‖² to ⟨T, S⟩, for the same reason."""
        dot = magnitude = self.total if self.exclude_own else 0.0
        for b in self.blocks:
            ts = t[b] * s[b]
            dot += float(np.sum(ts))
            magnitude += float(np.sum(np.abs(ts)))
        err = 4 * np.finfo(float).eps * (self.total + magnitude / self.n)
        return (self.total - dot / self.n if direct is None else direct), err

    def change(self, t: np.ndarray, s: np.ndarray, t_new: np.ndarray, s_new: np.ndarray) -> float:
        """‖C(T') − C(T)‖_F / ‖C(T')‖_F with ‖C(T') − C(T)‖² = ⟨T' − T, S' − S⟩ / M².

        Without the own terms in S (``exclude_own``), ⟨ΔT, ΔS⟩ gains Σ_i ⟨G_ii, ΔT_i ΔT_iᵀ⟩
        and ⟨T', S'⟩ gains Σ_i ‖N_i‖² (T' with orthonormal rows, see :meth:`objective`)."""
        diff = 0.0
        norm = self.total if self.exclude_own else 0.0
        for b in self.blocks:
            dt = t_new[b] - t[b]
            diff += float(np.vdot(dt, s_new[b] - s[b]))
            if self.exclude_own:
                diff += float(np.einsum("ij,ij->", self.g[b, b], dt @ dt.T))
            norm += float(np.vdot(t_new[b], s_new[b]))
        return math.sqrt(max(diff, 0.0) / norm) if norm > 0 else math.inf

    def initial(self) -> np.ndarray:
        """Every model aligned to model 0: T_0 = [I 0], T_i = polar(N_iᵀ N_0 T_0)."""
        t = np.zeros((self.off[-1], self.r))
        k0 = self.sizes[0]
        t[self.blocks[0], :k0] = np.eye(k0)

        def align(i: int) -> np.ndarray:
            b, b0 = self.blocks[i], self.blocks[0]
            a = self.g[b, b0] if self.g is not None else self.mats[i].T @ self.mats[0]
            return _polar(_to_width(a, self.r))[0]

        for i, ti in zip(range(1, self.n), self.pmap(align, range(1, self.n)), strict=True):
            t[self.blocks[i]] = ti
        return t

    def sweep_plain(
        self, t: np.ndarray, s: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float | None]:
        """The plain GPA step: T_i ← polar(N_iᵀ C) = polar(S_i) for every model at once.

        From the data the objective is summed from the aligned rows, so the polar factors need
        no Newton–Schulz step (from the cross-products they do: see :meth:`objective`)."""
        flags, polish = self.use_eigh, self.g is not None
        fits = list(
            self.pmap(lambda i: _polar(s[self.blocks[i]], flags[i], polish=polish), range(self.n))
        )
        for i, (_, ok) in enumerate(fits):
            if flags[i] != ok:
                log.info("GPA: model %d's polar factors from the %s", i, "eigh" if ok else "SVD")
        self.use_eigh = [ok for _, ok in fits]
        tn = np.concatenate([q for q, _ in fits])
        return (tn, *self.apply(tn))

    def sweep_gauss_seidel(
        self, t: np.ndarray, s: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, None]:
        """One Gauss–Seidel sweep: for i = 1..M in turn, T_i ← polar(Σ_{j≠i} G_ij T_j).

        Each step maximises the objective over T_i with the others fixed (tr(T_iᵀ G_ii T_i) is
        constant), so the objective never increases. The steps are sequential: each polar
        factor and product runs on BLAS's threads (:func:`gpa`), not on the pool. Polar
        factors get a Newton–Schulz step, so that Σ_i ‖N_i T_i‖² = Σ_i ‖N_i‖² holds to
        rounding (see :meth:`objective`).
        """
        g, blocks = self.g, self.blocks
        assert g is not None and self.exclude_own
        # sn_i = Σ_{j≠i} G_ij tn_j (S without the own terms), kept up to date after each step
        tn, sn = t.copy(), s.copy()
        for i, b in enumerate(blocks):
            q, ok = _polar(sn[b], self.use_eigh[i], tn[b], EIGH_MIN_RATIO_GS)
            if self.use_eigh[i] != ok:
                log.info("GPA: model %d's polar factors from the %s", i, "eigh" if ok else "SVD")
            self.use_eigh[i] = ok
            delta = q - tn[b]
            tn[b] = q
            _add_except(sn, g, b, delta)
        return tn, sn, None

    def finish(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Consensus C = (1/M) Σ N_i T_i (m × r) and residuals ‖(N_i T_i)_j − C_j‖₂ (m × M)."""
        consensus = np.empty((self.m, self.r))
        residuals = np.empty((self.m, self.n))
        ts = [t[b] for b in self.blocks]

        def rows(start: int) -> None:
            sl = slice(start, min(start + ROW_CHUNK, self.m))
            ys = [a[sl] @ ti for a, ti in zip(self.mats, ts, strict=True)]
            c = ys[0].copy()
            for y in ys[1:]:
                c += y
            c /= self.n
            consensus[sl] = c
            for i, y in enumerate(ys):
                residuals[sl, i] = np.linalg.norm(y - c, axis=1)

        for _ in self.pmap(rows, range(0, self.m, ROW_CHUNK)):
            pass
        return consensus, residuals


def _add_except(d: np.ndarray, g: np.ndarray, block: slice, delta: np.ndarray) -> None:
    """d += G[:, block] Δ on every row outside ``block``, ROW_CHUNK rows at a time."""
    for lo, hi in ((0, block.start), (block.stop, d.shape[0])):
        for start in range(lo, hi, ROW_CHUNK):
            sl = slice(start, min(start + ROW_CHUNK, hi))
            d[sl] += g[sl, block] @ delta


def _axpy(a: float, x: np.ndarray, y: np.ndarray) -> None:
    """y += a x in place, a block of rows at a time (temporaries of ROW_CHUNK rows only)."""
    for start in range(0, y.shape[0], ROW_CHUNK):
        sl = slice(start, start + ROW_CHUNK)
        y[sl] += a * x[sl]


class _Anderson:
    """Anderson mixing (type II) of a fixed-point map x ↦ F(x) on stacked transforms T.

    Keeps the last ``depth`` differences of residuals g = F(x) − x and of F(x) (with their
    S = G T), and proposes x = F(x_n) − Σ_j γ_j ΔF_j with γ minimising ‖g_n − Σ_j γ_j Δg_j‖_F.
    S is linear in T, so the proposal's S is mixed alongside and needs no product.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.hist: deque[tuple[np.ndarray, np.ndarray, np.ndarray]] = deque(maxlen=depth)
        self.last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # ⟨Δg_i, Δg_j⟩ of the kept differences, one new row per step instead of all of them
        self.gram = np.zeros((0, 0))

    def reset(self) -> None:
        self.hist.clear()
        self.last = None
        self.gram = np.zeros((0, 0))

    def propose(
        self, g: np.ndarray, fx: np.ndarray, fs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Next point after F(x) = (fx, fs) with residual g = F(x) − x; None when there is no
        history to mix yet."""
        if self.depth == 0:
            return None
        if self.last is not None:
            g0, f0, s0 = self.last
            if len(self.hist) == self.depth:
                self.hist.popleft()  # before the new differences are made: less memory
                self.gram = self.gram[1:, 1:]
            dg = np.subtract(g, g0, out=g0)
            row = [np.vdot(h[0], dg) for h in self.hist] + [np.vdot(dg, dg)]
            n = len(row)
            gram = np.empty((n, n))
            gram[: n - 1, : n - 1] = self.gram
            gram[n - 1, :] = gram[:, n - 1] = row
            self.gram = gram
            # F(x) of the last step is held only here (the iteration moved on), so its
            # differences are made in place: no new Σk × r arrays
            self.hist.append((dg, np.subtract(fx, f0, out=f0), np.subtract(fs, s0, out=s0)))
        self.last = (g, fx, fs)
        if not self.hist:
            return None
        rhs = np.array([np.vdot(h[0], g) for h in self.hist])
        gamma = np.linalg.lstsq(self.gram, rhs, rcond=1e-12)[0]
        if not np.all(np.isfinite(gamma)):
            self.reset()
            return None
        xt, xs = fx.copy(), fs.copy()
        for c, (_, df, ds) in zip(gamma, self.hist, strict=True):
            _axpy(-c, df, xt)
            _axpy(-c, ds, xs)
        return xt, xs


def fit_preprocessed(
    mats: list[np.ndarray],
    tol: float,
    max_iter: int,
    widths: Sequence[int] | None = None,
    *,
    cross: np.ndarray | None = None,
    pool: ThreadPoolExecutor | None = None,
    method: str | None = None,
    depth: int = ANDERSON_DEPTH,
    ranks: Sequence[int] | None = None,
) -> GPAResult:
    """GPA iterations (docs/method.md, GPA steps 2–4) on matrices from :meth:`Preprocessed.mats`.

    ``widths`` are the models' original widths (default: the matrices' widths). ``cross`` are
    the matrices' :func:`cross_products`; given, every product uses them, else the data.
    ``method`` (default: :func:`plan`'s) is ``plain`` or ``gauss-seidel``; Gauss–Seidel computes
    the cross-products when not given. ``depth`` 0 turns Anderson acceleration off. ``pool``
    runs independent steps in parallel. ``ranks``: the models' numerical ranks
    (:meth:`Preprocessed.ranks`); a rank-deficient model counts as that narrow
    (:func:`effective_widths`).
    """
    _check_stopping(tol, max_iter)
    widths = [int(a.shape[1]) for a in mats] if widths is None else [int(w) for w in widths]
    sizes = [int(a.shape[1]) for a in mats]
    m = mats[0].shape[0]
    effective = effective_widths(m, widths, ranks)
    slow = m > min(effective)
    method = plan(m, sizes, widths, ranks)[0] if method is None else method
    if method not in (PLAIN, GAUSS_SEIDEL):
        raise ValueError(f"method must be {PLAIN!r} or {GAUSS_SEIDEL!r}, got {method!r}")
    if method == GAUSS_SEIDEL and cross is None:
        cross = cross_products(mats, pool.map if pool is not None else map)
    problem = _Problem(mats, cross, pool, exclude_own=method == GAUSS_SEIDEL)
    route = CROSS if cross is not None else DATA
    deficient = [(i, e, w) for i, (e, w) in enumerate(zip(effective, widths, strict=True)) if e < w]
    if deficient:
        log.info(
            "GPA: model(s) of numerical rank below min(width, m − 1) = their span (duplicate "
            "stimuli or a degenerate layer?): %s",
            ", ".join(f"model {i} rank {e} of width {w}" for i, e, w in deficient),
        )
    if slow:
        log.info(
            "GPA in the slow regime: m=%d stimuli exceed the narrowest width or rank %d "
            "(consensus width %d); the fixed point may be non-unique",
            m,
            min(effective),
            problem.r,
        )
    log.info(
        "GPA: %d models, m=%d, widths %s -> %s; %s iteration, Anderson acceleration depth %d "
        "(0: none), products from the %s",
        problem.n,
        m,
        widths,
        sizes,
        method,
        depth,
        route,
    )
    sweep = problem.sweep_gauss_seidel if method == GAUSS_SEIDEL else problem.sweep_plain
    t0 = time.perf_counter()
    t, objective, n_iter, converged, n_rejected = _iterate(problem, sweep, tol, max_iter, depth)
    t1 = time.perf_counter()
    if not converged:
        log.warning(
            "GPA did not converge: relative consensus change still above tol=%g after %d iterations",
            tol,
            max_iter,
        )
    else:
        log.info("GPA converged in %d iterations, objective %.12g", n_iter, objective[-1])
    consensus, residuals = problem.finish(t)
    seconds = {"iterations": t1 - t0, "residuals": time.perf_counter() - t1}
    return GPAResult(
        consensus=consensus,
        transforms=[t[b].copy() for b in problem.blocks],
        residuals=residuals,
        objective=objective,
        n_iter=n_iter,
        converged=converged,
        slow_regime=slow,
        widths=widths,
        padded_width=max(widths),
        reduced_width=problem.r,
        method=method,
        route=route,
        n_rejected=n_rejected,
        seconds=seconds,
    )


def _iterate(
    problem: _Problem,
    sweep: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, float | None]],
    tol: float,
    max_iter: int,
    depth: int,
) -> tuple[np.ndarray, list[float], int, bool, int]:
    """Anderson-accelerated iterations with a safeguard on the objective.

    An accelerated point is accepted only if the step from it does not raise the objective
    above the last recorded value by more than the objective's rounding error, nor move the
    consensus GROWTH times more than the last step did (near convergence objective changes
    drown in rounding, and a poor extrapolation shows in the step's size only); otherwise the
    step is taken from the last accepted transforms instead and the history is dropped. The
    recorded objective is that of orthogonal transforms, after initialisation and after every
    iteration. Convergence: the step's consensus change ‖C(T') − C(T)‖_F / ‖C(T')‖_F ≤ tol,
    where ‖C(T') − C(T)‖² = ⟨T' − T, S' − S⟩ / M²; or a change stalled at its rounding floor
    (:data:`CHANGE_FLOOR`) with the objective flat to its rounding error.
    """
    accel = _Anderson(depth)
    t = problem.initial()
    s, direct = problem.apply(t)
    f, _ = problem.objective(t, s, direct)
    objective = [f]
    x_t, x_s, extrapolated, last_change = t, s, False, math.inf
    converged, n_rejected, n_iter = False, 0, 0
    best_change, f_at_best, stalled = math.inf, f, 0  # the rounding-floor stop (CHANGE_FLOOR)
    started = last_log = time.perf_counter()
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is used after the loop)
        ft, fs, direct = sweep(x_t, x_s)
        fo, err = problem.objective(ft, fs, direct)
        change = problem.change(x_t, x_s, ft, fs)
        if extrapolated and (fo > f + err or change > GROWTH * last_change):
            n_rejected += 1
            accel.reset()
            x_t, x_s = t, s
            ft, fs, direct = sweep(x_t, x_s)
            fo, err = problem.objective(ft, fs, direct)
            change = problem.change(x_t, x_s, ft, fs)
        last_change = change
        t, s, f = ft, fs, fo
        objective.append(f)
        now = time.perf_counter()
        if now - last_log >= LOG_EVERY_S:
            log.info(
                "GPA iteration %d: objective %.12g, consensus change %.2e (%.0f s)",
                n_iter,
                f,
                change,
                now - started,
            )
            last_log = now
        if change <= tol:
            converged = True
            break
        if change < best_change:
            best_change, f_at_best, stalled = change, f, 0
        else:
            stalled += 1
        if (
            stalled >= STALL_ITERATIONS
            and best_change <= CHANGE_FLOOR
            and abs(f_at_best - f) <= err
        ):
            log.info(
                "GPA: consensus change stayed at %.1e (tol %g) for %d iterations with the "
                "objective flat to its rounding error: converged to float64 precision",
                best_change,
                tol,
                stalled,
            )
            converged = True
            break
        g = ft - x_t
        del x_t, x_s  # freed before the proposal is made: two fewer arrays held at once
        proposal = accel.propose(g, ft, fs)
        extrapolated = proposal is not None
        x_t, x_s = proposal if proposal is not None else (ft, fs)
    if n_rejected:
        log.info("GPA: %d accelerated steps rejected by the safeguard", n_rejected)
    return t, objective, n_iter, converged, n_rejected


def project(rep: np.ndarray, consensus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Procrustes step of a held-out model onto C: N T with T = polar(Nᵀ C); dev_j = ‖(N T)_j − C_j‖₂.

    ``rep`` is preprocessed like GPA's inputs (centred, unit Frobenius norm, exactly reduced to
    m − 1 columns when wider) and it and the consensus are zero-padded to their common width;
    the consensus is used as given (not rescaled).
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


#: Arrays of (Σk × r) float64 a GPA fit holds at once at its peak (transforms, products, the
#: consensus' pieces and Anderson acceleration's history): 10–17 fit the peaks measured on the
#: job's path (audit of 2026-12-05); the largest is taken.
GPA_WORK_ARRAYS = 17
#: What the interpreter and libraries hold before the data (bytes).
GPA_BASE_BYTES = 0.3e9


def gpa_memory_mb(
    m: int, widths: list[int] | tuple[int, ...], leave_one_out_workers: int = 0
) -> int:
    """Peak memory (MiB) of a GPA job over models of these widths (features per stimulus) on
    ``m`` stimuli: the vision GPA and the language GPA, whose peak grows with m and the widths
    (12 LLMs at the paper's widths: 2.7 GiB at 1,024 stimuli, 46 GiB at 5,000), where a fixed
    request left every retry out of memory from about 2,000 stimuli on; with
    ``leave_one_out_workers`` (its threads), leave-one-model-out.

    Each model works at k = min(m − 1, width) columns, r = max k (docs/method.md, GPA step 1):

        bytes = 0.3e9 + 16 m Σwidth (the layers read as float64, and centred)
                + 8 m Σk (the reduced models) + 8 (Σk)² (the cross-products, when
                :func:`plan` uses them: Gauss–Seidel, with more stimuli than the narrowest
                model has features) + 17 · 8 Σk r (the fit's working arrays)

    which measured peaks of 0.73 and 1.38 GB (the job's path: 12 layers of 1/12 and 1/8 the
    paper's LLM widths, 1,200 stimuli) overestimate by 15–25%. Leave-one-model-out runs one
    fit per worker at once and keeps the M fits' results (consensus and transforms):

        + (workers − 1) · 17 · 8 Σk r + M · 8 (m r + Σk r)

    (without these, its peaks of 1.31 GiB at the paper's vision widths and m = 1,000, and 0.95
    GiB at m = 3,000, were 1.43× and 1.2× the estimate; audit of 2026-12-05).
    ``benchmarks/gpa_scale.py`` prints both next to the peaks measured. The workflow's GPA
    rules ask for it (``gpa_resources`` in workflow/rules/common.smk).
    """
    if m < 2 or not widths or min(widths) < 1:
        raise ValueError(f"need m >= 2 stimuli and widths >= 1, got m={m}, widths={widths}")
    ks = [min(m - 1, int(w)) for w in widths]
    total_k, r = sum(ks), max(ks)
    cross = plan(m, ks, list(widths))[1] == CROSS
    need = GPA_BASE_BYTES + 16 * m * sum(widths) + 8 * m * total_k
    need += 8 * total_k**2 * cross + GPA_WORK_ARRAYS * 8 * total_k * r
    if leave_one_out_workers:
        need += (leave_one_out_workers - 1) * GPA_WORK_ARRAYS * 8 * total_k * r
        need += len(widths) * 8 * (m * r + total_k * r)
    return math.ceil(need / 2**20)
