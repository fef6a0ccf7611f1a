"""Representational alignment metrics (docs/method.md, "Alignment"): CKNNA, mutual kNN, CKA, unbiased CKA.

Definitions (X: m×p, Y: m×q, K = XXᵀ, L = YYᵀ):

- ``knn_K(i)``: the k largest entries of row i of K, excluding i (directed, not symmetrised);
  ``M^K_ij = 1[j ∈ knn_K(i)]``, ``M = M^K ∘ M^L``.
- ``HSIC_u(A, B) = [Σ_ij Ã_ij B̃_ji + (1ᵀÃ1)(1ᵀB̃1)/((m−1)(m−2)) − 2·1ᵀÃB̃1/(m−2)] / (m(m−3))``
  with zeroed diagonals (Song et al. 2012). Note the transpose in the first term.
- ``CKNNA = HSIC_u(M∘K, M∘L) / sqrt(HSIC_u(M^K∘K, M^K∘K) · HSIC_u(M^L∘L, M^L∘L))`` (no epsilon).

The metric functions take features as given; :func:`prepare` is the reference preprocessing
(scalar outlier clamp at the mean per-stimulus 95th percentile of |x|, then row l2 per layer).

Precision: kernels are computed in the features' dtype (float32 for prepared features, as in the
reference code; float64 inputs stay float64) and every HSIC sum is accumulated in float64.
The masked HSIC terms are evaluated on the k-neighbour lists (O(m·k) per pair), never with an
m×m×m product; reciprocity comes from a dense m×m boolean mask up to :data:`DENSE_MAX_M`
stimuli and from the lists themselves above (docs/method.md, "Large m").

Ties (docs/method.md, "Ties"): exactly equal kernel values are taken in stimulus order (lower
index first) on every path. Rows whose kNN boundary gap is within the kernel's resolution
(:func:`kernel_resolution`) are unresolved; :func:`knn_metric` reports how much a value moves
when their near-tie bands are filled the other way round (its stability).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "FeatureMoments",
    "KernelKNN",
    "Neighbours",
    "abs_quantiles",
    "cka",
    "cknna",
    "cknna_from_kernels",
    "cknna_sides",
    "cross_moment",
    "duplicate_groups",
    "equal_row_representatives",
    "feature_cka",
    "feature_moments",
    "feature_tensor",
    "gram",
    "hsic_from_moments",
    "hsic_unbiased",
    "kernel_centred_product",
    "kernel_cka",
    "kernel_hsic",
    "kernel_resolution",
    "kernel_row_blocks",
    "kernel_tensor",
    "kernel_unbiased_cka",
    "knn_metric",
    "layer_problem",
    "mutual_knn",
    "mutual_knn_sides",
    "normalised_hsic",
    "outlier_threshold",
    "prepare",
    "prepare_layer",
    "ROUNDING_DECIDES",
    "rounding_decides",
    "threshold_from_quantiles",
    "top_lists",
    "unbiased_cka",
]

_QUANTILE_MAX_NUMEL = 1 << 24  # torch.quantile refuses larger inputs


# ----------------------------------------------------------------------------- preprocessing


def abs_quantiles(features: np.ndarray, q: float = 0.95) -> np.ndarray:
    """Per-stimulus q-quantile of |x| over all layers and dims: (n_layers, m, dim) or (m, dim) → (m,).

    float32, linear interpolation (``torch.quantile`` semantics, as the reference code).
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"features must be (n_layers, m, dim) or (m, dim), got {tuple(x.shape)}")
    n_layers, m, dim = x.shape
    per_row = n_layers * dim
    rows = max(1, _QUANTILE_MAX_NUMEL // max(per_row, 1))
    out = torch.empty(m, dtype=torch.float32)
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        block = x[:, start:stop, :].permute(1, 0, 2).reshape(stop - start, per_row).abs()
        if per_row > _QUANTILE_MAX_NUMEL:  # one row larger than torch.quantile allows
            out[start:stop] = torch.from_numpy(
                np.quantile(block.numpy(), q, axis=1, method="linear").astype(np.float32)
            )
        else:
            out[start:stop] = torch.quantile(block, q, dim=1)
    return out.numpy()


def threshold_from_quantiles(abs_q95: np.ndarray) -> float:
    """Clamp threshold t = mean over stimuli of the stored per-stimulus 95th percentiles of |x|.

    In float32, as the reference code; where that sum overflows (m × |x| beyond 3.4e38, e.g.
    4000 stimuli at 1e35) it was inf, and no value was clamped: the mean is then taken in
    float64, which lies within float32's range as each percentile does."""
    q = np.asarray(abs_q95, dtype=np.float32)
    if q.ndim != 1 or q.size == 0 or not np.all(np.isfinite(q)):
        raise ValueError(f"abs_q95 must be a finite non-empty 1-D array, got shape {q.shape}")
    t = float(torch.from_numpy(q).mean())
    if not math.isfinite(t):
        t = float(np.float32(np.mean(q, dtype=np.float64)))
    return t


def outlier_threshold(features: np.ndarray) -> float:
    """t = mean_i quantile_0.95(|x_i|) over all layers and dims of stimulus i (float32)."""
    return threshold_from_quantiles(abs_quantiles(features, 0.95))


def prepare_layer(x: np.ndarray, threshold: float) -> np.ndarray:
    """One (m, dim) layer: float32, clamp to [−t, t], then l2-normalise each row.

    Rows are divided by max(‖x‖₂, 1e-12), bit-identical to torch.nn.functional.normalize,
    except rows on which that fails to give a unit vector: a norm that overflows float32
    (|x| ≳ 1e19) or a nonzero row whose norm is below 1e-12 (squares underflow). Those are
    scaled by their max |x| first and normalised in float64. Zero rows stay zero.
    """
    a = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if a.ndim != 2:
        raise ValueError(f"a layer must be (m, dim), got {tuple(a.shape)}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    a = a.clamp(-threshold, threshold)  # a new tensor: the caller's array is never modified
    norm = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    rows = torch.nonzero((torch.isinf(norm) | (norm < 1e-12)).squeeze(1)).squeeze(1)
    if rows.numel():  # of those, the nonzero rows (zero rows stay zero)
        rows = rows[(a.index_select(0, rows) != 0).any(dim=1)]
    scaled = None
    if rows.numel():
        big = a.index_select(0, rows).to(torch.float64)
        big = big / big.abs().amax(dim=1, keepdim=True)
        scaled = (big / torch.linalg.vector_norm(big, dim=1, keepdim=True)).to(torch.float32)
    # in place, bit-identical to torch.nn.functional.normalize (x / max(‖x‖₂, 1e-12)):
    a.div_(norm.clamp_min_(1e-12))
    if scaled is not None:
        a.index_copy_(0, rows, scaled)
    return a.numpy()


def prepare(features: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Reference preprocessing of (n_layers, m, dim) or (m, dim): clamp at t, row l2 per layer."""
    x = np.asarray(features)
    if x.ndim not in (2, 3):
        raise ValueError(f"features must be (n_layers, m, dim) or (m, dim), got {x.shape}")
    t = outlier_threshold(x) if threshold is None else float(threshold)
    if x.ndim == 2:
        return prepare_layer(x, t)
    return np.stack([prepare_layer(layer, t) for layer in x])


# ----------------------------------------------------------------------------- kernels


def _as_features(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (stimuli × features), got shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return np.ascontiguousarray(a)


#: leading bytes of each row compared first: only rows that share them are compared whole
_PREFIX_BYTES = 64


def _row_groups(rows: np.ndarray) -> list[np.ndarray]:
    """Groups (local positions, ascending) of ≥ 2 equal entries of a 1-D void array."""
    _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.ravel(), kind="stable")  # positions grouped, ascending inside
    ends = np.cumsum(counts)
    return [order[e - c : e] for e, c in zip(ends[counts > 1], counts[counts > 1], strict=True)]


def duplicate_groups(x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
    """Groups (positions, ascending, ≥ 2 each) of rows that are exactly equal, in order of first row.

    Rows are compared as byte strings, so equal means bit-identical, as in the feature file:
    first by their leading bytes, then whole among the rows that share those (``np.unique``
    sorts, O(m log m) comparisons that stop at the first differing byte). Features on a GPU
    stay there: only those leading bytes and the rows that share them come to the host.
    """
    t = feature_tensor(x)
    m, p = t.shape
    if m < 2:
        return ()
    if p == 0:  # zero-width rows are all equal
        return (np.arange(m, dtype=np.int64),)
    itemsize = t.element_size()

    def as_bytes(rows: torch.Tensor) -> np.ndarray:
        a = np.ascontiguousarray(rows.cpu().numpy())
        return a.view(np.dtype((np.void, itemsize * a.shape[1]))).ravel()

    lead = min(p, max(1, _PREFIX_BYTES // itemsize))  # columns in the leading bytes
    candidates = np.sort(
        np.concatenate([np.zeros(0, np.int64), *_row_groups(as_bytes(t[:, :lead]))])
    )
    if candidates.size == 0:
        return ()
    whole = as_bytes(t[torch.from_numpy(candidates).to(t.device)])
    groups = [candidates[g].astype(np.int64) for g in _row_groups(whole)]
    return tuple(sorted(groups, key=lambda g: int(g[0])))


def equal_row_representatives(x: torch.Tensor) -> torch.Tensor | None:
    """For each row of X (m, p), the lowest index of a row bit-identical to it
    (:func:`duplicate_groups`); None when no two rows are.

    Equal rows (a repeated caption or image) have equal kernel entries in the data, but BLAS
    rounds XXᵀ by position, so the float32 kernel can rank one copy above the other by a last
    bit and rounding, not the tie rule, picks between them (docs/method.md, "Ties").
    """
    groups = duplicate_groups(x)
    if not groups:
        return None
    rep = np.arange(x.shape[0])
    for g in groups:
        rep[g] = g[0]
    return torch.from_numpy(rep).to(x.device)


def _copy_first_entries(k: torch.Tensor, rep: torch.Tensor | None, rows: bool = True) -> None:
    """Give each later copy's column (and row) of kernel (block) ``k`` the first copy's entries,
    in place: O(m · copies) work, not a gather of the whole kernel."""
    if rep is None:
        return
    copies = torch.nonzero(rep != torch.arange(rep.numel(), device=rep.device)).squeeze(1)
    k[:, copies] = k[:, rep[copies]]
    if rows:
        k[copies] = k[rep[copies]]


def gram(x: np.ndarray) -> np.ndarray:
    """Linear kernel K = XXᵀ in the features' dtype (numpy dispatches XXᵀ to BLAS syrk), with
    exactly equal entries for equal rows (:func:`equal_row_representatives`)."""
    a = _as_features(x, "x")
    k = a @ a.T
    _copy_first_entries(torch.from_numpy(k), equal_row_representatives(torch.from_numpy(a)))
    return k


def kernel_tensor(x: torch.Tensor) -> torch.Tensor:
    """K = XXᵀ of features (syrk on the CPU, a matmul on a GPU); equal rows, equal entries."""
    if x.device.type == "cpu":
        return torch.from_numpy(gram(x.numpy()))
    k = x @ x.T
    _copy_first_entries(k, equal_row_representatives(x))
    return k


def _check_k(m: int, k: int) -> None:
    if m < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 stimuli, got m={m}")
    if not 1 <= k <= m - 1:
        raise ValueError(f"k must be in [1, m−1] = [1, {m - 1}], got k={k}")


def hsic_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """HSIC_u(A,B) = [Σ Ã_ij B̃_ji + 1ᵀÃ1·1ᵀB̃1/((m−1)(m−2)) − 2·1ᵀÃB̃1/(m−2)] / (m(m−3))."""
    a = np.array(a, dtype=np.float64)
    b = np.array(b, dtype=np.float64)
    m = a.shape[0]
    if a.shape != (m, m) or b.shape != (m, m):
        raise ValueError(f"need two m×m matrices, got {a.shape} and {b.shape}")
    if m < 4:
        raise ValueError(f"unbiased HSIC needs m ≥ 4, got {m}")
    np.fill_diagonal(a, 0.0)
    np.fill_diagonal(b, 0.0)
    term1 = np.sum(a * b.T)
    term2 = a.sum() * b.sum() / ((m - 1) * (m - 2))
    term3 = 2.0 * (a.sum(axis=0) @ b.sum(axis=1)) / (m - 2)
    return float((term1 + term2 - term3) / (m * (m - 3)))


def unbiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC_u(K,L) / sqrt(HSIC_u(K,K) HSIC_u(L,L)) with K = XXᵀ, L = YYᵀ."""
    k_, l_ = gram(x), gram(y)
    return hsic_unbiased(k_, l_) / np.sqrt(hsic_unbiased(k_, k_) * hsic_unbiased(l_, l_))


def cka(x: np.ndarray, y: np.ndarray) -> float:
    """Biased linear CKA: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)), H = I − 11ᵀ/m."""
    k_ = gram(x).astype(np.float64)
    l_ = gram(y).astype(np.float64)

    def centre(g: np.ndarray) -> np.ndarray:
        return g - g.mean(axis=0, keepdims=True) - g.mean(axis=1, keepdims=True) + g.mean()

    kc, lc = centre(k_), centre(l_)
    return float(np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc)))


# ----------------------------------------------------------------------------- kNN structures

#: τ = RESOLUTION_FACTOR·√dim·eps(dtype) (docs/method.md, "Resolution"). Measured on unit-norm
#: float32 rows (Gaussian, a few massive dimensions, collapsed cos ≈ 1, heavy-tailed; dim 8–8192,
#: syrk and blocked gemm): max |K₃₂ − K₆₄| ≤ 0.71·√dim·eps₃₂. A gap between two kernel entries
#: can be off by twice that, so 4 leaves a margin of about 2.8.
RESOLUTION_FACTOR = 4.0

#: Rows of one kernel block ``x[rows] @ xᵀ`` in the blocked path (block·m elements ≤ this).
BLOCK_ELEMS = 1 << 25
#: Largest m for which a full m×m kernel is kept (dense path); above it the blocked path is used.
#: Measured (benchmarks/cknna_scale.py, one CKNNA 1280-d vs 4096-d, 2 busy cores): m = 8192
#: dense 9.0 s / 1.19 GB peak RSS, blocked 8.1 s / 0.71 GB; m = 12288 dense 22.2 s / 2.23 GB,
#: blocked 24.2 s / 0.80 GB. Time is a wash; memory is not: a per-LLM job holds five sides
#: (four vision models, one LLM layer), each with its kernel and two masks (≈ 6·m² bytes ≈
#: 0.4 GB at 8192, 0.9 GB at 12288). The dense path stays where subsets can slice it cheaply.
DENSE_MAX_M = 8192
_CHUNK_ELEMS = 1 << 24  # rows re-ranked together when ties or near-ties are resolved


def kernel_resolution(dim: int, dtype: np.dtype | torch.dtype | type | str) -> float:
    """τ = 4·√dim·eps(dtype): kernel entries of unit-norm rows closer than τ are not ordered by the data.

    A kNN boundary gap (k-th minus (k+1)-th largest entry of a kernel row) ≤ τ marks the row as
    unresolved (docs/method.md, "Resolution").
    """
    if isinstance(dtype, torch.dtype):
        eps = float(torch.finfo(dtype).eps)
    else:
        eps = float(np.finfo(np.dtype(dtype)).eps)
    if dim < 1:
        raise ValueError(f"dim must be ≥ 1, got {dim}")
    return RESOLUTION_FACTOR * float(np.sqrt(dim)) * eps


def _canonical(val: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's list sorted by (value descending, index ascending)."""
    order = torch.argsort(idx, dim=-1)
    idx, val = idx.gather(-1, order), val.gather(-1, order)
    order = torch.sort(val, dim=-1, descending=True, stable=True).indices
    return val.gather(-1, order), idx.gather(-1, order)


def _chunks(rows: torch.Tensor, n: int) -> list[torch.Tensor]:
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    return [rows[i : i + step] for i in range(0, rows.numel(), step)]


def top_lists(
    rows: torch.Tensor, t: int, ordered: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The t largest entries of each row of ``rows`` (N, n): values, columns, and the (t+1)-th value.

    Exactly equal values are taken in column order (lower column first), so the set is defined
    for every input; with ``ordered`` the lists are sorted by (value descending, column
    ascending). The (t+1)-th largest value is −inf when t = n. Exclude a row's own entry by
    setting it to −inf first.
    """
    n = rows.shape[-1]
    depth = min(t + 1, n)
    val, idx = torch.topk(rows, depth, dim=-1, largest=True, sorted=True)
    if depth > t:
        nxt = val[:, t].clone()
        val, idx = val[:, :t].contiguous(), idx[:, :t].contiguous()
        tie = torch.nonzero(val[:, t - 1] == nxt).squeeze(1)
    else:
        nxt = torch.full((rows.shape[0],), float("-inf"), dtype=rows.dtype, device=rows.device)
        tie = torch.zeros(0, dtype=torch.long, device=rows.device)
    if tie.numel():  # topk's order among equal values is unspecified: re-rank those rows
        cols = torch.arange(n, device=rows.device)
        for r in _chunks(tie, n):  # index_select/index_copy_: advanced indexing is slow here
            sub = rows.index_select(0, r)
            thr = val.index_select(0, r)[:, t - 1 : t]
            score = torch.where(sub > thr, 2 * n, torch.where(sub == thr, n - cols, -1))
            pick = torch.topk(score, t, dim=-1).indices
            idx.index_copy_(0, r, pick)
            val.index_copy_(0, r, sub.gather(1, pick))
    if ordered:
        val, idx = _canonical(val, idx)
    return val, idx, nxt


def _knn_block(
    rows: torch.Tensor, k: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """kNN lists of rows (N, n) whose own entries are −inf, with the near-tie alternative lists.

    Returns val, idx (N, k), gap (N,) float64 = k-th − (k+1)-th value (inf when k = n − 1),
    unresolved = gap ≤ τ, and alt_val, alt_idx: the lists with the band of entries within τ of
    the k-th value filled in the reverse of the default's order (lowest value first, equal values
    higher column first); equal to val, idx on resolved rows. Lists are sets here (not sorted).
    """
    n = rows.shape[-1]
    val, idx, nxt = top_lists(rows, k, ordered=False)
    gap = val[:, k - 1].to(torch.float64) - nxt.to(torch.float64)
    gap = torch.where(torch.isneginf(nxt), torch.inf, gap)
    unresolved = gap <= tau
    alt_val, alt_idx = val.clone(), idx.clone()
    bad = torch.nonzero(unresolved).squeeze(1)
    if bad.numel():
        for r in _chunks(bad, n):
            sub = rows.index_select(0, r)
            sub64 = sub.to(torch.float64)
            thr = val.index_select(0, r)[:, k - 1 : k].to(torch.float64)
            band = (sub64 - thr).abs() <= tau
            # the band in the reverse of the default's order: lowest value first, equal values
            # higher column first (columns flipped for the stable sort), so that the alternative
            # takes what the default left out even where rounding already ordered the band by
            # descending column (docs/method.md, "Stability")
            key = torch.where(sub64 > thr + tau, torch.inf, torch.where(band, -sub64, -torch.inf))
            flipped = torch.sort(key.flip(-1), dim=-1, descending=True, stable=True).indices
            pick = (n - 1) - flipped[:, :k]
            alt_val.index_copy_(0, r, sub.gather(1, pick))
            alt_idx.index_copy_(0, r, pick)
    return val, idx, gap, unresolved, alt_val, alt_idx


def _hsic_terms(
    a: torch.Tensor, b: torch.Tensor, b_t: torch.Tensor, idx: torch.Tensor, s: int
) -> torch.Tensor:
    """HSIC_u(A, B) from list entries: A_ij = a, B_ij = b, B_ji = b_t at j = idx (all (B, s·k)).

    Entries that are not in the masked matrices carry zeros; the diagonals are zero by
    construction. HSIC_u = [Σ A_ij B_ji + 1ᵀA1·1ᵀB1/((s−1)(s−2)) − 2·1ᵀAB1/(s−2)] / (s(s−3)).
    """
    bsz = a.shape[0]
    term1 = (a * b_t).sum(dim=1)
    sum_a, sum_b = a.sum(dim=1), b.sum(dim=1)
    col_a = torch.zeros((bsz, s), dtype=a.dtype, device=a.device)
    col_a.scatter_add_(1, idx.reshape(bsz, -1), a)
    row_b = b.view(bsz, s, -1).sum(dim=2)
    ab = (col_a * row_b).sum(dim=1)
    return (term1 + sum_a * sum_b / ((s - 1) * (s - 2)) - 2.0 * ab / (s - 2)) / (s * (s - 3))


def _member(
    lists: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Is ``cols[e]`` in list ``lists[rows[e]]`` (lists (R, k)), and its value there (0 if not).

    Lists hold distinct columns, so at most one entry matches and the masked sum is exact.
    Evaluated in chunks of entries: O(chunk·k) memory, never an s×s mask.
    """
    k = lists.shape[1]
    found = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)
    value = torch.empty(rows.shape, dtype=torch.float64, device=rows.device)
    step = max(1, _CHUNK_ELEMS // k)
    for start in range(0, rows.numel(), step):
        r, c = rows[start : start + step], cols[start : start + step]
        eq = lists.index_select(0, r) == c.unsqueeze(1)
        found[start : start + step] = eq.any(dim=1)
        vals = values.index_select(0, r).to(torch.float64)
        value[start : start + step] = torch.where(eq, vals, 0.0).sum(dim=1)
    return found, value


@dataclass
class Neighbours:
    """Directed kNN lists of a batch of kernels: idx, val (B, s, k) and HSIC_u(M^K∘K, M^K∘K) (B,).

    Membership ("is j among i's neighbours, with which kernel value") is answered from a dense
    (B, s·s) mask and the kernel on the dense path, and from the lists themselves on the
    blocked path (no s×s array; docs/method.md, "Large m"). Both give identical numbers.
    What depends on one side only is kept for every pairing: the flat indices i·s + j of the
    entries and j·s + i of their transposes, whether (j, i) is in the lists too, and the values
    in float64 (all (B, s·k)).
    """

    idx: torch.Tensor
    val: torch.Tensor
    self_hsic: torch.Tensor
    flat: torch.Tensor
    t_flat: torch.Tensor
    recip: torch.Tensor
    val64: torch.Tensor
    mask: torch.Tensor | None = None
    kernel: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of stimuli s."""
        return int(self.idx.shape[1])

    @classmethod
    def from_lists(
        cls, idx: torch.Tensor, val: torch.Tensor, kernel: torch.Tensor | None = None
    ) -> Neighbours:
        """Lists idx, val (B, s, k) of a kernel (B, s, s) if kept, with HSIC_u(M^K∘K, M^K∘K)."""
        bsz, s, k = idx.shape
        _check_k(s, k)
        rows = torch.arange(s, device=idx.device).view(1, s, 1)
        flat = (rows * s + idx).view(bsz, -1)
        t_flat = (idx * s + rows).view(bsz, -1)
        val64 = val.reshape(bsz, -1).to(torch.float64)
        empty = torch.empty(0)
        out = cls(idx, val, empty, flat, t_flat, empty, val64, kernel=kernel)
        if kernel is not None:
            out.mask = torch.zeros((bsz, s * s), dtype=torch.bool, device=idx.device)
            out.mask.scatter_(1, flat, True)
        out.recip, a_t = out.lookup(t_flat)  # i ∈ knn_K(j), and K_ji there
        out.self_hsic = _hsic_terms(val64, val64, a_t, idx, s)
        return out

    def lookup(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For entries flat = i·s + j (B, Q): j ∈ knn(i)?, and K_ij (float64, 0 where not)."""
        bsz, s, k = self.idx.shape
        if self.mask is not None and self.kernel is not None:
            found = self.mask.gather(1, flat)
            value = self.kernel.reshape(bsz, -1).gather(1, flat).to(torch.float64)
            return found, torch.where(found, value, 0.0)
        base = (torch.arange(bsz, device=flat.device) * s).view(bsz, 1)
        rows = (base + torch.div(flat, s, rounding_mode="floor")).reshape(-1)
        found, value = _member(
            self.idx.reshape(bsz * s, k), self.val.reshape(bsz * s, k), rows, (flat % s).reshape(-1)
        )
        return found.view(bsz, -1), value.view(bsz, -1)


def _cross_hsic(kn: Neighbours, ln: Neighbours) -> torch.Tensor:
    """HSIC_u(M∘K, M∘L) with M = M^K ∘ M^L, enumerated on K's lists: (B,)."""
    s = kn.size
    q = kn.flat.shape[1]
    found, value = ln.lookup(torch.cat([kn.flat, kn.t_flat], dim=1))
    keep, in_l = found[:, :q], found[:, q:]  # j ∈ knn_L(i); i ∈ knn_L(j)
    b, b_t = value[:, :q], value[:, q:]  # L_ij, L_ji
    a = torch.where(keep, kn.val64, 0.0)
    b_t = torch.where(keep & kn.recip & in_l, b_t, 0.0)  # (j, i) ∈ M as well
    return _hsic_terms(a, b, b_t, kn.idx, s)


def normalised_hsic(
    cross: torch.Tensor, self_x: torch.Tensor, self_y: torch.Tensor
) -> torch.Tensor:
    """cross / sqrt(self_x · self_y), NaN unless both self-similarities are > 0.

    A self-similarity ≤ 0 is a degenerate kernel (docs/method.md, "Degenerate layers"); two
    negative ones would otherwise give a finite value.
    """
    ok = (self_x > 0) & (self_y > 0)
    product = torch.where(ok, self_x * self_y, 1.0)
    return torch.where(ok, cross / torch.sqrt(product), torch.nan)


def _cknna_lists(kn: Neighbours, ln: Neighbours) -> torch.Tensor:
    return normalised_hsic(_cross_hsic(kn, ln), kn.self_hsic, ln.self_hsic)


def _mutual_lists(kn: Neighbours, ln: Neighbours) -> torch.Tensor:
    bsz, s, k = kn.idx.shape
    keep, _ = ln.lookup(kn.flat)
    return keep.to(torch.float64).sum(dim=1) / (s * k)


_LIST_METRICS = {"cknna": _cknna_lists, "mutual_knn": _mutual_lists}

#: A kNN structure with at least this fraction of unresolved rows has its neighbourhoods decided
#: by rounding, not by the data (a collapsed layer, docs/method.md, "Diagnostics"): values that
#: use it get stability ∞, since one alternative tie-break cannot bound how far they move.
ROUNDING_DECIDES = 0.5


@dataclass
class KernelKNN:
    """One kernel (or a batch) with deterministic kNN lists, boundary gaps and near-tie alternative.

    ``knn``: the kNN lists (ties by lower stimulus index); ``alt``: the same lists with each
    unresolved row's near-tie band filled in the reverse of the default's order (None when no
    row of the batch is unresolved); ``gap`` (B, s): k-th − (k+1)-th largest off-diagonal entry;
    ``unresolved`` = gap ≤ ``tau``. ``kernel`` (B, s, s) is kept on the dense path;
    ``features`` (s, p) when built from features (the CKA metrics use them on the blocked path).
    """

    knn: Neighbours
    alt: Neighbours | None
    gap: torch.Tensor
    unresolved: torch.Tensor
    k: int
    tau: float
    kernel: torch.Tensor | None = None
    features: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        """Number of stimuli s."""
        return self.knn.size

    @property
    def idx(self) -> torch.Tensor:
        """Neighbour indices (B, s, k): a set per row (the order within a row carries no meaning)."""
        return self.knn.idx

    @property
    def val(self) -> torch.Tensor:
        """Kernel values of the neighbours (B, s, k)."""
        return self.knn.val

    @property
    def self_hsic(self) -> torch.Tensor:
        """HSIC_u(M^K∘K, M^K∘K) (B,)."""
        return self.knn.self_hsic

    @classmethod
    def _from_block(
        cls,
        parts: list[tuple[torch.Tensor, ...]],
        shape: tuple[int, int],
        k: int,
        tau: float,
        **kept: torch.Tensor | None,
    ) -> KernelKNN:
        bsz, s = shape
        val, idx, gap, unresolved, alt_val, alt_idx = (
            parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts]) for i in range(6)
        )
        kernel = kept.get("kernel")
        knn = Neighbours.from_lists(idx.view(bsz, s, k), val.view(bsz, s, k), kernel)
        unresolved = unresolved.view(bsz, s)
        alt = None
        if bool(unresolved.any()):
            alt = Neighbours.from_lists(alt_idx.view(bsz, s, k), alt_val.view(bsz, s, k), kernel)
        return cls(knn, alt, gap.view(bsz, s), unresolved, k, float(tau), **kept)

    @classmethod
    def build(cls, kernel: torch.Tensor, k: int, tau: float = 0.0) -> KernelKNN:
        """kNN structure of a (B, s, s) or (s, s) kernel batch, kept in memory (dense path).

        ``tau``: the kernel's resolution (:func:`kernel_resolution`); 0 marks only exact ties.
        The kernel is kept, not copied; its diagonal is set to −inf while ranking and restored.
        """
        if kernel.ndim == 2:
            kernel = kernel.unsqueeze(0)
        bsz, s, _ = kernel.shape
        _check_k(s, k)
        # rank with the diagonal at −inf, then put it back (no copy of the kernel)
        diag = kernel.diagonal(dim1=1, dim2=2)
        saved = diag.clone()
        diag.fill_(float("-inf"))
        try:
            part = _knn_block(kernel.reshape(bsz * s, s), k, tau)
        finally:
            diag.copy_(saved)
        return cls._from_block([part], (bsz, s), k, tau, kernel=kernel)

    @classmethod
    def from_features(
        cls,
        x: np.ndarray | torch.Tensor,
        k: int,
        tau: float | None = None,
        dense: bool | None = None,
        device: torch.device | None = None,
    ) -> KernelKNN:
        """kNN structure of K = XXᵀ for prepared features X (m, p).

        dense (default for m ≤ :data:`DENSE_MAX_M`): the m×m kernel is computed and kept.
        Blocked: K is computed by row blocks X[b]Xᵀ and only the lists are kept, in
        O(m·k + block·m) memory. ``tau`` defaults to ``kernel_resolution(p, X.dtype)``.
        """
        xt = feature_tensor(x, device)
        m, p = xt.shape
        _check_k(m, k)
        tau = kernel_resolution(p, xt.dtype) if tau is None else float(tau)
        if (m <= DENSE_MAX_M) if dense is None else dense:
            out = cls.build(kernel_tensor(xt), k, tau)
            out.features = xt
            return out
        parts = [_knn_block(rows, k, tau) for _, rows in kernel_row_blocks(xt)]
        return cls._from_block(parts, (1, m), k, tau, features=xt)


def kernel_row_blocks(x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, X[start:stop]·Xᵀ with each row's own entry set to −inf), block·m ≤ BLOCK_ELEMS.

    The columns of equal rows hold equal entries (the first copy's), as in :func:`gram`.
    """
    m = x.shape[0]
    step = max(1, BLOCK_ELEMS // m)
    rep = equal_row_representatives(x)
    for start in range(0, m, step):
        rows = x[start : start + step] @ x.T
        _copy_first_entries(rows, rep, rows=False)
        rows[:, start : start + rows.shape[0]].diagonal().fill_(float("-inf"))
        yield start, rows
        del rows


def feature_tensor(
    x: np.ndarray | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """Features (m, p) as a float32/float64 tensor on ``device`` (other dtypes become float64)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(_as_features(x, "features"))
    if t.ndim != 2:
        raise ValueError(f"features must be 2-D (stimuli × features), got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float64)
    return t.to(device) if device is not None else t


def knn_metric(metric: str, xs: KernelKNN, ys: KernelKNN) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, stability) of ``cknna`` or ``mutual_knn`` for matched batches of kNN structures.

    stability = max |Δvalue| over recomputing with the near-tie bands of X's unresolved rows,
    of Y's, and of both filled in the reverse of the default's order; exactly 0 (no
    recomputation) for a batch element where neither side has an unresolved row; ∞ where at least
    :data:`ROUNDING_DECIDES` of either side's rows are unresolved; NaN where the value is NaN
    (docs/method.md, "Stability").
    """
    if metric not in _LIST_METRICS:
        raise ValueError(f"{metric!r} is not a kNN metric; kNN metrics: {tuple(_LIST_METRICS)}")
    if xs.size != ys.size or xs.k != ys.k or xs.idx.shape[0] != ys.idx.shape[0]:
        raise ValueError(
            f"kNN structures do not match: s={xs.size}/{ys.size}, k={xs.k}/{ys.k}, "
            f"batch={xs.idx.shape[0]}/{ys.idx.shape[0]}"
        )
    f = _LIST_METRICS[metric]
    value = f(xs.knn, ys.knn)
    # NaN where the value is (docs/method.md, "Stability"), also without unresolved rows
    stability = torch.where(torch.isfinite(value), 0.0, torch.nan).to(value.dtype)
    if xs.alt is None and ys.alt is None:
        return value, stability
    pairs = [(xs.alt, ys.knn), (xs.knn, ys.alt), (xs.alt, ys.alt)]  # X side, Y side, both
    if xs.alt is None or ys.alt is None:  # "both" is then one of the single-side pairs
        pairs = [(a, b) for a, b in pairs[:2] if a is not None and b is not None]
    for a, b in pairs:
        stability = torch.maximum(stability, (f(a, b) - value).abs())
    touched = xs.unresolved.any(dim=1) | ys.unresolved.any(dim=1)
    stability = torch.where(touched, stability, 0.0)
    stability = torch.where(rounding_decides(xs) | rounding_decides(ys), torch.inf, stability)
    stability = torch.where(torch.isfinite(value), stability, torch.nan)
    return value, stability


def rounding_decides(side: KernelKNN) -> torch.Tensor:
    """(B,) True where at least :data:`ROUNDING_DECIDES` of the batch element's rows are
    unresolved: a collapsed layer, whose kNN sets the kernel's rounding picks."""
    return side.unresolved.to(torch.float64).mean(dim=1) >= ROUNDING_DECIDES


def cknna_sides(kside: KernelKNN, lside: KernelKNN) -> torch.Tensor:
    """CKNNA for matched batches of prepared kNN structures (same stimuli, same k): (B,)."""
    return _cknna_lists(kside.knn, lside.knn)


def mutual_knn_sides(kside: KernelKNN, lside: KernelKNN) -> torch.Tensor:
    """mean_i |knn_K(i) ∩ knn_L(i)| / k for matched batches of kNN structures: (B,)."""
    return _mutual_lists(kside.knn, lside.knn)


def _batch_f64(kernel: torch.Tensor) -> torch.Tensor:
    a = kernel.unsqueeze(0) if kernel.ndim == 2 else kernel
    return a.to(torch.float64)


def kernel_hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """HSIC_u of symmetric (B,s,s) or (s,s) kernels, accumulated in float64 (diagonals ignored): (B,).

    Σ_ij Ã_ij B̃_ji = Σ A∘B − Σ_i A_ii B_ii and 1ᵀÃB̃1 = Σ_j (Ã1)_j (B̃1)_j for symmetric A, B.
    """
    a, b = _batch_f64(a), _batch_f64(b)
    s = a.shape[-1]
    da = torch.diagonal(a, dim1=1, dim2=2)
    db = torch.diagonal(b, dim1=1, dim2=2)
    ra = a.sum(dim=2) - da  # row sums of Ã
    rb = b.sum(dim=2) - db
    term1 = (a * b).sum(dim=(1, 2)) - (da * db).sum(dim=1)
    sa, sb = ra.sum(dim=1), rb.sum(dim=1)
    ab = (ra * rb).sum(dim=1)
    return (term1 + sa * sb / ((s - 1) * (s - 2)) - 2.0 * ab / (s - 2)) / (s * (s - 3))


def kernel_centred_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tr(KHLH) of (B,s,s) or (s,s) kernels in float64, centring each first (stable): (B,)."""

    def centre(g: torch.Tensor) -> torch.Tensor:
        return (
            g
            - g.mean(dim=1, keepdim=True)
            - g.mean(dim=2, keepdim=True)
            + g.mean(dim=(1, 2), keepdim=True)
        )

    return (centre(_batch_f64(a)) * centre(_batch_f64(b))).sum(dim=(1, 2))


def kernel_unbiased_cka(kernel_x: torch.Tensor, kernel_y: torch.Tensor) -> torch.Tensor:
    """HSIC_u(K,L)/sqrt(HSIC_u(K,K)·HSIC_u(L,L)) for (B,s,s) or (s,s) symmetric kernels: (B,)."""
    return kernel_hsic(kernel_x, kernel_y) / torch.sqrt(
        kernel_hsic(kernel_x, kernel_x) * kernel_hsic(kernel_y, kernel_y)
    )


def kernel_cka(kernel_x: torch.Tensor, kernel_y: torch.Tensor) -> torch.Tensor:
    """Biased linear CKA tr(KHLH)/sqrt(tr(KHKH)·tr(LHLH)) for (B,s,s) or (s,s) kernels: (B,)."""
    return kernel_centred_product(kernel_x, kernel_y) / torch.sqrt(
        kernel_centred_product(kernel_x, kernel_x) * kernel_centred_product(kernel_y, kernel_y)
    )


@dataclass
class FeatureMoments:
    """What the CKA metrics need of K = XXᵀ without forming it: m, column sums, diag, row sums.

    ``self_unbiased`` = HSIC_u(K, K); ``self_biased`` = tr(KHKH). All float64.
    """

    m: int
    col_sum: torch.Tensor
    diag: torch.Tensor
    row_sum: torch.Tensor
    self_unbiased: float
    self_biased: float


def cross_moment(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """XᵀY in float64, accumulated over row blocks (no float64 copy of X or Y)."""
    m = x.shape[0]
    step = max(1, BLOCK_ELEMS // max(x.shape[1] + y.shape[1], 1))
    acc = torch.zeros((x.shape[1], y.shape[1]), dtype=torch.float64, device=x.device)
    for start in range(0, m, step):
        acc += x[start : start + step].to(torch.float64).T @ y[start : start + step].to(
            torch.float64
        )
    return acc


def hsic_from_moments(
    cross: torch.Tensor, a: FeatureMoments, b: FeatureMoments
) -> tuple[float, float]:
    """(HSIC_u(K, L), tr(KHLH)) from XᵀY and the two sides' moments.

    Σ_ij K_ij L_ij = ‖XᵀY‖²_F; with zeroed diagonals Σ K̃∘L̃ = ‖XᵀY‖²_F − Σ_i K_ii L_ii, and
    tr(KHLH) = ‖XᵀY − (Xᵀ1)(Yᵀ1)ᵀ/m‖²_F.
    """
    m = a.m
    ra, rb = a.row_sum - a.diag, b.row_sum - b.diag  # row sums of K̃, L̃
    term1 = float((cross * cross).sum()) - float((a.diag * b.diag).sum())
    sa, sb = float(ra.sum()), float(rb.sum())
    ab = float((ra * rb).sum())
    unbiased = (term1 + sa * sb / ((m - 1) * (m - 2)) - 2.0 * ab / (m - 2)) / (m * (m - 3))
    centred = cross - torch.outer(a.col_sum, b.col_sum) / m
    return unbiased, float((centred * centred).sum())


def feature_moments(x: torch.Tensor) -> FeatureMoments:
    """:class:`FeatureMoments` of prepared features (m, p), in O(m·p² ) float64 work, O(p²) memory."""
    m = x.shape[0]
    col_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    diag = torch.empty(m, dtype=torch.float64, device=x.device)
    step = max(1, BLOCK_ELEMS // max(x.shape[1], 1))
    for start in range(0, m, step):
        xb = x[start : start + step].to(torch.float64)
        col_sum += xb.sum(dim=0)
        diag[start : start + step] = (xb * xb).sum(dim=1)
    row_sum = torch.cat([x[s : s + step].to(torch.float64) @ col_sum for s in range(0, m, step)])
    out = FeatureMoments(m, col_sum, diag, row_sum, float("nan"), float("nan"))
    out.self_unbiased, out.self_biased = hsic_from_moments(cross_moment(x, x), out, out)
    return out


def feature_cka(
    x: torch.Tensor,
    y: torch.Tensor,
    mx: FeatureMoments | None = None,
    my: FeatureMoments | None = None,
) -> tuple[float, float]:
    """(unbiased CKA, biased CKA) of prepared features without an m×m kernel (float64 moments)."""
    mx = feature_moments(x) if mx is None else mx
    my = feature_moments(y) if my is None else my
    if mx.m != my.m:
        raise ValueError(f"X has {mx.m} stimuli, Y has {my.m}")
    unbiased, biased = hsic_from_moments(cross_moment(x, y), mx, my)
    return (
        unbiased / float(np.sqrt(mx.self_unbiased * my.self_unbiased)),
        biased / float(np.sqrt(mx.self_biased * my.self_biased)),
    )


def cknna_from_kernels(kernel_x: np.ndarray, kernel_y: np.ndarray, k: int = 10) -> float:
    """CKNNA of two precomputed m×m kernels (docs/method.md, "Alignment")."""
    kx = torch.tensor(np.asarray(kernel_x))  # copies: build() ranks in place
    ky = torch.tensor(np.asarray(kernel_y))
    if kx.shape != ky.shape or kx.ndim != 2 or kx.shape[0] != kx.shape[1]:
        raise ValueError(
            f"need two m×m kernels of equal shape, got {tuple(kx.shape)}, {tuple(ky.shape)}"
        )
    value = cknna_sides(KernelKNN.build(kx, k), KernelKNN.build(ky, k))
    return float(value[0])


def _feature_problem(t: torch.Tensor) -> str:
    """Reason from one pass over the row norms: "non-finite features", "zero rows" or ""."""
    norms = torch.linalg.vector_norm(t, dim=1)
    if not bool(torch.isfinite(norms).all()):
        return "non-finite features"
    if not bool(norms.any()):
        return "zero rows"
    return ""


def _constant_rows(t: torch.Tensor, side: KernelKNN | None) -> bool:
    """Every row equals the first. A constant kernel has only zero kNN gaps, so with the layer's
    kNN structure at hand the rows are compared only when every row is unresolved."""
    if side is not None and side.k < side.size - 1 and not bool(side.unresolved.all()):
        return False
    return t.shape[0] > 1 and bool((t == t[0]).all())


def layer_problem(x: np.ndarray | torch.Tensor, side: KernelKNN | None = None) -> str:
    """Why prepared features (m, p) cannot be aligned, in a few words; "" when they can.

    "non-finite features" (NaN or ±inf anywhere: the row norms are then not finite), "zero
    rows" (every row is 0), "constant rows" (every row equals the first: a constant kernel).
    ``side``, the layer's kNN structure if built, spares the row comparison for usable layers.
    Kernels degenerate in a subtler way are caught by their self-similarity
    (:func:`xmodal.alignment.self_term`).
    """
    t = feature_tensor(x)
    reason = _feature_problem(t)
    if not reason and _constant_rows(t, side):
        reason = "constant rows"
    return reason


#: what a direct call of cknna / mutual_knn says for each reason of :func:`layer_problem`
_UNDEFINED = {
    "non-finite features": "has non-finite features: its neighbours are undefined",
    "zero rows": "has the same features for every stimulus: no neighbours",
    "constant rows": "has the same features for every stimulus: no neighbours",
}


def _pair(x: np.ndarray, y: np.ndarray, k: int) -> tuple[KernelKNN, KernelKNN]:
    a, b = _as_features(x, "X"), _as_features(y, "Y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"X has {a.shape[0]} stimuli, Y has {b.shape[0]}")
    sides = []
    for name, f in (("X", a), ("Y", b)):
        # the workflow screens layers the same way; a direct call must not return a number
        # either: top-k ranks NaN first, and identical rows tie everywhere
        side = KernelKNN.from_features(f, k)
        reason = layer_problem(f, side)
        if reason:
            raise ValueError(f"{name} {_UNDEFINED[reason]}")
        sides.append(side)
    return sides[0], sides[1]


def cknna(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """CKNNA(X,Y;k) = HSIC_u(M∘K, M∘L)/sqrt(HSIC_u(M^K∘K, M^K∘K)·HSIC_u(M^L∘L, M^L∘L)).

    Kernels in the features' dtype; the blocked path (no m×m matrix) above DENSE_MAX_M stimuli.
    """
    return float(cknna_sides(*_pair(x, y, k))[0])


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """mean_i |knn_K(i) ∩ knn_L(i)| / k."""
    return float(mutual_knn_sides(*_pair(x, y, k))[0])
