"""Fast alignment grids: vision models against every layer of one LLM, on the full set and subsets.

The per-LLM entry points are :func:`layer_search_table` (full-set values of every LLM layer for
every vision model and metric, and the chosen layer per (vision, metric)) and
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from xmodal.metrics import (
    DENSE_MAX_M,
    FeatureMoments,
    KernelKNN,
    cknna_sides,
    cross_moment,
    feature_moments,
    feature_tensor,
    gram,
    hsic_from_moments,
    kernel_centred_product,
    kernel_hsic,
    kernel_resolution,
    knn_metric,
)
from xmodal.selection import sets_to_indices
from xmodal.stats import BootstrapPlan, BootstrapSide, difference_summary, random_baseline

log = logging.getLogger(__name__)

__all__ = [
    "BOOTSTRAP_METRICS",
    "CONDITION_COLUMNS",
    "CONTRAST_COLUMNS",
    "KNN_METRICS",
    "LAYER_COLUMNS",
    "METRICS",
    "AlignmentError",
    "ConditionPlan",
    "ConditionSide",
    "condition_table",
    "condition_tables",
    "default_device",
    "kernel",
    "layer_problem",
    "layer_profile_table",
    "layer_search",
    "layer_search_many",
    "layer_search_table",
    "self_term",
    "side_values",
    "subset_sides",
]

_MAX_BATCH_ELEMS = 1 << 23  # subset kernels gathered per batch (B·s² elements)

#: Metrics of the fast path (docs/method.md, Alignment): each gets its own rows and its own layer.
METRICS = ("cknna", "mutual_knn", "unbiased_cka", "cka")
#: Metrics defined by kNN sets: they carry a stability; the CKA metrics have stability 0.
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
    "frac_random_ge_low",
    "diff_low_high",
    "diff_ci_low",
    "diff_ci_high",
    "n_boot",
]


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
    """CUDA when available, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def kernel(x: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """K = XXᵀ as a tensor (syrk on CPU; a matmul on the device when it is a GPU)."""
    device = device or torch.device("cpu")
    if device.type == "cpu":
        return torch.from_numpy(gram(x))
    xt = torch.as_tensor(np.asarray(x), device=device)
    return xt @ xt.T


def _feature_problem(t: torch.Tensor) -> str:
    """Reason from one pass over the row norms: "non-finite features", "zero rows" or ""."""
    norms = torch.linalg.vector_norm(t, dim=1)
    if not bool(torch.isfinite(norms).all()):
        return "non-finite features"
    if not bool(norms.any()):
        return "zero rows"
    return ""


def _constant_rows(t: torch.Tensor, side: KernelKNN | None) -> bool:
    """Every row equals the first. A constant kernel has only zero kNN gaps, so with the layer's
    kNN structure at hand the rows are compared only when every row is unresolved."""
    if side is not None and side.k < side.size - 1 and not bool(side.unresolved.all()):
        return False
    return t.shape[0] > 1 and bool((t == t[0]).all())


def layer_problem(x: np.ndarray | torch.Tensor, side: KernelKNN | None = None) -> str:
    """Why prepared features (m, p) cannot be aligned, in a few words; "" when they can.

    "non-finite features" (NaN or ±inf anywhere: the row norms are then not finite), "zero
    rows" (every row is 0), "constant rows" (every row equals the first: a constant kernel).
    ``side``, the layer's kNN structure if built, spares the row comparison for usable layers.
    Kernels degenerate in a subtler way are caught by their self-similarity (:func:`self_term`).
    """
    t = feature_tensor(x)
    reason = _feature_problem(t)
    if not reason and _constant_rows(t, side):
        reason = "constant rows"
    return reason


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


def side_values(metric: str, xs: KernelKNN, ys: KernelKNN) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, stability) of one metric for matched batches (same stimuli, same k): (B,) on the CPU.

    kNN metrics: :func:`xmodal.metrics.knn_metric`. CKA metrics: from the kernels (dense path)
    or from feature moments (blocked path); their stability is 0 (no kNN sets).
    """
    if metric in KNN_METRICS:
        value, stability = knn_metric(metric, xs, ys)
        return value.cpu(), stability.cpu()
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
        cross = torch.tensor([unbiased if metric == "unbiased_cka" else biased])
    value = cross / torch.sqrt(self_term(metric, xs) * self_term(metric, ys))
    return value, torch.where(torch.isfinite(value), 0.0, torch.nan).to(torch.float64)


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
    chosen[int(np.argmax(values))] = True
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


def _choose(table: pd.DataFrame, llm: str) -> pd.Series:
    """Per (vision, metric): True at the argmax of value among valid rows (first on equal values)."""
    chosen = pd.Series(False, index=table.index)
    for (vision, metric), group in table.groupby(["vision", "metric"], sort=False):
        ok = group[group["valid"]]
        if ok.empty:
            reasons = sorted({f"{r.reason}" for r in group.itertuples() if r.reason})
            raise AlignmentError(
                f"no layer of LLM {llm!r} gives a valid {metric} with vision model {vision!r}: "
                f"every one of its {len(group)} layers is invalid ({'; '.join(reasons)}); "
                "check that LLM's feature file (docs/method.md, 'Degenerate layers')"
            )
        chosen[ok["value"].idxmax()] = True
    return chosen


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
    names = _check_metrics(metrics)
    device = device or default_device()
    vsides = _vision_sides(vision, k, names, device, dense)
    m = next(iter(vsides.values())).size
    rows = []
    for index, name, y in llm_layers:
        if np.shape(y)[0] != m:
            raise ValueError(
                f"LLM {llm!r} layer {name} has {np.shape(y)[0]} stimuli, vision has {m}"
            )
        lside, reason = _checked_side(y, k, device, dense)
        if on_layer is not None:
            on_layer(int(index), str(name), y, lside)
        invalid: dict[str, list[str]] = {}
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
    if not rows:
        raise ValueError(f"LLM {llm!r}: llm_layers is empty")
    table = pd.DataFrame(rows, columns=LAYER_COLUMNS[:-1])
    rank = table["vision"].map({key: i for i, key in enumerate(vision)}) * len(names) + table[
        "metric"
    ].map({metric: i for i, metric in enumerate(names)})
    table = table.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True)
    table["chosen"] = _choose(table, llm)
    return table


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
    chosen LLM layer) and :meth:`evaluate_metrics` per pair. Random draws are evaluated as one
    batch. Every set's positions are sorted, so ties inside a set break by stimulus order.
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
        self.fixed = sorted(key for key in self.positions if key[0] != "random")
        self.random_draws = sorted(key[2] for key in self.positions if key[0] == "random")
        sizes = {len(self.positions[("random", "none", d)]) for d in self.random_draws}
        if len(sizes) > 1:
            raise ValueError("random draws in the sets table have different sizes")
        self.random = (
            np.stack([self.positions[("random", "none", d)] for d in self.random_draws])
            if self.random_draws
            else None
        )
        self.summaries = sorted(
            {s for (name, s, _) in self.positions if name in ("low", "high") and s != "none"}
        )
        self.plans: dict[tuple[str, str], BootstrapPlan] = {}
        if self.n_boot > 0:
            for si, summary in enumerate(self.summaries):
                rng = np.random.default_rng([seed, si])
                for name in ("low", "high"):
                    key = (name, summary, 0)
                    if key in given:  # the draws index the set as listed in sets.tsv
                        self.plans[(name, summary)] = BootstrapPlan(given[key], self.n_boot, rng, k)

    def side(
        self,
        x_or_kernel: np.ndarray | torch.Tensor,
        is_kernel: bool = False,
        boot: bool = True,
        device: torch.device | None = None,
    ) -> ConditionSide:
        """Prepared features (or a given m×m kernel) with kNN structures for every condition.

        ``boot=False`` skips the bootstrap resamples (for metrics that have none). The
        resolution τ comes from the features' width and dtype; a given kernel gets τ = 0
        (only exact ties count as unresolved).
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
                key: subset_sides(full, self.positions[key], self.k, tau) for key in self.fixed
            }
            if self.random is not None:
                subsets[("random", 0)] = subset_sides(full, self.random, self.k, tau)
            host = full.cpu()
            resamples = {key: plan.side(host) for key, plan in self.plans.items()} if boot else {}
            return ConditionSide(KernelKNN.build(full, self.k, tau), subsets, resamples)
        xt = feature_tensor(x_or_kernel, device)
        if xt.shape[0] != self.m:
            raise ValueError(f"features have {xt.shape[0]} rows, m={self.m}")

        def rows(pos: np.ndarray) -> torch.Tensor:
            return xt.index_select(0, torch.as_tensor(pos, device=xt.device))

        subsets = {
            key: [KernelKNN.from_features(rows(self.positions[key]), self.k)] for key in self.fixed
        }
        if self.random is not None:
            subsets[("random", 0)] = [KernelKNN.from_features(rows(r), self.k) for r in self.random]
        resamples = (
            {key: plan.side(features=xt.cpu()) for key, plan in self.plans.items()} if boot else {}
        )
        full_side = KernelKNN.from_features(xt, self.k, dense=False)
        return ConditionSide(full_side, subsets, resamples)

    def _metric_rows(
        self, metric: str, xs: ConditionSide, ys: ConditionSide
    ) -> tuple[list[tuple], dict[tuple[str, str, int], tuple[float, float]], np.ndarray]:
        """Condition rows (condition, summary, draw, n_stimuli, value, stability) of one metric."""
        v, st = side_values(metric, xs.full, ys.full)
        rows = [("full", "none", 0, self.m, float(v[0]), float(st[0]))]
        values: dict[tuple[str, str, int], tuple[float, float]] = {}
        for key in self.fixed:
            parts = [
                side_values(metric, a, b)
                for a, b in zip(xs.subsets[key], ys.subsets[key], strict=True)
            ]
            values[key] = (float(parts[0][0][0]), float(parts[0][1][0]))
            rows.append((key[0], key[1], key[2], len(self.positions[key]), *values[key]))
        random_vals = np.array([])
        if self.random is not None:
            pairs = zip(xs.subsets[("random", 0)], ys.subsets[("random", 0)], strict=True)
            parts = [side_values(metric, a, b) for a, b in pairs]
            random_vals = torch.cat([p[0] for p in parts]).numpy()
            random_stab = torch.cat([p[1] for p in parts]).numpy()
            for d, v_, s_ in zip(self.random_draws, random_vals, random_stab, strict=True):
                rows.append(("random", "none", d, self.random.shape[1], float(v_), float(s_)))
        return rows, values, random_vals

    def _boot_diff(self, metric: str, summary: str, xs: ConditionSide, ys: ConditionSide):
        """Bootstrap summary of low* − high* (None when this metric or summary has none)."""
        if metric not in BOOTSTRAP_METRICS:
            return None
        if ("low", summary) not in self.plans or ("high", summary) not in self.plans:
            return None
        if ("low", summary) not in xs.boot or ("low", summary) not in ys.boot:
            raise ValueError("a side was prepared with boot=False; the bootstrap needs it")
        lo = self.plans[("low", summary)].values(
            xs.boot[("low", summary)], ys.boot[("low", summary)], metric
        )
        hi = self.plans[("high", summary)].values(
            xs.boot[("high", summary)], ys.boot[("high", summary)], metric
        )
        return difference_summary(lo - hi)

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
            rows, values, random_vals = self._metric_rows(metric, xs, ys)
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
                }
                if random_vals.size:
                    base = random_baseline(random_vals, low)
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
                else:
                    row.update(
                        random_mean=nan, random_ci_low=nan, random_ci_high=nan,
                        frac_random_ge_low=nan,
                    )  # fmt: skip
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
        contrasts = contrasts.drop(columns=["metric", "low_stability", "high_stability"])
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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every stimulus condition of sets.tsv for one LLM, each vision model and metric at its layer.

    ``chosen[(vision, metric)]`` is the LLM layer chosen on the full set for that metric;
    ``llm_layer(index)`` returns a prepared layer and is called once per distinct index. Kernels
    and kNN structures are built once per vision model and once per distinct LLM layer (held
    one at a time); the bootstrap draws are those of :class:`ConditionPlan` (for a seed, the
    same as ``condition_table``'s). Returns (conditions, contrasts) with
    :data:`CONDITION_COLUMNS` and :data:`CONTRAST_COLUMNS`, ordered by vision, then metric.
    The bootstrap runs on the CPU; ``device`` (default CPU) holds the kernels and subsets.
    ``dense`` overrides the automatic dense/blocked choice (:class:`ConditionPlan`).
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
    xsides = {key: plan.side(x, boot=boot, device=device) for key, (_, x) in vision.items()}
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
            parts[(key, metric)] = plan.evaluate_metrics(
                key, llm, index, xsides[key], ys, (metric,)
            )
        del ys
    order = [(v, mt) for v in vision for mt in names]
    return (
        pd.concat([parts[p][0] for p in order], ignore_index=True)[CONDITION_COLUMNS],
        pd.concat([parts[p][1] for p in order], ignore_index=True)[CONTRAST_COLUMNS],
    )
