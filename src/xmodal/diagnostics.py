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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from xmodal.metrics import feature_tensor, kernel_resolution, kernel_row_blocks, top_lists

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
COLLAPSED_UNRESOLVED = 0.5
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
]


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

    def row(self, model: str, layer: int, layer_name: str) -> dict[str, object]:
        """One row of :func:`diagnostics_table`."""
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
        }


def participation_ratio(x: np.ndarray | torch.Tensor) -> float:
    """(Σλ)²/Σλ² of the spectrum of C = X_cᵀX_c (column-centred X), in float64.

    = tr(C)²/‖C‖²_F, computed from the smaller Gram matrix (d×d by row blocks, or m×m); NaN
    when X_c = 0.
    """
    t = feature_tensor(x)
    m, d = t.shape
    mean = t.to(torch.float64).mean(dim=0)
    if d <= m:
        g = torch.zeros((d, d), dtype=torch.float64, device=t.device)
        step = max(1, (1 << 24) // max(d, 1))
        for start in range(0, m, step):
            xb = t[start : start + step].to(torch.float64) - mean
            g += xb.T @ xb
    else:
        xc = t.to(torch.float64) - mean
        g = xc @ xc.T
    trace = float(torch.diagonal(g).sum())
    frob2 = float((g * g).sum())
    return trace * trace / frob2 if frob2 > 0 else float("nan")


def duplicate_groups(x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
    """Groups (positions, ascending, ≥ 2 each) of rows that are exactly equal, in order of first row."""
    a = feature_tensor(x).cpu().numpy()
    _, inverse, counts = np.unique(a, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    groups = [np.flatnonzero(inverse == g) for g in np.flatnonzero(counts > 1)]
    return tuple(sorted(groups, key=lambda g: int(g[0])))


def diagnose(
    x: np.ndarray | torch.Tensor,
    k: int = 10,
    tau: float | None = None,
    device: torch.device | None = None,
) -> LayerDiagnostics:
    """Diagnostics of one prepared layer (m, d) with l2-normalised rows (see the module docstring).

    ``tau`` defaults to ``kernel_resolution(d, dtype)``; the kernel is visited by row blocks.
    """
    t = feature_tensor(x, device)
    m, d = t.shape
    if m < 3 or not 1 <= k <= m - 2:
        raise ValueError(f"need m ≥ 3 and 1 ≤ k ≤ m − 2 (a (k+1)-th neighbour), got m={m}, k={k}")
    tau = kernel_resolution(d, t.dtype) if tau is None else float(tau)
    col = t.to(torch.float64).sum(dim=0)
    norms2 = (t.to(torch.float64) ** 2).sum(dim=1)
    n_off = m * (m - 1)
    mean = (float(col @ col) - float(norms2.sum())) / n_off  # Σ_{i≠j} K_ij = ‖1ᵀX‖² − Σ‖x_i‖²
    sq_dev = 0.0
    unresolved = []
    for start, rows in kernel_row_blocks(t):
        val, _, nxt = top_lists(rows, k, ordered=False)
        gap = val[:, k - 1].to(torch.float64) - nxt.to(torch.float64)
        unresolved.append(torch.nonzero(gap <= tau).squeeze(1).cpu() + start)
        dev = rows.to(torch.float64) - mean
        sq_dev += float(torch.where(torch.isinf(rows), 0.0, dev * dev).sum())
    return LayerDiagnostics(
        m=m,
        dim=d,
        k=k,
        tau=tau,
        cos_mean=mean,
        cos_sd=float(np.sqrt(sq_dev / (n_off - 1))),
        eff_dim=participation_ratio(t),
        unresolved=torch.cat(unresolved).numpy().astype(np.int64),
        duplicate_groups=duplicate_groups(t),
    )


def diagnostics_table(items: Iterable[tuple[str, int, str, LayerDiagnostics]]) -> pd.DataFrame:
    """Tidy table of (model, layer index, layer name, diagnostics): :data:`DIAGNOSTIC_COLUMNS`."""
    rows = [diag.row(model, layer, name) for model, layer, name, diag in items]
    return pd.DataFrame(rows, columns=DIAGNOSTIC_COLUMNS)
