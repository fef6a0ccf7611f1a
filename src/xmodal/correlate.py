"""Correlation of two per-stimulus quantities with a bootstrap interval over stimuli.

Used for language vs vision dispersion and for stimulus properties vs dispersion
(docs/method.md, "Correlations and their intervals"). The estimate and its p-value are
scipy's (``scipy.stats.spearmanr`` / ``pearsonr``). The interval resamples stimuli (pairs)
with replacement ``n_boot`` times from ``numpy.random.default_rng(seed)``, recomputes the
coefficient on each resample (Spearman: average ranks of the resample, as scipy ranks ties)
and takes the equal-tailed percentile interval (:func:`xmodal.intervals.percentile_interval`).
Up to :data:`EXACT_P_MAX_N` stimuli the p-value is the exact permutation p instead: scipy's
approximation gave p = 0 for ρ = 1 on 3 stimuli, whose exact p is 1/3. A variable for which
fewer than :data:`MIN_OUTSIDE_MODE` stimuli differ from its most common value gets no interval.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import scipy.stats

from xmodal.intervals import percentile_interval

__all__ = [
    "EXACT_P_MAX_N",
    "METHODS",
    "MIN_OUTSIDE_MODE",
    "bootstrap_coefficients",
    "correlation_ci",
    "outside_mode",
]

#: Correlation coefficients this module computes.
METHODS = ("spearman", "pearson")
_BLOCK_ELEMS = 1 << 22  # resampled values held at once (n_boot is processed in blocks)
#: Up to this many stimuli the p-value enumerates all n! pairings (8! = 40320: a fraction of a
#: second; 9! took seconds per coefficient). Above, scipy's t (Pearson) or t-approximation
#: (Spearman) p-value, within a few per cent of the exact one at n = 8 already except in the far
#: tail (|ρ| near 1), where the Spearman p is floored at the smallest a permutation p can be
#: (:func:`smallest_permutation_p`: 2/n! without ties).
EXACT_P_MAX_N = 8
#: Fewest stimuli that must differ from a variable's most common value for a bootstrap interval
#: (docs/method.md, "Correlations and their intervals"). With fewer, the percentile interval
#: follows how many copies of those few stimuli each resample happens to hold: for a property
#: that marks g of 100 stimuli and is unrelated to y, the 95% interval excluded 0 in 82% of
#: simulations at g = 1, 36% at 2, 20% at 3, 12% at 5, 7–8% from 8 to 20 and 6% at 50, while
#: scipy's p < 0.05 stayed at 4–6% (benchmarks/correlation_calibration.py).
MIN_OUTSIDE_MODE = 10


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of (B, n) arrays; NaN where a row is constant.

    Constant rows are found by exact comparison: centring a row of equal values (0.3, 0.3, …)
    leaves ±1e-17 where its float mean is off in the last bit, which gave r ≈ 0, not NaN."""
    constant = (a == a[:, :1]).all(axis=1) | (b == b[:, :1]).all(axis=1)
    ac = a - a.mean(axis=1, keepdims=True)
    bc = b - b.mean(axis=1, keepdims=True)
    num = np.einsum("ij,ij->i", ac, bc)
    den = np.sqrt(np.einsum("ij,ij->i", ac, ac) * np.einsum("ij,ij->i", bc, bc))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[~(den > 0) | constant] = np.nan
    return np.clip(r, -1.0, 1.0)


def _blocks(n_boot: int, n: int) -> Iterator[int]:
    step = max(1, _BLOCK_ELEMS // max(1, n))
    done = 0
    while done < n_boot:
        yield min(step, n_boot - done)
        done += step


def bootstrap_coefficients(
    x: np.ndarray, y: np.ndarray, method: str, n_boot: int, seed: int
) -> np.ndarray:
    """The coefficient on ``n_boot`` resamples of the pairs (x_j, y_j) with replacement: (n_boot,).

    Resample b draws n indices uniformly with replacement (``default_rng(seed).integers``, one
    (block, n) draw after another); Spearman ranks each resample anew (average ranks for ties,
    copies of a stimulus are ties). A resample in which x or y is constant gives NaN.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    rng = np.random.default_rng(seed)
    out = []
    for b in _blocks(int(n_boot), n):
        idx = rng.integers(0, n, size=(b, n))
        xs, ys = x[idx], y[idx]
        if method == "spearman":
            xs = scipy.stats.rankdata(xs, axis=1)
            ys = scipy.stats.rankdata(ys, axis=1)
        out.append(_rowwise_pearson(xs, ys))
    return np.concatenate(out) if out else np.empty(0)


def outside_mode(v: np.ndarray) -> tuple[int, float]:
    """How many values differ from the most common one, and that value (the smallest of equally
    common ones): (n − its count, value). Exact comparison, as ties are ranked."""
    values, counts = np.unique(np.asarray(v, dtype=np.float64), return_counts=True)
    top = int(np.argmax(counts))
    return int(counts.sum() - counts[top]), float(values[top])


def exact_permutation_p(x: np.ndarray, y: np.ndarray, method: str = "spearman") -> float:
    """The two-sided exact permutation p of Pearson's r of ``x`` and ``y`` (``spearman``: of
    their average ranks) over all n! pairings: min(1, 2·min(P(S ≥ s), P(S ≤ s))), S = Σ x_i y_π(i)
    and s the observed one (S orders the pairings as r does, the marginals being fixed).

    Ranks are compared in integers (doubled average ranks), so a pairing whose ρ equals the
    observed one counts on both sides exactly; scipy's permutation p compares with a tolerance
    relative to the observed r, none at r = 0, and missed pairings at ±1e-17 (p 0.95 for an
    exact 1, audit). Pearson's values are compared within rounding of S.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    if method == "spearman":  # doubled average ranks: integers, centred at n + 1
        xc = (2 * scipy.stats.rankdata(x)).astype(np.int64) - (n + 1)
        yv = (2 * scipy.stats.rankdata(y)).astype(np.int64)
        tol = 0
    else:
        xc, yv = x - x.mean(), y
        tol = 16 * n * np.finfo(np.float64).eps * float(np.abs(xc).max() * np.abs(yv).max())
    pairings = np.fromiter(
        itertools.chain.from_iterable(itertools.permutations(range(n))), np.int64
    ).reshape(-1, n)
    stats = yv[pairings] @ xc
    observed = yv @ xc
    greater = np.count_nonzero(stats >= observed - tol)
    less = np.count_nonzero(stats <= observed + tol)
    return float(min(1.0, 2 * min(greater, less) / len(pairings)))


def smallest_permutation_p(x: np.ndarray, y: np.ndarray) -> float:
    """The smallest two-sided permutation p a rank correlation of ``x`` and ``y`` can have: the
    share of the n! pairings of x with y whose |ρ| reaches the largest or the smallest ρ.

    Only the pairing that sorts both in the same order reaches the largest ρ, and the one that
    sorts them in opposite orders the smallest, up to reorderings within tie groups: a sorted
    pairing whose cells (equal x and equal y) hold c stimuli each is reached by
    ∏t_x!·∏t_y!/∏c! pairings (t: the tie groups' sizes). Without ties this is 2/n!. Where both
    ends' |ρ| are equal (no ties, or a tie structure that is its own mirror image) a p counts
    both ends. Checked by brute force over all 9! pairings (tests/test_properties.py).
    """
    n = len(x)
    xs, ys = np.sort(np.asarray(x, np.float64)), np.sort(np.asarray(y, np.float64))

    def log_factorials(v: np.ndarray, axis: int | None = None) -> float:
        counts = np.unique(v, return_counts=True, axis=axis)[1]
        return float(sum(math.lgamma(c + 1) for c in counts))

    groups = log_factorials(xs) + log_factorials(ys)
    rx, ry = scipy.stats.rankdata(xs), scipy.stats.rankdata(ys)
    ends = []
    for y_end, ry_end in ((ys, ry), (ys[::-1], ry[::-1])):  # the largest ρ, the smallest
        rho = float(np.corrcoef(rx, ry_end)[0, 1])
        ends.append((abs(rho), groups - log_factorials(np.stack([xs, y_end]), axis=1)))
    (top, log_top), (bottom, log_bottom) = ends
    # both ends reach the same |ρ| (to rounding): a p at either counts both
    both = math.isclose(top, bottom, rel_tol=1e-12, abs_tol=1e-12)
    # else a p at the end of larger |ρ| counts only its pairings, at the other end both ends'
    log_count = (
        float(np.logaddexp(log_top, log_bottom))
        if both
        else (log_top if top > bottom else log_bottom)
    )
    return min(1.0, math.exp(log_count - math.lgamma(n + 1)))


def correlation_ci(
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: str = "spearman",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    names: tuple[str, str] = ("x", "y"),
) -> dict[str, float | int | str]:
    """Correlation of x and y over stimuli, its p-value and a bootstrap percentile interval.

    Pairs where x or y is not finite are left out (``n`` counts those used). Returns
    ``estimate``, ``ci_low``, ``ci_high``, ``p_value``, ``n``, ``n_boot`` (resamples that gave a
    number; the others, with a constant variable, are left out of the interval) and ``reason``:
    empty, or why the estimate is NaN (fewer than 3 stimuli, a constant variable) or the
    interval is (fewer than :data:`MIN_OUTSIDE_MODE` stimuli differ from a variable's most
    common value; no resample gave a number). ``names`` name x and y in the reason.
    ``n_boot=0`` gives the estimate without an interval.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be ≥ 0, got {n_boot}")
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y have {x.size} and {y.size} values")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    nan = math.nan
    out: dict[str, float | int | str] = {
        "estimate": nan,
        "ci_low": nan,
        "ci_high": nan,
        "p_value": nan,
        "n": n,
        "n_boot": 0,
        "reason": "",
    }
    if n < 3:
        out["reason"] = f"{n} stimuli with finite values (need 3)"
        return out
    constant = [name for name, v in zip(names, (x, y), strict=True) if np.all(v == v[0])]
    if constant:
        out["reason"] = f"constant {' and '.join(constant)}"
        return out
    res = scipy.stats.spearmanr(x, y) if method == "spearman" else scipy.stats.pearsonr(x, y)
    out["estimate"] = float(res.statistic)
    out["p_value"] = float(res.pvalue)
    if n <= EXACT_P_MAX_N:  # Spearman: Pearson's r of the average ranks
        out["p_value"] = exact_permutation_p(x, y, method)
    elif method == "spearman":
        # the t approximation gives 0 at |ρ| = 1 from 9 stimuli on: no permutation p is below
        # the smallest permutation p (docs/method.md, "Correlations and their intervals")
        out["p_value"] = max(float(res.pvalue), smallest_permutation_p(x, y))
    few = [(name, *outside_mode(v)) for name, v in zip(names, (x, y), strict=True)]
    few = [f for f in few if f[1] < MIN_OUTSIDE_MODE]
    if n_boot and few:
        out["reason"] = (
            "no interval: "
            + "; ".join(
                f"only {g} of {n} stimuli differ from the {name}'s most common value ({value:.6g})"
                for name, g, value in few
            )
            + f", and a bootstrap interval needs {MIN_OUTSIDE_MODE}"
        )
    elif n_boot:
        boot = bootstrap_coefficients(x, y, method, n_boot, seed)
        used = boot[np.isfinite(boot)]  # a resample with a constant variable gives no number
        if used.size:
            lo, hi = percentile_interval(used, level)
            out.update(ci_low=lo, ci_high=hi)
        else:
            out["reason"] = f"none of the {n_boot} resamples gave a number"
        out["n_boot"] = int(used.size)
    return out
