"""Time GPA (and leave-one-model-out) as the number of stimuli m grows past the models' widths.

Planted shared structure as in benchmarks/analysis_scale.py's ``Synthetic``: a shared latent
S (m × 48) seen through a random map by every model, plus per-stimulus noise of scale σ_j.
Features are generated in float32 one model at a time, as a feature file would hold them.
Prints the stages' wall time, iterations, convergence, final objective and peak RSS, and with
``--plain`` the plain algorithm (no acceleration, products from the data, as before the
cross-product route) on the same input for comparison.

Run: .venv/bin/python benchmarks/gpa_scale.py [--m 4096] [--widths 1280,1536,1280,1280]
     [--loo [--loo-permutations 100]] [--plain] [--plain-max-iter 1000]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time

import xmodal

xmodal.configure_cpu_threads()  # before numpy starts its thread pool

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from xmodal.dispersion import leave_one_model_out  # noqa: E402
from xmodal.gpa import PLAIN, Preprocessed, fit_preprocessed, gpa, gpa_memory_mb  # noqa: E402
from xmodal.parallel import n_workers  # noqa: E402

D_SHARED = 48


class Planted:
    """Shared latent S (m × 48), per-stimulus dispersion σ_j ∈ [0.1, 1], per-model noise."""

    def __init__(self, m: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.m = m
        self.shared = rng.standard_normal((m, D_SHARED), dtype=np.float32)
        self.sigma = rng.uniform(0.1, 1.0, m).astype(np.float32)

    def model(self, index: int, width: int) -> np.ndarray:
        """Full-rank (m × width) float32 features: S A + 0.6 σ_j · noise."""
        rng = np.random.default_rng([self.seed, 1, index])
        a = rng.standard_normal((D_SHARED, width), dtype=np.float32) / np.sqrt(D_SHARED)
        x = self.shared @ a
        x += 0.6 * self.sigma[:, None] * rng.standard_normal((self.m, width), dtype=np.float32)
        return x


def peak_rss_gib() -> float:
    """Peak resident memory in GiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def cpu_s() -> float:
    """CPU seconds used by this process (all threads): on a loaded machine, a bound on what
    the wall time would be on a quiet one (cpu / cores)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=4096, help="number of stimuli")
    parser.add_argument("--widths", default="1280,1536,1280,1280", help="model widths")
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loo", action="store_true", help="also time leave-one-model-out")
    parser.add_argument(
        "--loo-permutations",
        type=int,
        default=100,
        help="its baseline of shuffled rows per held-out model (the workflow: analysis.n_random)",
    )
    parser.add_argument("--plain", action="store_true", help="also run the plain algorithm")
    parser.add_argument("--plain-max-iter", type=int, default=1000)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    widths = [int(w) for w in args.widths.split(",")]
    print(f"m={args.m} widths={widths} tol={args.tol:g} cores={len(os.sched_getaffinity(0))}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    t0 = time.perf_counter()
    data = Planted(args.m, args.seed)
    reps = [data.model(i, w) for i, w in enumerate(widths)]
    print(f"generate (synthetic, float32): {time.perf_counter() - t0:.1f} s")
    rss_data = peak_rss_gib()

    t0, c0 = time.perf_counter(), cpu_s()
    fit = gpa(reps, tol=args.tol, max_iter=args.max_iter)
    total, cpu = time.perf_counter() - t0, cpu_s() - c0
    rho = spearman(fit.residuals.mean(axis=1), data.sigma)
    print(
        f"gpa: {fit.method} iteration, products from the {fit.route}; "
        f"slow_regime={fit.slow_regime}, consensus width {fit.reduced_width}"
    )
    for stage, sec in fit.seconds.items():
        print(f"  {stage:<16}{sec:8.1f} s")
    print(f"  {'total':<16}{total:8.1f} s (CPU time {cpu:.1f} s)")
    print(
        f"  iterations {fit.n_iter} (rejected accelerated steps {fit.n_rejected}), "
        f"converged={fit.converged}, objective {fit.objective[-1]:.12f}"
    )
    print(f"  Spearman(mean residual, planted sigma) {rho:.4f}")
    print(f"  peak RSS {peak_rss_gib():.2f} GiB (after generating the data: {rss_data:.2f} GiB)")
    # what the workflow asks SLURM for (its estimate also counts the job's float64 read)
    print(f"  the GPA rules' memory estimate {gpa_memory_mb(args.m, widths) / 1024:.2f} GiB")

    if args.loo:
        del fit
        t0, c0 = time.perf_counter(), cpu_s()
        loo = leave_one_model_out(
            reps, tol=args.tol, max_iter=args.max_iter, n_permutations=args.loo_permutations
        )
        sec, cpu = time.perf_counter() - t0, cpu_s() - c0
        iters = [f.n_iter for f in loo.fits.values()]
        print(
            f"leave-one-model-out: {sec:.1f} s (CPU time {cpu:.1f} s); iterations {iters}; "
            f"converged {[f.converged for f in loo.fits.values()]}; "
            f"pearson r {' '.join(f'{r:.3f}' for r in loo.models['pearson_r'])}"
            + (
                f"; {args.loo_permutations} shuffles each, permutation p "
                f"{' '.join(f'{p:.3f}' for p in loo.models['perm_pearson_p'])}"
                if args.loo_permutations
                else ""
            )
        )
        print(f"  peak RSS {peak_rss_gib():.2f} GiB")
        workers = n_workers(len(widths), None)
        estimate = gpa_memory_mb(args.m, widths, workers) / 1024
        print(
            f"  the leave-one-model-out rule's memory estimate ({workers} threads) {estimate:.2f} GiB"
        )

    if args.plain:
        t0, c0 = time.perf_counter(), cpu_s()
        with threadpool_limits(limits=1, user_api="blas"):
            prep = Preprocessed(reps)
            mats = prep.mats()
            plain = fit_preprocessed(
                mats, args.tol, args.plain_max_iter, prep.widths, method=PLAIN, depth=0
            )
        print(
            f"plain (no acceleration, products from the data): {time.perf_counter() - t0:.1f} s "
            f"(CPU time {cpu_s() - c0:.1f} s); "
            f"iterations {plain.n_iter}, converged={plain.converged}, "
            f"objective {plain.objective[-1]:.12f}"
        )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
