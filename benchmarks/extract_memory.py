"""Host memory of an extraction's features as the number of stimuli m grows: kept in memory
against waiting in the spill file next to the output (xmodal.extract._common.FeatureAccumulator).

The model is left out: synthetic batches of ``(B, n_layers, dim)`` float32 features (batches
scattered over the stimuli, as the language extractor's longest-caption-first order gives) go
through the accumulator and ``write_features`` into a real HDF5 file, exactly as
``extract_features`` does after each forward pass. Peak RSS is the process's high-water mark
(torch and h5py included); the features' own size is printed next to it.

Run: .venv/bin/python benchmarks/extract_memory.py --m 20000 --layers 33 --dim 1024 \
         [--spill|--memory]
     .venv/bin/python benchmarks/extract_memory.py --sweep 5000,20000  (each in a fresh process)
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import xmodal.extract._common as common
from xmodal.extract import SPILL_SUFFIX
from xmodal.features import write_features
from xmodal.io import scratch_path


def peak_rss_gb() -> float:
    """High-water mark of this process's resident memory (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run(m: int, n_layers: int, dim: int, batch: int, spill: bool, out_dir: Path) -> None:
    """Accumulate and write one synthetic extraction; print time, peak RSS and sizes."""
    if spill:
        common.IN_MEMORY_FEATURE_BYTES = 0
    else:
        common.IN_MEMORY_FEATURE_BYTES = 1 << 62
    rng = np.random.default_rng(0)
    order = rng.permutation(m)
    ids = [f"s{i:06d}" for i in range(m)]
    names = [f"layer{j}" for j in range(n_layers)]
    out = out_dir / "features.h5"
    t0 = time.perf_counter()
    with scratch_path(out, SPILL_SUFFIX) as scratch:
        acc = common.FeatureAccumulator(
            n_layers, m, dim, model_name="bench", layer_names=names, stimulus_ids=ids, spill=scratch
        )
        for start in range(0, m, batch):
            idx = order[start : start + batch]
            acc.add(torch.randn(len(idx), n_layers, dim), idx)
        res = acc.result()
        t_acc = time.perf_counter() - t0
        write_features(out, res.features, ids, names, {}, abs_q95=res.abs_q95, check_finite=False)
        del res
    total = time.perf_counter() - t0
    gb = 4 * n_layers * m * dim / 1e9
    mode = "spill" if spill else "memory"
    print(
        f"m={m:6d} layers={n_layers} dim={dim} {mode:6s}: features {gb:6.2f} GB, "
        f"peak RSS {peak_rss_gb():6.2f} GB, accumulate {t_acc:6.1f} s, total {total:6.1f} s, "
        f"file {out.stat().st_size / 1e9:.2f} GB",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--m", type=int, default=20000)
    ap.add_argument("--layers", type=int, default=33)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--spill", action="store_true", help="always spill (else both modes)")
    mode.add_argument("--memory", action="store_true", help="always in memory")
    ap.add_argument("--sweep", help="comma-separated m values, each mode in a fresh process")
    ap.add_argument("--dir", default=None, help="where the file goes (default: a temporary dir)")
    args = ap.parse_args()
    if args.sweep or not (args.spill or args.memory):
        ms = [int(x) for x in args.sweep.split(",")] if args.sweep else [args.m]
        for m in ms:
            for flag in ("--memory", "--spill"):
                cmd = [sys.executable, __file__, "--m", str(m), "--layers", str(args.layers),
                       "--dim", str(args.dim), "--batch", str(args.batch), flag]  # fmt: skip
                if args.dir:
                    cmd += ["--dir", args.dir]
                subprocess.run(cmd, check=True)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run(args.m, args.layers, args.dim, args.batch, args.spill, Path(tmp))


if __name__ == "__main__":
    main()
