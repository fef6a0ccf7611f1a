"""Time and peak memory of one CKNNA (with its stability) as the number of stimuli m grows.

Synthetic prepared features (a shared 48-d latent plus noise, rows l2-normalised, float32) of
widths dx and dy; one CKNNA between them, on the dense path (an m×m kernel per side) or the
blocked path (kernel row blocks, O(m·k + block·m) memory); metrics.DENSE_MAX_M picks by default.
Peak RSS is the process's high-water mark, features included (m·(dx+dy)·4 bytes).

Run: .venv/bin/python benchmarks/cknna_scale.py --m 50000 [--dx 1280 --dy 4096] [--dense|--blocked]
     .venv/bin/python benchmarks/cknna_scale.py --sweep 1024,4096,8192,20000,50000
     (--sweep runs each m in a fresh process, so that each peak RSS is its own)
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import xmodal

xmodal.configure_cpu_threads()  # before numpy and torch start their thread pools

import numpy as np  # noqa: E402
import torch  # noqa: E402

from xmodal import metrics  # noqa: E402

D_LATENT = 48


def peak_rss_gb() -> float:
    """High-water mark of this process's resident memory (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def features(m: int, width: int, latent: np.ndarray, seed: int) -> np.ndarray:
    """(m, width) float32: latent·A + noise, rows l2-normalised, built by row blocks in place."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((latent.shape[1], width), dtype=np.float32) / np.sqrt(latent.shape[1])
    out = np.empty((m, width), dtype=np.float32)
    step = max(1, (1 << 24) // width)
    for start in range(0, m, step):
        block = out[start : start + step]
        block[:] = latent[start : start + step] @ a
        block += 0.7 * rng.standard_normal(block.shape, dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return out


def one(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    latent = rng.standard_normal((args.m, D_LATENT), dtype=np.float32)
    x = features(args.m, args.dx, latent, args.seed + 1)
    y = features(args.m, args.dy, latent, args.seed + 2)
    del latent
    rss_data = peak_rss_gb()
    dense = True if args.dense else (False if args.blocked else None)
    path = "dense" if (args.m <= metrics.DENSE_MAX_M if dense is None else dense) else "blocked"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    xs = metrics.KernelKNN.from_features(x, args.k, dense=dense, device=device)
    ys = metrics.KernelKNN.from_features(y, args.k, dense=dense, device=device)
    t1 = time.perf_counter()
    value, stability = metrics.knn_metric("cknna", xs, ys)
    value, stability = float(value[0]), float(stability[0])
    t2 = time.perf_counter()
    gpu = ""
    if device.type == "cuda":
        gpu = f" gpu_peak_gb={torch.cuda.max_memory_allocated() / 1024**3:.2f}"
    print(
        f"m={args.m} dx={args.dx} dy={args.dy} k={args.k} path={path} device={device.type} "
        f"seconds={t2 - t0:.2f} (kNN {t1 - t0:.2f}, HSIC+stability {t2 - t1:.2f}) "
        f"peak_rss_gb={peak_rss_gb():.2f} (features alone {rss_data:.2f}){gpu} "
        f"cknna={value:.6f} stability={stability:.2e} "
        f"unresolved={int(xs.unresolved.sum())}+{int(ys.unresolved.sum())}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--dx", type=int, default=1280)
    parser.add_argument("--dy", type=int, default=4096)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--dense", action="store_true", help="force the dense path")
    path.add_argument("--blocked", action="store_true", help="force the blocked path")
    parser.add_argument("--sweep", help="comma-separated m values, each in a fresh process")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; load: {os.getloadavg()}", flush=True)
    if not args.sweep:
        one(args)
        return 0
    rest = [a for a in sys.argv[1:] if not a.startswith("--sweep")]
    rest = [a for i, a in enumerate(rest) if not (i > 0 and rest[i - 1] == "--sweep")]
    if args.sweep in rest:
        rest.remove(args.sweep)
    for m in [int(v) for v in args.sweep.split(",") if v]:
        cmd = [sys.executable, __file__, *rest, "--m", str(m)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("m=")]
        print(lines[-1] if lines else f"m={m} failed: {done.stderr.strip()[-400:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
