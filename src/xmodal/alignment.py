"""Fast CKNNA grids: one vision layer against every layer of an LLM, on the full set and on subsets.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from xmodal.metrics import KernelKNN, cknna_sides, gram
from xmodal.selection import sets_to_indices
from xmodal.stats import BootstrapPlan, BootstrapSide, difference_summary, random_baseline

log = logging.getLogger(__name__)

__all__ = [
    "ConditionPlan",
    "ConditionSide",
    "condition_table",
    "default_device",
    "kernel",
    "layer_profile_table",
    "layer_search",
    "layer_search_many",
    "subset_sides",
]

_MAX_BATCH_ELEMS = 1 << 23  # subset kernels gathered per batch (B·s² elements)


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
        self, x_or_kernel: np.ndarray | torch.Tensor, is_kernel: bool = False
    ) -> ConditionSide:
        """Kernel of prepared features (or a given kernel) with kNN structures for every condition."""
        full = torch.as_tensor(x_or_kernel) if is_kernel else kernel(x_or_kernel)
        if full.shape != (self.m, self.m):
            raise ValueError(f"kernel shape {tuple(full.shape)} does not match m={self.m}")
        subsets: dict = {key: subset_sides(full, self.positions[key], self.k) for key in self.fixed}
        if self.random is not None:
            subsets[("random", 0)] = subset_sides(full, self.random, self.k)
        boot = {key: plan.side(full) for key, plan in self.plans.items()}
        return ConditionSide(KernelKNN.build(full, self.k), subsets, boot)

    def evaluate(
        self, vision: str, llm: str, llm_layer: int, xs: ConditionSide, ys: ConditionSide
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(conditions, contrasts) tables of docs/contracts.md for one (vision, LLM layer) pair."""
        rows = [("full", "none", 0, self.m, float(cknna_sides(xs.full, ys.full)[0]))]
        values: dict[tuple[str, str, int], float] = {}
        for key in self.fixed:
            v = torch.cat(
                [cknna_sides(a, b) for a, b in zip(xs.subsets[key], ys.subsets[key], strict=True)]
            )
            values[key] = float(v[0])
            rows.append((key[0], key[1], key[2], len(self.positions[key]), values[key]))
        random_vals = np.array([])
        if self.random is not None:
            parts = zip(xs.subsets[("random", 0)], ys.subsets[("random", 0)], strict=True)
            random_vals = torch.cat([cknna_sides(a, b) for a, b in parts]).cpu().numpy()
            for d, v in zip(self.random_draws, random_vals, strict=True):
                rows.append(("random", "none", d, self.random.shape[1], float(v)))
        conditions = pd.DataFrame(
            rows, columns=["condition", "summary", "draw", "n_stimuli", "value"]
        )
        conditions.insert(0, "llm_layer", int(llm_layer))
        conditions.insert(0, "llm", llm)
        conditions.insert(0, "vision", vision)
        conditions.insert(7, "metric", "cknna")
        conditions = conditions[
            [
                "vision",
                "llm",
                "llm_layer",
                "condition",
                "summary",
                "draw",
                "n_stimuli",
                "metric",
                "value",
            ]
        ]
        contrast_rows = []
        for summary in self.summaries:
            low = values.get(("low", summary, 0), float("nan"))
            high = values.get(("high", summary, 0), float("nan"))
            row = {"vision": vision, "llm": llm, "summary": summary, "low": low, "high": high}
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
            if ("low", summary) in self.plans and ("high", summary) in self.plans:
                lo = self.plans[("low", summary)].cknna(
                    xs.boot[("low", summary)], ys.boot[("low", summary)]
                )
                hi = self.plans[("high", summary)].cknna(
                    xs.boot[("high", summary)], ys.boot[("high", summary)]
                )
                summ = difference_summary(lo - hi)
                row.update(
                    diff_ci_low=summ["diff_ci_low"],
                    diff_ci_high=summ["diff_ci_high"],
                    n_boot=self.n_boot,
                )
            else:
                row.update(diff_ci_low=np.nan, diff_ci_high=np.nan, n_boot=0)
            contrast_rows.append(row)
        contrasts = pd.DataFrame(
            contrast_rows,
            columns=[
                "vision",
                "llm",
                "summary",
                "low",
                "high",
                "random_mean",
                "random_ci_low",
                "random_ci_high",
                "frac_random_ge_low",
                "diff_low_high",
                "diff_ci_low",
                "diff_ci_high",
                "n_boot",
            ],
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
