"""Cluster resources per job: GPUs, memory, CPUs and runtime from a model's size.

Pure functions of the model registry's values (``modality``, ``size_b``) and Snakemake's
``attempt`` counter, so that the workflow can write ``resources: mem_mb=lambda wc, attempt: ...``.
Memory and runtime grow linearly with ``attempt`` (a retried job asks for more); the GPU count
does not (it is what the weights need, which a retry does not change).

The GPU model (bf16 weights, sharded with accelerate ``device_map="auto"``):

    weights_gb = bytes_per_param * size_b            (2 in bf16/fp16, the default; 4 in fp32)
    need_gb    = weights_gb + max(2, 0.05 * weights_gb)   (activations, hidden states, buffers)
    usable_gb  = 0.9 * gpu_mem_gb                    (accelerate keeps ~10% of each GPU free)
    gpu        = ceil(need_gb / usable_gb)

On 80 GB GPUs: everything up to 13B -> 1 GPU, LLaMA-30B (32.5B) -> 1, LLaMA-65B -> 2;
on 40 GB GPUs: 13B -> 1, 30B -> 2, 65B -> 4.

The runtime model (minutes, first attempt): reading the weights, plus the forward passes of
``n_stimuli`` stimuli at a deliberately low sustained rate, so that a job at scale is not killed
at its time limit (a retry starts the extraction again from the first stimulus):

    runtime = 30 + ceil(weights_gb / 2) + ceil(n_stimuli * tokens * 2 * size_b * 1e9 / rate / 60)

with ``tokens`` = 1370 per image (a 518-px input at patch 14, DINOv2's, the largest in the
paper's models) or 128 per caption (captions run sorted by length, so padding stays short),
and ``rate`` = 5e13 operations per second in bf16/fp16 and 5e12 in float32 (one GPU at a
fraction of its peak: torch computes float32 without TF32 by default, 19.5e12 at most on an
A100, 15.7e12 on a V100, and ``device_map`` runs the shards of a large model one after
another; attention's own cost, about 15% at 1370 tokens, is inside that margin).
LLaMA-65B over 1024 captions: 96 + 6 min; over 100,000: 96 + 557 min.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

__all__ = [
    "ANALYSIS_KINDS",
    "analysis_resources",
    "extraction_resources",
    "forward_minutes",
    "gpus_needed",
    "loo_minutes",
    "pair_minutes",
]

BYTES_PER_PARAM_BF16 = 2
GPU_USABLE_FRACTION = 0.9
MAX_GPUS = 8
#: The image of the memory and runtime models: the largest input side of the paper's vision
#: models (DINOv2's), in pixels.
VISION_SIDE = 518
#: Tokens a stimulus costs in the runtime model: patches of a 518-px image at patch 14 (+ CLS),
#: and a long caption.
TOKENS_PER_STIMULUS = {"vision": (VISION_SIDE // 14) ** 2 + 1, "language": 128}
#: Batches of decoded images each decoding worker keeps ready (the DataLoader's prefetch_factor).
LOADER_PREFETCH = 4
#: The extraction's batch size where the config sets none, by modality and device.
DEFAULT_BATCH = {
    ("vision", "cuda"): 64,
    ("vision", "cpu"): 16,
    ("language", "cuda"): 32,
    ("language", "cpu"): 8,
}
#: Sustained operations per second assumed for the forward passes, by bytes per weight (low on
#: purpose: a job asks for more time than it needs rather than be killed at its limit).
SUSTAINED_FLOPS = {2: 5e13, 4: 5e12}


def forward_minutes(
    modality: str, size_b: float, n_stimuli: int, bytes_per_param: int = BYTES_PER_PARAM_BF16
) -> int:
    """Minutes the forward passes of ``n_stimuli`` stimuli take at most in the runtime model
    (2 · parameters operations per token, :data:`TOKENS_PER_STIMULUS`, :data:`SUSTAINED_FLOPS`)."""
    if not (isinstance(n_stimuli, int) and n_stimuli >= 0):
        raise ValueError(f"n_stimuli must be an integer >= 0, got {n_stimuli!r}")
    flops = n_stimuli * TOKENS_PER_STIMULUS[modality] * 2 * size_b * 1e9
    return math.ceil(flops / SUSTAINED_FLOPS[bytes_per_param] / 60)


def _check(size_b: float, attempt: int) -> None:
    if not (isinstance(size_b, int | float) and math.isfinite(size_b) and size_b > 0):
        raise ValueError(
            f"size_b must be a positive number of billions of parameters, got {size_b!r}"
        )
    if not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an integer >= 1 (Snakemake's attempt), got {attempt!r}")


def slurm_gpus() -> dict[str, str]:
    """The GPUs SLURM allocated to this job, as its environment says ({} outside such a job)."""
    out = {k: os.environ[k] for k in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS") if os.environ.get(k)}
    if os.environ.get("SLURM_GPUS_ON_NODE", "0") not in ("", "0"):
        out["SLURM_GPUS_ON_NODE"] = os.environ["SLURM_GPUS_ON_NODE"]
    return out


def gpu_memory_needed_gb(size_b: float, bytes_per_param: int = BYTES_PER_PARAM_BF16) -> float:
    """GB of GPU memory a ``size_b``-billion-parameter model's extraction needs: its weights and
    5% more (at least 2 GB) for activations; a GPU offers :data:`GPU_USABLE_FRACTION` of its
    memory to it."""
    weights_gb = bytes_per_param * size_b
    return weights_gb + max(2.0, 0.05 * weights_gb)


def gpus_needed(
    size_b: float,
    gpu_mem_gb: float,
    max_gpus: int = MAX_GPUS,
    bytes_per_param: int = BYTES_PER_PARAM_BF16,
) -> int:
    """GPUs of ``gpu_mem_gb`` each that hold a ``size_b``-billion-parameter model
    (``bytes_per_param``: 2 in bf16/fp16, 4 in fp32).

    Raises ValueError when more than ``max_gpus`` (the GPUs of one node) would be needed.
    """
    _check(size_b, 1)
    if not (isinstance(gpu_mem_gb, int | float) and math.isfinite(gpu_mem_gb) and gpu_mem_gb > 0):
        raise ValueError(f"gpu_mem_gb must be a positive number of GB, got {gpu_mem_gb!r}")
    if not (isinstance(max_gpus, int) and max_gpus >= 1):
        raise ValueError(f"max_gpus must be an integer >= 1, got {max_gpus!r}")
    need_gb = gpu_memory_needed_gb(size_b, bytes_per_param)
    n = max(1, math.ceil(need_gb / (GPU_USABLE_FRACTION * gpu_mem_gb)))
    if n > max_gpus:
        raise ValueError(
            f"a {size_b}B model needs {n} GPUs of {gpu_mem_gb} GB, more than the {max_gpus} "
            "GPUs of one node"
        )
    return n


def extraction_resources(
    modality: str,
    size_b: float,
    attempt: int = 1,
    *,
    gpu_mem_gb: float,
    num_workers: int,
    max_gpus: int = MAX_GPUS,
    bytes_per_param: int = BYTES_PER_PARAM_BF16,
    n_stimuli: int = 0,
    batch_size: int | None = None,
) -> dict[str, int]:
    """Resources of one model's feature-extraction job (a GPU job) over ``n_stimuli`` stimuli.

    Returns ``{"gpu", "mem_mb", "runtime", "cpus_per_task"}`` (runtime in minutes), the names
    snakemake-executor-plugin-slurm turns into ``--gpus``, ``--mem``, ``-t`` and
    ``--cpus-per-task``.

    - vision (timm): ``num_workers`` CPUs decode images, and one runs the model (0 workers: it
      decodes too); host memory holds the fp32 checkpoint twice while loading (8 bytes/param),
      0.5 GB per decoding worker, and the decoded batches waiting for the GPU: each worker
      keeps :data:`LOADER_PREFETCH` ready, two more are in flight, each ``batch_size`` (None:
      :data:`DEFAULT_BATCH` on a GPU) float32 images of :data:`VISION_SIDE` px, on top of 8 GB
      (64 images and 8 workers: 7 GB; 256 images: 28 GB).
    - language (transformers): tokenising captions is cheap (4 CPUs at most); host memory is
      8 GB plus the bf16 weights (the worst case of a loader materialising one full copy).
    - the features do not count: beyond ``IN_MEMORY_FEATURE_BYTES`` (2 GiB, inside the 8 GB)
      they wait in a spill file next to the output (xmodal.extract._common.FeatureAccumulator),
      so memory does not grow with the number of stimuli.
    - runtime: 30 min plus 1 min per 2 GB of weights plus :func:`forward_minutes` of the
      stimuli, per attempt (the module docstring).
    """
    _check(size_b, attempt)
    if modality not in ("vision", "language"):
        raise ValueError(f"modality must be 'vision' or 'language', got {modality!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    weights_gb = bytes_per_param * size_b
    if modality == "vision":
        cpus = num_workers + 1
        batch = DEFAULT_BATCH[("vision", "cuda")] if batch_size is None else batch_size
        waiting = (LOADER_PREFETCH * num_workers + 2) * batch * 3 * VISION_SIDE**2 * 4 / 1e9
        mem_gb = 8 + 4 * 2 * size_b + 0.5 * num_workers + waiting
    else:
        cpus = min(max(1, num_workers), 4)
        mem_gb = 8 + weights_gb
    forward = forward_minutes(modality, size_b, n_stimuli, bytes_per_param)
    runtime = 30 + math.ceil(weights_gb / 2) + forward
    return {
        "gpu": gpus_needed(size_b, gpu_mem_gb, max_gpus, bytes_per_param),
        "mem_mb": 1024 * math.ceil(mem_gb) * attempt,
        "runtime": runtime * attempt,
        "cpus_per_task": cpus,
    }


# CPU-only analysis jobs: (mem_mb, runtime in minutes, cpus) on the first attempt.
ANALYSIS_KINDS: dict[str, tuple[int, int, int]] = {
    "light": (2000, 15, 1),  # aggregation, tables, summaries
    "gpa": (8000, 60, 2),  # GPA, dispersion, leave-one-model-out (float64 SVDs)
    "pair": (4000, 30, 1),  # a per-LLM alignment job over all vision models; vision_bootstrap
    "figures": (4000, 20, 1),
    # decoding every image (stimuli_report, image_properties), kNN diagnostics of every vision
    # layer, GPA across the LLMs: what the profile's default-resources gave them, set in their
    # rules so that a --default-resources on the command line (which replaces the profile's
    # list) cannot leave them without memory or runtime
    "scan": (4000, 60, 2),
}


#: Seconds a per-LLM alignment job costs per stimulus² on 2 threads of an AMD EPYC (avx512f),
#: 2026-12-05, as measured by benchmarks/controls_scale.py: the layer search of one LLM layer
#: against the 4 vision models (with the held-out choice on 20 splits and the diagnostics) per
#: feature of the layer (0.6 s a layer at 2,048 stimuli × 4096, 4.5 s at 4,096 × 8192), and one
#: conditions job (the sets, 100 random sets, the drop sets and their size-matched control,
#: n_boot 1000) at an LLM layer 4096 wide (41 s at 4,096 stimuli, 11 s at 2,048).
PAIR_SECONDS = {"layer_search": 3.5e-11, "conditions": 2.5e-6}
#: How much slower the same work is past ``xmodal.metrics.DENSE_MAX_M`` stimuli, where no
#: kernel is kept (rough, from few measurements: the layer search 2.7× at 9,000 stimuli;
#: conditions, whose subset kernels are then rebuilt from the features for every draw, 16–28×
#: at 15,000–20,000, from the audit's timings of single draws).
PAIR_BLOCKED_FACTOR = {"layer_search": 3.0, "conditions": 20.0}
#: Margin over those rates: a SLURM job gets one CPU (measured on two), and nodes are slower.
PAIR_MARGIN = 4


def pair_minutes(kind: str, m: int, width: int, n_layers: int = 1, blocked: bool = False) -> int:
    """Runtime (minutes, first attempt) of a per-LLM alignment job over ``m`` stimuli: ``kind``
    ``"layer_search"`` (``n_layers`` LLM layers of ``width`` features) or ``"conditions"`` (one
    chosen layer of ``width``; also the 2 × 2 sets' job). 30 minutes, or more where the work,
    which grows as m² (:data:`PAIR_SECONDS`, × :data:`PAIR_BLOCKED_FACTOR` with ``blocked``,
    × :data:`PAIR_MARGIN`), needs it: a fixed 30 killed the layer search of LLaMA-65B's 81
    layers at 9,000 stimuli (about 85 minutes measured on 2 threads) on every retry.

    The paper's size (1,024 stimuli) keeps the 30 minutes; the layer search of 81 layers 8192
    wide asks for more from about 4,400 stimuli on (6.3 hours at 9,000), a conditions job
    past ``DENSE_MAX_M`` (9 hours at 9,000 for an LLM 8192 wide).
    """
    if kind not in PAIR_SECONDS:
        raise ValueError(f"kind must be one of {sorted(PAIR_SECONDS)}, got {kind!r}")
    if m < 1 or width < 1 or n_layers < 1:
        raise ValueError(f"need m, width and n_layers >= 1, got {m}, {width}, {n_layers}")
    rate = PAIR_SECONDS[kind] * (PAIR_BLOCKED_FACTOR[kind] if blocked else 1.0)
    scale = width if kind == "layer_search" else width / 4096
    seconds = PAIR_MARGIN * rate * n_layers * float(m) ** 2 * scale
    return max(ANALYSIS_KINDS["pair"][1], math.ceil(seconds / 60))


#: Seconds of one shuffled held-out model's Procrustes step in leave-one-model-out, per
#: m·k² + k³ (its cross-product with the consensus and the SVD; k = min(width, m − 1)): 0.51 s
#: of CPU a shuffle at 1,024 stimuli and k = 1023 (`benchmarks/gpa_scale.py --m 1024 --loo`,
#: the paper's widths, 2 busy cores, 2026-12-06).
LOO_SHUFFLE_SECONDS = 2.4e-10


def loo_minutes(m: int, widths: Sequence[int], n_permutations: int, threads: int) -> int:
    """Runtime (minutes, first attempt) of the leave-one-model-out job over ``m`` stimuli and
    vision models of ``widths``: the GPA kind's 60, or more where the baseline of each model's
    rows shuffled ``n_permutations`` times (docs/method.md, "Leave-one-model-out against
    shuffled stimuli") needs it, its shuffles on min(threads, models) threads, ×
    :data:`PAIR_MARGIN`. The paper's size keeps 60 (about 2 minutes of shuffles); 100
    shuffles of its four models ask for 2.7 hours at 20,000 stimuli (163 minutes)."""
    if m < 2 or not widths or min(widths) < 1 or n_permutations < 0 or threads < 1:
        raise ValueError(
            f"need m >= 2, widths >= 1, n_permutations >= 0 and threads >= 1, got {m}, "
            f"{list(widths)}, {n_permutations}, {threads}"
        )
    k = min(max(widths), m - 1)
    seconds = n_permutations * len(widths) * LOO_SHUFFLE_SECONDS * (m * k * k + k**3)
    seconds *= PAIR_MARGIN / min(threads, len(widths))
    return max(ANALYSIS_KINDS["gpa"][1], math.ceil(seconds / 60))


def analysis_resources(kind: str = "light", attempt: int = 1) -> dict[str, int]:
    """Resources of a CPU-only analysis job: ``{"mem_mb", "runtime", "cpus_per_task"}``, no GPU.

    ``kind`` is one of :data:`ANALYSIS_KINDS`; memory and runtime grow with ``attempt``.
    """
    _check(1, attempt)
    try:
        mem_mb, runtime, cpus = ANALYSIS_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown analysis kind {kind!r}; choose one of {sorted(ANALYSIS_KINDS)}"
        ) from None
    return {"mem_mb": mem_mb * attempt, "runtime": runtime * attempt, "cpus_per_task": cpus}
