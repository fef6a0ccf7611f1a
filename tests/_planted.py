"""Planted ground truth for GPA and dispersion tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import ortho_group


def planted_reps(
    rng: np.random.Generator, m: int, d: int, widths: Sequence[int], max_noise: float
) -> tuple[list[np.ndarray], np.ndarray]:
    """Rotated copies of one m×d configuration, each stimulus j perturbed by noise of norm
    σ_j·‖x_j‖ (σ_j uniform in [0, max_noise]); returns the models and σ."""
    x = rng.standard_normal((m, d))
    sigma = rng.uniform(0.0, max_noise, m)
    reps = []
    for w in widths:
        q = ortho_group.rvs(w, random_state=rng)[:d]
        e = rng.standard_normal((m, w))
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        reps.append(x @ q + sigma[:, None] * np.linalg.norm(x, axis=1, keepdims=True) * e)
    return reps, sigma
