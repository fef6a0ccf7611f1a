"""Time the whole analysis at the paper's real shapes (or any m) on synthetic features.

m = 1024 stimuli by default (``--m`` for any other); 4 vision models (one layer, widths
1280/1536/1280/1280); 12 LLMs with their real numbers of hidden states and widths. LLM layers are
generated one at a time from a seed (never all models at once), prepared, used and dropped.
Stages, through the same library calls as the workflow's jobs: GPA, leave-one-model-out,
selection, the vision models' bootstrap structures (once, as rule vision_bootstrap), the layer
search of each LLM against all 4 vision models (``alignment.layer_search_table``, with
stability) and the representation diagnostics of every LLM layer (``diagnostics.diagnose``),
every subset condition (low/high by rank and by PC1, random draws, drop-25%) with the bootstrap
of low − high (``alignment.condition_tables``, reusing the vision structures); the bytes of
LLM features the per-LLM jobs read, against what one job per (vision, LLM) pair would read; then
the straightforward way (kernels and kNN recomputed for every layer pair, HSIC as in the
reference code) on a slice.

Not included: the controls the default config also runs (held-out layer choice, size-matched
drop sets, self-selection; benchmarks/controls_scale.py times them per job) and the
language-side extensions. Its totals are the paper's analysis, not the default pipeline's.

Run: .venv/bin/python benchmarks/analysis_scale.py [--m 1024] [--n-boot 1000] [--llms bloomz-560m,...]
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from collections.abc import Iterator

import xmodal

xmodal.configure_cpu_threads()  # before numpy and torch start their thread pools

import numpy as np  # noqa: E402
import torch  # noqa: E402

from xmodal import alignment, diagnostics, metrics  # noqa: E402
from xmodal.dispersion import dispersion_table, leave_one_model_out  # noqa: E402
from xmodal.gpa import gpa  # noqa: E402
from xmodal.selection import make_sets  # noqa: E402

M = 1024
VISION = {"mae-h": 1280, "dinov2-g": 1536, "clip-h": 1280, "clip-h-ft": 1280}
LLMS = {  # key: (width, number of hidden states = layers + 1)
    "bloomz-560m": (1024, 25),
    "bloomz-1b1": (1536, 25),
    "bloomz-1b7": (2048, 25),
    "bloomz-3b": (2560, 31),
    "bloomz-7b1": (4096, 31),
    "open-llama-3b": (3200, 27),
    "open-llama-7b": (4096, 33),
    "open-llama-13b": (5120, 41),
    "llama-7b": (4096, 33),
    "llama-13b": (5120, 41),
    "llama-30b": (6656, 61),
    "llama-65b": (8192, 81),
}
D_SHARED, D_NOISE, D_LAYER = 48, 48, 64
# Synthetic data generation stands in for reading feature files (and their stored abs_q95):
# timed separately, and left out of the analysis total.
GEN_VISION = "generate vision (synthetic)"
GEN_LLM = "generate LLM layers + abs_q95 (synthetic)"


class Synthetic:
    """Planted structure: a shared latent S, per-stimulus dispersion σ_j, per-model noise."""

    def __init__(self, seed: int = 0, m: int = M) -> None:
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.m = m
        self.shared = rng.standard_normal((m, D_SHARED), dtype=np.float32)
        self.sigma = rng.uniform(0.1, 1.0, m).astype(np.float32)

    def vision(self, index: int, width: int) -> np.ndarray:
        """Full-rank (m × width) features: S A + σ_j · noise."""
        rng = np.random.default_rng([self.seed, 1, index])
        a = rng.standard_normal((D_SHARED, width), dtype=np.float32) / np.sqrt(D_SHARED)
        noise = rng.standard_normal((self.m, width), dtype=np.float32)
        return self.shared @ a + 0.6 * self.sigma[:, None] * noise

    def llm_layers(self, index: int, width: int, n_layers: int) -> Iterator[np.ndarray]:
        """Layers one at a time; alignment with S peaks at 2/3 depth; σ-scaled model noise."""
        rng = np.random.default_rng([self.seed, 2, index])
        model_noise = rng.standard_normal((self.m, D_NOISE), dtype=np.float32) * self.sigma[:, None]
        for layer in range(n_layers):
            lr = np.random.default_rng([self.seed, 3, index, layer])
            depth = layer / max(n_layers - 1, 1)
            a = 0.3 + np.exp(-((depth - 0.66) ** 2) / 0.05)
            latent = np.concatenate(
                [
                    a * self.shared,
                    model_noise,
                    0.5 * lr.standard_normal((self.m, D_LAYER), dtype=np.float32),
                ],
                axis=1,
            )
            w = lr.standard_normal((latent.shape[1], width), dtype=np.float32)
            yield latent @ w


def reference_cknna(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """The straightforward way, as in the Platonic Representation code (without its 1e-6)."""

    def hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        at, bt = a.clone().fill_diagonal_(0), b.clone().fill_diagonal_(0)
        return (
            torch.sum(at * bt.T)
            + torch.sum(at) * torch.sum(bt) / ((n - 1) * (n - 2))
            - 2 * torch.sum(torch.mm(at, bt)) / (n - 2)
        ) / (n * (n - 3))

    def sim(kk: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
        n = kk.shape[0]
        _, ik = torch.topk(kk.clone().fill_diagonal_(float("-inf")), k, dim=1)
        _, il = torch.topk(ll.clone().fill_diagonal_(float("-inf")), k, dim=1)
        mk = torch.zeros(n, n).scatter_(1, ik, 1)
        ml = torch.zeros(n, n).scatter_(1, il, 1)
        mask = mk * ml
        return hsic(mask * kk, mask * ll)

    kk, ll = x @ x.T, y @ y.T
    return float(sim(kk, ll) / torch.sqrt(sim(kk, kk) * sim(ll, ll)))


def _report(
    times: dict[str, float],
    total: float,
    n_pairs: int,
    n_layers: int,
    n_vision: int,
    read_per_llm: int,
    read_per_pair: int,
) -> None:
    print(f"\n{'stage':<46}{'seconds':>8}")
    for name, sec in times.items():
        print(f"  {name:<44}{sec:8.2f}")
    print(f"  {'total':<44}{total:8.2f}")
    synth = times[GEN_VISION] + times[GEN_LLM]
    print(f"  {'analysis (total without generation)':<44}{total - synth:8.2f}")
    print(
        f"pairs: {n_pairs}; LLM layers scanned: {n_layers}; "
        f"layer-search CKNNA evaluations: {n_layers * n_vision}"
    )
    print(
        f"LLM features read: one job per LLM {read_per_llm / 2**30:.2f} GiB; one job per pair "
        f"would read {read_per_pair / 2**30:.2f} GiB ({read_per_pair / max(read_per_llm, 1):.1f}x)"
    )
    print(f"peak RSS: {peak_rss_gb():.2f} GB")


def _contrast_lines(contrasts: list) -> None:
    import pandas as pd

    c = pd.concat(contrasts, ignore_index=True)
    for summary, g in c.groupby("summary"):
        print(
            f"contrast {summary}: low>random_mean>high in "
            f"{int(((g.low > g.random_mean) & (g.random_mean > g.high)).sum())}/{len(g)} pairs; "
            f"median low-high {g.diff_low_high.median():.3f}; "
            f"CI excludes 0 in {int((g.diff_ci_low > 0).sum())}/{len(g)}"
        )


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=M, help="number of stimuli")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--n-random", type=int, default=100)
    parser.add_argument("--set-size", type=int, default=None, help="default: m / 4")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--llms", default=",".join(LLMS), help="comma-separated subset of LLM keys")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings of the slice comparison (best is kept)"
    )
    parser.add_argument("--no-slice", action="store_true", help="skip the straightforward slice")
    parser.add_argument(
        "--timed-resamples",
        type=int,
        default=20,
        help="bootstrap resamples per set timed for the straightforward conditions",
    )
    args = parser.parse_args()
    m = args.m
    set_size = args.set_size or m // 4
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("xmodal.alignment").setLevel(logging.ERROR)
    device = alignment.default_device()
    print(f"device: {device}; torch threads: {torch.get_num_threads()}; m={m}; k={args.k}")
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    data = Synthetic(0, m)
    ids = [f"s{j:05d}" for j in range(m)]

    t0 = time.perf_counter()
    raw_vision = [data.vision(i, w) for i, w in enumerate(VISION.values())]
    times[GEN_VISION] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vision = {key: (30, metrics.prepare(x)) for key, x in zip(VISION, raw_vision, strict=True)}
    vision_x = [x for _, x in vision.values()]
    times["prepare vision (clamp, l2)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fit = gpa(raw_vision)
    times["gpa"] = time.perf_counter() - t0
    print(f"gpa: n_iter={fit.n_iter} converged={fit.converged} slow_regime={fit.slow_regime}")

    t0 = time.perf_counter()
    # with its baseline of shuffled rows, as the workflow runs it (analysis.n_random shuffles)
    loo = leave_one_model_out(
        raw_vision, names=list(VISION), stimulus_ids=ids, n_permutations=args.n_random
    )
    times["leave-one-model-out (4 fits)"] = time.perf_counter() - t0
    print("loo pearson r:", " ".join(f"{r:.3f}" for r in loo.models["pearson_r"]))
    del raw_vision

    t0 = time.perf_counter()
    table, explained = dispersion_table(ids, fit.residuals)
    sets = make_sets(
        ids, table["mean_dispersion"], table["pc1_score"], set_size, args.n_random, 0.25, 0
    )
    times["selection (rank, pc1, sets)"] = time.perf_counter() - t0
    rho = np.corrcoef(
        np.argsort(np.argsort(table["mean_dispersion"])), np.argsort(np.argsort(data.sigma))
    )[0, 1]
    print(
        f"pc1 explained variance {explained:.3f}; Spearman(mean dispersion, planted sigma) {rho:.3f}"
    )

    # the vision models' bootstrap structures, once for every LLM (rule vision_bootstrap)
    t0 = time.perf_counter()
    plan = alignment.ConditionPlan(sets, ids, k=args.k, n_boot=args.n_boot, seed=0)
    boot_cache: dict = {}
    for _, x in vision.values():
        plan.bootstrap_sides(x, cache=boot_cache)
    times["vision bootstrap structures (once)"] = time.perf_counter() - t0
    del plan

    times["layer search (per LLM, stability)"] = 0.0
    times["diagnostics of every LLM layer"] = 0.0
    times["conditions (per LLM, bootstrap)"] = 0.0
    times[GEN_LLM] = 0.0
    times["prepare LLM layers (clamp, l2)"] = 0.0
    n_pairs = n_layers_total = 0
    read_per_llm = read_per_pair = 0  # bytes of LLM features (float32, as in the files)
    contrasts = []
    llm_keys = [key for key in args.llms.split(",") if key]
    for li, key in enumerate(llm_keys):
        width, n_layers = LLMS[key]
        layer_bytes = m * width * 4
        # synthetic stand-in for the file's stored abs_q95 (computed at extraction time)
        t0 = time.perf_counter()
        first = next(data.llm_layers(li, width, n_layers))
        threshold = metrics.threshold_from_quantiles(metrics.abs_quantiles(first))
        del first
        times[GEN_LLM] += time.perf_counter() - t0
        pulled = [0]

        def layers(li=li, width=width, n_layers=n_layers, threshold=threshold, pulled=pulled):
            gen = data.llm_layers(li, width, n_layers)
            for layer in range(n_layers):
                t0 = time.perf_counter()
                raw = next(gen)
                tg = time.perf_counter()
                y = metrics.prepare_layer(raw, threshold)
                del raw
                t1 = time.perf_counter()
                times[GEN_LLM] += tg - t0
                times["prepare LLM layers (clamp, l2)"] += t1 - tg
                times["layer search (per LLM, stability)"] -= t1 - t0  # not layer-search time
                pulled[0] += 1
                yield layer, f"layers.{layer}", y

        def diagnose(index, name, y, side):  # as the pipeline does: from the search's kernel
            t0 = time.perf_counter()
            diagnostics.diagnose(y, args.k, side=side)
            dt = time.perf_counter() - t0
            times["diagnostics of every LLM layer"] += dt
            times["layer search (per LLM, stability)"] -= dt

        t0 = time.perf_counter()
        search = alignment.layer_search_table(
            vision, key, layers(), k=args.k, device=device, on_layer=diagnose
        )
        times["layer search (per LLM, stability)"] += time.perf_counter() - t0
        n_layers_total += pulled[0]
        chosen = {
            (r.vision, r.metric): int(r.llm_layer) for r in search[search["chosen"]].itertuples()
        }
        requested: list[int] = []

        def llm_layer(
            index, li=li, width=width, n_layers=n_layers, threshold=threshold, requested=requested
        ):
            t0 = time.perf_counter()
            gen = data.llm_layers(li, width, n_layers)
            for _ in range(index):
                next(gen)
            raw = next(gen)
            times[GEN_LLM] += time.perf_counter() - t0
            times["conditions (per LLM, bootstrap)"] -= time.perf_counter() - t0
            requested.append(index)
            return metrics.prepare_layer(raw, threshold)

        t0 = time.perf_counter()
        _, contrast = alignment.condition_tables(
            vision, key, chosen, llm_layer, sets, ids, k=args.k, n_boot=args.n_boot, seed=0,
            boot_cache=boot_cache,
        )  # fmt: skip
        times["conditions (per LLM, bootstrap)"] += time.perf_counter() - t0
        contrasts.append(contrast)
        n_pairs += len(vision)
        # one job per LLM and stage: every layer once, then each distinct chosen layer once;
        # one job per (vision, LLM) pair: every layer and the pair's chosen layer, per vision model
        read_per_llm += (pulled[0] + len(set(requested))) * layer_bytes
        read_per_pair += len(vision) * (n_layers + 1) * layer_bytes
    total = time.perf_counter() - t_all
    if args.no_slice:
        _report(times, total, n_pairs, n_layers_total, len(vision_x), read_per_llm, read_per_pair)
        _contrast_lines(contrasts)
        return 0

    # straightforward way on a slice: 2 layers each of a small, a mid and the largest LLM
    # (mean width 4779, close to the grid's mean layer width 4775), against every vision model
    slice_layers = []
    slice_keys = ["bloomz-560m", "llama-13b", "llama-65b"]
    for key in slice_keys:
        li = list(LLMS).index(key)
        width, n_layers = LLMS[key]
        first = next(data.llm_layers(li, width, n_layers))
        threshold = metrics.threshold_from_quantiles(metrics.abs_quantiles(first))
        gen = data.llm_layers(li, width, n_layers)
        slice_layers += [metrics.prepare_layer(next(gen), threshold) for _ in range(2)]
    n_slice = len(slice_layers)
    key = "+".join(slice_keys)
    t_ref = t_fast = float("inf")
    for _ in range(args.repeats):  # best of a few: the fast slice is short and easily disturbed
        t0 = time.perf_counter()
        ref = [
            [
                reference_cknna(torch.from_numpy(v), torch.from_numpy(y), args.k)
                for y in slice_layers
            ]
            for v in vision_x
        ]
        t_ref = min(t_ref, time.perf_counter() - t0)
        t0 = time.perf_counter()
        fast = alignment.layer_search_many(vision_x, iter(slice_layers), args.k, device)
        t_fast = min(t_fast, time.perf_counter() - t0)
    max_diff = float(np.max(np.abs(np.asarray(ref) - fast)))

    _report(times, total, n_pairs, n_layers_total, len(vision_x), read_per_llm, read_per_pair)
    print(
        f"straightforward slice ({len(vision_x)} vision x {n_slice} layers, 2 of each of {key}; "
        f"best of {args.repeats}): "
        f"{t_ref:.2f} s vs fast {t_fast:.2f} s -> {t_ref / t_fast:.1f}x (max |diff| {max_diff:.1e})"
    )
    per_pair = t_ref / (len(vision_x) * n_slice)
    search_ref = per_pair * n_layers_total * len(vision_x)
    print(
        f"straightforward grid extrapolated: {search_ref:.0f} s "
        f"vs measured fast layer search {times['layer search (per LLM, stability)']:.1f} s"
    )
    cond_ref = straightforward_conditions(
        vision_x[0], slice_layers[-1], sets, ids, args.k, args.n_boot, args.timed_resamples
    )
    rest = sum(
        times[s] for s in ("gpa", "leave-one-model-out (4 fits)", "selection (rank, pc1, sets)")
    )
    whole_ref = search_ref + cond_ref * n_pairs + rest
    analysis = total - times[GEN_VISION] - times[GEN_LLM]
    print(
        f"straightforward conditions, one pair: {cond_ref:.1f} s (every set's CKNNA from its rows, "
        f"the bootstrap from each resample's rows; {args.timed_resamples} resamples per set timed)"
    )
    print(
        f"straightforward whole analysis extrapolated: {whole_ref:.0f} s (layer search "
        f"{search_ref:.0f} + conditions {cond_ref * n_pairs:.0f} over {n_pairs} pairs + GPA, "
        f"leave-one-model-out and selection as measured {rest:.0f}) vs measured analysis "
        f"{analysis:.0f} s -> {whole_ref / analysis:.1f}x"
    )
    _contrast_lines(contrasts)
    return 0


def straightforward_conditions(
    x: np.ndarray,
    y: np.ndarray,
    sets,
    ids: list[str],
    k: int,
    n_boot: int,
    n_timed: int,
) -> float:
    """Seconds of one pair's conditions the per-pair way: the reference CKNNA of every set of
    sets.tsv from its rows, and of each bootstrap resample (rows drawn with replacement) of the
    low and high sets, timed on ``n_timed`` resamples per set and scaled to ``n_boot``."""
    from xmodal.selection import sets_to_indices

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    given = sets_to_indices(sets, ids)
    t0 = time.perf_counter()
    for pos in given.values():
        idx = torch.as_tensor(pos)
        reference_cknna(xt[idx], yt[idx], k)
    fixed = time.perf_counter() - t0
    boot_sets = [pos for (name, summary, _), pos in given.items() if name in ("low", "high")]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for pos in boot_sets:
        for _ in range(n_timed):
            idx = torch.as_tensor(pos[rng.integers(0, len(pos), len(pos))])
            reference_cknna(xt[idx], yt[idx], k)
    boot = (time.perf_counter() - t0) * n_boot / max(n_timed, 1)
    return fixed + boot


if __name__ == "__main__":
    sys.exit(main())
