"""How often a 95% bootstrap interval of Spearman's ρ excludes 0 when nothing correlates.

The property marks g of n stimuli (g ones, n − g zeros: a flag column of the manifest, or any
property whose values are mostly one number) and the dispersion is independent noise, so an
interval should exclude 0 in about 5% of simulations. Printed per (n, g): that rate for the
percentile interval over the resamples that give a number (what ``correlation_ci`` computed for
every property before ``MIN_OUTSIDE_MODE``), the share of resamples left out (a constant
property), and the rate of scipy's p < 0.05. The interval is calibrated from about g = 10
(``xmodal.correlate.MIN_OUTSIDE_MODE``; docs/method.md, "Correlations and their intervals").

    python benchmarks/correlation_calibration.py [--reps 300] [--n-boot 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xmodal.correlate import MIN_OUTSIDE_MODE, bootstrap_coefficients  # noqa: E402
from xmodal.intervals import percentile_interval  # noqa: E402


def rates(n: int, g: int, reps: int, n_boot: int, seed: int) -> tuple[float, float, float]:
    """(interval excludes 0, resamples left out, p < 0.05), each a fraction over ``reps``."""
    rng = np.random.default_rng([seed, n, g])
    x = np.zeros(n)
    x[:g] = 1.0
    excludes = left_out = significant = 0.0
    for r in range(reps):
        y = rng.random(n)
        boot = bootstrap_coefficients(x, y, "spearman", n_boot, r)
        used = boot[np.isfinite(boot)]
        left_out += 1 - used.size / n_boot
        if used.size:
            lo, hi = percentile_interval(used, 0.95)
            excludes += lo > 0 or hi < 0
        significant += scipy.stats.spearmanr(x, y).pvalue < 0.05
    return excludes / reps, left_out / reps, significant / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--n", type=int, nargs="+", default=[40, 100, 400])
    parser.add_argument("--g", type=int, nargs="+", default=[1, 2, 3, 5, 8, 10, 15, 20])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"MIN_OUTSIDE_MODE = {MIN_OUTSIDE_MODE}; {args.reps} simulations per row, "
          f"{args.n_boot} resamples each; nominal rate 0.05")  # fmt: skip
    print("n\tg\tinterval excludes 0\tresamples left out\tp < 0.05")
    t0 = time.perf_counter()
    for n in args.n:
        for g in args.g:
            if g < n:
                ex, out, sig = rates(n, g, args.reps, args.n_boot, args.seed)
                print(f"{n}\t{g}\t{ex:.3f}\t{out:.3f}\t{sig:.3f}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
