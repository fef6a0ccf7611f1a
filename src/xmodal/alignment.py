"""Fast alignment grids: vision models against every layer of one LLM, on the full set and subsets.

The per-LLM entry points are :func:`layer_search_tables` (through :func:`layer_search_table`
the full-set values of every LLM layer for every vision model and metric, and the chosen layer
per (vision, metric); with halves also the held-out choice) and
:func:`condition_tables` (every stimulus condition at the chosen layers, with contrasts).

Each kernel (K = XXᵀ) and its kNN lists are built once and reused: on the full set for every
pairing, and for subsets by slicing the kernel (K_S = K[S][:, S]) — the kNN lists and centring
are recomputed inside each subset, as the metrics on the subset require, but no feature matrix
is multiplied again. Subsets of equal size are evaluated as one batch. Above
``metrics.DENSE_MAX_M`` stimuli no m×m kernel is formed (the blocked path, docs/method.md
"Large m"). Every kNN value comes with its stability (docs/method.md "Stability"); a layer
whose features or kernel are degenerate is never chosen ("Degenerate layers"). Nothing here
writes files.

The chosen LLM layer is the argmax of the metric on the full set and stays fixed for every
subset. Kernels are float32 for prepared (float32) features; HSIC sums are float64.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from xmodal.metrics import (
    DENSE_MAX_M,
    FeatureMoments,
    KernelKNN,
    _constant_rows,
    _feature_problem,
    cknna_sides,
    cross_moment,
    feature_moments,
    feature_tensor,
    hsic_from_moments,
    kernel_centred_product,
    kernel_hsic,
    kernel_resolution,
    kernel_tensor,
    knn_metric,
    layer_problem,
    normalised_hsic,
    rounding_decides,
)
from xmodal.parallel import mapper, n_workers
from xmodal.selection import RANDOM_SETS, sets_to_indices
from xmodal.stats import BootstrapPlan, BootstrapSide, difference_summary, random_baseline
from xmodal.summary import mean_stability

log = logging.getLogger(__name__)

__all__ = [
    "BOOTSTRAP_METRICS",
    "CONDITION_COLUMNS",
    "CONTRAST_COLUMNS",
    "DROP_COLUMNS",
    "HELDOUT_COLUMNS",
    "HELDOUT_LAYER_COLUMNS",
    "KNN_METRICS",
    "LAYER_COLUMNS",
    "METRICS",
    "SELF_SELECTION_COLUMNS",
    "AlignmentError",
    "ConditionPlan",
    "ConditionSide",
    "condition_table",
    "condition_tables",
    "default_device",
    "drop_table",
    "heldout_condition_table",
    "kernel",
    "layer_problem",
    "layer_profile_table",
    "layer_tie_column",
    "layer_search",
    "layer_search_many",
    "layer_search_table",
    "layer_search_tables",
    "self_selection_table",
    "self_term",
    "side_values",
    "subset_sides",
]

_MAX_BATCH_ELEMS = 1 << 23  # subset kernels gathered per batch (B·s² elements)

#: Metrics of the fast path (docs/method.md, Alignment): each gets its own rows and its own layer.
METRICS = ("cknna", "mutual_knn", "unbiased_cka", "cka")
#: Metrics defined by kNN sets: they carry a stability; the CKA metrics have stability 0, or ∞
#: where a side's kernel is rounding (:data:`CKA_ROUNDING`).
KNN_METRICS = ("cknna", "mutual_knn")
#: Metrics whose low − high difference is bootstrapped (the multiset machinery of xmodal.stats);
#: the CKA metrics get n_boot = 0 and NaN intervals in the contrasts table.
BOOTSTRAP_METRICS = ("cknna", "mutual_knn")

LAYER_COLUMNS = [
    "vision",
    "llm",
    "vision_layer",
    "llm_layer",
    "layer_name",
    "metric",
    "value",
    "stability",
    "valid",
    "reason",
    "chosen",
    "layer_tied",
]
CONDITION_COLUMNS = [
    "vision",
    "llm",
    "llm_layer",
    "condition",
    "summary",
    "draw",
    "n_stimuli",
    "metric",
    "value",
    "stability",
]
CONTRAST_COLUMNS = [
    "vision",
    "llm",
    "metric",
    "summary",
    "low",
    "high",
    "low_stability",
    "high_stability",
    "random_mean",
    "random_ci_low",
    "random_ci_high",
    "random_stability",
    "frac_random_ge_low",
    "diff_low_high",
    "diff_ci_low",
    "diff_ci_high",
    "n_boot",
    "layer_tied",
]
#: The drop sets against the size-matched random draws (docs/method.md, "Size-matched drop
#: control"): one row per (vision, LLM, metric, summary) of the drop sets.
DROP_COLUMNS = [
    "vision",
    "llm",
    "llm_layer",
    "metric",
    "summary",
    "n_stimuli",
    "full",
    "full_stability",
    "drop_high",
    "drop_high_stability",
    "drop_low",
    "drop_low_stability",
    "random_mean",
    "random_ci_low",
    "random_ci_high",
    "random_stability",
    "n_random",
    "frac_random_ge_drop_high",
    "frac_random_ge_drop_low",
    "layer_tied",
]
#: Each vision model on the low and high sets chosen without it (docs/method.md, "Sets chosen
#: without the scored model"): the contrast columns, then the same pair's values on the sets of
#: every model (``_all``) and how many stimuli each pair of sets shares.
SELF_SELECTION_COLUMNS = [
    *CONTRAST_COLUMNS[:4],
    "llm_layer",
    "n_stimuli",
    *CONTRAST_COLUMNS[4:],
    "low_all",
    "high_all",
    "diff_ci_low_all",
    "n_shared_low",
    "n_shared_high",
    "pc1_oriented",
]
#: The layer chosen on half A of each split (docs/method.md, "Held-out layer choice"): one row
#: per (vision, metric, split), written by the layer search.
HELDOUT_LAYER_COLUMNS = [
    "vision",
    "llm",
    "metric",
    "split",
    "n_stimuli",
    "llm_layer",
    "layer_name",
    "value",
    "stability",
    "full_layer",
    "same_as_full",
]
#: The sets inside half B of each split at the held-out and at the full-set layer: one row per
#: (vision, metric, summary, split, layer_rule).
HELDOUT_COLUMNS = [
    "vision",
    "llm",
    "metric",
    "summary",
    "split",
    "layer_rule",
    "llm_layer",
    "n_stimuli",
    "low",
    "high",
    "low_stability",
    "high_stability",
    "random_mean",
    "random_ci_low",
    "random_ci_high",
    "random_stability",
    "n_random",
    "frac_random_ge_low",
    "diff_low_high",
]
#: Bytes of half-set kernels the layer search keeps for the vision models across LLM layers;
#: above it they are rebuilt for each LLM layer (same values, more time).
HALF_CACHE_BYTES = 1 << 31
#: Bytes per entry of a subset's kNN structure on the dense path: the float32 kernel slice and
#: its neighbour mask (and the near-tie alternative's, when rows are unresolved).
SUBSET_BYTES_PER_ENTRY = 6
#: A family of random draws whose subset structures (about n_draws · s² · 6 bytes: kernel
#: slices and neighbour masks) would exceed this per side is not kept with each side: its
#: subsets are built from the full kernels in chunks at evaluation time (same values; the
#: vision side's are then rebuilt for each LLM layer). 100 draws of 768 of 1024 stimuli (the
#: size-matched drop control) took the conditions job from 1.4 to 3.4 GiB kept.
EAGER_FAMILY_BYTES = 1 << 27


class AlignmentError(ValueError):
    """An alignment value the data cannot give: no valid LLM layer, or a degenerate vision layer."""


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    names = tuple(dict.fromkeys(str(m) for m in metrics))
    unknown = [m for m in names if m not in METRICS]
    if not names or unknown:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {list(metrics)}")
    return names


# ----------------------------------------------------------------------------- kernels and sides


def default_device() -> torch.device:
    """CUDA when available, else CPU; logged, and warned about in a job that asked for a GPU
    (``analysis.gpu``) and was given GPUs by SLURM that torch does not see (it would hold them
    idle)."""
    from xmodal.resources import slurm_gpus

    if torch.cuda.is_available():
        log.info("alignment on %s", torch.cuda.get_device_name(0))
        return torch.device("cuda")
    # a job that asked for no GPU is given none to see (scripts/_bootstrap.py): no warning
    asked = os.environ.get("CUDA_VISIBLE_DEVICES") != ""
    if asked and (gpus := slurm_gpus()):
        log.warning(
            "this job was given GPUs by SLURM (%s), but torch %s sees no CUDA device: it runs on "
            "the CPU (the same numbers, more slowly) and holds them idle. Install a CUDA build "
            "of torch in the analysis environment (docs/cluster.md), or set analysis.gpu: false",
            ", ".join(f"{k}={v}" for k, v in gpus.items()),
            torch.__version__,
        )
    else:
        log.info("alignment on the CPU")
    return torch.device("cpu")


def kernel(x: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """K = XXᵀ as a tensor (syrk on CPU; a matmul on the device when it is a GPU)."""
    x = np.ascontiguousarray(x)  # torch refuses arrays with negative strides (x[::-1])
    return kernel_tensor(torch.as_tensor(x, device=device or torch.device("cpu")))


def _checked_side(
    x: np.ndarray, k: int, device: torch.device | None, dense: bool | None
) -> tuple[KernelKNN | None, str]:
    """(kNN structure, "") of usable prepared features, or (None, reason)."""
    t = feature_tensor(x)
    reason = _feature_problem(t)
    if reason:
        return None, reason
    side = _prepared_side(t, k, device, dense)
    if _constant_rows(t, side):
        return None, "constant rows"
    return side, ""


def _moments(side: KernelKNN) -> FeatureMoments:
    if "moments" not in side.cache:
        if side.features is None:
            raise ValueError("a blocked kNN structure without features cannot give CKA")
        side.cache["moments"] = feature_moments(side.features)
    return side.cache["moments"]


def self_term(metric: str, side: KernelKNN) -> torch.Tensor:
    """The self-similarity a metric divides by, (B,) on the CPU: > 0 for a usable kernel.

    cknna: HSIC_u(M^K∘K, M^K∘K); unbiased_cka: HSIC_u(K, K); cka: tr(KHKH); mutual_knn: 1.
    """
    if metric == "mutual_knn":
        return torch.ones(side.idx.shape[0], dtype=torch.float64)
    if metric == "cknna":
        return side.self_hsic.cpu()
    key = "self_" + metric
    if key not in side.cache:
        if side.kernel is not None:
            f = kernel_hsic if metric == "unbiased_cka" else kernel_centred_product
            side.cache[key] = f(side.kernel, side.kernel).cpu()
        else:
            mom = _moments(side)
            value = mom.self_unbiased if metric == "unbiased_cka" else mom.self_biased
            side.cache[key] = torch.tensor([value], dtype=torch.float64)
    return side.cache[key]


#: A kernel whose centred entries' root mean square is below this many τ (the resolution of its
#: entries, xmodal.metrics.kernel_resolution) is rounding: its CKA is noise (a layer at mean
#: cosine 0.999999 gave 0.106 dense and 0.837 blocked; such layers measure 0.003–4 τ, healthy
#: ones and repeated stimuli 10⁴ τ and more).
CKA_ROUNDING = 10.0


def kernel_is_rounding(side: KernelKNN) -> torch.Tensor:
    """(B,) True where the side's centred kernel is within :data:`CKA_ROUNDING` τ of 0 (root
    mean square of its entries, sqrt(tr(KHKH))/s): CKA from it is rounding. Unlike the kNN
    sets' ties (:func:`xmodal.metrics.rounding_decides`), repeated stimuli do not make it."""
    rms = torch.sqrt(self_term("cka", side).clamp(min=0.0)) / side.size
    return rms < CKA_ROUNDING * side.tau


#: How far beyond ±1 a normalised alignment may lie by rounding alone (docs/method.md,
#: "Alignment": values outside [−1, 1] are written as NaN).
OUT_OF_RANGE_TOL = 1e-6
_warned_out_of_range: set[tuple[str, int, int, str]] = set()
_warned_lock = threading.Lock()  # the pair jobs' worker threads (xmodal.parallel) share the set


def _outside_range(
    metric: str, value: torch.Tensor, size: int, k: int, what: str = "values"
) -> torch.Tensor:
    """Where ``value`` lies outside [−1, 1] beyond rounding (bool, NaN never). CKNNA's masked
    kernels are not positive semi-definite, so nothing bounds it, and with neighbour sets a
    large part of a small set it left [−1, 1] in 22–72% of random sets of 4–8 stimuli at
    k = n/2 (sizes audit: values up to 100, exit 0); no such value is a correlation of local
    structure. Warned once per metric, set size, k and ``what``."""
    bad = value.abs() > 1 + OUT_OF_RANGE_TOL  # (NaN compares False)
    if not bool(bad.any()):
        return bad
    key = (metric, size, k, what)
    with _warned_lock:
        first = key not in _warned_out_of_range
        _warned_out_of_range.add(key)
    if first:
        log.warning(
            "%s over sets of %d stimuli (k = %d): %d of %d %s lie outside [-1, 1] (largest "
            "|value| %.3g) and are written as NaN. With neighbour sets this large a part of the "
            "set the measure is no longer a correlation of local structure: use fewer "
            "neighbours (analysis.knn_k, at most a quarter of analysis.set_size) or larger sets "
            '(docs/method.md, "Alignment")',
            metric,
            size,
            k,
            int(bad.sum()),
            bad.numel(),
            what,
            float(value[bad].abs().max()),
        )
    return bad


def _in_range(
    metric: str, value: torch.Tensor, stability: torch.Tensor, side: KernelKNN
) -> tuple[torch.Tensor, torch.Tensor]:
    """``value`` and ``stability`` with NaN where the value lies outside [−1, 1] beyond
    rounding (:func:`_outside_range`)."""
    bad = _outside_range(metric, value, side.size, side.k)
    if not bool(bad.any()):
        return value, stability
    nan = torch.tensor(float("nan"), dtype=value.dtype)
    return torch.where(bad, nan, value), torch.where(bad, nan.to(stability.dtype), stability)


def side_values(metric: str, xs: KernelKNN, ys: KernelKNN) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, stability) of one metric for matched batches (same stimuli, same k): (B,) on the CPU.

    kNN metrics: :func:`xmodal.metrics.knn_metric`. CKA metrics: from the kernels (dense path)
    or from feature moments (blocked path); their stability is 0 (no kNN sets), and ∞ where a
    side's kernel is rounding (:func:`kernel_is_rounding`: a collapsed layer), which makes its
    CKA noise (docs/method.md, "Stability"). A value outside [−1, 1] beyond rounding is NaN
    (:func:`_in_range`).
    """
    if metric in KNN_METRICS:
        value, stability = knn_metric(metric, xs, ys)
        return _in_range(metric, value.cpu(), stability.cpu(), xs)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {METRICS}")
    if xs.kernel is not None and ys.kernel is not None:
        f = kernel_hsic if metric == "unbiased_cka" else kernel_centred_product
        cross = f(xs.kernel, ys.kernel).cpu()
    else:
        if xs.features is None or ys.features is None:
            raise ValueError("CKA on the blocked path needs both sides built from features")
        unbiased, biased = hsic_from_moments(
            cross_moment(xs.features, ys.features), _moments(xs), _moments(ys)
        )
        cross = torch.tensor(
            [unbiased if metric == "unbiased_cka" else biased], dtype=torch.float64
        )
    value = normalised_hsic(cross, self_term(metric, xs), self_term(metric, ys))
    rounding = kernel_is_rounding(xs) | kernel_is_rounding(ys)
    stability = torch.where(rounding, torch.inf, 0.0).to(torch.float64)
    return _in_range(metric, value, torch.where(torch.isfinite(value), stability, torch.nan), xs)


def _prepared_side(
    x: np.ndarray | torch.Tensor, k: int, device: torch.device | None, dense: bool | None = None
) -> KernelKNN:
    return KernelKNN.from_features(x, k, dense=dense, device=device)


# ----------------------------------------------------------------------------- layer search


def layer_search_many(
    vision_xs: Sequence[np.ndarray],
    llm_layers: Iterable[np.ndarray],
    k: int = 10,
    device: torch.device | None = None,
) -> np.ndarray:
    """CKNNA of each vision model against each LLM layer: (n_vision, n_layers); every L built once."""
    device = device or default_device()
    vsides = [_prepared_side(x, k, device) for x in vision_xs]
    m = vsides[0].size
    cols = []
    for i, y in enumerate(llm_layers):
        if np.shape(y)[0] != m:
            raise ValueError(f"LLM layer {i} has {np.shape(y)[0]} stimuli, vision has {m}")
        lside = _prepared_side(y, k, device)
        cols.append([float(cknna_sides(v, lside)[0]) for v in vsides])
        del lside
    return np.asarray(cols, dtype=np.float64).T.reshape(len(vsides), len(cols))


def layer_search(
    vision_x: np.ndarray,
    llm_layers: Iterable[np.ndarray],
    k: int = 10,
    device: torch.device | None = None,
) -> np.ndarray:
    """CKNNA(vision_x, layer; k) for each LLM layer, consumed one at a time (prepared features)."""
    return layer_search_many([vision_x], llm_layers, k, device)[0]


def layer_profile_table(
    vision: str,
    llm: str,
    vision_layer: int,
    vision_x: np.ndarray,
    llm_layers: Iterable[tuple[int, str, np.ndarray]],
    k: int = 10,
    device: torch.device | None = None,
) -> pd.DataFrame:
    """Full-set layer profile: vision, llm, vision_layer, llm_layer, layer_name, metric, value, chosen."""
    indices: list[int] = []
    names: list[str] = []

    def layers() -> Iterable[np.ndarray]:
        for index, name, x in llm_layers:
            indices.append(int(index))
            names.append(str(name))
            yield x

    values = layer_search(vision_x, layers(), k, device)
    if values.size == 0:
        raise ValueError("llm_layers is empty")
    chosen = np.zeros(values.size, dtype=bool)
    finite = np.flatnonzero(np.isfinite(values))  # argmax would pick a NaN (a degenerate layer)
    if finite.size:
        chosen[int(finite[np.argmax(values[finite])])] = True
    return pd.DataFrame(
        {
            "vision": vision,
            "llm": llm,
            "vision_layer": int(vision_layer),
            "llm_layer": indices,
            "layer_name": names,
            "metric": "cknna",
            "value": values,
            "chosen": chosen,
        }
    )


def _choose(table: pd.DataFrame, llm: str) -> tuple[pd.Series, pd.Series]:
    """Per (vision, metric): ``chosen``, True at the argmax of value among valid rows (first on
    equal values); ``layer_tied``, True there when another valid layer's value is within the
    two values' stabilities of it (docs/method.md, "Layer choice and statistics"): another
    tie-break of the kNN sets (another order of the stimuli) may choose that layer."""
    chosen = pd.Series(False, index=table.index)
    tied = pd.Series(False, index=table.index)
    for (vision, metric), group in table.groupby(["vision", "metric"], sort=False):
        ok = group[group["valid"]]
        if ok.empty:
            reasons = sorted({f"{r.reason}" for r in group.itertuples() if r.reason})
            raise AlignmentError(
                f"no layer of LLM {llm!r} gives a valid {metric} with vision model {vision!r}: "
                f"every one of its {len(group)} layers is invalid ({'; '.join(reasons)}); "
                "check that LLM's feature file (docs/method.md, 'Degenerate layers')"
            )
        best = ok["value"].idxmax()
        chosen[best] = True
        rivals = ok.drop(index=best)
        reach = rivals["stability"].to_numpy(float) + float(ok.at[best, "stability"])
        close = ok.at[best, "value"] - rivals["value"].to_numpy(float) <= reach
        if close.any():
            tied[best] = True
            log.warning(
                "%s x %s (%s): the chosen layer %s (%.6g, stability %.2g) is within the "
                "stabilities of layer(s) %s (%s): the kNN tie-breaks (the stimuli's order) "
                "decide between them (layer_tied; docs/method.md, 'Layer choice and statistics')",
                vision,
                llm,
                metric,
                ok.at[best, "llm_layer"],
                ok.at[best, "value"],
                ok.at[best, "stability"],
                ", ".join(str(x) for x in rivals["llm_layer"][close]),
                ", ".join(
                    f"{v:.6g} ± {st:.2g}"
                    for v, st in zip(
                        rivals["value"][close], rivals["stability"][close], strict=True
                    )
                ),
            )
    return chosen, tied


def _vision_sides(
    vision: Mapping[str, tuple[int, np.ndarray]],
    k: int,
    names: Sequence[str],
    device: torch.device | None,
    dense: bool | None = None,
) -> dict[str, KernelKNN]:
    """kNN structures of the vision layers; a degenerate vision layer is an AlignmentError."""
    if not vision:
        raise ValueError("vision is empty: give at least one vision model")
    sides: dict[str, KernelKNN] = {}
    for key, (layer, x) in vision.items():
        side, reason = _checked_side(x, k, device, dense)
        if not reason:
            bad = [n for n in names if not bool((self_term(n, side) > 0).all())]
            reason = f"degenerate kernel ({', '.join(bad)} self-similarity ≤ 0)" if bad else ""
        if reason:
            raise AlignmentError(
                f"vision model {key!r}, layer {layer}: {reason}; no alignment can be computed "
                "with it. Check its feature file or choose another vision layer "
                "(config key analysis.vision_layer)"
            )
        sides[key] = side
    sizes = {key: s.size for key, s in sides.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"vision models have different numbers of stimuli: {sizes}")
    return sides


def _validity(value: float, self_y: float, layer_reason: str) -> tuple[bool, str]:
    if layer_reason:
        return False, layer_reason
    if not (np.isfinite(self_y) and self_y > 0):
        return False, "degenerate kernel"
    if not np.isfinite(value):
        return False, "non-finite value"
    return True, ""


def layer_search_table(
    vision: Mapping[str, tuple[int, np.ndarray]],
    llm: str,
    llm_layers: Iterable[tuple[int, str, np.ndarray]],
    k: int = 10,
    metrics: Sequence[str] = ("cknna",),
    device: torch.device | None = None,
    dense: bool | None = None,
    on_layer: Callable[[int, str, np.ndarray, KernelKNN | None], None] | None = None,
) -> pd.DataFrame:
    """Full-set layer search of one LLM against several vision models, for several metrics.

    ``vision``: vision key → (vision layer index, prepared features m×p); ``llm_layers``:
    (layer index, layer name, prepared features m×q), consumed one at a time. Each LLM layer's
    kernel and kNN lists are built once and used for every vision model and metric.
    Columns :data:`LAYER_COLUMNS`: vision, llm, vision_layer, llm_layer, layer_name, metric,
    value, stability, valid, reason, chosen (per (vision, metric) the argmax of value among
    valid rows). A layer with degenerate features or kernel is ``valid=False`` with a
    ``reason``; no valid layer for a (vision, metric), or a degenerate vision layer, is an
    :class:`AlignmentError`. ``dense`` overrides the automatic choice of the dense or the
    blocked path (metrics.DENSE_MAX_M). ``on_layer(index, name, x, side)`` is called for every
    LLM layer with its kNN structure (None for a degenerate layer), e.g. for its diagnostics.
    """
    return layer_search_tables(
        vision, llm, llm_layers, None, k, metrics, device, dense, on_layer=on_layer
    )[0]


def _subsets_of(side: KernelKNN, positions: np.ndarray) -> list[KernelKNN]:
    """kNN batches of equal-size subsets (B, s) of a full-set side: slices of its kernel (dense),
    or built from its features' rows (blocked); τ is the full side's, as for every subset."""
    pos = np.atleast_2d(np.asarray(positions, dtype=np.int64))
    if side.kernel is not None:
        return subset_sides(side.kernel[0], pos, side.k, side.tau)
    if side.features is None:
        raise ValueError("a kNN structure without kernel or features cannot give subsets")
    feats = side.features
    return [
        KernelKNN.from_features(
            feats.index_select(0, torch.as_tensor(p, device=feats.device)), side.k, side.tau
        )
        for p in pos
    ]


def _batched_values(
    metric: str, xs: Sequence[KernelKNN], ys: Sequence[KernelKNN]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, stabilities, Y's self-terms) over matched lists of batches, concatenated."""
    parts = [side_values(metric, a, b) for a, b in zip(xs, ys, strict=True)]
    selfs = [self_term(metric, b).expand(b.idx.shape[0]) for b in ys]
    return (
        torch.cat([p[0] for p in parts]).numpy(),
        torch.cat([p[1] for p in parts]).numpy(),
        torch.cat(selfs).numpy(),
    )


def _half_values(
    lside: KernelKNN | None,
    vsides: Mapping[str, KernelKNN],
    pairs: Sequence[tuple[str, str]],
    chunks: Sequence[np.ndarray],
    vhalf: Mapping[str, list[list[KernelKNN]]] | None,
) -> tuple[dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]], np.ndarray]:
    """(values, stabilities, self-terms) on every half of ``chunks`` for each (vision, metric)
    of ``pairs``, one batch of the LLM layer's halves at a time (the vision models' from
    ``vhalf`` when cached, else built per batch); and, per half, whether rounding decides the
    LLM layer's kNN sets there (collapsed on that half, as on the full set)."""
    n = sum(len(c) for c in chunks)
    if lside is None or not pairs:
        return {}, np.zeros(n, dtype=bool)
    parts: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    collapsed = []
    keys = list(dict.fromkeys(key for key, _ in pairs))
    for i, chunk in enumerate(chunks):
        lh = _subsets_of(lside, chunk)
        collapsed += [rounding_decides(b).cpu().numpy() for b in lh]
        for key in keys:
            vh = vhalf[key][i] if vhalf is not None else _subsets_of(vsides[key], chunk)
            for metric in (mt for k2, mt in pairs if k2 == key):
                parts.setdefault((key, metric), []).append(_batched_values(metric, vh, lh))
        del lh
    values = {
        pair: tuple(np.concatenate([p[j] for p in got]) for j in range(3))  # type: ignore[misc]
        for pair, got in parts.items()
    }
    return values, np.concatenate(collapsed)


def _heldout_choice(
    llm: str,
    key: str,
    metric: str,
    values: np.ndarray,
    ok: np.ndarray,
    indices: Sequence[int],
) -> np.ndarray:
    """Per split, the row (layer position) of the largest value among valid ones (first on equal
    values, as the full-set choice); no valid layer on a half is an AlignmentError."""
    masked = np.where(ok, values, -np.inf)
    bad = np.flatnonzero(~ok.any(axis=0))
    if bad.size:
        raise AlignmentError(
            f"no layer of LLM {llm!r} gives a valid {metric} with vision model {key!r} on half A "
            f"of split(s) {bad.tolist()} (layers: {list(indices)}); check that LLM's feature file "
            "(docs/method.md, 'Degenerate layers') or turn off analysis.heldout_layer"
        )
    return np.argmax(masked, axis=0)


def layer_search_tables(
    vision: Mapping[str, tuple[int, np.ndarray]],
    llm: str,
    llm_layers: Iterable[tuple[int, str, np.ndarray]],
    halves: np.ndarray | None = None,
    k: int = 10,
    metrics: Sequence[str] = ("cknna",),
    device: torch.device | None = None,
    dense: bool | None = None,
    on_layer: Callable[[int, str, np.ndarray, KernelKNN | None], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The full-set layer search (:func:`layer_search_table`) and, with ``halves``, the layer
    chosen on each half (docs/method.md, "Held-out layer choice"), in one pass over the layers.

    ``halves`` (n_splits, h): sorted positions of half A of each split
    (``xmodal.selection.split_halves``). Each LLM layer's half-A kNN structures are slices of
    its full-set kernel (built once); the vision models' are built once when they fit in
    :data:`HALF_CACHE_BYTES`, else once per LLM layer. On each half, a layer is valid when it is
    valid on the full set, not collapsed on the half (rounding decides at least
    :data:`~xmodal.metrics.ROUNDING_DECIDES` of its kNN sets there), and its value and
    self-similarity on the half are finite and > 0 (self); the choice is the argmax among valid
    layers. Returns (layers table, held-out table with :data:`HELDOUT_LAYER_COLUMNS`, or None
    without ``halves``). ``on_layer``: as in :func:`layer_search_table`.
    """
    names = _check_metrics(metrics)
    device = device or default_device()
    vsides = _vision_sides(vision, k, names, device, dense)
    m = next(iter(vsides.values())).size
    if halves is not None:
        halves = np.atleast_2d(np.asarray(halves, dtype=np.int64))
        h = halves.shape[1]
        if halves.size and (halves.min() < 0 or halves.max() >= m):
            raise ValueError(f"halves hold positions outside 0..{m - 1}")
        if h <= k or h < 4:
            raise ValueError(
                f"half A holds {h} stimuli: CKNNA needs more than k = {k} (and at least 4)"
            )
        # the splits in batches of subset kernels; one batch of the LLM's halves held at a time
        step = max(1, _MAX_BATCH_ELEMS // (h * h))
        chunks = [halves[a : a + step] for a in range(0, halves.shape[0], step)]
        cache = len(vsides) * halves.shape[0] * h * h * SUBSET_BYTES_PER_ENTRY <= HALF_CACHE_BYTES
        vhalf = (
            {key: [_subsets_of(vs, c) for c in chunks] for key, vs in vsides.items()}
            if cache
            else None
        )
        if not cache:
            log.info(
                "LLM %s: the vision models' half-set kernels exceed %d bytes; they are rebuilt "
                "for each LLM layer",
                llm,
                HALF_CACHE_BYTES,
            )
    on_half: dict[tuple[str, str], list[tuple[np.ndarray, ...]]] = {}
    rows = []
    t0 = time.perf_counter()
    for done, (index, name, y) in enumerate(llm_layers, start=1):
        if np.shape(y)[0] != m:
            raise ValueError(
                f"LLM {llm!r} layer {name} has {np.shape(y)[0]} stimuli, vision has {m}"
            )
        lside, reason = _checked_side(y, k, device, dense)
        if lside is not None and bool(rounding_decides(lside)[0]):
            reason = "collapsed: rounding decides most stimuli's nearest neighbours"
        if on_layer is not None:
            on_layer(int(index), str(name), y, lside)
        invalid: dict[str, list[str]] = {}
        valid_pairs: list[tuple[str, str]] = []
        for key, vs in vsides.items():
            for metric in names:
                value = stability = self_y = float("nan")
                if lside is not None:
                    v, st = side_values(metric, vs, lside)
                    value, stability = float(v[0]), float(st[0])
                    self_y = float(self_term(metric, lside)[0])
                valid, why = _validity(value, self_y, reason)
                if not valid:
                    invalid.setdefault(why, []).append(f"{metric} with {key}")
                rows.append(
                    (
                        key,
                        llm,
                        int(vision[key][0]),
                        int(index),
                        str(name),
                        metric,
                        value,
                        stability,
                        valid,
                        why,
                    )
                )
                if valid and lside is not None:
                    valid_pairs.append((key, metric))
        if halves is not None:
            got, collapsed = _half_values(lside, vsides, valid_pairs, chunks, vhalf)
            nan = np.full(halves.shape[0], np.nan)
            for key in vsides:
                for metric in names:
                    on_half.setdefault((key, metric), []).append(
                        (*got.get((key, metric), (nan, nan, nan)), collapsed)
                    )
        for why, pairs in invalid.items():
            log.warning(
                "LLM %s layer %s (%s) is invalid (%s) for %s; it is never chosen",
                llm,
                index,
                name,
                why,
                ", ".join(pairs),
            )
        del lside
        # progress: at scale a layer takes minutes, and the job's log is all a user sees
        log.info("LLM %s: layer %s (%s) searched, %d so far in %.0f s", llm, index, name, done,
                 time.perf_counter() - t0)  # fmt: skip
    if not rows:
        raise ValueError(f"LLM {llm!r}: llm_layers is empty")
    table = pd.DataFrame(rows, columns=LAYER_COLUMNS[:-2])
    rank = table["vision"].map({key: i for i, key in enumerate(vision)}) * len(names) + table[
        "metric"
    ].map({metric: i for i, metric in enumerate(names)})
    table = table.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True)
    table["chosen"], table["layer_tied"] = _choose(table, llm)
    if halves is None:
        return table, None
    return table, _heldout_layer_table(table, llm, on_half, halves.shape[1])


def _heldout_layer_table(
    table: pd.DataFrame,
    llm: str,
    on_half: Mapping[tuple[str, str], list[tuple[np.ndarray, ...]]],
    n_half: int,
) -> pd.DataFrame:
    """One row per (vision, metric, split): the layer chosen on half A (HELDOUT_LAYER_COLUMNS)."""
    out = []
    for (key, metric), per_layer in on_half.items():
        rows = table[(table["vision"] == key) & (table["metric"] == metric)]
        indices = rows["llm_layer"].to_numpy()
        layer_names = rows["layer_name"].to_numpy()
        values = np.stack([p[0] for p in per_layer])  # (n_layers, n_splits), layer order
        stabs = np.stack([p[1] for p in per_layer])
        selfs = np.stack([p[2] for p in per_layer])
        collapsed = np.stack([p[3] for p in per_layer])
        # valid on the full set, finite on the half, and not collapsed on the half
        ok = rows["valid"].to_numpy(bool)[:, None] & np.isfinite(values) & ~collapsed
        ok &= np.isfinite(selfs) & (selfs > 0)
        best = _heldout_choice(llm, key, metric, values, ok, indices.tolist())
        full_layer = int(rows.loc[rows["chosen"], "llm_layer"].item())
        splits = np.arange(values.shape[1])
        out.append(
            pd.DataFrame(
                {
                    "vision": key,
                    "llm": llm,
                    "metric": metric,
                    "split": splits,
                    "n_stimuli": n_half,
                    "llm_layer": indices[best].astype(np.int64),
                    "layer_name": layer_names[best],
                    "value": values[best, splits],
                    "stability": stabs[best, splits],
                    "full_layer": full_layer,
                    "same_as_full": indices[best] == full_layer,
                }
            )
        )
    return pd.concat(out, ignore_index=True)[HELDOUT_LAYER_COLUMNS]


# ----------------------------------------------------------------------------- conditions


def subset_sides(
    full: torch.Tensor, subsets: np.ndarray, k: int, tau: float = 0.0
) -> list[KernelKNN]:
    """KernelKNN batches for equal-size subsets (B, s) of a full kernel: kernel slices, kNN inside each."""
    idx = torch.as_tensor(np.asarray(subsets, dtype=np.int64), device=full.device)
    if idx.ndim == 1:
        idx = idx.unsqueeze(0)
    s = idx.shape[1]
    step = max(1, _MAX_BATCH_ELEMS // (s * s))
    out = []
    for start in range(0, idx.shape[0], step):
        part = idx[start : start + step]
        sub = full[part[:, :, None], part[:, None, :]]
        out.append(KernelKNN.build(sub, k, tau))
    return out


@dataclass
class ConditionSide:
    """One kernel prepared for every condition of a plan (full, subsets, bootstrap resamples)."""

    full: KernelKNN
    subsets: dict[tuple[str, str, int] | tuple[str, int], list[KernelKNN]]
    boot: dict[tuple[str, str], BootstrapSide] = field(default_factory=dict)


class ConditionPlan:
    """The stimulus conditions of sets.tsv with shared bootstrap resamples; evaluates kernel pairs.

    Build one plan, call :meth:`side` once per kernel (e.g. once per vision model and once per
    chosen LLM layer) and :meth:`evaluate_metrics` per pair. Each family of random draws
    (``xmodal.selection.RANDOM_SETS``: the random baseline ``random`` and the size-matched
    ``random_drop``) is evaluated as one batch; every other set is a fixed set. Every set's
    positions are sorted, so ties inside a set break by stimulus order.
    ``dense``: keep the m×m kernel and slice it (default for m ≤ metrics.DENSE_MAX_M), else
    build each subset's kNN lists from its features (blocked when large).
    """

    def __init__(
        self,
        sets: pd.DataFrame,
        stimulus_ids: Sequence[str],
        k: int = 10,
        n_boot: int = 1000,
        seed: int = 0,
        dense: bool | None = None,
    ) -> None:
        self.m = len(stimulus_ids)
        self.k = k
        self.n_boot = int(n_boot)
        self.dense = self.m <= DENSE_MAX_M if dense is None else bool(dense)
        given = sets_to_indices(sets, stimulus_ids)
        self.positions = {key: np.sort(pos) for key, pos in given.items()}
        self.fixed = sorted(key for key in self.positions if key[0] not in RANDOM_SETS)
        #: fixed sets built at evaluation time, from the largest down, so that the ones each
        #: side keeps fit in EAGER_FAMILY_BYTES (the drop sets, 0.75·m each: with K = 256, the
        #: first from m ≈ 3150)
        self.lazy_fixed: set[tuple[str, str, int]] = set()
        size = {key: len(self.positions[key]) ** 2 * SUBSET_BYTES_PER_ENTRY for key in self.fixed}
        kept = sum(size.values())
        for key in sorted(self.fixed, key=lambda key: -size[key]):
            if kept <= EAGER_FAMILY_BYTES:
                break
            self.lazy_fixed.add(key)
            kept -= size[key]
        #: family name → (draw numbers, positions (n_draws, size)), in RANDOM_SETS order
        self.families: dict[str, tuple[list[int], np.ndarray]] = {}
        for name in RANDOM_SETS:
            keys = sorted(key for key in self.positions if key[0] == name)
            if not keys:
                continue
            if {key[1] for key in keys} != {"none"}:
                raise ValueError(f"{name} draws in the sets table must have summary 'none'")
            sizes = {len(self.positions[key]) for key in keys}
            if len(sizes) > 1:
                raise ValueError(f"{name} draws in the sets table have different sizes {sizes}")
            stack = np.stack([self.positions[key] for key in keys])
            self.families[name] = ([key[2] for key in keys], stack)
        self.random_draws, self.random = self.families.get("random", ([], None))
        #: families whose subsets are built at evaluation time, in chunks (EAGER_FAMILY_BYTES)
        self.lazy = {
            name
            for name, (_, stack) in self.families.items()
            if stack.shape[0] * stack.shape[1] ** 2 * SUBSET_BYTES_PER_ENTRY > EAGER_FAMILY_BYTES
        }
        self.summaries = sorted(
            {s for (name, s, _) in self.positions if name in ("low", "high") and s != "none"}
        )
        self.plans: dict[tuple[str, str], BootstrapPlan] = {}
        if self.n_boot > 0:
            for si, summary in enumerate(self.summaries):
                rng = np.random.default_rng([seed, si])
                for name in ("low", "high"):
                    key = (name, summary, 0)
                    if key in given:  # the draws index the set's stimuli in ascending order
                        self.plans[(name, summary)] = BootstrapPlan(given[key], self.n_boot, rng, k)

    def side(
        self,
        x_or_kernel: np.ndarray | torch.Tensor,
        is_kernel: bool = False,
        boot: bool = True,
        device: torch.device | None = None,
        boot_cache: MutableMapping[str, BootstrapSide] | None = None,
    ) -> ConditionSide:
        """Prepared features (or a given m×m kernel) with kNN structures for every condition.

        ``boot=False`` skips the bootstrap resamples (for metrics that have none). The
        resolution τ comes from the features' width and dtype; a given kernel gets τ = 0
        (only exact ties count as unresolved). ``boot_cache``: bootstrap sides by content key
        (:meth:`BootstrapPlan.key`), taken when the key matches and added to otherwise.
        """
        if is_kernel or self.dense:
            if is_kernel:
                full = torch.as_tensor(x_or_kernel).clone()  # build() ranks in place
                full = full.to(device) if device is not None else full
                tau = 0.0
            else:
                full = kernel(x_or_kernel, device)
                tau = kernel_resolution(np.shape(x_or_kernel)[1], full.dtype)
            if full.shape != (self.m, self.m):
                raise ValueError(f"kernel shape {tuple(full.shape)} does not match m={self.m}")
            subsets: dict = {
                key: subset_sides(full, self.positions[key], self.k, tau)
                for key in self.fixed
                if key not in self.lazy_fixed
            }
            for name, (_, stack) in self.families.items():
                if name not in self.lazy:
                    subsets[(name, 0)] = subset_sides(full, stack, self.k, tau)
            resamples = self._resamples(kernel=full.cpu(), cache=boot_cache) if boot else {}
            return ConditionSide(KernelKNN.build(full, self.k, tau), subsets, resamples)
        xt = feature_tensor(x_or_kernel, device)
        if xt.shape[0] != self.m:
            raise ValueError(f"features have {xt.shape[0]} rows, m={self.m}")

        def rows(pos: np.ndarray) -> torch.Tensor:
            return xt.index_select(0, torch.as_tensor(pos, device=xt.device))

        subsets = {
            key: [KernelKNN.from_features(rows(self.positions[key]), self.k)]
            for key in self.fixed
            if key not in self.lazy_fixed
        }
        for name, (_, stack) in self.families.items():
            if name not in self.lazy:
                subsets[(name, 0)] = [KernelKNN.from_features(rows(r), self.k) for r in stack]
        resamples = self._resamples(features=xt.cpu(), cache=boot_cache) if boot else {}
        full_side = KernelKNN.from_features(xt, self.k, dense=False)
        return ConditionSide(full_side, subsets, resamples)

    def _resamples(
        self,
        kernel: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        cache: MutableMapping[str, BootstrapSide] | None = None,
    ) -> dict[tuple[str, str], BootstrapSide]:
        return {
            key: plan.side(kernel=kernel, features=features, cache=cache)
            for key, plan in self.plans.items()
        }

    def bootstrap_sides(
        self,
        x: np.ndarray | torch.Tensor,
        device: torch.device | None = None,
        cache: MutableMapping[str, BootstrapSide] | None = None,
    ) -> dict[tuple[str, str], BootstrapSide]:
        """Only the bootstrap sides of prepared features ``x``, built as :meth:`side` builds
        them (so that ``cache`` filled here serves :meth:`side` on the same features)."""
        if self.dense:
            return self._resamples(kernel=kernel(x, device).cpu(), cache=cache)
        return self._resamples(features=feature_tensor(x, device).cpu(), cache=cache)

    def _metric_rows(
        self, metric: str, xs: ConditionSide, ys: ConditionSide
    ) -> tuple[
        list[tuple],
        dict[tuple[str, str, int], tuple[float, float]],
        dict[str, tuple[np.ndarray, np.ndarray]],
    ]:
        """Condition rows (condition, summary, draw, n_stimuli, value, stability) of one metric,
        the fixed sets' (value, stability) and each random family's (values, stabilities)."""
        v, st = side_values(metric, xs.full, ys.full)
        rows = [("full", "none", 0, self.m, float(v[0]), float(st[0]))]
        values: dict[tuple[str, str, int], tuple[float, float]] = {}
        for key in self.fixed:
            if key in self.lazy_fixed:  # built from the full sides (same values) and dropped
                pos = self.positions[key][None, :]
                a, b = _subsets_of(xs.full, pos), _subsets_of(ys.full, pos)
            else:
                a, b = xs.subsets[key], ys.subsets[key]
            parts = [side_values(metric, p, q) for p, q in zip(a, b, strict=True)]
            del a, b
            values[key] = (float(parts[0][0][0]), float(parts[0][1][0]))
            rows.append((key[0], key[1], key[2], len(self.positions[key]), *values[key]))
        families: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, (draws, stack) in self.families.items():
            if name in self.lazy:  # chunks of draws, built from the full kernels and dropped
                step = max(1, _MAX_BATCH_ELEMS // stack.shape[1] ** 2)
                parts = []
                for start in range(0, stack.shape[0], step):
                    chunk = stack[start : start + step]
                    a, b = _subsets_of(xs.full, chunk), _subsets_of(ys.full, chunk)
                    parts += [side_values(metric, p, q) for p, q in zip(a, b, strict=True)]
                    del a, b
            else:
                pairs = zip(xs.subsets[(name, 0)], ys.subsets[(name, 0)], strict=True)
                parts = [side_values(metric, a, b) for a, b in pairs]
            vals = torch.cat([p[0] for p in parts]).numpy()
            stabs = torch.cat([p[1] for p in parts]).numpy()
            families[name] = (vals, stabs)
            for d, v_, s_ in zip(draws, vals, stabs, strict=True):
                rows.append((name, "none", d, stack.shape[1], float(v_), float(s_)))
        return rows, values, families

    def _boot_diff(self, metric: str, summary: str, xs: ConditionSide, ys: ConditionSide):
        """Bootstrap summary of low* − high* (None when this metric or summary has none)."""
        if metric not in BOOTSTRAP_METRICS:
            return None
        if ("low", summary) not in self.plans or ("high", summary) not in self.plans:
            return None
        if ("low", summary) not in xs.boot or ("low", summary) not in ys.boot:
            raise ValueError("a side was prepared with boot=False; the bootstrap needs it")

        def resampled(name: str) -> np.ndarray:
            # a resample outside [−1, 1] is NaN as a set's value is (side_values), so that the
            # interval is NaN rather than stretched by it (docs/method.md, "Alignment")
            plan = self.plans[(name, summary)]
            value = plan.values(xs.boot[(name, summary)], ys.boot[(name, summary)], metric)
            bad = _outside_range(
                metric, torch.from_numpy(value), plan.n, plan.k, "bootstrap resamples"
            )
            return np.where(bad.numpy(), np.nan, value)

        return difference_summary(resampled("low") - resampled("high"))

    def evaluate_metrics(
        self,
        vision: str,
        llm: str,
        llm_layer: int,
        xs: ConditionSide,
        ys: ConditionSide,
        metrics: Sequence[str] = ("cknna",),
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(conditions, contrasts) of one (vision, LLM layer) pair for each metric.

        conditions: :data:`CONDITION_COLUMNS`; contrasts: :data:`CONTRAST_COLUMNS`.
        """
        cond_frames, contrast_rows = [], []
        nan = float("nan")
        for metric in _check_metrics(metrics):
            rows, values, families = self._metric_rows(metric, xs, ys)
            random_vals, random_stabs = families.get("random", (np.array([]), np.array([])))
            frame = pd.DataFrame(rows, columns=CONDITION_COLUMNS[3:7] + CONDITION_COLUMNS[8:])
            frame.insert(0, "vision", vision)
            frame.insert(1, "llm", llm)
            frame.insert(2, "llm_layer", int(llm_layer))
            frame.insert(7, "metric", metric)
            cond_frames.append(frame)
            bad = frame[~np.isfinite(frame["value"])]
            if len(bad):
                log.warning(
                    "%s x %s layer %s: %s is not finite on %d condition(s) (%s)",
                    vision,
                    llm,
                    llm_layer,
                    metric,
                    len(bad),
                    ", ".join(sorted(set(bad["condition"]))),
                )
            for summary in self.summaries:
                low, low_st = values.get(("low", summary, 0), (nan, nan))
                high, high_st = values.get(("high", summary, 0), (nan, nan))
                row = {
                    "vision": vision,
                    "llm": llm,
                    "metric": metric,
                    "summary": summary,
                    "low": low,
                    "high": high,
                    "low_stability": low_st,
                    "high_stability": high_st,
                    "random_stability": mean_stability(random_stabs),
                }
                base = _baseline(random_vals, low)
                if base["n_nonfinite"]:
                    log.warning(
                        "%s x %s %s: %d of %d random draws are not finite; the random "
                        "baseline is NaN",
                        vision,
                        llm,
                        metric,
                        base["n_nonfinite"],
                        random_vals.size,
                    )
                row.update(base)
                row["diff_low_high"] = low - high
                summ = self._boot_diff(metric, summary, xs, ys)
                if summ is not None and summ["n_nonfinite"]:
                    log.warning(
                        "%s x %s %s (%s): %d bootstrap differences are not finite; "
                        "the interval is NaN",
                        vision,
                        llm,
                        metric,
                        summary,
                        summ["n_nonfinite"],
                    )
                if summ is None:
                    row.update(diff_ci_low=nan, diff_ci_high=nan, n_boot=0)
                else:
                    row.update(
                        diff_ci_low=summ["diff_ci_low"],
                        diff_ci_high=summ["diff_ci_high"],
                        n_boot=self.n_boot,
                    )
                row["layer_tied"] = False  # the layer search's flag (condition_tables)
                contrast_rows.append(row)
        conditions = pd.concat(cond_frames, ignore_index=True)[CONDITION_COLUMNS]
        contrasts = pd.DataFrame(contrast_rows, columns=CONTRAST_COLUMNS)
        return conditions, contrasts

    def evaluate(
        self, vision: str, llm: str, llm_layer: int, xs: ConditionSide, ys: ConditionSide
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """CKNNA (conditions, contrasts) of one pair in the per-pair layout of docs/contracts.md."""
        conditions, contrasts = self.evaluate_metrics(vision, llm, llm_layer, xs, ys, ("cknna",))
        conditions = conditions.drop(columns=["stability"])
        contrasts = contrasts.drop(
            columns=["metric", "low_stability", "high_stability", "random_stability", "layer_tied"]
        )
        return conditions, contrasts


def condition_table(
    vision: str,
    llm: str,
    llm_layer: int,
    vision_x: np.ndarray,
    llm_x: np.ndarray,
    sets: pd.DataFrame,
    stimulus_ids: Sequence[str],
    k: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CKNNA of one pair on the full set and every set of sets.tsv, plus low/high/random contrasts."""
    if np.shape(vision_x)[0] != len(stimulus_ids) or np.shape(llm_x)[0] != len(stimulus_ids):
        raise ValueError(
            f"features have {np.shape(vision_x)[0]} / {np.shape(llm_x)[0]} rows, "
            f"{len(stimulus_ids)} stimulus ids"
        )
    plan = ConditionPlan(sets, stimulus_ids, k=k, n_boot=n_boot, seed=seed)
    return plan.evaluate(vision, llm, llm_layer, plan.side(vision_x), plan.side(llm_x))


@contextmanager
def _one_thread_per_worker(jobs: int) -> Iterator[None]:
    """BLAS and torch on one thread each while ``jobs`` > 1 workers of a pool run their matrix
    routines, so that the pool uses ``jobs`` threads, not ``jobs`` times the job's budget (a
    conditions job of 2 threads ran 4; audit); nothing changes for one job."""
    if jobs <= 1:
        yield
        return
    before = torch.get_num_threads()
    with threadpool_limits(limits=1, user_api="blas"):
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def condition_tables(
    vision: Mapping[str, tuple[int, np.ndarray]],
    llm: str,
    chosen: Mapping[tuple[str, str], int],
    llm_layer: Callable[[int], np.ndarray],
    sets: pd.DataFrame,
    stimulus_ids: Sequence[str],
    k: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    metrics: Sequence[str] = ("cknna",),
    device: torch.device | None = None,
    dense: bool | None = None,
    boot_cache: MutableMapping[str, BootstrapSide] | None = None,
    tied: Mapping[tuple[str, str], bool] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every stimulus condition of sets.tsv for one LLM, each vision model and metric at its layer.

    ``chosen[(vision, metric)]`` is the LLM layer chosen on the full set for that metric, and
    ``tied[(vision, metric)]`` the layer search's ``layer_tied`` of that choice (absent: False),
    the contrasts' column;
    ``llm_layer(index)`` returns a prepared layer and is called once per distinct index. Kernels
    and kNN structures are built once per vision model and once per distinct LLM layer (held
    one at a time); the bootstrap draws are those of :class:`ConditionPlan` (for a seed, the
    same as ``condition_table``'s). Returns (conditions, contrasts) with
    :data:`CONDITION_COLUMNS` and :data:`CONTRAST_COLUMNS`, ordered by vision, then metric.
    The bootstrap runs on the CPU; ``device`` (default CPU) holds the kernels and subsets.
    ``dense`` overrides the automatic dense/blocked choice (:class:`ConditionPlan`).
    ``boot_cache``: the vision models' bootstrap sides prepared before (the same for every
    LLM; see :meth:`ConditionPlan.bootstrap_sides`), used where their content keys match.
    """
    names = _check_metrics(metrics)
    m = len(stimulus_ids)
    missing = [(v, mt) for v in vision for mt in names if (v, mt) not in chosen]
    if missing:
        raise ValueError(f"LLM {llm!r}: no chosen layer for (vision, metric) {missing}")
    for key, (_, x) in vision.items():
        if np.shape(x)[0] != m:
            raise ValueError(
                f"vision model {key!r} has {np.shape(x)[0]} stimuli, {m} stimulus ids given"
            )
    plan = ConditionPlan(sets, stimulus_ids, k=k, n_boot=n_boot, seed=seed, dense=dense)
    boot = any(metric in BOOTSTRAP_METRICS for metric in names)
    # the vision models' structures are independent: built on threads (torch releases the GIL)
    jobs = n_workers(len(vision))
    with _one_thread_per_worker(jobs), mapper(jobs) as pmap:
        built = list(
            pmap(
                lambda item: plan.side(item[1], boot=boot, device=device, boot_cache=boot_cache),
                vision.values(),
            )
        )
    xsides = dict(zip(vision, built, strict=True))
    parts: dict[tuple[str, str], tuple[pd.DataFrame, pd.DataFrame]] = {}
    for index in sorted({int(chosen[(v, mt)]) for v in vision for mt in names}):
        y = llm_layer(index)
        if np.shape(y)[0] != m:
            raise ValueError(
                f"LLM {llm!r} layer {index} has {np.shape(y)[0]} stimuli, expected {m}"
            )
        pairs = [(v, mt) for v in vision for mt in names if int(chosen[(v, mt)]) == index]
        reason = layer_problem(y)
        if reason:
            raise AlignmentError(
                f"LLM {llm!r} layer {index}, chosen for {pairs}, has {reason}; "
                "a chosen layer must be valid (was the layer table made from other features?)"
            )
        ys = plan.side(y, boot=any(mt in BOOTSTRAP_METRICS for _, mt in pairs), device=device)
        del y
        for key, metric in pairs:
            t0 = time.perf_counter()
            parts[(key, metric)] = plan.evaluate_metrics(
                key, llm, index, xsides[key], ys, (metric,)
            )
            log.info("LLM %s layer %d with %s (%s): every condition in %.0f s", llm, index, key,
                     metric, time.perf_counter() - t0)  # fmt: skip
        del ys
    order = [(v, mt) for v in vision for mt in names]
    contrasts = pd.concat([parts[p][1] for p in order], ignore_index=True)[CONTRAST_COLUMNS]
    contrasts["layer_tied"] = layer_tie_column(contrasts, tied)
    return (
        pd.concat([parts[p][0] for p in order], ignore_index=True)[CONDITION_COLUMNS],
        contrasts,
    )


def layer_tie_column(
    table: pd.DataFrame, tied: Mapping[tuple[str, str], bool] | None
) -> np.ndarray:
    """Per row of ``table`` (columns vision and metric), ``tied[(vision, metric)]``: whether
    the layer search's choice of that pair's LLM layer was within the stabilities of another
    layer (``layer_tied`` of the layers table); False where ``tied`` says nothing."""
    tied = tied or {}
    pairs = zip(table["vision"].astype(str), table["metric"].astype(str), strict=True)
    return np.array([bool(tied.get(key, False)) for key in pairs], dtype=bool)


# ----------------------------------------------------------------------------- controls

_SUMMARY_ORDER = {"mean": 0, "pc1": 1}


def _ordered_summaries(values: Iterable[str]) -> list[str]:
    return sorted(set(values), key=lambda s: (_SUMMARY_ORDER.get(s, 2), s))


def _baseline(values: np.ndarray, low: float) -> dict[str, float]:
    """:func:`xmodal.stats.random_baseline` of the draws against ``low``; every figure NaN (and
    no non-finite draw) when there are no draws."""
    if np.size(values):
        return random_baseline(np.asarray(values, dtype=np.float64), low)
    nan = float("nan")
    return {
        "random_mean": nan, "random_ci_low": nan, "random_ci_high": nan,
        "frac_random_ge_low": nan, "n_nonfinite": 0,
    }  # fmt: skip


def drop_table(
    conditions: pd.DataFrame, tied: Mapping[tuple[str, str], bool] | None = None
) -> pd.DataFrame:
    """The drop sets against the size-matched random draws (docs/method.md, "Size-matched drop
    control"): one row per (vision, LLM, metric, summary of the drop sets), :data:`DROP_COLUMNS`
    (``layer_tied`` from ``tied``, as in :func:`condition_tables`).

    ``conditions``: :func:`condition_tables` of a sets table with ``random_drop`` draws. The
    random columns are ``xmodal.stats.random_baseline`` of the ``random_drop`` values (mean,
    95% percentile interval; NaN when a draw is), ``random_stability`` their mean stability,
    ``frac_random_ge_drop_high`` / ``_low`` the fraction of draws at or above each drop set.
    The draws must have the drop sets' size (else the sets table is inconsistent: an error).
    """
    required = {"vision", "llm", "llm_layer", "metric", "condition", "summary", "value"}
    missing = required - set(conditions.columns)
    if missing:
        raise ValueError(f"conditions table lacks columns {sorted(missing)}")
    if not (conditions["condition"] == "random_drop").any():
        raise ValueError(
            "the conditions hold no random_drop draws: the sets table was made without the "
            "size-matched control (analysis.drop_control); rerun stimulus_sets"
        )
    nan = float("nan")
    rows = []
    keys = ["vision", "llm", "metric"]
    for (vision, llm, metric), g in conditions.groupby(keys, sort=False):
        rand = g[g["condition"] == "random_drop"]
        values = rand["value"].to_numpy(np.float64)
        stab = rand["stability"].to_numpy(np.float64) if "stability" in g else np.zeros(len(rand))
        size = set(rand["n_stimuli"].astype(int)) if "n_stimuli" in g else set()
        full = g[g["condition"] == "full"]
        full_v = float(full["value"].iloc[0]) if len(full) else nan
        full_s = float(full["stability"].iloc[0]) if len(full) and "stability" in g else nan
        drops = g[g["condition"].isin(["drop_high", "drop_low"])]
        for summary in _ordered_summaries(drops["summary"]):
            got: dict[str, tuple[float, float, int]] = {}
            for name in ("drop_high", "drop_low"):
                r = drops[(drops["condition"] == name) & (drops["summary"] == summary)]
                if len(r) != 1:
                    raise ValueError(
                        f"{vision} x {llm} {metric}: expected one {name} row for summary "
                        f"{summary!r}, found {len(r)}"
                    )
                st = float(r["stability"].item()) if "stability" in r else nan
                got[name] = (float(r["value"].item()), st, int(r["n_stimuli"].item()))
            n_drop = got["drop_high"][2]
            if size and size != {n_drop}:
                raise ValueError(
                    f"{vision} x {llm}: the random_drop draws hold {sorted(size)} stimuli but the "
                    f"drop sets {n_drop}; the sets table is inconsistent (rerun stimulus_sets)"
                )
            base_hi = _baseline(values, got["drop_high"][0])
            base_lo = _baseline(values, got["drop_low"][0])
            rows.append(
                {
                    "vision": vision,
                    "llm": llm,
                    "llm_layer": int(g["llm_layer"].iloc[0]),
                    "metric": metric,
                    "summary": summary,
                    "n_stimuli": n_drop,
                    "full": full_v,
                    "full_stability": full_s,
                    "drop_high": got["drop_high"][0],
                    "drop_high_stability": got["drop_high"][1],
                    "drop_low": got["drop_low"][0],
                    "drop_low_stability": got["drop_low"][1],
                    "random_mean": base_hi["random_mean"],
                    "random_ci_low": base_hi["random_ci_low"],
                    "random_ci_high": base_hi["random_ci_high"],
                    "random_stability": mean_stability(stab),
                    "n_random": int(values.size),
                    "frac_random_ge_drop_high": base_hi["frac_random_ge_low"],
                    "frac_random_ge_drop_low": base_lo["frac_random_ge_low"],
                }
            )
    table = pd.DataFrame(rows, columns=DROP_COLUMNS)
    table["layer_tied"] = layer_tie_column(table, tied)
    return table


def self_selection_table(
    others: pd.DataFrame,
    others_conditions: pd.DataFrame,
    conditions: pd.DataFrame,
    contrasts: pd.DataFrame,
    n_shared: Mapping[tuple[str, str], int],
    pc1_oriented: Mapping[str, bool] | None = None,
) -> pd.DataFrame:
    """Each vision model on its sets chosen without it, next to the sets of every model
    (:data:`SELF_SELECTION_COLUMNS`; docs/method.md, "Sets chosen without the scored model").

    ``others`` / ``others_conditions``: :func:`condition_tables` contrasts and conditions of each
    vision model on its own ``others_sets``; ``conditions`` / ``contrasts``: those of the sets of
    every model. The random baseline is the draws of ``conditions`` (random sets do not depend
    on dispersion, so they are the same draws), against the ``low`` value of ``others``.
    ``n_shared[(vision, summary, set)]``: stimuli that set shares with the one chosen with every
    model by the same summary. ``pc1_oriented[vision]``: whether the PC1 of the fit without
    that model follows its mean dispersion (:func:`xmodal.dispersion.partial_pc1_orientation`;
    absent: True); column ``pc1_oriented`` is False on that model's ``pc1`` rows otherwise.
    """
    rows = []
    for r in others.itertuples(index=False):
        key = (r.vision, r.llm, r.metric)
        own = others_conditions[
            (others_conditions["vision"] == r.vision)
            & (others_conditions["metric"] == r.metric)
            & (others_conditions["condition"] == "low")
            & (others_conditions["summary"] == r.summary)
        ]
        c = conditions[
            (conditions["vision"] == r.vision)
            & (conditions["llm"] == r.llm)
            & (conditions["metric"] == r.metric)
        ]
        rand = c[c["condition"] == "random"]
        base = _baseline(rand["value"].to_numpy(np.float64), float(r.low))
        main = contrasts[
            (contrasts["vision"] == r.vision)
            & (contrasts["llm"] == r.llm)
            & (contrasts["metric"] == r.metric)
            & (contrasts["summary"] == r.summary)
        ]
        if len(main) != 1 or len(own) != 1:
            raise ValueError(f"{key}: expected one row of the main contrasts and of the low set")
        rows.append(
            {
                **r._asdict(),
                "llm_layer": int(own["llm_layer"].item()),
                "n_stimuli": int(own["n_stimuli"].item()),
                "random_mean": base["random_mean"],
                "random_ci_low": base["random_ci_low"],
                "random_ci_high": base["random_ci_high"],
                "random_stability": mean_stability(rand["stability"].to_numpy(np.float64)),
                "frac_random_ge_low": base["frac_random_ge_low"],
                "low_all": float(main["low"].item()),
                "high_all": float(main["high"].item()),
                "diff_ci_low_all": float(main["diff_ci_low"].item()),
                "n_shared_low": int(n_shared[(r.vision, r.summary, "low")]),
                "n_shared_high": int(n_shared[(r.vision, r.summary, "high")]),
                "pc1_oriented": r.summary != "pc1"
                or bool((pc1_oriented or {}).get(r.vision, True)),
            }
        )
    return pd.DataFrame(rows, columns=SELF_SELECTION_COLUMNS)


def heldout_condition_table(
    vision: Mapping[str, tuple[int, np.ndarray]],
    llm: str,
    chosen: Mapping[tuple[str, str], int],
    heldout_chosen: Mapping[tuple[str, str, int], int],
    llm_layer: Callable[[int], np.ndarray],
    sets: pd.DataFrame,
    stimulus_ids: Sequence[str],
    k: int = 10,
    metrics: Sequence[str] = ("cknna",),
    device: torch.device | None = None,
    dense: bool | None = None,
) -> pd.DataFrame:
    """The sets inside half B of each split at two LLM layers (docs/method.md, "Held-out layer
    choice"): ``layer_rule`` ``heldout``, the layer chosen on half A of that split
    (``heldout_chosen[(vision, metric, split)]``), and ``full``, the layer chosen on the full
    set (``chosen[(vision, metric)]``, which saw half B).

    ``sets``: split, set (low, high, random), summary, draw, stimulus_id
    (``xmodal.selection.heldout_sets``). Kernels are built once per vision model and once per
    distinct LLM layer (each read once through ``llm_layer``, all held: memory ≈ (vision models +
    distinct layers) · m² · 4 bytes); subsets slice them (kNN lists and centring recomputed
    inside each set, τ of the full kernel) on ``device`` (default CPU, as
    :func:`condition_tables`). Per (vision, metric, summary, split, layer_rule):
    low, high, their stabilities, the random sets' baseline (``random_baseline``) and mean
    stability, low − high. Columns :data:`HELDOUT_COLUMNS`.
    """
    names = _check_metrics(metrics)
    m = len(stimulus_ids)
    if "split" not in sets.columns:
        raise ValueError("the held-out sets table has no 'split' column")
    splits = sorted(int(s) for s in set(sets["split"].astype(int)))
    missing = [(v, mt) for v in vision for mt in names if (v, mt) not in chosen]
    missing += [
        (v, mt, s) for v in vision for mt in names for s in splits
        if (v, mt, s) not in heldout_chosen
    ]  # fmt: skip
    if missing:
        raise ValueError(f"LLM {llm!r}: no chosen layer for {missing[:5]}")
    vsides = _vision_sides(vision, k, names, device, dense)
    if next(iter(vsides.values())).size != m:
        raise ValueError(f"vision features have {next(iter(vsides.values())).size} rows, m={m}")
    layers: dict[int, KernelKNN] = {}

    def llm_side(index: int) -> KernelKNN:
        if index not in layers:
            y = llm_layer(index)
            if np.shape(y)[0] != m:
                raise ValueError(f"LLM {llm!r} layer {index} has {np.shape(y)[0]} stimuli, m={m}")
            side, reason = _checked_side(y, k, device, dense)
            if reason:
                raise AlignmentError(
                    f"LLM {llm!r} layer {index}, chosen for the held-out layer choice, has "
                    f"{reason}; a chosen layer must be valid"
                )
            layers[index] = side
        return layers[index]

    split_col = sets["split"].astype(int)
    rows = []
    t0 = time.perf_counter()
    for n_done, split in enumerate(splits, start=1):
        given = sets_to_indices(sets[split_col == split].drop(columns="split"), stimulus_ids)
        pos = {key: np.sort(p) for key, p in given.items()}
        fixed = sorted(key for key in pos if key[0] != "random")
        rkeys = sorted(key for key in pos if key[0] == "random")
        stack = np.stack([pos[key] for key in rkeys]) if rkeys else None
        summaries = _ordered_summaries(s for name, s, _ in fixed if name in ("low", "high"))
        vsub = {key: _split_subsets(vs, pos, fixed, stack) for key, vs in vsides.items()}
        lsub: dict[int, dict] = {}
        done: dict[tuple[str, str, int], dict] = {}
        for key in vision:
            for metric in names:
                for rule in ("heldout", "full"):
                    index = int(
                        heldout_chosen[(key, metric, split)] if rule == "heldout"
                        else chosen[(key, metric)]
                    )  # fmt: skip
                    if (key, metric, index) not in done:
                        if index not in lsub:
                            lsub[index] = _split_subsets(llm_side(index), pos, fixed, stack)
                        done[(key, metric, index)] = _set_values(
                            metric, vsub[key], lsub[index], fixed
                        )
                    res = done[(key, metric, index)]
                    for summary in summaries:
                        rows.append(
                            _heldout_row(key, llm, metric, summary, split, rule, index, pos, res)
                        )
        del vsub, lsub
        # a line per split, with the time so far (docs/cluster.md, "What each job asks for")
        log.info("LLM %s: held-out layer choice, split %d of %d evaluated, %.0f s so far", llm,
                 n_done, len(splits), time.perf_counter() - t0)  # fmt: skip
    return pd.DataFrame(rows, columns=HELDOUT_COLUMNS)


def _split_subsets(
    side: KernelKNN, pos: Mapping, fixed: Sequence, stack: np.ndarray | None
) -> dict:
    """kNN batches of one split's fixed sets and of its random sets (key ``random``)."""
    out = {key: _subsets_of(side, pos[key]) for key in fixed}
    if stack is not None:
        out["random"] = _subsets_of(side, stack)
    return out


def _set_values(metric: str, xsub: dict, ysub: dict, fixed: Sequence) -> dict:
    """(value, stability) of every fixed set and (values, stabilities) of the random batch."""
    out: dict = {}
    for key in fixed:
        v, st, _ = _batched_values(metric, xsub[key], ysub[key])
        out[key] = (float(v[0]), float(st[0]))
    if "random" in xsub:
        v, st, _ = _batched_values(metric, xsub["random"], ysub["random"])
        out["random"] = (v, st)
    return out


def _heldout_row(
    vision: str,
    llm: str,
    metric: str,
    summary: str,
    split: int,
    rule: str,
    index: int,
    pos: Mapping,
    res: Mapping,
) -> dict:
    nan = float("nan")
    low, low_st = res.get(("low", summary, 0), (nan, nan))
    high, high_st = res.get(("high", summary, 0), (nan, nan))
    rand, rand_st = res.get("random", (np.array([]), np.array([])))
    base = _baseline(rand, low)
    key = ("low", summary, 0)
    return {
        "vision": vision,
        "llm": llm,
        "metric": metric,
        "summary": summary,
        "split": int(split),
        "layer_rule": rule,
        "llm_layer": int(index),
        "n_stimuli": len(pos[key]) if key in pos else 0,
        "low": low,
        "high": high,
        "low_stability": low_st,
        "high_stability": high_st,
        "random_mean": base["random_mean"],
        "random_ci_low": base["random_ci_low"],
        "random_ci_high": base["random_ci_high"],
        "random_stability": mean_stability(rand_st),
        "n_random": int(rand.size),
        "frac_random_ge_low": base["frac_random_ge_low"],
        "diff_low_high": low - high,
    }
