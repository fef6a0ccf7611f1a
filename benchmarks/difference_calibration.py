"""How often the bootstrap interval of low − high (CKNNA) covers the difference it estimates.

Two populations of stimuli with a planted alignment: a shared latent z ~ N(0, I₄) seen by both
"models" through fixed random maps, X = zA + σε and Y = zB + σε′ (16 dimensions each), with
less noise σ for the low set than for the high one, so that the low set aligns better. Features
are prepared as the pipeline prepares them (``xmodal.metrics.prepare``: clamp, unit rows). The
estimated quantity is θ = E[CKNNA of K stimuli from the low population] − E[the same for the
high one], computed here by Monte Carlo over ``--truth`` fresh sets of each. Each simulation
draws one low and one high set of K stimuli and computes the pipeline's interval
(``xmodal.stats.bootstrap_difference``: stimuli resampled with replacement within each set,
95% percentile interval; docs/method.md, "Layer choice and statistics").

Printed per setting: θ; the SD of the point estimate over simulations (the real sampling SD)
and the mean bootstrap SD; the mean of the resampled differences minus the point estimate (the
bootstrap's bias); the coverage of θ (nominal 0.95) and the rate of intervals above 0 (with
σ_low = σ_high, the false-positive rate: nominal 0.025).

With ``--results results --dataset demo`` it measures the same on real features instead, for
every (vision, LLM) pair of a finished run at its chosen layers (CKNNA): the run's m stimuli
are the population, sets of K are drawn from them without replacement, and the bootstrap SD
of a set's CKNNA is compared with the SD over sets (a calibrated bootstrap would be
sqrt((m − 1)/(m − K)) times it, the finite population's correction).

    python benchmarks/difference_calibration.py [--reps 300] [--n-boot 200] [--truth 1000]
    python benchmarks/difference_calibration.py --results results --dataset demo [--set-size 120]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xmodal.metrics import cknna, prepare  # noqa: E402
from xmodal.stats import bootstrap_cknna, difference_summary  # noqa: E402

#: (K, σ_low, σ_high): a large and a moderate planted difference, and no difference, at set
#: sizes of the demo (120, and 60 for the held-out halves) and the paper setup (256)
SETTINGS = (
    (60, 1.0, 3.0), (60, 1.5, 2.0), (60, 2.0, 2.0),
    (120, 1.5, 2.0), (120, 2.0, 2.0),
    (256, 1.5, 2.0), (256, 2.0, 2.0),
)  # fmt: skip
LATENT, DIM, KNN_K = 4, 16, 10


def real_features(results: Path, dataset: str, set_size: int, reps: int, n_boot: int) -> None:
    """The bootstrap SD against the SD over sets of ``set_size`` of a run's own stimuli."""
    import pandas as pd

    from xmodal.features import FeatureFile

    layers = pd.read_csv(results / "alignment" / dataset / "layers.tsv", sep="\t")
    chosen = layers[(layers["metric"] == "cknna") & (layers["chosen"].astype(str) == "True")]

    def prepared(model: str, layer: int) -> np.ndarray:
        with FeatureFile(results / "features" / dataset / f"{model}.h5") as ff:
            return prepare(np.asarray(ff.layer(int(layer)), dtype=np.float32)).astype(np.float64)

    print(f"{dataset}: K = {set_size}, {reps} sets per pair for the SD over sets, "
          f"{min(reps, 40)} sets × {n_boot} resamples for the bootstrap SD")  # fmt: skip
    print("vision\tLLM\tSD over sets\tbootstrap SD\tratio\tcalibrated ratio")
    rng = np.random.default_rng(0)
    for r in chosen.itertuples():
        x, y = prepared(r.vision, r.vision_layer), prepared(r.llm, r.llm_layer)
        m = len(x)
        sets = [np.sort(rng.choice(m, set_size, replace=False)) for _ in range(reps)]
        sd = float(np.std([cknna(x[s], y[s], KNN_K) for s in sets], ddof=1))
        kx, ky = x @ x.T, y @ y.T
        boot = np.mean([
            np.std(bootstrap_cknna(kx, ky, s, n_boot, np.random.default_rng(i), KNN_K), ddof=1)
            for i, s in enumerate(sets[:40])
        ])  # fmt: skip
        print(f"{r.vision}\t{r.llm}\t{sd:.4f}\t{boot:.4f}\t{boot / sd:.2f}\t"
              f"{np.sqrt((m - 1) / (m - set_size)):.2f}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--truth", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, help="a finished run's results/ (real features)")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--set-size", type=int, default=120)
    args = parser.parse_args()
    if args.results is not None:
        real_features(args.results, args.dataset, args.set_size, args.reps, args.n_boot)
        return
    maps = np.random.default_rng([args.seed, 0]).normal(size=(2, LATENT, DIM))

    def draw(rng: np.random.Generator, n: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        z = rng.normal(size=(n, LATENT))
        x, y = (z @ a + sigma * rng.normal(size=(n, DIM)) for a in maps)
        return prepare(x).astype(np.float64), prepare(y).astype(np.float64)

    print(f"{args.reps} simulations per setting, {args.n_boot} resamples each, θ from "
          f"{args.truth} sets per side; k = {KNN_K}, nominal coverage 0.95")  # fmt: skip
    print("K\tσ_low\tσ_high\tθ\tsampling SD\tbootstrap SD\tratio\tbootstrap bias\t"
          "coverage\tinterval above 0")  # fmt: skip
    t0 = time.perf_counter()
    for n, s_low, s_high in SETTINGS:
        rng = np.random.default_rng([args.seed, n, round(100 * s_low), round(100 * s_high)])
        theta = np.mean([cknna(*draw(rng, n, s_low), KNN_K) for _ in range(args.truth)])
        theta -= np.mean([cknna(*draw(rng, n, s_high), KNN_K) for _ in range(args.truth)])
        points, sds, bias, covered, above = [], [], [], 0, 0
        for r in range(args.reps):
            xl, yl = draw(rng, n, s_low)
            xh, yh = draw(rng, n, s_high)
            x, y = np.vstack([xl, xh]), np.vstack([yl, yh])
            kx, ky = x @ x.T, y @ y.T
            low, high = np.arange(n), np.arange(n, 2 * n)
            point = cknna(xl, yl, KNN_K) - cknna(xh, yh, KNN_K)
            boot = np.random.default_rng(r)  # as bootstrap_difference(…, seed=r) draws
            diffs = bootstrap_cknna(kx, ky, low, args.n_boot, boot, KNN_K)
            diffs -= bootstrap_cknna(kx, ky, high, args.n_boot, boot, KNN_K)
            s = difference_summary(diffs)
            points.append(point)
            sds.append(s["boot_sd"])
            bias.append(diffs.mean() - point)
            covered += s["diff_ci_low"] <= theta <= s["diff_ci_high"]
            above += s["diff_ci_low"] > 0
        sd = float(np.std(points, ddof=1))
        print(f"{n}\t{s_low}\t{s_high}\t{theta:.4f}\t{sd:.4f}\t{np.mean(sds):.4f}\t"
              f"{np.mean(sds) / sd:.2f}\t{np.mean(bias):+.4f}\t{covered / args.reps:.3f}\t"
              f"{above / args.reps:.3f}", flush=True)  # fmt: skip
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
