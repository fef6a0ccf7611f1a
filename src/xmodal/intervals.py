"""The equal-tailed percentile interval of a bootstrap or random-draw distribution.

NumPy only, so that the steps that summarise draws (correlation intervals, summaries) need not
load torch, which the bootstrap itself (:mod:`xmodal.stats`) uses.
"""

from __future__ import annotations

import numpy as np

__all__ = ["percentile_interval"]


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Equal-tailed percentile interval ((1−level)/2, (1+level)/2) with linear interpolation.

    NaN when any value is not finite (or there are none): a distribution with undefined draws
    has no interval (docs/method.md, "Degenerate layers").
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
