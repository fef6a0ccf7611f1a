"""Time reading a large stimulus manifest and finding its duplicate stimuli.

Writes ``--images`` small distinct images (96 x 96 JPEG, like the demo's) into a temporary
folder, plus a manifest of ``--m`` stimuli drawn from them (so that images repeat, and one
caption in ten repeats), then times: ``write_manifest``, ``read_manifest`` (parse + checks +
image existence), ``scan_images`` (every image decoded and hashed, with 1 and ``--workers``
threads), ``find_duplicates`` on that scan, and ``drop_duplicates``. Prints each figure, the
per-stimulus rate, the peak resident memory and the load average at the end. Also times what
every ``snakemake`` call does at start-up once the manifest stamps exist (``read_manifest``
without the image checks, then ``write_manifest_stamp`` for both modalities): the first call
reads every image file for its SHA-256, a later one only stats them (the digest cache), and one
after a ``touch`` of every image reads them all again.

Run: .venv/bin/python benchmarks/manifest_scale.py [--m 10000] [--images 10000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from xmodal.stimuli import (
    drop_duplicates,
    find_duplicates,
    read_manifest,
    scan_images,
    write_manifest,
    write_manifest_stamp,
)


def _timed(label: str, m: int, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    dt = time.perf_counter() - t0
    print(f"{label:<42s} {dt:8.2f} s   {1e6 * dt / m:9.1f} µs/stimulus")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=10_000, help="stimuli in the manifest")
    parser.add_argument("--images", type=int, default=10_000, help="distinct image files")
    parser.add_argument("--workers", type=int, default=2, help="threads for the parallel scan")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        t0 = time.perf_counter()
        base = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
        for k in range(args.images):
            img = base.copy()
            img[k % 96, (k // 96) % 96] = k % 251  # distinct pixels, cheap to make
            img[0, 0] = [k % 256, (k // 256) % 256, (k // 65536) % 256]
            Image.fromarray(img).save(root / "images" / f"{k:06d}.jpg", quality=90)
        print(f"{'(setup) write images':<42s} {time.perf_counter() - t0:8.2f} s")
        pick = rng.integers(0, args.images, args.m)
        caps = [
            f"caption {int(rng.integers(0, args.m // 10))}" if k % 10 == 0 else f"caption of {k}"
            for k in range(args.m)
        ]
        df = pd.DataFrame(
            {
                "stimulus_id": [f"{k:07d}" for k in range(args.m)],
                "image": [f"images/{i:06d}.jpg" for i in pick],
                "caption": caps,
            }
        )
        path = _timed("write_manifest", args.m, write_manifest, df, root / "stimuli.tsv")
        df = _timed("read_manifest", args.m, read_manifest, path)

        def stamps() -> None:  # what every snakemake call does at start-up (common.smk)
            table = read_manifest(path, check_images=False)
            for modality in ("vision", "language"):
                write_manifest_stamp(path, root / f"{modality}.json", modality, manifest=table)

        time.sleep(2)  # files changed in the last 2 s are not cached (xmodal.stimuli._RACY_NS)
        _timed("manifest stamps, first call (reads images)", args.m, stamps)
        _timed("manifest stamps, up to date (start-up)", args.m, stamps)
        print(
            f"{'(digest cache)':<42s} {(root / 'image_digests.json').stat().st_size / 2**20:8.2f} MiB"
        )
        for k in range(args.images):
            os.utime(root / "images" / f"{k:06d}.jpg")
        time.sleep(2)
        _timed("manifest stamps, every image touched", args.m, stamps)
        _timed("scan_images (1 thread)", args.m, scan_images, df, root, workers=1)
        scan = _timed(
            f"scan_images ({args.workers} threads)", args.m, scan_images, df, root,
            workers=args.workers,
        )  # fmt: skip
        dups = _timed("find_duplicates (given the scan)", args.m, find_duplicates, df, root,
                      images=scan)  # fmt: skip
        kept = _timed("drop_duplicates", args.m, drop_duplicates, df, dups)
    n_groups = dups.groupby("kind")["group"].nunique().to_dict()
    print(f"m = {args.m}, distinct images = {args.images}: duplicate groups {n_groups}, "
          f"{len(kept)} stimuli kept")  # fmt: skip
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    main()
