"""Representation diagnostics of a prepared layer (docs/method.md, "Diagnostics").

For rows l2-normalised by :func:`xmodal.metrics.prepare_layer` (m × d):

- ``cos_mean``, ``cos_sd``: mean and SD of the off-diagonal cosines K_ij, i ≠ j;
- ``eff_dim``: participation ratio (Σλ)²/Σλ² of the covariance spectrum of the features,
  = tr(C)²/‖C‖²_F for C = X_cᵀX_c (X_c: column-centred), computed on the smaller of X_cᵀX_c
  and X_cX_cᵀ (same nonzero spectrum);
- ``unresolved``: stimuli whose kNN boundary gap (k-th − (k+1)-th largest off-diagonal cosine)
  is ≤ τ = :func:`xmodal.metrics.kernel_resolution`, i.e. whose kNN set the kernel's rounding
  can change;
- duplicate groups: sets of ≥ 2 stimuli with bit-identical prepared rows;
- ``collapsed``: cos_mean ≥ :data:`COLLAPSED_COS` or at least :data:`COLLAPSED_UNRESOLVED` of
  the rows unresolved; ``warn``: collapsed, or more than :data:`WARN_UNRESOLVED` unresolved.

The kernel is visited by row blocks (``metrics.kernel_row_blocks``), so no m×m matrix is
formed when m is large; the work is one kernel's worth (m²·d), as for the layer search.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from xmodal.metrics import (
    BLOCK_ELEMS,
    ROUNDING_DECIDES,
    KernelKNN,
    cross_moment,
    duplicate_groups,
    feature_tensor,
    kernel_resolution,
    kernel_row_blocks,
    top_lists,
)

__all__ = [
    "COLLAPSED_COS",
    "COLLAPSED_UNRESOLVED",
    "DIAGNOSTIC_COLUMNS",
    "WARN_UNRESOLVED",
    "LayerDiagnostics",
    "diagnose",
    "diagnostics_table",
    "duplicate_groups",
    "participation_ratio",
]

#: A layer whose mean off-diagonal cosine reaches this is collapsed (all stimuli nearly alike).
COLLAPSED_COS = 0.999
#: ... as is one where at least this fraction of rows has an unresolved kNN set.
COLLAPSED_UNRESOLVED = ROUNDING_DECIDES
#: Warn above this fraction of unresolved rows. Healthy synthetic layers at the paper's scale
#: (m = 1024, d = 1024–8192, benchmarks/analysis_scale.py's generator) have 0.1–2.1 %.
WARN_UNRESOLVED = 0.05

DIAGNOSTIC_COLUMNS = [
    "model",
    "layer",
    "layer_name",
    "m",
    "dim",
    "k",
    "tau",
    "cos_mean",
    "cos_sd",
    "eff_dim",
    "n_unresolved",
    "frac_unresolved",
    "n_duplicate_groups",
    "n_in_duplicate_groups",
    "collapsed",
    "warn",
    "unresolved_ids",
]
#: How many unresolved stimuli the diagnostics table names per layer (``n_unresolved`` counts them all).
N_NAMED = 10


@dataclass(frozen=True)
class LayerDiagnostics:
    """Diagnostics of one prepared layer; positions index its rows (stimulus order)."""

    m: int
    dim: int
    k: int
    tau: float
    cos_mean: float
    cos_sd: float
    eff_dim: float
    unresolved: np.ndarray
    duplicate_groups: tuple[np.ndarray, ...]

    @property
    def n_unresolved(self) -> int:
        """Number of stimuli whose kNN boundary gap is ≤ τ."""
        return int(self.unresolved.size)

    @property
    def frac_unresolved(self) -> float:
        """n_unresolved / m."""
        return self.n_unresolved / self.m

    @property
    def n_duplicate_groups(self) -> int:
        """Number of groups of identical prepared rows."""
        return len(self.duplicate_groups)

    @property
    def n_in_duplicate_groups(self) -> int:
        """Number of stimuli that share their prepared row with another stimulus."""
        return int(sum(g.size for g in self.duplicate_groups))

    @property
    def collapsed(self) -> bool:
        """cos_mean ≥ COLLAPSED_COS or frac_unresolved ≥ COLLAPSED_UNRESOLVED."""
        return bool(self.cos_mean >= COLLAPSED_COS or self.frac_unresolved >= COLLAPSED_UNRESOLVED)

    @property
    def warn(self) -> bool:
        """collapsed, or frac_unresolved > WARN_UNRESOLVED."""
        return self.collapsed or self.frac_unresolved > WARN_UNRESOLVED

    def unresolved_ids(self, stimulus_ids: Sequence[str]) -> list[str]:
        """The stimulus ids of the unresolved rows."""
        return [str(stimulus_ids[i]) for i in self.unresolved]

    def row(
        self,
        model: str,
        layer: int,
        layer_name: str,
        stimulus_ids: Sequence[str] | None = None,
    ) -> dict[str, object]:
        """One row of :func:`diagnostics_table`; ``unresolved_ids`` names the first
        :data:`N_NAMED` unresolved stimuli (a JSON list; empty without ``stimulus_ids``)."""
        return {
            "model": model,
            "layer": int(layer),
            "layer_name": str(layer_name),
            "m": self.m,
            "dim": self.dim,
            "k": self.k,
            "tau": self.tau,
            "cos_mean": self.cos_mean,
            "cos_sd": self.cos_sd,
            "eff_dim": self.eff_dim,
            "n_unresolved": self.n_unresolved,
            "frac_unresolved": self.frac_unresolved,
            "n_duplicate_groups": self.n_duplicate_groups,
            "n_in_duplicate_groups": self.n_in_duplicate_groups,
            "collapsed": self.collapsed,
            "warn": self.warn,
            "unresolved_ids": json.dumps(
                self.unresolved_ids(stimulus_ids)[:N_NAMED] if stimulus_ids is not None else [],
                ensure_ascii=False,
            ),
        }


def participation_ratio(x: np.ndarray | torch.Tensor) -> float:
    """(Σλ)²/Σλ² of the spectrum of C = X_cᵀX_c (column-centred X).

    = tr(C)²/‖C‖²_F, from the smaller Gram matrix (d×d by row blocks, or m×m). X is centred in
    float64 first (so that a collapsed layer, all rows nearly equal, loses nothing to
    cancellation), the Gram product runs in the features' dtype (BLAS) and the sums in float64.
    NaN when X_c = 0.
    """
    t = feature_tensor(x)
    m, d = t.shape
    mean = t.to(torch.float64).mean(dim=0)
    if d <= m:
        g = torch.zeros((d, d), dtype=torch.float64, device=t.device)
        step = max(1, (1 << 24) // max(d, 1))
        for start in range(0, m, step):
            xb = (t[start : start + step].to(torch.float64) - mean).to(t.dtype)
            g += (xb.T @ xb).to(torch.float64)
    else:
        xc = (t.to(torch.float64) - mean).to(t.dtype)
        g = (xc @ xc.T).to(torch.float64)
    trace = float(torch.diagonal(g).sum())
    frob2 = float((g * g).sum())
    return trace * trace / frob2 if frob2 > 0 else float("nan")


#: The double-centred kernel HKH gives the participation ratio (same nonzero spectrum as
#: X_cᵀX_c) when ‖HKH‖_F is at least this fraction r of ‖K‖_F. A float32 kernel's rounding
#: (~6e-8 of its entries) then moves the ratio by at most about 6e-8 / r ≈ 1e-5 relative; below
#: (collapsed or near-collapsed layers, where centring the kernel cancels) the ratio is computed
#: from the features centred in float64 instead.
KERNEL_CENTRING_MIN = 0.005


def _kernel_blocks(kern: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, rows of the kernel in float64), blocks of at most BLOCK_ELEMS / 8 entries (32 MiB
    each, and as much for each temporary of the caller's: no m × m float64 copy)."""
    m = kern.shape[0]
    step = max(1, BLOCK_ELEMS // 8 // m)
    for start in range(0, m, step):
        yield start, kern[start : start + step].to(torch.float64)


def _eff_dim_from_kernel(kern: torch.Tensor) -> float | None:
    """tr(HKH)²/‖HKH‖²_F from the kernel in float64 row blocks, or None when that would
    cancel. HKH_ij = K_ij − r_i − r_j + g (r: row means, g: their mean; K symmetric)."""
    r = torch.cat([b.mean(dim=1) for _, b in _kernel_blocks(kern)])
    g = r.mean()
    frob2 = total2 = trace = 0.0
    for start, b in _kernel_blocks(kern):
        ri = r[start : start + b.shape[0]]
        centred = b - ri[:, None] - r[None, :] + g
        frob2 += float((centred * centred).sum())
        total2 += float((b * b).sum())
        trace += float(torch.diagonal(centred, offset=start).sum())
    if frob2 < (KERNEL_CENTRING_MIN**2) * total2:
        return None
    return trace * trace / frob2


def diagnose(
    x: np.ndarray | torch.Tensor,
    k: int = 10,
    tau: float | None = None,
    device: torch.device | None = None,
    side: KernelKNN | None = None,
) -> LayerDiagnostics:
    """Diagnostics of one prepared layer (m, d) with l2-normalised rows (see the module docstring).

    ``tau`` defaults to ``kernel_resolution(d, dtype)``; the kernel is visited by row blocks.
    ``side``: the layer's kNN structure as the layer search built it (same k and τ); when it kept
    its kernel (the dense path), the pairwise cosines and kNN boundary gaps come from it instead
    of a second pass over the kernel (same values).
    """
    t = feature_tensor(x, device)
    m, d = t.shape
    if m < 3 or not 1 <= k <= m - 2:
        raise ValueError(f"need m ≥ 3 and 1 ≤ k ≤ m − 2 (a (k+1)-th neighbour), got m={m}, k={k}")
    if not bool(torch.isfinite(t).all()):  # NaN compares false: it would pass as healthy
        raise ValueError("features hold NaN or ±inf: diagnostics need finite prepared features")
    tau = kernel_resolution(d, t.dtype) if tau is None else float(tau)
    if t.device.type == "cpu":  # numpy's float64-accumulating reductions are much faster here
        a = t.numpy()
        col = torch.from_numpy(a.sum(axis=0, dtype=np.float64))
        norms2 = torch.from_numpy(np.einsum("ij,ij->i", a, a, dtype=np.float64))
    else:
        col = t.sum(dim=0, dtype=torch.float64)
        norms2 = (t * t).sum(dim=1, dtype=torch.float64)
    n_off = m * (m - 1)
    mean = (float(col @ col) - float(norms2.sum())) / n_off  # Σ_{i≠j} K_ij = ‖1ᵀX‖² − Σ‖x_i‖²
    if side is not None and side.kernel is not None:
        if side.k != k or side.tau != tau or side.size != m:
            raise ValueError(
                f"the kNN structure has k={side.k}, τ={side.tau}, m={side.size}; "
                f"diagnostics asked for k={k}, τ={tau}, m={m}"
            )
        kern = side.kernel[0]
        # Σ over i ≠ j: all entries minus the diagonal (K_ii = ‖x_i‖²)
        sq_dev = sum(float(((b - mean) ** 2).sum()) for _, b in _kernel_blocks(kern))
        sq_dev -= float(((norms2 - mean) ** 2).sum())
        cos_sd = float(np.sqrt(max(sq_dev, 0.0) / (n_off - 1)))
        eff_dim = _eff_dim_from_kernel(kern)
        if eff_dim is None:  # centring the rounded kernel would cancel: from the features
            eff_dim = participation_ratio(t)
        return LayerDiagnostics(
            m=m,
            dim=d,
            k=k,
            tau=tau,
            cos_mean=mean,
            cos_sd=cos_sd,
            eff_dim=eff_dim,
            unresolved=_positions(side.unresolved[0]),
            duplicate_groups=duplicate_groups(t),
        )
    sq_dev, unresolved = -1.0, np.empty(0, dtype=np.int64)
    if side is not None and side.k == k and side.tau == tau and side.size == m and 2 * d <= m:
        # the blocked side's gaps are at hand: Σ_{i≠j} (K_ij − mean)² = ‖XᵀX‖²_F − Σ‖x_i‖⁴
        # − n_off·mean² (m·d² work, not a second m²·d pass over the kernel), unless it cancels
        gram = cross_moment(t, t)  # by row blocks: no float64 copy of the layer (m × d)
        sq_dev = float((gram * gram).sum()) - float((norms2**2).sum()) - n_off * mean * mean
        unresolved = _positions(side.unresolved[0])
    if not sq_dev > 1e-8 * n_off * mean * mean:
        sq_dev, parts = 0.0, []
        for start, rows in kernel_row_blocks(t):
            val, _, nxt = top_lists(rows, k, ordered=False)
            gap = val[:, k - 1].to(torch.float64) - nxt.to(torch.float64)
            parts.append(_positions(gap <= tau) + start)
            dev = rows.to(torch.float64) - mean
            sq_dev += float(torch.where(torch.isinf(rows), 0.0, dev * dev).sum())
        unresolved = np.concatenate(parts)
    return LayerDiagnostics(
        m=m,
        dim=d,
        k=k,
        tau=tau,
        cos_mean=mean,
        cos_sd=float(np.sqrt(sq_dev / (n_off - 1))),
        eff_dim=participation_ratio(t),
        unresolved=unresolved,
        duplicate_groups=duplicate_groups(t),
    )


def _positions(flags: torch.Tensor) -> np.ndarray:
    """Positions (int64, ascending) of the True entries of a 1-D flag tensor."""
    return torch.nonzero(flags).squeeze(1).cpu().numpy().astype(np.int64)


def diagnostics_table(
    items: Iterable[tuple[str, int, str, LayerDiagnostics]],
    stimulus_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Tidy table of (model, layer index, layer name, diagnostics): :data:`DIAGNOSTIC_COLUMNS`
    (``stimulus_ids``, in the layers' row order, name the unresolved stimuli)."""
    rows = [diag.row(model, layer, name, stimulus_ids) for model, layer, name, diag in items]
    return pd.DataFrame(rows, columns=DIAGNOSTIC_COLUMNS)
