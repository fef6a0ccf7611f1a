"""Time the extensions at the paper's shapes on synthetic features (the cost the docs state).

- language GPA: 12 LLM layers of the paper's widths (1024 … 8192), m = 1024 stimuli, planted
  shared structure and per-caption noise (generation timed separately);
- one joint_conditions job: 4 vision models (1280/1536/1280/1280) against one LLM layer of width
  8192 on the 2 × 2 sets (n = 256 each, both summaries) and 100 size-matched random sets;
- the vision–language correlation and the property correlations (n_boot = 1000);
- image properties per image, on synthetic 640 × 480 JPEGs (WIT's images are of this order).

Run: .venv/bin/python benchmarks/extensions_scale.py [--m 1024] [--images 64]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import xmodal

xmodal.configure_cpu_threads()  # before numpy and torch start their thread pools

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from xmodal import alignment, metrics  # noqa: E402
from xmodal.dispersion import dispersion_table  # noqa: E402
from xmodal.gpa import gpa  # noqa: E402
from xmodal.language_dispersion import cell_table, correlation_table, joint_sets  # noqa: E402
from xmodal.properties import image_properties, property_correlations  # noqa: E402

LLM_WIDTHS = [1024, 1536, 2048, 2560, 4096, 3200, 4096, 5120, 4096, 5120, 6656, 8192]
VISION_WIDTHS = [1280, 1536, 1280, 1280]


def _timed(label: str, fn, timings: dict):
    t0 = time.perf_counter()
    out = fn()
    timings[label] = time.perf_counter() - t0
    print(f"{label:55s} {timings[label]:8.1f} s", flush=True)
    return out


def _features(rng, shared, sigma, width):
    m, d = shared.shape
    a = rng.standard_normal((d, width)) / np.sqrt(d)
    return shared @ a + 0.6 * sigma[:, None] * rng.standard_normal((m, width))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    m = args.m
    rng = np.random.default_rng(0)
    t: dict[str, float] = {}
    ids = [f"s{j:05d}" for j in range(m)]
    shared = rng.standard_normal((m, 48))
    sigma = rng.uniform(0.1, 1.0, m)

    llms = _timed(
        "generate 12 LLM layers (synthetic)",
        lambda: [_features(rng, shared, sigma, w) for w in LLM_WIDTHS],
        t,
    )
    res = _timed("language GPA (12 LLMs, float64)", lambda: gpa(llms), t)
    print(f"    {res.n_iter} iterations, converged={res.converged}")
    lang, _ = dispersion_table(ids, res.residuals)
    vision = [_features(rng, shared, sigma, w) for w in VISION_WIDTHS]
    vres = gpa(vision)
    vis, _ = dispersion_table(ids, vres.residuals)
    _timed("vision-language correlation (4 coefficients)", lambda: correlation_table(
        vis, lang, args.n_boot, 0), t)  # fmt: skip
    sets = _timed("2 x 2 sets", lambda: joint_sets(vis, lang, 256, 100, 10, 0), t)
    n = int(sets[sets["set"] != "random"].groupby(["set", "summary"]).size().iloc[0])
    print(f"    n = {n} stimuli per set")

    def prepared(x):
        x = x.astype(np.float32)
        t_ = metrics.threshold_from_quantiles(np.quantile(np.abs(x), 0.95, axis=1))
        return metrics.prepare_layer(x, t_)

    pv = {f"v{i}": (0, prepared(x)) for i, x in enumerate(vision)}
    y = prepared(llms[-1])
    llms.clear()  # only the last layer is needed from here

    def joint():
        cond, _ = alignment.condition_tables(
            pv, "llm", {(k, "cknna"): 0 for k in pv}, lambda i: y, sets, ids, k=10, n_boot=0
        )
        return cell_table(cond)

    _timed("one joint_conditions job (4 vision x 1 LLM layer)", joint, t)

    props = pd.concat(
        [
            pd.DataFrame({"stimulus_id": ids, "property": p, "model": "",
                          "value": rng.normal(size=m)})
            for p in ("caption_words", "bytes_per_pixel", "colourfulness", "edge_density",
                      "entropy", "image_pixels", "aspect_ratio")
        ]
        + [pd.DataFrame({"stimulus_id": ids, "property": "caption_tokens", "model": f"l{i}",
                         "value": rng.integers(5, 40, m)}) for i in range(12)]
    )  # fmt: skip
    _timed("property correlations (19 properties x 2 summaries)", lambda: property_correlations(
        props, vis, args.n_boot, 0), t)  # fmt: skip

    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for j in range(args.images):
            arr = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
            arr[:, : 320 + j] //= 2
            Image.fromarray(arr).save(root / f"{j}.jpg", quality=90)
            rows.append((f"i{j}", f"{j}.jpg", "caption"))
        man = pd.DataFrame(rows, columns=["stimulus_id", "image", "caption"])
        sizes = pd.DataFrame({"stimulus_id": man["stimulus_id"], "width": 640, "height": 480})
        _timed(f"image properties ({args.images} 640x480 JPEGs, 2 threads)",
               lambda: image_properties(man, root, sizes, workers=2), t)  # fmt: skip
    per_image = t[f"image properties ({args.images} 640x480 JPEGs, 2 threads)"] / args.images
    print(f"    {1000 * per_image:.1f} ms per image -> {per_image * m:.0f} s for {m} images")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
