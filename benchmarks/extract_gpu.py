"""Extraction throughput on a GPU: the project's extractor vs a bare forward loop.

Builds real-size architectures with random weights directly on the GPU (no weights can be
fetched): ViT-H/14 at 224 px, DINOv2-g/14 at 518 px, BLOOM-7b1 and LLaMA-13B shapes. For each it
measures, on the same inputs,

  (a) a bare loop: host-to-device copy + ``forward`` per batch, nothing kept;
  (b) the extractor (``extract_vision_features`` / ``extract_language_features``: hooks or
      ``output_hidden_states``, pooling, finiteness checks, abs_q95, copy to host) plus writing
      the HDF5 feature file;

each twice, alternating, and prints (b)/(a) for the best run of each (target: >= 0.85) and for
the extractor's first run. Then it runs the whole ``extract_features`` call for
``--jpegs`` JPEG files on disk (decoding in DataLoader workers included) with the ViT-H.

    python benchmarks/extract_gpu.py                 # on a CUDA machine
    python benchmarks/extract_gpu.py --dtype bfloat16   # every model in bfloat16
    python benchmarks/extract_gpu.py --cpu-smoke     # tiny shapes on the CPU: checks it runs

Each model computes in the dtype a pipeline job would use (``--dtype auto``, the default:
``xmodal.registry.compute_dtype``, i.e. float32 for the ViTs and bfloat16 for the language
models on a GPU), or in the ``--dtype`` given for all.

CPU-smoke numbers say nothing about GPU performance.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xmodal._compat import ensure_torchvision_importable

ensure_torchvision_importable()

import timm  # noqa: E402

from xmodal.extract import extract_features  # noqa: E402
from xmodal.extract._common import dtype_name, resolve_dtype  # noqa: E402
from xmodal.extract.language import extract_language_features  # noqa: E402
from xmodal.extract.vision import extract_vision_features, load_vision_model  # noqa: E402
from xmodal.features import write_features  # noqa: E402
from xmodal.registry import compute_dtype  # noqa: E402

log = logging.getLogger("benchmark")

DTYPE_HELP = (
    "auto (as a pipeline job: float32 for vision, bfloat16 for language on a GPU), or float32, "
    "bfloat16 or float16 for every model"
)

WORDS = (
    "a the man woman dog cat red blue green small large old young running sitting standing on in "
    "near under next to table street park river mountain city building car bicycle tree house "
    "photograph of with and two three people child bird water field sky beach snow night"
).split()

# name -> (kind, builder arguments); real sizes, and tiny stand-ins for --cpu-smoke
GPU_MODELS = {
    "vit-h14-224": ("vision", dict(arch="vit_huge_patch14_224", kw=dict(img_size=224))),
    "dinov2-g14-518": ("vision", dict(arch="vit_giant_patch14_dinov2", kw=dict(img_size=518))),
    "bloomz-7b1": (
        "language",
        dict(arch="bloom", cfg=dict(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880)),
    ),
    "llama-13b": (
        "language",
        dict(
            arch="llama",
            cfg=dict(
                hidden_size=5120,
                intermediate_size=13824,
                num_hidden_layers=40,
                num_attention_heads=40,
                vocab_size=32000,
                max_position_embeddings=2048,
            ),
        ),
    ),
}
SMOKE_MODELS = {
    "vit-h14-224": (
        "vision",
        dict(arch="vit_huge_patch14_224", kw=dict(img_size=56, embed_dim=64, depth=4, num_heads=4)),
    ),
    "dinov2-g14-518": (
        "vision",
        dict(
            arch="vit_giant_patch14_dinov2",
            kw=dict(img_size=70, embed_dim=48, depth=4, num_heads=4),
        ),
    ),
    "bloomz-7b1": ("language", dict(arch="bloom", cfg=dict(hidden_size=64, n_layer=3, n_head=4))),
    "llama-13b": (
        "language",
        dict(
            arch="llama",
            cfg=dict(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=3,
                num_attention_heads=4,
                max_position_embeddings=2048,
            ),
        ),
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_dtype(kind: str, choice: str, device: torch.device) -> torch.dtype:
    """The dtype a pipeline job computes ``kind`` ("vision" or "language") in for the
    ``extraction.dtype`` setting ``choice`` on ``device`` (``auto``: float32 for the ViTs,
    bfloat16 for the language models on a GPU)."""
    return resolve_dtype(compute_dtype(kind, choice), device)


def build_vit(spec: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device(device):
        model = timm.create_model(spec["arch"], pretrained=False, **spec["kw"])
    return model.eval().requires_grad_(False).to(dtype)


def build_lm(spec: dict, vocab: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModel, BloomConfig, LlamaConfig

    cfg_cls = BloomConfig if spec["arch"] == "bloom" else LlamaConfig
    cfg = cfg_cls(**{"vocab_size": vocab, **spec["cfg"]})
    cfg.vocab_size = max(cfg.vocab_size, vocab)
    with torch.device(device):
        model = AutoModel.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def image_batches(spec: dict, n: int, bs: int, device: torch.device) -> list:
    """``n`` random images at the model's size as ``(images, indices)`` batches of ``bs``,
    in pinned memory for a GPU (as the extraction's DataLoader gives them)."""
    size = spec["kw"]["img_size"]
    g = torch.Generator().manual_seed(0)
    batches = []
    for s in range(0, n, bs):
        x = torch.randn(min(bs, n - s), 3, size, size, generator=g)
        batches.append((x.pin_memory() if device.type == "cuda" else x, list(range(s, s + len(x)))))
    return batches


def bench_vision(name, spec, n, bs, device, dtype, out_dir) -> dict:
    model = build_vit(spec, device, dtype)
    size = spec["kw"]["img_size"]
    batches = image_batches(spec, n, bs, device)
    ids = [f"s{i:05d}" for i in range(n)]
    nb = device.type == "cuda"

    @torch.inference_mode()
    def bare() -> None:
        for x, _ in batches:
            model.forward_features(x.to(device, dtype, non_blocking=nb))
        sync(device)

    def extractor() -> tuple[float, int]:
        res = extract_vision_features(
            model, batches, stimulus_ids=ids, batch_size=bs, progress=False
        )
        return write_timed(out_dir / f"{name}.h5", res, ids, name)

    out = timed(name, "images", n, bare, extractor, batches[:1], model, device, dtype)
    out.update(shape=f"{len(model.blocks)} blocks x {model.embed_dim}, {size}px")
    return out


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) for _ in range(n)]


def bench_tokenizer(folder: Path):
    """A byte-level BPE tokenizer trained on synthetic captions, padding with its EOS token."""
    from transformers import AutoTokenizer

    from xmodal.demo.models import train_tokenizer

    tok_dir = train_tokenizer(synthetic_captions(2000, seed=2), folder, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def caption_batches(tokenizer, captions: list[str], bs: int) -> tuple[list, int]:
    """The same sorted-by-length batches as the extractor builds, pre-tokenized for the bare
    loop: ``(input_ids, attention_mask)`` pairs, and the number of tokens in all."""
    tok = tokenizer(captions)["input_ids"]
    order = np.argsort([-len(t) for t in tok], kind="stable")
    batches = []
    for s in range(0, len(captions), bs):
        rows = order[s : s + bs]
        width = max(len(tok[r]) for r in rows)
        x = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for j, r in enumerate(rows):
            x[j, : len(tok[r])] = torch.tensor(tok[r])
            mask[j, : len(tok[r])] = 1
        batches.append((x, mask))
    return batches, sum(len(t) for t in tok)


def bench_language(name, spec, n, bs, device, dtype, out_dir, tokenizer) -> dict:
    captions = synthetic_captions(n)
    ids = [f"s{i:05d}" for i in range(n)]
    model = build_lm(spec, len(tokenizer), device, dtype)
    batches, n_tokens = caption_batches(tokenizer, captions, bs)

    @torch.inference_mode()
    def bare() -> None:
        for x, mask in batches:
            model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False)
        sync(device)

    def extractor() -> tuple[float, int]:
        res = extract_language_features(
            model, tokenizer, captions, stimulus_ids=ids, batch_size=bs, progress=False
        )
        return write_timed(out_dir / f"{name}.h5", res, ids, name)

    def warm() -> None:
        with torch.inference_mode():
            x, mask = batches[0]
            model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False)

    out = timed(name, "captions", n, bare, extractor, None, model, device, dtype, warm=warm)
    cfg = model.config
    out.update(
        shape=f"{cfg.num_hidden_layers} layers x {cfg.hidden_size}, {n_tokens / n:.1f} tok/caption"
    )
    return out


def timed(name, unit, n, bare, extractor, warm_batches, model, device, dtype, warm=None) -> dict:
    if warm is None:

        def warm() -> None:
            with torch.inference_mode():
                model.forward_features(warm_batches[0][0].to(device, dtype))

    warm()
    sync(device)
    results: dict[str, list[float]] = {"bare": [], "extractor+hdf5": []}
    writes: list[tuple[float, int]] = []
    # alternating, each twice; best of two for both (the first extractor run also pays one-time
    # costs, e.g. pinned host buffers and first touch of the feature array)
    for label, fn in (("bare", bare), ("extractor+hdf5", extractor)) * 2:
        t0 = time.perf_counter()
        written = fn()
        sync(device)
        results[label].append(n / (time.perf_counter() - t0))
        if written is not None:
            writes.append(written)
    bare_rate = max(results["bare"])
    best = int(np.argmax(results["extractor+hdf5"]))
    ext_rate = results["extractor+hdf5"][best]
    t_write, n_bytes = writes[best]
    ratio = ext_rate / bare_rate
    no_write = n / (n / ext_rate - t_write) / bare_rate
    print(
        f"  {name:16s} bare {bare_rate:9.1f} {unit}/s   extractor+hdf5 {ext_rate:9.1f} "
        f"{unit}/s   ratio {ratio:5.2f}   (first run {results['extractor+hdf5'][0] / bare_rate:4.2f}; "
        f"without the write {no_write:4.2f}; HDF5 write "
        f"{n_bytes / 2**20:.0f} MiB in {t_write:.2f} s = {n_bytes / 2**20 / max(t_write, 1e-9):.0f} MiB/s)",
        flush=True,
    )
    return dict(
        model=name,
        bare=bare_rate,
        extractor=ext_rate,
        extractor_first=results["extractor+hdf5"][0],
        ratio=ratio,
        ratio_without_write=no_write,
        write_s=t_write,
        write_mib=n_bytes / 2**20,
        unit=unit,
    )


def write_timed(path: Path, res, ids: list[str], name: str) -> tuple[float, int]:
    """Write the feature file as ``extract_features`` does; (seconds, bytes of features)."""
    t0 = time.perf_counter()
    write_features(
        path, res.features, ids, res.layer_names, {"model_key": name},
        abs_q95=res.abs_q95, check_finite=False,
    )  # fmt: skip
    return time.perf_counter() - t0, int(res.features.nbytes)


def make_jpegs(root: Path, n: int, size: tuple[int, int]) -> Path:
    """``n`` JPEG photos-like images (smooth colour fields plus noise) and a manifest."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    caps = synthetic_captions(n, seed=1)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lines = ["stimulus_id\timage\tcaption"]
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.05, 3)
        img = np.stack(
            [
                np.sin(a * xx + i) * 100 + 128,
                np.cos(b * yy) * 100 + 128,
                np.sin(c * (xx + yy)) * 100 + 128,
            ],
            -1,
        )
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "img" / f"{i:05d}.jpg", quality=90)
        lines.append(f"img{i:05d}\timg/{i:05d}.jpg\t{caps[i]}")
    (root / "stimuli.tsv").write_text("\n".join(lines) + "\n")
    return root / "stimuli.tsv"


def bench_jpegs(spec, n, bs, workers, device, dtype, root: Path) -> dict:
    from xmodal.demo.models import save_vit

    t0 = time.perf_counter()
    manifest = make_jpegs(root / "stimuli", n, (500, 375))
    t_make = time.perf_counter() - t0
    model = build_vit(spec, device, dtype)
    save_vit(model, root / "vit", spec["kw"])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    load_vision_model(str(root / "vit"), device=device, dtype=dtype)
    t_load = time.perf_counter() - t0
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    extract_features(
        "vit-h14-224",
        {"modality": "vision", "id": str(root / "vit")},
        manifest,
        root / "out" / "vit.h5",
        device=device,
        dtype=dtype,
        batch_size=bs,
        num_workers=workers,
        progress=False,
    )
    total = time.perf_counter() - t0
    rate = n / total
    rate_ex_load = n / max(total - t_load, 1e-9)
    print(
        f"  {n} JPEGs (500x375, written in {t_make:.1f} s), {workers} decode workers: "
        f"{total:.1f} s total = {rate:.1f} images/s incl. model load "
        f"(~{rate_ex_load:.1f} images/s excl. the {t_load:.1f} s load)",
        flush=True,
    )
    return dict(n=n, total_s=total, rate=rate, rate_ex_load=rate_ex_load)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on the CPU (checks that it runs)"
    )
    p.add_argument("--models", default=",".join(GPU_MODELS), help="comma-separated subset")
    p.add_argument("-n", type=int, default=None, help="inputs per model (default 1024; smoke 64)")
    p.add_argument("--batch-vision", type=int, default=64)
    p.add_argument("--batch-language", type=int, default=32)
    p.add_argument(
        "--jpegs",
        type=int,
        default=None,
        help="JPEG files for the end-to-end run (default 1024; smoke 128)",
    )
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.cpu_smoke:
        device, models = torch.device("cpu"), SMOKE_MODELS
        n, n_jpeg = args.n or 64, 128 if args.jpegs is None else args.jpegs
        bs_v, bs_l = min(args.batch_vision, 16), min(args.batch_language, 16)
        workers = min(args.workers, 2)
    else:
        if not torch.cuda.is_available():
            print(
                "no CUDA device: run with --cpu-smoke to check the script on the CPU",
                file=sys.stderr,
            )
            return 2
        device, models = torch.device("cuda"), GPU_MODELS
        n, n_jpeg = args.n or 1024, 1024 if args.jpegs is None else args.jpegs
        bs_v, bs_l, workers = args.batch_vision, args.batch_language, args.workers
    names = [m for m in args.models.split(",") if m]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    dtypes = {kind: bench_dtype(kind, args.dtype, device) for kind in ("vision", "language")}
    print(f"device: {dev_name}; dtype {dtype_name(dtypes['vision'])} (vision), "
          f"{dtype_name(dtypes['language'])} (language); {n} inputs per model; "
          f"batch {bs_v} (vision) / {bs_l} (language); torch {torch.__version__}", flush=True)  # fmt: skip
    if args.cpu_smoke:
        print("CPU SMOKE RUN: tiny shapes; the GPU throughput target is UNMEASURED", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="xmodal-bench-") as tmp:
        tmp = Path(tmp)
        tokenizer = None
        for name in names:
            kind, spec = models[name]
            if kind == "vision":
                rows.append(bench_vision(name, spec, n, bs_v, device, dtypes[kind], tmp))
            else:
                if tokenizer is None:
                    tokenizer = bench_tokenizer(tmp / "tok")
                rows.append(
                    bench_language(name, spec, n, bs_l, device, dtypes[kind], tmp, tokenizer)
                )
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        jpeg = (
            bench_jpegs(
                models["vit-h14-224"][1], n_jpeg, bs_v, workers, device, dtypes["vision"], tmp
            )
            if n_jpeg
            else None
        )

    ok = all(r["ratio"] >= 0.85 for r in rows)
    print("summary:")
    for r in rows:
        verdict = (
            "n/a (CPU smoke)" if args.cpu_smoke else ("ok" if r["ratio"] >= 0.85 else "BELOW 0.85")
        )
        print(
            f"  {r['model']:16s} {r['shape']:42s} ratio {r['ratio']:.2f}  {verdict}"
            f"  (without the HDF5 write {r['ratio_without_write']:.2f}; write {r['write_mib']:.0f} MiB"
            f" in {r['write_s']:.2f} s)"
        )
    if jpeg:
        print(
            f"  end-to-end JPEG extraction: {jpeg['rate']:.1f} images/s ({jpeg['rate_ex_load']:.1f} excl. model load)"
        )
    if args.cpu_smoke:
        print("target (extractor >= 85% of bare loop): UNMEASURED on GPU (CPU smoke run)")
    else:
        print(f"target (extractor >= 85% of bare loop): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
