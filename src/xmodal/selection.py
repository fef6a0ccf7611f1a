"""Stimulus sets by a dispersion summary (docs/method.md, "Stimulus sets"): low / high / random /
drop fractions, the size-matched random sets of the drop ablation and the random halves of the
held-out layer choice (docs/method.md, "Controls")."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from xmodal.config import DEFAULTS, ConfigError, heldout_set_size, min_set_size

__all__ = [
    "DRAW_KEYS",
    "RANDOM_SETS",
    "SEED_STREAMS",
    "SET_NAMES",
    "DropControl",
    "HeldOutLayer",
    "SelfSelection",
    "check_set_sizes",
    "config_draws",
    "drop_fraction_sets",
    "drop_set_size",
    "heldout_set_size",
    "heldout_sets",
    "high_set",
    "low_set",
    "make_sets",
    "others_sets",
    "random_sets",
    "read_sets",
    "sets_to_indices",
    "split_halves",
]

SET_NAMES = ("low", "high", "random", "drop_high", "drop_low", "random_drop")
#: Sets that are families of random draws (several ``draw`` values of one size): each family is
#: evaluated as one batch and summarised as a distribution; any other set is a fixed set.
RANDOM_SETS = ("random", "random_drop")
#: numpy seeds of the random draws: ``default_rng(seed)`` for the random baseline (as before the
#: controls existed), ``default_rng([seed, stream])`` for the others, and
#: ``default_rng([seed, 13, split])`` for the random sets inside half B of one split,
#: ``default_rng([seed, 14, crc32(model)])`` for the row permutations of a held-out model
#: (:func:`xmodal.dispersion.leave_one_model_out`). The
#: bootstrap's ``[seed, i]`` (i: the summary's index) is distinct from these except for i = 0:
#: numpy pads a seed list with zeros, so ``[seed, 0]`` is ``seed``, the random baseline's stream
#: (docs/method.md, "Seeds": no reported number uses both, so none is affected).
SEED_STREAMS = {"random_drop": 11, "splits": 12, "heldout_random": 13, "loo_permutations": 14}


def _scores(scores: np.ndarray, what: str = "scores", ids: np.ndarray | None = None) -> np.ndarray:
    """``scores`` as a finite 1-D float array; else an error naming ``what`` and, given the
    stimuli's ``ids``, the first stimuli whose score is not a number."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {s.shape}")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        named = (
            f": {', '.join(repr(str(i)) for i in ids[bad[:5]])}{', …' if bad.size > 5 else ''}"
            if ids is not None and ids.size == s.size
            else ""
        )
        raise ValueError(f"{what} is not a finite number for {bad.size} stimuli{named}")
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


def random_sets(m: int, set_size: int, n_draws: int, seed: int | Sequence[int]) -> np.ndarray:
    """n_draws × K positions, each row drawn without replacement (numpy default_rng(seed)).

    Row r is the r-th ``rng.choice(m, K, replace=False)`` of one generator (positions in draw
    order, not sorted).
    """
    k = _check_size(set_size, m)
    if n_draws < 0:
        raise ValueError(f"n_random must be ≥ 0, got {n_draws}")
    rng = np.random.default_rng(seed)
    rows = [rng.choice(m, size=k, replace=False) for _ in range(n_draws)]
    return np.stack(rows) if rows else np.empty((0, k), dtype=np.int64)


def drop_set_size(m: int, fraction: float) -> int:
    """Stimuli a drop set keeps: m − round(f·m) (Python's round, as :func:`drop_fraction_sets`)."""
    return int(m) - int(round(_check_fraction(fraction) * m))


def drop_fraction_sets(scores: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(drop_high, drop_low): positions left after removing the top / bottom round(f·m) by stable rank."""
    s = _scores(scores)
    f = _check_fraction(fraction)
    n_drop = int(round(f * s.size))
    if not 0 < n_drop < s.size:
        raise ValueError(f"drop_fraction={f} removes {n_drop} of {s.size} stimuli; need 0 < n < m")
    order = np.argsort(s, kind="stable")
    return np.sort(order[: s.size - n_drop]), np.sort(order[n_drop:])


def _ids_and_scores(
    stimulus_ids: Sequence[str], mean_scores: np.ndarray, pc1_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique ids (as text) and the two dispersion summaries, checked to match them."""
    ids = np.asarray([str(s) for s in stimulus_ids], dtype=object)
    m = ids.size
    if len(set(ids.tolist())) != m:
        raise ValueError("stimulus_ids must be unique")
    mean_s = _scores(mean_scores, "the mean dispersion", ids)
    pc1_s = _scores(pc1_scores, "the PC1 score of dispersion", ids)
    if mean_s.size != m or pc1_s.size != m:
        raise ValueError(f"{m} stimulus ids but {mean_s.size} mean and {pc1_s.size} pc1 scores")
    return ids, mean_s, pc1_s


def make_sets(
    stimulus_ids: Sequence[str],
    mean_scores: np.ndarray,
    pc1_scores: np.ndarray,
    set_size: int,
    n_random: int = 100,
    drop_fraction: float = 0.25,
    seed: int = 0,
    n_drop_random: int = 0,
) -> pd.DataFrame:
    """Long table set, summary, draw, stimulus_id: low/high by mean and pc1, random draws, drop sets.

    Drop sets follow the mean summary (the paper's Supp. Fig. 1) and also the pc1 summary.
    ``n_drop_random`` > 0 adds the size-matched control of the drop sets: set ``random_drop``
    (summary ``none``), that many random sets of the drop sets' size m − round(f·m), drawn by
    :func:`random_sets` with seed ``[seed, 11]`` (docs/method.md, "Size-matched drop control").
    """
    ids, mean_s, pc1_s = _ids_and_scores(stimulus_ids, mean_scores, pc1_scores)
    m = ids.size
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
    if n_drop_random < 0:
        raise ValueError(f"n_drop_random must be ≥ 0, got {n_drop_random}")
    if n_drop_random:
        size = drop_set_size(m, drop_fraction)
        stream = [int(seed), SEED_STREAMS["random_drop"]]
        for draw, pos in enumerate(random_sets(m, size, n_drop_random, stream)):
            add("random_drop", "none", draw, pos)
    out = pd.concat(parts, ignore_index=True)
    out["draw"] = out["draw"].astype(np.int64)
    return out


#: the dispersion summaries of the sets chosen without a model: loo_stimuli.tsv's column of each
SELF_SELECTION_SCORES = {"mean": "partial_dispersion", "pc1": "partial_pc1"}


def others_sets(
    stimulus_ids: Sequence[str], partial_dispersion: pd.DataFrame, set_size: int
) -> pd.DataFrame:
    """Each vision model's low and high sets chosen without it (docs/method.md, "Sets chosen
    without the scored model"): the first / last K of a stable ascending sort of the mean
    dispersion, and of the PC1 score, of the GPA over the other vision models (ties by manifest
    order).

    ``partial_dispersion``: ``loo_stimuli.tsv`` (``held_out``, ``stimulus_id``,
    ``partial_dispersion`` and ``partial_pc1``), every stimulus of ``stimulus_ids`` once per
    held-out model. Long table ``vision``, ``set`` (``low``, ``high``), ``summary`` (``mean``
    from ``partial_dispersion``; ``pc1`` from ``partial_pc1``, when the table has it),
    ``draw`` (0), ``stimulus_id``.
    """
    ids = np.asarray([str(s) for s in stimulus_ids], dtype=object)
    parts = []
    for model, g in partial_dispersion.groupby("held_out", sort=False):
        g = g.assign(stimulus_id=g["stimulus_id"].astype(str)).set_index("stimulus_id")
        if len(g) != ids.size or not g.index.is_unique or set(g.index) != set(ids):
            raise ValueError(
                f"the partial dispersion without {model!r} covers {g.index.nunique()} of "
                f"{ids.size} stimuli (the leave-one-model-out table is from other stimuli)"
            )
        for summary, column in SELF_SELECTION_SCORES.items():
            if column not in g.columns:
                continue
            scores = _scores(
                g.loc[ids, column].to_numpy(np.float64),
                f"{column} without {model!r} (leave-one-model-out table)",
                ids,
            )
            for name, pos in (
                ("low", low_set(scores, set_size)),
                ("high", high_set(scores, set_size)),
            ):
                parts.append(
                    pd.DataFrame(
                        {
                            "vision": str(model),
                            "set": name,
                            "summary": summary,
                            "draw": 0,
                            "stimulus_id": ids[pos],
                        }
                    )
                )
    if not parts:
        raise ValueError("the leave-one-model-out table holds no model")
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
    keys = pd.DataFrame(
        {
            "set": sets["set"].astype(str).to_numpy(dtype=object),
            "summary": sets["summary"].astype(str).to_numpy(dtype=object),
            "draw": sets["draw"].astype(int).to_numpy(dtype=np.int64),
        }
    )
    out: dict[tuple[str, str, int], np.ndarray] = {}
    # rows of each (set, summary, draw) in table order
    for (name, summary, draw), rows in keys.groupby(["set", "summary", "draw"]).indices.items():
        key = (str(name), str(summary), int(draw))
        arr = pos[rows]
        if np.unique(arr).size != arr.size:
            raise ValueError(f"set {key} lists a stimulus more than once")
        out[key] = arr
    return out


#: the config key that sets the number of draws of each family of random sets
DRAW_KEYS = {"random": "analysis.n_random", "random_drop": "analysis.drop_control.n_random"}


def config_draws(config: Mapping[str, Any]) -> dict[str, int]:
    """The number of draws of each family of random sets that the config asks for
    (``random_drop``: 0 when the drop control is off), as :func:`check_set_sizes` compares
    them."""
    analysis = config.get("analysis") or {}
    n_random = _count(analysis.get("n_random"), DRAW_KEYS["random"], 0)
    return {
        "random": n_random,
        "random_drop": DropControl.from_config(config).draws({"n_random": n_random}),
    }


def check_set_sizes(
    sets: pd.DataFrame,
    path: str | os.PathLike = "the sets table",
    draws: Mapping[str, int] | None = None,
) -> None:
    """Refuse a sets table whose sets do not have the sizes the pipeline gives them: inside each
    split (held-out sets) or vision model (self-selection sets), every low, high and random set
    (and every 2 × 2 cell) holds the same number of stimuli, and so does every drop set and its
    size-matched random draw; every split or vision model holds every set, with its random
    draws numbered 0..n-1. A table edited by hand (a row or a draw deleted) would compare sets
    of different sizes, or average fewer draws, without an error; the message names the file
    and the set. ``draws`` (set name → number of draws, from :func:`config_draws`): each set
    with n > 0 must be in the table with exactly n draws, which also catches the last draw
    deleted from every group, and a table made with another ``analysis.n_random``."""
    required = {"set", "summary", "draw", "stimulus_id"}
    if not required <= set(sets.columns):
        raise ValueError(f"{path}: sets table lacks columns {sorted(required - set(sets.columns))}")
    by = [c for c in ("split", "vision") if c in sets.columns]
    sizes = sets.groupby([*by, "set", "summary", "draw"], sort=False).size().reset_index(name="n")
    sizes["kind"] = np.where(sizes["set"].astype(str).str.contains("drop"), "drop", "set")
    # every split or vision model holds every set, and random draws are numbered 0..n-1 in
    # each: a draw (or a split's sets) deleted whole leaves sets of the usual size, and the
    # mean over draws would quietly use fewer
    if by:
        groups = sizes[by].drop_duplicates()
        for (name, summary), present in sizes.groupby(["set", "summary"], sort=False):
            absent = groups.merge(present[by].drop_duplicates(), how="left", indicator=True)
            absent = absent[absent["_merge"] == "left_only"]
            if len(absent):
                where = ", ".join(f"{c} {absent[c].iloc[0]}" for c in by)
                raise ValueError(
                    f"{path}: set {name!r} ({summary}) is missing for {where}; was it edited? "
                    "Delete it and rerun (the pipeline writes it again)"
                )
    # draws as read, not truncated to integers: a draw edited to 1.5 is not draw 1
    draws_of = sizes.groupby(["set", "summary", *by], sort=False)["draw"].agg(
        lambda d: set(d.tolist())
    )
    # draws a set has: the config's where given, else the most common 1 + largest draw over its
    # splits (robust to one edit)
    usual_draws = (
        draws_of.map(lambda d: int(max(d)) + 1).groupby(level="set").agg(lambda n: n.mode().max())
    )
    # a family the config switches off (0 draws) is not checked: its draws are not read as such
    asked_for = {name: n for name, n in (draws or {}).items() if n > 0}
    for name, n in asked_for.items():
        if name not in usual_draws.index:
            raise ValueError(
                f"{path}: holds no {name!r} set, where {DRAW_KEYS.get(name, 'the config')} asks "
                f"for {n} draws; was it edited, or made with another config? Delete it and rerun "
                "(the pipeline writes it again)"
            )
        usual_draws[name] = n
    for (name, summary, *at), found in draws_of.items():
        expected = set(range(int(usual_draws[name])))
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            where = "".join(f", {c} {v}" for c, v in zip(by, at, strict=True))
            wrong = " and ".join(
                [f"lacks draw(s) {missing[:10]}"] * bool(missing)
                + [f"has draw(s) {unexpected[:10]}"] * bool(unexpected)
            )
            asked = f" ({DRAW_KEYS.get(name, 'the config')} is {len(expected)})" * (
                name in asked_for
            )
            raise ValueError(
                f"{path}: set {name!r} ({summary}{where}) {wrong} "
                f"{'outside' if unexpected else 'of'} 0..{len(expected) - 1}{asked}; was it "
                "edited, or made with another config? Delete it and rerun (the pipeline writes "
                "it again)"
            )
    for _, group in sizes.groupby([*by, "kind"], sort=False):
        usual = int(group["n"].mode().max())
        odd = group[group["n"] != usual]
        if len(odd):
            r = odd.iloc[0]
            where = "".join(f", {c} {r[c]}" for c in (*by, "draw") if c != "draw" or r["draw"])
            raise ValueError(
                f"{path}: set {r['set']!r} ({r['summary']}{where}) holds {r['n']} stimuli where "
                f"the table's other sets of its kind hold {usual}; was it edited? Delete it and "
                "rerun (the pipeline writes it again)"
            )


def read_sets(path: str | os.PathLike, draws: Mapping[str, int] | None = None) -> pd.DataFrame:
    """A sets table (``sets.tsv``, ``heldout_sets.tsv``, the 2 × 2 and self-selection sets),
    read and checked by :func:`check_set_sizes` (with ``draws``, against the config)."""
    from xmodal.io import read_table

    sets = read_table(path, numbers=("draw",))
    check_set_sizes(sets, path, draws)
    return sets


# ---------------------------------------------------------------- held-out layer choice


def split_halves(m: int, n_splits: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random halves of the m stimuli: (A, B), arrays (n_splits, ⌊m/2⌋) and (n_splits, m − ⌊m/2⌋).

    Split s is the s-th ``rng.permutation(m)`` of ``numpy.random.default_rng([seed, 12])``:
    A = its first ⌊m/2⌋ positions, B = the rest, each sorted (manifest order). Not stratified:
    the halves depend on m and the seed only, not on dispersion, so that the layer search that
    chooses a layer on A does not wait for GPA (docs/method.md, "Held-out layer choice").
    """
    if isinstance(m, bool) or int(m) != m or m < 2:
        raise ValueError(f"need at least 2 stimuli to split into halves, got m={m!r}")
    if isinstance(n_splits, bool) or int(n_splits) != n_splits or n_splits < 1:
        raise ValueError(f"n_splits must be an integer ≥ 1, got {n_splits!r}")
    rng = np.random.default_rng([int(seed), SEED_STREAMS["splits"]])
    half = int(m) // 2
    a, b = [], []
    for _ in range(int(n_splits)):
        perm = rng.permutation(int(m))
        a.append(np.sort(perm[:half]))
        b.append(np.sort(perm[half:]))
    return np.stack(a), np.stack(b)


def heldout_sets(
    stimulus_ids: Sequence[str],
    mean_scores: np.ndarray,
    pc1_scores: np.ndarray,
    set_size: int,
    n_random: int,
    n_splits: int,
    seed: int = 0,
    knn_k: int = 10,
) -> pd.DataFrame:
    """The sets of the held-out layer choice: for each split, low / high / random inside half B.

    Long table ``split``, ``set`` (``low``, ``high``, ``random``), ``summary`` (``mean``,
    ``pc1``, ``none``), ``draw``, ``stimulus_id``. Within half B of split s
    (:func:`split_halves`): low / high = the first / last K_B of a stable ascending sort of the
    summary restricted to B (ties by manifest order), K_B = :func:`heldout_set_size`; random =
    ``n_random`` sets of K_B drawn from B by :func:`random_sets` with seed ``[seed, 13, s]``
    (indices into B's sorted positions). K_B < max(4, 2 × knn_k) (:func:`xmodal.config.
    min_set_size`) is an error naming the keys.
    """
    ids, mean_s, pc1_s = _ids_and_scores(stimulus_ids, mean_scores, pc1_scores)
    m = ids.size
    k_b = heldout_set_size(set_size, m)
    need = min_set_size(knn_k)
    if k_b < need:
        raise ValueError(
            f"held-out layer choice: the sets inside half B would hold {k_b} stimuli "
            f"(analysis.set_size {set_size} × {m - m // 2}/{m}), fewer than max(4, 2 × knn_k) = "
            f"{need}; raise analysis.set_size, lower analysis.knn_k or turn off "
            "analysis.heldout_layer"
        )
    if n_random < 0:
        raise ValueError(f"n_random must be ≥ 0, got {n_random}")
    _, halves_b = split_halves(m, n_splits, seed)
    parts = []

    def add(split: int, name: str, summary: str, draw: int, pos: np.ndarray) -> None:
        parts.append(
            pd.DataFrame(
                {"split": split, "set": name, "summary": summary, "draw": draw,
                 "stimulus_id": ids[pos]}
            )
        )  # fmt: skip

    for split, b in enumerate(halves_b):
        for summary, scores in (("mean", mean_s), ("pc1", pc1_s)):
            add(split, "low", summary, 0, b[low_set(scores[b], k_b)])
            add(split, "high", summary, 0, b[high_set(scores[b], k_b)])
        stream = [int(seed), SEED_STREAMS["heldout_random"], split]
        for draw, idx in enumerate(random_sets(b.size, k_b, n_random, stream)):
            add(split, "random", "none", draw, b[idx])
    out = pd.concat(parts, ignore_index=True)
    out[["split", "draw"]] = out[["split", "draw"]].astype(np.int64)
    return out


# ---------------------------------------------------------------- config of the controls


def _section(config: Mapping[str, Any], key: str) -> dict:
    raw = (config.get("analysis") or {}).get(key)
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"config key 'analysis.{key}' must be a mapping, got {raw!r}")
    return dict(raw or {})


def _count(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config key '{key}' must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class DropControl:
    """``analysis.drop_control`` with its defaults (the switch's is xmodal.config.DEFAULTS'): the
    size-matched random sets of the drop ablation (docs/method.md, "Size-matched drop control").

    ``n_random`` None means ``analysis.n_random``.
    """

    enabled: bool = DEFAULTS["analysis.drop_control.enabled"]
    n_random: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DropControl:
        """Read and check ``analysis.drop_control`` (absent: the defaults)."""
        raw = _section(config, "drop_control")
        n = raw.get("n_random")
        n = None if n is None else _count(n, "analysis.drop_control.n_random", 1)
        return cls(enabled=bool(raw.get("enabled", cls.enabled)), n_random=n)

    def draws(self, analysis: Mapping[str, Any]) -> int:
        """Number of size-matched draws for the ``analysis`` config section (0 when disabled)."""
        if not self.enabled:
            return 0
        return int(self.n_random if self.n_random is not None else analysis["n_random"])


@dataclass(frozen=True)
class HeldOutLayer:
    """``analysis.heldout_layer`` with its defaults: the layer chosen on one random half and
    evaluated on sets drawn from the other (docs/method.md, "Held-out layer choice"). Off by
    default: it adds work to every layer search and every conditions job."""

    enabled: bool = DEFAULTS["analysis.heldout_layer.enabled"]
    n_splits: int = 20

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HeldOutLayer:
        """Read and check ``analysis.heldout_layer`` (absent: the defaults)."""
        raw = _section(config, "heldout_layer")
        n = _count(raw.get("n_splits", cls.n_splits), "analysis.heldout_layer.n_splits", 1)
        return cls(enabled=bool(raw.get("enabled", cls.enabled)), n_splits=n)


@dataclass(frozen=True)
class SelfSelection:
    """``analysis.self_selection`` with its default: each vision model scored on low and high
    sets chosen by the GPA of the other vision models (docs/method.md, "Sets chosen without the
    scored model"). Off by default: it adds four sets per vision model (low and high, by mean
    and by PC1) to every conditions job."""

    enabled: bool = DEFAULTS["analysis.self_selection.enabled"]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SelfSelection:
        """Read ``analysis.self_selection`` (absent: the default)."""
        raw = _section(config, "self_selection")
        unknown = set(raw) - {"enabled"}
        if unknown:
            raise ConfigError(
                f"config key 'analysis.self_selection': unknown setting(s) {sorted(unknown)}"
            )
        return cls(enabled=bool(raw.get("enabled", cls.enabled)))
