"""Where the extractor's time goes on a GPU, for one model of ``extract_gpu.py``.

Prints the rate (inputs/s, best of two) of the bare forward loop, of the extractor without the
HDF5 write, and of the extractor with ``abs_q95`` stubbed out; for language models also of the
bare loop with ``output_hidden_states``. Then torch.profiler tables (by host time and by GPU
time) of one bare pass and one extractor pass. A host-bound model shows more host time than GPU
time; a GPU-bound extractor waits in ``cudaEventSynchronize``.

    python benchmarks/extract_gpu_profile.py --model bloomz-7b1      # on a CUDA machine
    python benchmarks/extract_gpu_profile.py --cpu-smoke             # tiny shapes: checks it runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import extract_gpu as bench  # noqa: E402

import xmodal.extract._common as common  # noqa: E402
from xmodal.extract.language import extract_language_features  # noqa: E402
from xmodal.extract.vision import extract_vision_features  # noqa: E402


def best_seconds(fn: Callable[[], object], device: torch.device, reps: int = 2) -> float:
    """Best wall time of ``reps`` runs of ``fn`` after one warm-up run."""
    fn()
    bench.sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        bench.sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def profile_tables(label: str, fn: Callable[[], object], device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    bench.sync(device)
    with profile(activities=activities) as prof:
        fn()
        bench.sync(device)
    table = prof.key_averages()
    print(f"== {label}", flush=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48))
    if device.type == "cuda":
        print(table.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=48))


def without_abs_q95(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the accumulator's abs_q95 replaced by zeros (what it costs)."""

    def run() -> object:
        real = common.abs_quantile_rows
        common.abs_quantile_rows = lambda t: torch.zeros(t.shape[0], device=t.device)
        try:
            return fn()
        finally:
            common.abs_quantile_rows = real

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="bloomz-7b1", choices=sorted(bench.GPU_MODELS))
    p.add_argument("-n", type=int, default=None, help="inputs (default 512; smoke 64)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (vision) / 32 (language)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--dtype", default="auto", help=bench.DTYPE_HELP)
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, models, n = torch.device("cpu"), bench.SMOKE_MODELS, 64
    elif torch.cuda.is_available():
        device, models, n = torch.device("cuda"), bench.GPU_MODELS, 512
    else:
        print("no CUDA device: run with --cpu-smoke to check the script", file=sys.stderr)
        return 2
    n = args.n or n
    kind, spec = models[args.model]
    dtype = bench.bench_dtype(kind, args.dtype, device)
    print(f"{args.model}: {kind}, {common.dtype_name(dtype)}", flush=True)
    bs = args.batch or (64 if kind == "vision" else 32)
    ids = [f"s{i:05d}" for i in range(n)]
    nb = device.type == "cuda"
    rates: dict[str, float] = {}

    if kind == "vision":
        model = bench.build_vit(spec, device, dtype)
        batches = bench.image_batches(spec, n, bs, device)

        @torch.inference_mode()
        def bare() -> None:
            for x, _ in batches:
                model.forward_features(x.to(device, dtype, non_blocking=nb))

        def extractor() -> object:
            return extract_vision_features(
                model, batches, stimulus_ids=ids, batch_size=bs, progress=False
            )

    else:
        with tempfile.TemporaryDirectory(prefix="xmodal-profile-") as tmp:
            tokenizer = bench.bench_tokenizer(Path(tmp))
        model = bench.build_lm(spec, len(tokenizer), device, dtype)
        captions = bench.synthetic_captions(n)
        batches, _ = bench.caption_batches(tokenizer, captions, bs)

        @torch.inference_mode()
        def bare(hidden_states: bool = False) -> None:
            for x, mask in batches:
                model(
                    input_ids=x.to(device),
                    attention_mask=mask.to(device),
                    use_cache=False,
                    output_hidden_states=hidden_states,
                )

        def extractor() -> object:
            return extract_language_features(
                model, tokenizer, captions, stimulus_ids=ids, batch_size=bs, progress=False
            )

        rates["bare, output_hidden_states"] = n / best_seconds(lambda: bare(True), device)

    rates = {
        "bare": n / best_seconds(bare, device),
        **rates,
        "extractor (no HDF5)": n / best_seconds(extractor, device),
        "extractor without abs_q95": n / best_seconds(without_abs_q95(extractor), device),
    }
    print(f"{args.model} on {device.type}, {n} inputs, batch {bs} (best of two):")
    for label, rate in rates.items():
        print(f"  {label:28s} {rate:9.1f}/s   {rate / rates['bare']:.2f} of bare", flush=True)
    profile_tables(f"{args.model}: bare", bare, device)
    profile_tables(f"{args.model}: extractor", extractor, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
