"""Representational alignment metrics (DESIGN §2.5): CKNNA, mutual kNN, CKA, unbiased CKA.

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
The masked HSIC terms are evaluated on the k-neighbour lists (O(m·k) per pair, plus one dense
m×m boolean mask for reciprocity), never with an m×m×m product.
Ties inside a kernel row are broken by ``torch.topk``; with real-valued features they do not occur.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "KernelKNN",
    "abs_quantiles",
    "cka",
    "cknna",
    "cknna_from_kernels",
    "cknna_sides",
    "kernel_cka",
    "kernel_unbiased_cka",
    "gram",
    "hsic_unbiased",
    "mutual_knn",
    "mutual_knn_sides",
    "outlier_threshold",
    "prepare",
    "prepare_layer",
    "threshold_from_quantiles",
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
    """Clamp threshold t = mean over stimuli of the stored per-stimulus 95th percentiles of |x|."""
    q = np.asarray(abs_q95, dtype=np.float32)
    if q.ndim != 1 or q.size == 0 or not np.all(np.isfinite(q)):
        raise ValueError(f"abs_q95 must be a finite non-empty 1-D array, got shape {q.shape}")
    return float(torch.from_numpy(q).mean())


def outlier_threshold(features: np.ndarray) -> float:
    """t = mean_i quantile_0.95(|x_i|) over all layers and dims of stimulus i (float32)."""
    return threshold_from_quantiles(abs_quantiles(features, 0.95))


def prepare_layer(x: np.ndarray, threshold: float) -> np.ndarray:
    """One (m, dim) layer: float32, clamp to [−t, t], then l2-normalise each row."""
    a = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if a.ndim != 2:
        raise ValueError(f"a layer must be (m, dim), got {tuple(a.shape)}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    a = a.clamp(-threshold, threshold)  # a new tensor: the caller's array is never modified
    # in place, bit-identical to torch.nn.functional.normalize (x / max(‖x‖₂, 1e-12)):
    a.div_(torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min_(1e-12))
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


def gram(x: np.ndarray) -> np.ndarray:
    """Linear kernel K = XXᵀ in the features' dtype (numpy dispatches XXᵀ to BLAS syrk)."""
    a = _as_features(x, "x")
    return a @ a.T


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


@dataclass
class KernelKNN:
    """A (batch of) kernel(s) with its directed kNN lists: K (B,s,s), idx/val (B,s,k), self-HSIC (B,)."""

    kernel: torch.Tensor
    idx: torch.Tensor
    val: torch.Tensor
    mask_flat: torch.Tensor
    self_hsic: torch.Tensor

    @property
    def size(self) -> int:
        """Number of stimuli s."""
        return int(self.kernel.shape[-1])

    @classmethod
    def build(cls, kernel: torch.Tensor, k: int) -> KernelKNN:
        """kNN lists of each row (self excluded) and HSIC_u(M^K∘K, M^K∘K) for a (B,s,s) kernel batch."""
        if kernel.ndim == 2:
            kernel = kernel.unsqueeze(0)
        b, s, _ = kernel.shape
        _check_k(s, k)
        masked = kernel.clone()
        masked.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
        val, idx = torch.topk(masked, k, dim=2, largest=True, sorted=False)
        mask = torch.zeros((b, s * s), dtype=torch.bool, device=kernel.device)
        rows = torch.arange(s, device=kernel.device).view(1, s, 1)
        mask.scatter_(1, (rows * s + idx).view(b, -1), True)
        ones = torch.ones_like(val, dtype=torch.bool)
        self_h = _hsic_lists(idx, val, val, ones, mask, s)
        return cls(kernel=kernel, idx=idx, val=val, mask_flat=mask, self_hsic=self_h)


def _hsic_lists(
    idx: torch.Tensor,
    a_val: torch.Tensor,
    b_val: torch.Tensor,
    keep: torch.Tensor,
    mask_flat: torch.Tensor,
    s: int,
) -> torch.Tensor:
    """HSIC_u(A, B) for A_ij = a_val, B_ij = b_val on the list entries j = idx[i, t] where ``keep``.

    ``mask_flat`` (B, s·s) is the dense mask of kept entries (for the reciprocal term B_ji ≠ 0).
    Both masked matrices share the support ``keep``; their diagonals are zero by construction.
    """
    bsz = idx.shape[0]
    rows = torch.arange(s, device=idx.device).view(1, s, 1)
    keep_f = keep.to(torch.float64)
    a = a_val.to(torch.float64) * keep_f
    bm = b_val.to(torch.float64) * keep_f
    recip = mask_flat.gather(1, (idx * s + rows).view(bsz, -1)).view_as(idx)
    term1 = (a * bm * recip).sum(dim=(1, 2))  # Σ_ij A_ij B_ji, B symmetric on its support
    sum_a = a.sum(dim=(1, 2))
    sum_b = bm.sum(dim=(1, 2))
    col_a = torch.zeros((bsz, s), dtype=torch.float64, device=idx.device)
    col_a.scatter_add_(1, idx.view(bsz, -1), a.view(bsz, -1))
    row_b = bm.sum(dim=2)
    ab = (col_a * row_b).sum(dim=1)
    return (term1 + sum_a * sum_b / ((s - 1) * (s - 2)) - 2.0 * ab / (s - 2)) / (s * (s - 3))


def cknna_sides(kside: KernelKNN, lside: KernelKNN) -> torch.Tensor:
    """CKNNA for matched batches of prepared kNN structures (same stimuli, same k): (B,)."""
    s = kside.size
    bsz = kside.idx.shape[0]
    idx = kside.idx
    # M = M^K ∘ M^L, enumerated on K's lists: keep j ∈ knn_K(i) iff also j ∈ knn_L(i).
    rows = torch.arange(s, device=idx.device).view(1, s, 1)
    flat = (rows * s + idx).view(bsz, -1)
    keep = lside.mask_flat.gather(1, flat).view_as(idx)
    mask = torch.zeros_like(kside.mask_flat)
    mask.scatter_(1, flat, keep.view(bsz, -1))
    l_val = lside.kernel.reshape(bsz, -1).gather(1, flat).view_as(idx)
    cross = _hsic_lists(idx, kside.val, l_val, keep, mask, s)
    return cross / torch.sqrt(kside.self_hsic * lside.self_hsic)


def mutual_knn_sides(kside: KernelKNN, lside: KernelKNN) -> torch.Tensor:
    """mean_i |knn_K(i) ∩ knn_L(i)| / k for matched batches of kNN structures: (B,)."""
    s = kside.size
    bsz, _, k = kside.idx.shape
    rows = torch.arange(s, device=kside.idx.device).view(1, s, 1)
    keep = lside.mask_flat.gather(1, (rows * s + kside.idx).view(bsz, -1))
    return keep.to(torch.float64).sum(dim=1) / (s * k)


def _batch_f64(kernel: torch.Tensor) -> torch.Tensor:
    a = kernel.unsqueeze(0) if kernel.ndim == 2 else kernel
    return a.to(torch.float64)


def _hsic_full(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """HSIC_u of symmetric (B,s,s) float64 kernels (diagonals ignored): (B,)."""
    s = a.shape[-1]
    da = torch.diagonal(a, dim1=1, dim2=2)
    db = torch.diagonal(b, dim1=1, dim2=2)
    ra = a.sum(dim=2) - da  # row sums of Ã
    rb = b.sum(dim=2) - db
    term1 = (a * b).sum(dim=(1, 2)) - (da * db).sum(dim=1)  # Σ Ã_ij B̃_ji, both symmetric
    sa, sb = ra.sum(dim=1), rb.sum(dim=1)
    ab = (ra * rb).sum(dim=1)  # 1ᵀÃB̃1 = Σ_j (Σ_i Ã_ij)(Σ_l B̃_jl)
    return (term1 + sa * sb / ((s - 1) * (s - 2)) - 2.0 * ab / (s - 2)) / (s * (s - 3))


def kernel_unbiased_cka(kernel_x: torch.Tensor, kernel_y: torch.Tensor) -> torch.Tensor:
    """HSIC_u(K,L)/sqrt(HSIC_u(K,K)·HSIC_u(L,L)) for (B,s,s) or (s,s) symmetric kernels: (B,)."""
    a, b = _batch_f64(kernel_x), _batch_f64(kernel_y)
    return _hsic_full(a, b) / torch.sqrt(_hsic_full(a, a) * _hsic_full(b, b))


def kernel_cka(kernel_x: torch.Tensor, kernel_y: torch.Tensor) -> torch.Tensor:
    """Biased linear CKA tr(KHLH)/sqrt(tr(KHKH)·tr(LHLH)) for (B,s,s) or (s,s) kernels: (B,)."""

    def centre(g: torch.Tensor) -> torch.Tensor:  # HgH, computed before any product (stable)
        return (
            g
            - g.mean(dim=1, keepdim=True)
            - g.mean(dim=2, keepdim=True)
            + g.mean(dim=(1, 2), keepdim=True)
        )

    kc, lc = centre(_batch_f64(kernel_x)), centre(_batch_f64(kernel_y))
    return (kc * lc).sum(dim=(1, 2)) / torch.sqrt(
        (kc * kc).sum(dim=(1, 2)) * (lc * lc).sum(dim=(1, 2))
    )


def cknna_from_kernels(kernel_x: np.ndarray, kernel_y: np.ndarray, k: int = 10) -> float:
    """CKNNA of two precomputed m×m kernels (DESIGN §2.5)."""
    kx = torch.as_tensor(np.asarray(kernel_x))
    ky = torch.as_tensor(np.asarray(kernel_y))
    if kx.shape != ky.shape or kx.ndim != 2 or kx.shape[0] != kx.shape[1]:
        raise ValueError(
            f"need two m×m kernels of equal shape, got {tuple(kx.shape)}, {tuple(ky.shape)}"
        )
    value = cknna_sides(KernelKNN.build(kx, k), KernelKNN.build(ky, k))
    return float(value[0])


def cknna(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """CKNNA(X,Y;k) = HSIC_u(M∘K, M∘L)/sqrt(HSIC_u(M^K∘K, M^K∘K)·HSIC_u(M^L∘L, M^L∘L))."""
    a, b = _as_features(x, "X"), _as_features(y, "Y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"X has {a.shape[0]} stimuli, Y has {b.shape[0]}")
    return cknna_from_kernels(gram(a), gram(b), k)


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """mean_i |knn_K(i) ∩ knn_L(i)| / k."""
    a, b = _as_features(x, "X"), _as_features(y, "Y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"X has {a.shape[0]} stimuli, Y has {b.shape[0]}")
    kside = KernelKNN.build(torch.from_numpy(gram(a)), k)
    lside = KernelKNN.build(torch.from_numpy(gram(b)), k)
    s = kside.size
    rows = torch.arange(s).view(1, s, 1)
    keep = lside.mask_flat.gather(1, (rows * s + kside.idx).view(1, -1))
    return float(keep.to(torch.float64).sum() / (s * k))
