"""Language-side dispersion: GPA across the language models, per caption (docs/method.md,
"Language-side dispersion").

The same GPA and dispersion summaries as on the vision side (:func:`xmodal.gpa.gpa`,
:func:`xmodal.dispersion.dispersion_table`), run on one layer per LLM: the layer chosen by the
full-set layer search (the most frequent choice by CKNNA across vision models, ties to the lower
index) or the layer at a configured relative depth. Then: its correlation with vision dispersion
(bootstrap interval, :mod:`xmodal.correlate`), and the 2 × 2 stimulus sets (low/high vision ×
low/high language dispersion, equal sizes) on which each (vision, LLM) pair's alignment is
compared with size-matched random sets.

``run_*`` functions are pipeline steps (files in, files out, written atomically), called by the
workflow's thin scripts; everything else takes arrays and tables.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd

from xmodal.config import ConfigError, min_set_size, setting
from xmodal.io import read_table
from xmodal.summary import mean_stability, require_unique_keys

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

__all__ = [
    "CELLS",
    "CELL_COLUMNS",
    "CORRELATION_COLUMNS",
    "LAYER_COLUMNS",
    "SUMMARIES",
    "LanguageDispersionSettings",
    "cell_table",
    "chosen_llm_layer",
    "correlation_table",
    "joint_sets",
    "language_layers",
    "relative_depth_layer",
]

#: Dispersion summaries (columns of dispersion.tsv) paired across the two modalities.
SUMMARIES = {"mean": "mean_dispersion", "pc1": "pc1_score"}
#: the metric by which ``layer: chosen`` takes each LLM's layer from its layer search
CHOSEN_METRIC = "cknna"
#: The 2 × 2 sets: (set name, vision level, language level).
CELLS = (
    ("vlow_llow", "low", "low"),
    ("vlow_lhigh", "low", "high"),
    ("vhigh_llow", "high", "low"),
    ("vhigh_lhigh", "high", "high"),
)
LAYER_COLUMNS = [
    "llm",
    "llm_layer",
    "layer_name",
    "n_layers",
    "relative_depth",
    "rule",
    "votes",
    "n_vision",
]
CORRELATION_COLUMNS = [
    "summary",
    "method",
    "estimate",
    "ci_low",
    "ci_high",
    "p_value",
    "n",
    "n_boot",
    "reason",
]
CELL_COLUMNS = [
    "vision",
    "llm",
    "llm_layer",
    "layer_tied",
    "metric",
    "summary",
    "cell",
    "vision_level",
    "language_level",
    "n_stimuli",
    "value",
    "stability",
    "random_mean",
    "random_ci_low",
    "random_ci_high",
    "random_stability",
    "frac_random_ge",
    "n_random",
]


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class LanguageDispersionSettings:
    """``analysis.language_dispersion`` with its defaults (the one place they are defaulted).

    ``layer`` is ``"chosen"`` (the layer search's choice) or a relative depth in [0, 1].
    """

    enabled: bool = True
    layer: str | float = "chosen"

    @property
    def uses_chosen(self) -> bool:
        """True when the layer comes from the layer-search tables (they become inputs)."""
        return self.layer == "chosen"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LanguageDispersionSettings:
        """Read and check ``analysis.language_dispersion`` (absent: the defaults)."""
        raw = dict((config.get("analysis") or {}).get("language_dispersion") or {})
        enabled = bool(raw.get("enabled", cls.enabled))
        layer = raw.get("layer", cls.layer)
        key = "analysis.language_dispersion.layer"
        if isinstance(layer, bool) or not (
            layer == "chosen" or (isinstance(layer, int | float) and 0 <= layer <= 1)
        ):
            raise ConfigError(
                f"config key '{key}': {layer!r} is neither 'chosen' nor a relative depth in "
                "[0, 1] (0 = embeddings, 1 = last hidden state)"
            )
        layer = "chosen" if layer == "chosen" else float(layer)
        metrics = list(setting(config, "analysis.metrics"))
        if enabled and CHOSEN_METRIC not in metrics:
            # the 2 × 2 sets are scored by CKNNA at each LLM's chosen layer, whatever `layer`
            raise ConfigError(
                f"config key 'analysis.metrics': the language-side dispersion scores its 2 × 2 "
                f"sets by CKNNA at the layer the search chose by CKNNA (and with '{key}: "
                f"chosen' takes that layer), but 'analysis.metrics' ({metrics}) has no cknna; "
                "add cknna to 'analysis.metrics', or set "
                "'analysis.language_dispersion.enabled' to false"
            )
        n_llm = sum(
            1 for m in (config.get("models") or {}).values() if m.get("modality") == "language"
        )
        if enabled and n_llm < 2:
            raise ConfigError(
                f"config key 'analysis.language_dispersion.enabled': GPA across language models "
                f"needs at least 2 of them, found {n_llm}; add language models or set it to false"
            )
        return cls(enabled=enabled, layer=layer)


# ---------------------------------------------------------------- layers


def relative_depth_layer(depth: float, n_layers: int) -> int:
    """Hidden state at relative depth d of L + 1 states: index ⌊d·L + 1/2⌋ (0 = embeddings).

    d is taken as the decimal it is written as (``repr``, exact): in floats 0.58 · 25 is just
    below 14.5, and a d halfway between two states picked the lower one."""
    if not 0 <= depth <= 1:
        raise ValueError(f"relative depth must be in [0, 1], got {depth}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be ≥ 1, got {n_layers}")
    return math.floor(Fraction(repr(float(depth))) * (n_layers - 1) + Fraction(1, 2))


def chosen_llm_layer(
    layers: pd.DataFrame, llm: str, metric: str = CHOSEN_METRIC, path: PathLike = "layers table"
) -> tuple[int, int, int]:
    """One layer per LLM from its layer search: the layer chosen for the most vision models by
    ``metric``, ties to the lower index. Returns (layer, votes, number of vision models)."""
    rows = layers.loc[
        layers["chosen"].astype(bool)
        & (layers["metric"].astype(str) == metric)
        & (layers["llm"].astype(str) == str(llm))
    ]
    if rows.empty:
        raise ValueError(
            f"{path}: no layer of LLM {llm!r} is marked chosen for metric {metric!r}; rerun its "
            "layer search (rule layer_search)"
        )
    # one vote per vision model: a repeated row would count twice
    name = f"layer-search ({path}: rows chosen for LLM {llm!r} by {metric!r})"
    require_unique_keys(rows, ["vision"], name)
    votes = Counter(int(v) for v in rows["llm_layer"])
    best = max(votes.values())
    layer = min(v for v, c in votes.items() if c == best)
    return layer, best, int(rows["vision"].nunique())


def language_layers(
    llms: Sequence[str],
    layer_names: Mapping[str, Sequence[str]],
    setting: str | float,
    layer_tables: Mapping[str, PathLike] | None = None,
) -> pd.DataFrame:
    """The layer each LLM contributes to the language GPA (:data:`LAYER_COLUMNS`).

    ``layer_names[llm]``: the file's layer names; ``setting``: ``"chosen"`` (then
    ``layer_tables[llm]`` is that LLM's layer-search table) or a relative depth.
    """
    rows = []
    for llm in llms:
        names = list(layer_names[llm])
        n = len(names)
        if setting == "chosen":
            if not layer_tables or llm not in layer_tables:
                raise ValueError(f"no layer-search table given for LLM {llm!r}")
            path = layer_tables[llm]
            index, votes, n_vision = chosen_llm_layer(read_table(path), llm, path=path)
            if not 0 <= index < n:
                raise ValueError(
                    f"{path}: chosen layer {index} of {llm!r} is not among its {n} layers; the "
                    "layer search is older than the feature file (rerun it)"
                )
            rule = "chosen"
        else:
            index, votes, n_vision = relative_depth_layer(float(setting), n), np.nan, np.nan
            rule = f"depth {float(setting):g}"
        rows.append(
            {
                "llm": llm,
                "llm_layer": index,
                "layer_name": names[index],
                "n_layers": n,
                "relative_depth": index / (n - 1) if n > 1 else 0.0,
                "rule": rule,
                "votes": votes,
                "n_vision": n_vision,
            }
        )
    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


# ---------------------------------------------------------------- correlation with vision


def _paired(vision: pd.DataFrame, language: pd.DataFrame) -> pd.DataFrame:
    """Both dispersion tables on the same stimuli, in the vision table's order."""
    v_ids = vision["stimulus_id"].astype(str)
    l_ids = language["stimulus_id"].astype(str)
    require_unique_keys(vision.assign(stimulus_id=v_ids), ["stimulus_id"], "vision dispersion")
    require_unique_keys(language.assign(stimulus_id=l_ids), ["stimulus_id"], "language dispersion")
    if set(v_ids) != set(l_ids) or len(v_ids) != len(l_ids):
        missing = sorted(set(v_ids) ^ set(l_ids))
        raise ValueError(
            f"vision and language dispersion cover different stimuli ({len(v_ids)} vs "
            f"{len(l_ids)}; differing ids: {missing[:5]}); rerun both GPA steps on one manifest"
        )
    lang = language.assign(stimulus_id=l_ids).set_index("stimulus_id")
    out = vision.assign(stimulus_id=v_ids).reset_index(drop=True)
    for col in SUMMARIES.values():
        out[f"language_{col}"] = lang.loc[out["stimulus_id"], col].to_numpy()
    return out


def correlation_table(
    vision: pd.DataFrame, language: pd.DataFrame, n_boot: int, seed: int
) -> pd.DataFrame:
    """Spearman and Pearson correlation of language with vision dispersion, per summary (mean
    with mean, PC1 with PC1), each with its bootstrap interval (:data:`CORRELATION_COLUMNS`)."""
    from xmodal.correlate import correlation_ci

    both = _paired(vision, language)
    rows = []
    for summary, col in SUMMARIES.items():
        for method in ("spearman", "pearson"):
            res = correlation_ci(
                both[col].to_numpy(),
                both[f"language_{col}"].to_numpy(),
                method=method,
                n_boot=n_boot,
                seed=seed,  # the same resamples for every coefficient
                names=("vision dispersion", "language dispersion"),
            )
            rows.append({"summary": summary, "method": method, **res})
    return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)


# ---------------------------------------------------------------- the 2 × 2 sets


def joint_sets(
    vision: pd.DataFrame,
    language: pd.DataFrame,
    set_size: int,
    n_random: int,
    knn_k: int,
    seed: int,
) -> pd.DataFrame:
    """The 2 × 2 sets and size-matched random sets (columns set, summary, draw, stimulus_id).

    For each summary (mean, PC1), each modality's stimuli are split at the median of a stable
    ascending sort (low = the first ⌊m/2⌋, high = the rest); the four cells are the
    intersections. Every cell set has the same size n = min(``set_size``, smallest cell over
    both summaries) and holds the n members deepest in its corner: the largest
    e = d_v + d_l, with d = rank (high half) or m − 1 − rank (low half), ties by manifest order.
    ``n_random`` random sets of n stimuli (``xmodal.selection.random_sets`` with ``seed``) are
    the size-matched baseline.
    """
    from xmodal.dispersion import stable_rank
    from xmodal.selection import random_sets

    both = _paired(vision, language)
    ids = both["stimulus_id"].to_numpy(dtype=object)
    m = len(ids)
    half = m // 2
    cells: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for summary, col in SUMMARIES.items():
        rv = stable_rank(both[col].to_numpy(dtype=np.float64))
        rl = stable_rank(both[f"language_{col}"].to_numpy(dtype=np.float64))
        for name, v_level, l_level in CELLS:
            in_v = rv < half if v_level == "low" else rv >= half
            in_l = rl < half if l_level == "low" else rl >= half
            members = np.flatnonzero(in_v & in_l)
            depth_v = rv if v_level == "high" else m - 1 - rv
            depth_l = rl if l_level == "high" else m - 1 - rl
            cells[(summary, name)] = (members, (depth_v + depth_l)[members])
    sizes = {key: len(mem) for key, (mem, _) in cells.items()}
    n = min(int(set_size), *sizes.values())
    log.info(
        "2 x 2 sets: cell sizes %s; every set holds n = %d stimuli",
        ", ".join(f"{s}/{c}: {k}" for (s, c), k in sizes.items()),
        n,
    )
    if n < min_set_size(knn_k):
        small = min(sizes, key=sizes.get)
        why = (
            "vision and language dispersion are strongly related"
            if sizes[small] < m / 8
            else f"cells of a quarter of {m} stimuli"
        )
        raise ConfigError(
            f"the 2 x 2 sets hold only n = {n} stimuli each (cell {small[1]} by {small[0]} "
            f"dispersion has {sizes[small]} of {m}: {why}), fewer than max(4, 2 × k) = "
            f"{min_set_size(knn_k)} for CKNNA with k = {knn_k} (config key 'analysis.knn_k'); "
            "lower knn_k, use more stimuli, or set analysis.language_dispersion.enabled to false"
        )
    if n < set_size:
        log.info("2 x 2 sets are smaller than analysis.set_size = %d: n = %d", set_size, n)
    parts = []
    for (summary, name), (members, depth) in cells.items():
        order = np.lexsort((members, -depth))[:n]  # deepest first, ties by manifest position
        parts.append(
            pd.DataFrame(
                {"set": name, "summary": summary, "draw": 0, "stimulus_id": ids[members[order]]}
            )
        )
    for draw, pos in enumerate(random_sets(m, n, int(n_random), int(seed))):
        parts.append(
            pd.DataFrame(
                {"set": "random", "summary": "none", "draw": draw, "stimulus_id": ids[pos]}
            )
        )
    out = pd.concat(parts, ignore_index=True)
    out["draw"] = out["draw"].astype(np.int64)
    return out


# ---------------------------------------------------------------- alignment on the 2 × 2 sets


def cell_table(
    conditions: pd.DataFrame, tied: Mapping[tuple[str, str], bool] | None = None
) -> pd.DataFrame:
    """Each 2 × 2 set's alignment against the size-matched random draws (:data:`CELL_COLUMNS`).

    ``conditions``: :func:`xmodal.alignment.condition_tables` of the joint sets; ``tied``: per
    (vision, metric), whether the layer search's choice of the LLM layer was tied with another
    layer (``layer_tied``; docs/method.md, "Layer choice and statistics"). Per (vision,
    LLM, metric): the random draws' mean, 95% percentile interval and the fraction of draws at or
    above the cell's value (``xmodal.stats.random_baseline``). ``stability`` is the cell's own
    (docs/method.md, "Stability"), ``random_stability`` the mean of the draws' stabilities
    (``xmodal.summary.mean_stability``); NaN where the conditions table has no stability.
    """
    from xmodal.alignment import layer_tie_column
    from xmodal.stats import random_baseline

    levels = {name: (v, lang) for name, v, lang in CELLS}
    rows = []
    for (vision, llm, metric), group in conditions.groupby(["vision", "llm", "metric"], sort=False):
        rand = group.loc[group["condition"] == "random", "value"].to_numpy(dtype=np.float64)
        has_stability = "stability" in group.columns
        rand_stab = (
            group.loc[group["condition"] == "random", "stability"].to_numpy(dtype=np.float64)
            if has_stability
            else np.full(rand.size, np.nan)
        )
        cells = group[group["condition"].isin(list(levels))]
        for r in cells.itertuples():
            base = (
                random_baseline(rand, float(r.value))
                if rand.size
                else {
                    "random_mean": np.nan,
                    "random_ci_low": np.nan,
                    "random_ci_high": np.nan,
                    "frac_random_ge_low": np.nan,
                }
            )
            rows.append(
                {
                    "vision": vision,
                    "llm": llm,
                    "llm_layer": int(r.llm_layer),
                    "layer_tied": False,
                    "metric": metric,
                    "summary": r.summary,
                    "cell": r.condition,
                    "vision_level": levels[r.condition][0],
                    "language_level": levels[r.condition][1],
                    "n_stimuli": int(r.n_stimuli),
                    "value": float(r.value),
                    "stability": float(r.stability) if has_stability else np.nan,
                    "random_mean": base["random_mean"],
                    "random_ci_low": base["random_ci_low"],
                    "random_ci_high": base["random_ci_high"],
                    "random_stability": mean_stability(rand_stab),
                    "frac_random_ge": base["frac_random_ge_low"],
                    "n_random": int(rand.size),
                }
            )
    table = pd.DataFrame(rows, columns=CELL_COLUMNS)
    table["layer_tied"] = layer_tie_column(table, tied)
    return table
