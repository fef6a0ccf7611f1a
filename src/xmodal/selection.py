"""Stimulus sets by a dispersion summary (docs/method.md, "Stimulus sets"): low / high / random / drop fractions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "SET_NAMES",
    "drop_fraction_sets",
    "high_set",
    "low_set",
    "make_sets",
    "random_sets",
    "sets_to_indices",
]

SET_NAMES = ("low", "high", "random", "drop_high", "drop_low")


def _scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain non-finite values")
    return s


def _check_size(set_size: int, m: int) -> int:
    if isinstance(set_size, bool) or int(set_size) != set_size or not 1 <= set_size <= m:
        raise ValueError(f"set_size must be an integer in [1, m={m}], got {set_size!r}")
    return int(set_size)


def _check_fraction(fraction: float) -> float:
    if not 0 < fraction < 1:
        raise ValueError(f"drop_fraction must satisfy 0 < drop_fraction < 1, got {fraction!r}")
    return float(fraction)


def low_set(scores: np.ndarray, set_size: int) -> np.ndarray:
    """Positions of the first K in a stable ascending sort of the summary (least dispersed)."""
    s = _scores(scores)
    return np.argsort(s, kind="stable")[: _check_size(set_size, s.size)]


def high_set(scores: np.ndarray, set_size: int) -> np.ndarray:
    """Positions of the last K in a stable ascending sort of the summary (most dispersed)."""
    s = _scores(scores)
    k = _check_size(set_size, s.size)
    return np.argsort(s, kind="stable")[s.size - k :]


def random_sets(m: int, set_size: int, n_draws: int, seed: int) -> np.ndarray:
    """n_draws × K positions, each row drawn without replacement (numpy default_rng(seed))."""
    k = _check_size(set_size, m)
    if n_draws < 0:
        raise ValueError(f"n_random must be ≥ 0, got {n_draws}")
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(m, size=k, replace=False) for _ in range(n_draws)]).reshape(
        n_draws, k
    )


def drop_fraction_sets(scores: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(drop_high, drop_low): positions left after removing the top / bottom round(f·m) by stable rank."""
    s = _scores(scores)
    f = _check_fraction(fraction)
    n_drop = int(round(f * s.size))
    if not 0 < n_drop < s.size:
        raise ValueError(f"drop_fraction={f} removes {n_drop} of {s.size} stimuli; need 0 < n < m")
    order = np.argsort(s, kind="stable")
    return np.sort(order[: s.size - n_drop]), np.sort(order[n_drop:])


def make_sets(
    stimulus_ids: Sequence[str],
    mean_scores: np.ndarray,
    pc1_scores: np.ndarray,
    set_size: int,
    n_random: int = 100,
    drop_fraction: float = 0.25,
    seed: int = 0,
) -> pd.DataFrame:
    """Long table set, summary, draw, stimulus_id: low/high by mean and pc1, random draws, drop sets.

    Drop sets follow the mean summary (the paper's Supp. Fig. 1) and also the pc1 summary.
    """
    ids = np.asarray([str(s) for s in stimulus_ids], dtype=object)
    m = ids.size
    if len(set(ids.tolist())) != m:
        raise ValueError("stimulus_ids must be unique")
    mean_s, pc1_s = _scores(mean_scores), _scores(pc1_scores)
    if mean_s.size != m or pc1_s.size != m:
        raise ValueError(f"{m} stimulus ids but {mean_s.size} mean and {pc1_s.size} pc1 scores")
    _check_size(set_size, m)
    _check_fraction(drop_fraction)
    parts = []

    def add(name: str, summary: str, draw: int, pos: np.ndarray) -> None:
        parts.append(
            pd.DataFrame({"set": name, "summary": summary, "draw": draw, "stimulus_id": ids[pos]})
        )

    for summary, scores in (("mean", mean_s), ("pc1", pc1_s)):
        add("low", summary, 0, low_set(scores, set_size))
        add("high", summary, 0, high_set(scores, set_size))
    for draw, pos in enumerate(random_sets(m, set_size, n_random, seed)):
        add("random", "none", draw, pos)
    for summary, scores in (("mean", mean_s), ("pc1", pc1_s)):
        drop_high, drop_low = drop_fraction_sets(scores, drop_fraction)
        add("drop_high", summary, 0, drop_high)
        add("drop_low", summary, 0, drop_low)
    out = pd.concat(parts, ignore_index=True)
    out["draw"] = out["draw"].astype(np.int64)
    return out


def sets_to_indices(
    sets: pd.DataFrame, stimulus_ids: Sequence[str]
) -> dict[tuple[str, str, int], np.ndarray]:
    """Map (set, summary, draw) → positions into ``stimulus_ids``; unknown ids raise ValueError naming them."""
    required = {"set", "summary", "draw", "stimulus_id"}
    missing = required - set(sets.columns)
    if missing:
        raise ValueError(f"sets table lacks columns {sorted(missing)}")
    lookup = {str(s): i for i, s in enumerate(stimulus_ids)}
    sid = sets["stimulus_id"].astype(str)
    unknown = sorted(set(sid) - set(lookup))
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ValueError(
            f"{len(unknown)} stimulus ids in the sets table are not in the features: {shown}"
        )
    pos = sid.map(lookup).to_numpy(dtype=np.int64)
    out: dict[tuple[str, str, int], np.ndarray] = {}
    keys = list(
        zip(
            sets["set"].astype(str),
            sets["summary"].astype(str),
            sets["draw"].astype(int),
            strict=True,
        )
    )
    groups: dict[tuple[str, str, int], list[int]] = {}
    for key, p in zip(keys, pos, strict=True):
        groups.setdefault(key, []).append(int(p))
    for key, plist in groups.items():
        arr = np.asarray(plist, dtype=np.int64)
        if np.unique(arr).size != arr.size:
            raise ValueError(f"set {key} lists a stimulus more than once")
        out[key] = arr
    return out
