"""Fast alignment grids: vision models against every layer of one LLM, on the full set and subsets.

The per-LLM entry points are :func:`layer_search_table` (full-set values of every LLM layer for
every vision model and metric, and the chosen layer per (vision, metric)) and
:func:`condition_tables` (every stimulus condition at the chosen layers, with contrasts).

Each kernel (K = XXᵀ, computed once per layer with BLAS syrk) and its directed kNN lists are
built once and reused: on the full set for every pairing, and for subsets by slicing the kernel
(K_S = K[S][:, S]) — the kNN lists and centring are recomputed inside each subset, as CKNNA on
the subset requires, but no feature matrix is multiplied again. Subsets of equal size are
evaluated as one batch. Nothing here writes files.

The chosen LLM layer is the argmax of full-set CKNNA and stays fixed for every subset
(DESIGN §2.5). Kernels are float32 for prepared (float32) features; HSIC sums are float64.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from xmodal.metrics import (
    KernelKNN,
    cknna_sides,
    gram,
    kernel_cka,
    kernel_unbiased_cka,
    mutual_knn_sides,
)
from xmodal.selection import sets_to_indices
from xmodal.stats import BootstrapPlan, BootstrapSide, difference_summary, random_baseline

log = logging.getLogger(__name__)

__all__ = [
    "BOOTSTRAP_METRICS",
    "CONDITION_COLUMNS",
    "CONTRAST_COLUMNS",
    "LAYER_COLUMNS",
    "METRICS",
    "AlignmentError",
    "ConditionPlan",
    "ConditionSide",
    "condition_table",
    "condition_tables",
    "default_device",
    "kernel",
    "layer_profile_table",
    "layer_search",
    "layer_search_table",
    "layer_search_many",
    "side_values",
    "subset_sides",
]

_MAX_BATCH_ELEMS = 1 << 23  # subset kernels gathered per batch (B·s² elements)

#: Metrics of the fast path (docs/method.md, Alignment): each gets its own rows and its own layer.
METRICS = ("cknna", "mutual_knn", "unbiased_cka", "cka")

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
#: Metrics whose low − high difference is bootstrapped (the multiset machinery of xmodal.stats).
BOOTSTRAP_METRICS = ("cknna",)


class AlignmentError(ValueError):
    """An alignment value the data cannot give: no valid LLM layer, or a degenerate vision layer."""


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(str(m) for m in metrics))
    unknown = [m for m in names if m not in METRICS]
    if not names or unknown:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {list(metrics)}")
    return names


def side_values(metric: str, xs: KernelKNN, ys: KernelKNN) -> torch.Tensor:
    """One metric for matched batches of kNN structures (same stimuli, same k): (B,) float64."""
    if metric == "cknna":
        return cknna_sides(xs, ys)
    if metric == "mutual_knn":
        return mutual_knn_sides(xs, ys)
    if metric == "unbiased_cka":
        return kernel_unbiased_cka(xs.kernel, ys.kernel)
    if metric == "cka":
        return kernel_cka(xs.kernel, ys.kernel)
    raise ValueError(f"unknown metric {metric!r}; known: {METRICS}")


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


def layer_search_many(
    vision_xs: Sequence[np.ndarray],
    llm_layers: Iterable[np.ndarray],
    k: int = 10,
    device: torch.device | None = None,
) -> np.ndarray:
    """CKNNA of each vision model against each LLM layer: (n_vision, n_layers); every L built once."""
    device = device or default_device()
    vsides = [KernelKNN.build(kernel(x, device), k) for x in vision_xs]
    m = vsides[0].size
    cols = []
    for i, y in enumerate(llm_layers):
        if np.shape(y)[0] != m:
            raise ValueError(f"LLM layer {i} has {np.shape(y)[0]} stimuli, vision has {m}")
        lside = KernelKNN.build(kernel(y, device), k)
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
            reasons = "; ".join(
                f"{r.layer_name}: {r.reason}" for r in group.itertuples() if r.reason
            )
            raise AlignmentError(
                f"no LLM layer of {llm!r} gives a valid {metric} with vision model {vision!r} "
                f"({reasons or 'no layers'}); check the LLM's feature file"
            )
        chosen[ok["value"].idxmax()] = True
    return chosen


def layer_search_table(
    vision: Mapping[str, tuple[int, np.ndarray]],
    llm: str,
    llm_layers: Iterable[tuple[int, str, np.ndarray]],
    k: int = 10,
    metrics: Sequence[str] = ("cknna",),
    device: torch.device | None = None,
) -> pd.DataFrame:
    """Full-set layer search of one LLM against several vision models, for several metrics.

    ``vision``: vision key → (vision layer index, prepared features m×p); ``llm_layers``:
    (layer index, layer name, prepared features m×q), consumed one at a time. Each LLM layer's
    kernel and kNN lists are built once and used for every vision model and metric.
    Columns: vision, llm, vision_layer, llm_layer, layer_name, metric, value, stability, valid,
    reason, chosen (per (vision, metric) the argmax of value among valid rows).
    """
    names = _check_metrics(metrics)
    if not vision:
        raise ValueError("vision is empty: give at least one vision model")
    device = device or default_device()
    vsides = {key: KernelKNN.build(kernel(x, device), k) for key, (_, x) in vision.items()}
    m = next(iter(vsides.values())).size
    for key, side in vsides.items():
        if side.size != m:
            raise ValueError(f"vision model {key!r} has {side.size} stimuli, others have {m}")
    rows = []
    for index, name, y in llm_layers:
        if np.shape(y)[0] != m:
            raise ValueError(
                f"LLM {llm!r} layer {name} has {np.shape(y)[0]} stimuli, vision has {m}"
            )
        lside = KernelKNN.build(kernel(y, device), k)
        for key, vs in vsides.items():
            for metric in names:
                value = float(side_values(metric, vs, lside)[0])
                valid = bool(np.isfinite(value))
                rows.append(
                    (
                        key,
                        llm,
                        int(vision[key][0]),
                        int(index),
                        str(name),
                        metric,
                        value,
                        np.nan,
                        valid,
                        "" if valid else "non-finite value",
                    )
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


def subset_sides(full: torch.Tensor, subsets: np.ndarray, k: int) -> list[KernelKNN]:
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
        out.append(KernelKNN.build(sub, k))
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
    chosen LLM layer) and :meth:`evaluate` per pair. Random draws are evaluated as one batch.
    """

    def __init__(
        self,
        sets: pd.DataFrame,
        stimulus_ids: Sequence[str],
        k: int = 10,
        n_boot: int = 1000,
        seed: int = 0,
    ) -> None:
        self.m = len(stimulus_ids)
        self.k = k
        self.n_boot = int(n_boot)
        self.positions = sets_to_indices(sets, stimulus_ids)
        self.fixed = sorted(key for key in self.positions if key[0] != "random")
        self.random_draws = sorted(key[2] for key in self.positions if key[0] == "random")
        self.random = (
            np.stack([self.positions[("random", "none", d)] for d in self.random_draws])
            if self.random_draws
            else None
        )
        if self.random is not None and len({len(r) for r in self.random}) != 1:
            raise ValueError("random draws in the sets table have different sizes")
        self.summaries = sorted(
            {s for (name, s, _) in self.positions if name in ("low", "high") and s != "none"}
        )
        self.plans: dict[tuple[str, str], BootstrapPlan] = {}
        if self.n_boot > 0:
            for si, summary in enumerate(self.summaries):
                rng = np.random.default_rng([seed, si])
                for name in ("low", "high"):
                    key = (name, summary, 0)
                    if key in self.positions:
                        self.plans[(name, summary)] = BootstrapPlan(
                            self.positions[key], self.n_boot, rng, k
                        )

    def side(
        self, x_or_kernel: np.ndarray | torch.Tensor, is_kernel: bool = False, boot: bool = True
    ) -> ConditionSide:
        """Kernel of prepared features (or a given kernel) with kNN structures for every condition.

        ``boot=False`` skips the bootstrap resamples (for metrics that have none).
        """
        full = torch.as_tensor(x_or_kernel) if is_kernel else kernel(x_or_kernel)
        if full.shape != (self.m, self.m):
            raise ValueError(f"kernel shape {tuple(full.shape)} does not match m={self.m}")
        subsets: dict = {key: subset_sides(full, self.positions[key], self.k) for key in self.fixed}
        if self.random is not None:
            subsets[("random", 0)] = subset_sides(full, self.random, self.k)
        resamples = {key: plan.side(full) for key, plan in self.plans.items()} if boot else {}
        return ConditionSide(KernelKNN.build(full, self.k), subsets, resamples)

    def _metric_rows(
        self, metric: str, xs: ConditionSide, ys: ConditionSide
    ) -> tuple[list[tuple], dict[tuple[str, str, int], float], np.ndarray]:
        """Condition rows (condition, summary, draw, n_stimuli, value, stability) of one metric."""
        rows = [
            ("full", "none", 0, self.m, float(side_values(metric, xs.full, ys.full)[0]), np.nan)
        ]
        values: dict[tuple[str, str, int], float] = {}
        for key in self.fixed:
            parts = zip(xs.subsets[key], ys.subsets[key], strict=True)
            v = torch.cat([side_values(metric, a, b) for a, b in parts])
            values[key] = float(v[0])
            rows.append((key[0], key[1], key[2], len(self.positions[key]), values[key], np.nan))
        random_vals = np.array([])
        if self.random is not None:
            parts = zip(xs.subsets[("random", 0)], ys.subsets[("random", 0)], strict=True)
            random_vals = torch.cat([side_values(metric, a, b) for a, b in parts]).cpu().numpy()
            for d, v in zip(self.random_draws, random_vals, strict=True):
                rows.append(("random", "none", d, self.random.shape[1], float(v), np.nan))
        return rows, values, random_vals

    def _boot_diff(self, metric: str, summary: str, xs: ConditionSide, ys: ConditionSide):
        """Bootstrap summary of low* − high* (None when this metric or summary has none)."""
        if metric not in BOOTSTRAP_METRICS:
            return None
        if ("low", summary) not in self.plans or ("high", summary) not in self.plans:
            return None
        lo = self.plans[("low", summary)].cknna(
            xs.boot[("low", summary)], ys.boot[("low", summary)]
        )
        hi = self.plans[("high", summary)].cknna(
            xs.boot[("high", summary)], ys.boot[("high", summary)]
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
        for metric in _check_metrics(metrics):
            rows, values, random_vals = self._metric_rows(metric, xs, ys)
            frame = pd.DataFrame(rows, columns=CONDITION_COLUMNS[3:7] + CONDITION_COLUMNS[8:])
            frame.insert(0, "vision", vision)
            frame.insert(1, "llm", llm)
            frame.insert(2, "llm_layer", int(llm_layer))
            frame.insert(7, "metric", metric)
            cond_frames.append(frame)
            stab = {(r[0], r[1], r[2]): r[5] for r in rows}
            for summary in self.summaries:
                low = values.get(("low", summary, 0), float("nan"))
                high = values.get(("high", summary, 0), float("nan"))
                row = {
                    "vision": vision,
                    "llm": llm,
                    "metric": metric,
                    "summary": summary,
                    "low": low,
                    "high": high,
                    "low_stability": stab.get(("low", summary, 0), np.nan),
                    "high_stability": stab.get(("high", summary, 0), np.nan),
                }
                if random_vals.size:
                    row.update(random_baseline(random_vals, low))
                else:
                    row.update(
                        random_mean=np.nan,
                        random_ci_low=np.nan,
                        random_ci_high=np.nan,
                        frac_random_ge_low=np.nan,
                    )
                row["diff_low_high"] = low - high
                summ = self._boot_diff(metric, summary, xs, ys)
                if summ is None:
                    row.update(diff_ci_low=np.nan, diff_ci_high=np.nan, n_boot=0)
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
        """CKNNA (conditions, contrasts) tables of one pair in the per-pair layout of docs/contracts.md."""
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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every stimulus condition of sets.tsv for one LLM, each vision model and metric at its layer.

    ``chosen[(vision, metric)]`` is the LLM layer chosen on the full set for that metric;
    ``llm_layer(index)`` returns a prepared layer and is called once per distinct index. Kernels
    and kNN structures are built once per vision model and once per distinct LLM layer; the
    bootstrap draws are those of :class:`ConditionPlan` (the same for a seed as ``condition_table``).
    Returns (conditions, contrasts) with :data:`CONDITION_COLUMNS` and :data:`CONTRAST_COLUMNS`.
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
    del device  # the subset and bootstrap machinery runs on the CPU
    plan = ConditionPlan(sets, stimulus_ids, k=k, n_boot=n_boot, seed=seed)
    boot = any(metric in BOOTSTRAP_METRICS for metric in names)
    xsides = {key: plan.side(x, boot=boot) for key, (_, x) in vision.items()}
    parts: dict[tuple[str, str], tuple[pd.DataFrame, pd.DataFrame]] = {}
    for index in sorted({int(chosen[(v, mt)]) for v in vision for mt in names}):
        y = llm_layer(index)
        if np.shape(y)[0] != m:
            raise ValueError(
                f"LLM {llm!r} layer {index} has {np.shape(y)[0]} stimuli, expected {m}"
            )
        pairs = [(v, mt) for v in vision for mt in names if int(chosen[(v, mt)]) == index]
        ys = plan.side(y, boot=any(mt in BOOTSTRAP_METRICS for _, mt in pairs))
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
