"""Time the controls at the paper's shapes on synthetic features (the cost docs/method.md states).

One LLM against 4 vision models (widths 1280/1536/1280/1280), m = 1024 stimuli:

- the layer search of one LLM (``--layers`` layers of width ``--width``; LLaMA-7b: 33 × 4096,
  LLaMA-65b: 81 × 8192) without and with the held-out choice on ``--n-splits`` halves;
- one conditions job (K = 256, 100 random sets, the drop sets, n_boot = 1000) without and with
  the size-matched drop control (100 random sets of 768);
- the held-out evaluation of one conditions job (``--n-splits`` splits, sets of 128 inside each
  half B, 100 random sets each), with one or two distinct LLM layers.

The work per job does not depend on the number of LLMs (one job per LLM). Prints wall times
and the peak RSS; the machine's load changes them (report ``uptime`` with them).

Run: .venv/bin/python benchmarks/controls_scale.py [--m 1024] [--layers 33] [--width 4096]
"""

from __future__ import annotations

import argparse
import resource
import time

import xmodal

xmodal.configure_cpu_threads()  # before numpy and torch start their thread pools

import numpy as np  # noqa: E402
import torch  # noqa: E402

from xmodal import alignment, metrics, selection  # noqa: E402

VISION_WIDTHS = [1280, 1536, 1280, 1280]


def _timed(label: str, fn, timings: dict):
    t0 = time.perf_counter()
    out = fn()
    timings[label] = time.perf_counter() - t0
    print(f"{label:64s} {timings[label]:8.1f} s", flush=True)
    return out


def _prepared(rng, shared, sigma, width):
    m, d = shared.shape
    x = shared @ (rng.standard_normal((d, width)) / np.sqrt(d))
    x = (x + 0.6 * sigma[:, None] * rng.standard_normal((m, width))).astype(np.float32)
    t = metrics.threshold_from_quantiles(np.quantile(np.abs(x), 0.95, axis=1))
    return metrics.prepare_layer(x, t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=33)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--n-splits", type=int, default=20)
    ap.add_argument("--n-random", type=int, default=100)
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    m, rng, t = args.m, np.random.default_rng(0), {}
    ids = [f"s{j:05d}" for j in range(m)]
    shared = rng.standard_normal((m, 48))
    sigma = rng.uniform(0.1, 1.0, m)
    vision = {f"v{i}": (0, _prepared(rng, shared, sigma, w)) for i, w in enumerate(VISION_WIDTHS)}
    # a few distinct layers, reused: generating 81 layers of 8192 would dominate the run
    pool = [_prepared(rng, shared, sigma * (1 + 0.3 * i), args.width) for i in range(3)]

    def layers():
        for i in range(args.layers):
            yield i, f"layers.{i}", pool[i % len(pool)]

    cpu = torch.device("cpu")
    lab = f"layer search, {args.layers} layers x {args.width}"
    _timed(f"{lab}", lambda: alignment.layer_search_table(vision, "llm", layers(), device=cpu), t)
    halves = selection.split_halves(m, args.n_splits, 0)[0]
    table, held = _timed(
        f"{lab} + held-out choice ({args.n_splits} splits)",
        lambda: alignment.layer_search_tables(vision, "llm", layers(), halves, device=cpu),
        t,
    )
    extra = t[f"{lab} + held-out choice ({args.n_splits} splits)"] - t[lab]
    print(f"    held-out choice adds {extra:.1f} s ({extra / args.layers:.2f} s per layer)")

    disp = sigma + rng.normal(0, 0.05, m)
    pc1 = disp + rng.normal(0, 0.05, m)
    plain = selection.make_sets(ids, disp, pc1, 256, args.n_random, 0.25, 0)
    with_drop = selection.make_sets(ids, disp, pc1, 256, args.n_random, 0.25, 0, args.n_random)
    chosen = {(v, "cknna"): 0 for v in vision}

    def conditions(sets):
        return alignment.condition_tables(
            vision, "llm", chosen, lambda i: pool[0], sets, ids, n_boot=args.n_boot, device=cpu
        )

    _timed("conditions job (K = 256, drop sets, n_boot)", lambda: conditions(plain), t)
    cond, _ = _timed(
        f"conditions job + {args.n_random} random sets of the drop size",
        lambda: conditions(with_drop),
        t,
    )
    _timed("drop table", lambda: alignment.drop_table(cond), t)
    extra = (
        t[f"conditions job + {args.n_random} random sets of the drop size"]
        - t["conditions job (K = 256, drop sets, n_boot)"]
    )
    print(f"    size-matched drop control adds {extra:.1f} s")

    sets = selection.heldout_sets(ids, disp, pc1, 256, args.n_random, args.n_splits, 0)
    for n_layers in (1, 2):
        per_split = {(v, "cknna", s): (s % n_layers) for v in vision for s in range(args.n_splits)}
        _timed(
            f"held-out evaluation ({args.n_splits} splits, {n_layers} distinct layer(s))",
            lambda per_split=per_split: alignment.heldout_condition_table(
                vision, "llm", chosen, per_split, lambda i: pool[i], sets, ids, device=cpu
            ),
            t,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
