"""Per-stimulus dispersion summaries and leave-one-model-out validation (docs/method.md, "Dispersion")."""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from xmodal.gpa import (
    CROSS,
    GPAResult,
    Preprocessed,
    fit_preprocessed,
    plan,
    project_preprocessed,
)
from xmodal.parallel import mapper, n_workers
from xmodal.selection import SEED_STREAMS

log = logging.getLogger(__name__)

__all__ = [
    "LOOResult",
    "dispersion_table",
    "leave_one_model_out",
    "mean_dispersion",
    "permutation_baseline",
    "pc1_dispersion",
    "pc1_orientation",
    "read_dispersion_table",
    "stable_rank",
    "table_digest",
]


def _residual_matrix(residuals: np.ndarray) -> np.ndarray:
    r = np.asarray(residuals, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 1:
        raise ValueError(f"residuals must be an m×M matrix (m ≥ 2), got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("residuals contain non-finite values")
    return r


def _first_equal_rows(r: np.ndarray) -> np.ndarray:
    """For each row, the first row equal to it (itself when none is)."""
    _, first, inverse = np.unique(r, axis=0, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


def mean_dispersion(residuals: np.ndarray) -> np.ndarray:
    """d_j = mean_i r_ij (row means of the m×M residual matrix); equal rows, equal means."""
    r = _residual_matrix(residuals)
    return r.mean(axis=1)[_first_equal_rows(r)]


def pc1_dispersion(residuals: np.ndarray) -> tuple[np.ndarray, float]:
    """PC1 score Rc v₁ (Rc = R − column means, v₁ top right singular vector), sign: corr(score, d) ≥ 0.

    Returns (scores, explained variance ratio σ₁² / Σσ²). With one model the score is Rc itself.
    Equal rows of R get equal scores (the product's rounding could differ with a row's place).
    """
    r = _residual_matrix(residuals)
    rc = r - r.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(rc, full_matrices=False)
    total = float(np.sum(s**2))
    scores = (rc @ vt[0])[_first_equal_rows(r)]
    d = r.mean(axis=1)
    dc = d - d.mean()
    # corr(score, d) has the sign of the centred inner product (both are centred).
    if float(scores @ dc) < 0:
        scores = -scores
    explained = float(s[0] ** 2 / total) if total > 0 else float("nan")
    return scores, explained


def pc1_orientation(table: pd.DataFrame) -> tuple[float, bool]:
    """Pearson r of the PC1 score with the mean dispersion over the stimuli of a
    :func:`dispersion_table`, and whether it orients PC1: |r| ≥ 2/√m.

    PC1's sign is chosen so that r ≥ 0 ("high = more dispersed"). Where PC1 is a contrast
    between models, nearly uncorrelated with the mean, r's sign is noise (its standard error is
    about 1/√m): a change in the last digits of one residual swapped the PC1 low and high sets,
    with no message. NaN and False for a constant score or fewer than 3 stimuli.
    """
    return _orientation(
        table["pc1_score"].to_numpy(float), table["mean_dispersion"].to_numpy(float)
    )


def partial_pc1_orientation(loo_stimuli: pd.DataFrame, held_out: str) -> tuple[float, bool]:
    """:func:`pc1_orientation` of the GPA without vision model ``held_out``, from the
    leave-one-model-out stimulus table (its ``partial_pc1`` against ``partial_dispersion``):
    the loo table's ``pc1_oriented``, for the PC1 sets chosen without that model."""
    rows = loo_stimuli[loo_stimuli["held_out"] == held_out]
    return _orientation(
        rows["partial_pc1"].to_numpy(float), rows["partial_dispersion"].to_numpy(float)
    )


def _orientation(score: np.ndarray, mean: np.ndarray) -> tuple[float, bool]:
    """:func:`pc1_orientation` of a PC1 score and a mean dispersion over the same stimuli."""
    m = score.size
    if m < 3 or np.ptp(score) == 0 or np.ptp(mean) == 0:
        return float("nan"), False
    r = float(np.corrcoef(score, mean)[0, 1])
    return r, bool(abs(r) >= 2 / np.sqrt(m))


def stable_rank(values: np.ndarray) -> np.ndarray:
    """Rank 0..m−1 in a stable ascending sort (ties keep their stimulus order)."""
    order = np.argsort(np.asarray(values), kind="stable")
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size)
    return ranks


def dispersion_table(
    stimulus_ids: Sequence[str], residuals: np.ndarray, distances: np.ndarray | None = None
) -> tuple[pd.DataFrame, float]:
    """Table stimulus_id, position, mean_dispersion, pc1_score, rank_mean, rank_pc1; and PC1
    explained variance. ``position`` is the row in ``stimulus_ids`` (the feature files' order,
    which skips stimuli dropped as duplicates, so it is not always the manifest line). With
    ``distances`` (m × M, :attr:`xmodal.gpa.GPAResult.distances`) also ``mean_distance``, each
    stimulus's mean distance from the models' centres."""
    r = _residual_matrix(residuals)
    ids = [str(s) for s in stimulus_ids]
    if len(ids) != r.shape[0]:
        raise ValueError(f"{len(ids)} stimulus ids for {r.shape[0]} residual rows")
    d = mean_dispersion(r)
    pc1, explained = pc1_dispersion(r)
    table = pd.DataFrame(
        {
            "stimulus_id": ids,
            "position": np.arange(len(ids), dtype=np.int64),
            "mean_dispersion": d,
            "pc1_score": pc1,
            "rank_mean": stable_rank(d),
            "rank_pc1": stable_rank(pc1),
        }
    )
    if distances is not None:
        dist = np.asarray(distances, dtype=np.float64)
        if dist.shape != r.shape:
            raise ValueError(f"distances of shape {dist.shape} for residuals of shape {r.shape}")
        table["mean_distance"] = dist.mean(axis=1)
    return table, explained


def table_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a table file's text with its line endings made LF: what ``gpa.json`` records
    of the dispersion table, so that a copy through git's autocrlf or an editor still matches."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes().replace(b"\r\n", b"\n")).hexdigest()


def read_dispersion_table(path: str | os.PathLike) -> pd.DataFrame:
    """The per-stimulus dispersion table as :func:`dispersion_table` wrote it (docs/contracts.md),
    checked to be unedited: one row per stimulus in feature order (``position`` 0..m−1), unique
    ids, and ranks that are the ranks of the values; and, for a ``dispersion.tsv`` with the
    fit's summary ``gpa.json`` next to it (as the pipeline writes them), its m and the table's
    SHA-256. A table changed by hand (a row deleted, the rows sorted, the last rows cut off, a
    value changed) would select other stimuli without an error; it is refused, naming the file
    and what disagrees."""
    import json

    from xmodal.io import TableError, read_table

    path = Path(path)
    table = read_table(
        path, numbers=("position", "mean_dispersion", "pc1_score", "rank_mean", "rank_pc1")
    )
    again = "; was it edited? Delete it and rerun (the GPA writes it again)"
    if "stimulus_id" not in table.columns:
        raise TableError(f"{path}: no column 'stimulus_id'")
    dup = table["stimulus_id"].duplicated()
    if dup.any():
        row = int(dup.to_numpy().nonzero()[0][0])
        raise TableError(
            f"{path}: stimulus {table['stimulus_id'].iloc[row]!r} is listed twice (row {row + 1})"
            + again
        )
    checks = {  # column: (what it must hold, why)
        "position": (np.arange(len(table)), "rows are in feature order, numbered from 0"),
        "rank_mean": (
            stable_rank(table["mean_dispersion"].to_numpy()),
            "it is the rank of mean_dispersion",
        ),
        "rank_pc1": (stable_rank(table["pc1_score"].to_numpy()), "it is the rank of pc1_score"),
    }
    for column, (expected, what) in checks.items():
        off = table[column].to_numpy() != expected
        if off.any():
            row = int(off.nonzero()[0][0])
            raise TableError(
                f"{path}: row {row + 1} (stimulus {table['stimulus_id'].iloc[row]!r}) has "
                f"{column} {table[column].iloc[row]:g} where {expected[row]} is expected ({what})"
                + again
            )
    summary = path.with_name("gpa.json")  # written with it, as results/*/{dataset}/ hold them
    try:
        fit = json.loads(summary.read_text()) if path.name == "dispersion.tsv" else None
    except (OSError, ValueError):
        fit = None
    if fit is None:  # no summary (a table from elsewhere): the checks above are all there is
        return table
    if isinstance(fit, dict) and fit.get("m") not in (None, len(table)):
        raise TableError(
            f"{path}: {len(table)} stimuli, where the GPA that wrote it had {fit['m']} "
            f"({summary})" + again
        )
    digest = fit.get("dispersion_sha256") if isinstance(fit, dict) else None
    if digest and table_digest(path) != digest:
        raise TableError(
            f"{path}: not the table the GPA wrote (its SHA-256 differs from the one {summary} "
            "recorded)" + again
        )
    return table


def permutation_baseline(
    partial: np.ndarray, shuffled: np.ndarray, pearson_r: float, spearman_rho: float
) -> dict[str, float | int]:
    """The row-permutation baseline's columns of one held-out model's row in ``loo.tsv``
    (:func:`leave_one_model_out`): ``shuffled`` holds its deviations with its rows shuffled,
    one shuffle per row; ``pearson_r`` and ``spearman_rho`` are the model's own."""
    import scipy.stats

    out: dict[str, float | int] = {}
    for name, test, value in (
        ("pearson_r", scipy.stats.pearsonr, float(pearson_r)),
        ("spearman_rho", scipy.stats.spearmanr, float(spearman_rho)),
    ):
        null = np.array([test(partial, d).statistic for d in shuffled], dtype=np.float64)
        out[f"perm_{name}"] = float(null.mean())
        out[f"perm_{name.split('_')[0]}_p"] = float(
            (1 + np.count_nonzero(null >= value)) / (len(null) + 1)
            if np.isfinite(value)
            else np.nan
        )
    out["n_permutations"] = len(shuffled)
    return out


@dataclass
class LOOResult:
    """Leave-one-model-out results: per-model correlations, per-stimulus values, and the GPA fits."""

    models: pd.DataFrame
    stimuli: pd.DataFrame
    fits: dict[str, GPAResult]

    def __iter__(self):  # allows ``models, stimuli = leave_one_model_out(...)``
        return iter((self.models, self.stimuli))


def leave_one_model_out(
    reps: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
    stimulus_ids: Sequence[str] | None = None,
    tol: float = 1e-10,
    max_iter: int = 1000,
    n_jobs: int | None = None,
    n_permutations: int = 0,
    seed: int = 0,
) -> LOOResult:
    """For each k: GPA on the others → C₋ₖ, p = mean residual; dev_kj = ‖(N_k T_k)_j − C₋ₖ,j‖₂; correlate p, dev.

    ``models``: held_out, pearson_r, pearson_p, spearman_rho, spearman_p, n, converged, n_iter,
    pc1_oriented (:func:`pc1_orientation` of the fit's PC1 score with its mean dispersion);
    with ``n_permutations`` P > 0 also the **row-permutation baseline** (docs/method.md,
    "Leave-one-model-out against shuffled stimuli"): the held-out model's rows shuffled
    across stimuli P times (seeded by ``seed`` and its name), each aligned and correlated as
    the model itself, give perm_pearson_r and perm_spearman_rho (their means over the P
    shuffles), perm_pearson_p and perm_spearman_p ((1 + #{shuffles at or above the model's
    value}) / (P + 1)) and n_permutations. A shuffled model shares no stimulus with the
    others, yet its deviation grows with the consensus's distance from the centre as the
    partial dispersion does, so r > 0 alone does not show a shared property.
    ``stimuli`` (long): held_out, stimulus_index, stimulus_id, partial_dispersion, partial_pc1
    (the PC1 score of the fit's residuals, as :func:`pc1_dispersion`), deviation.
    The M fits run on ``n_jobs`` threads (default: one per core, at most M), single-threaded BLAS,
    and share one preprocessing and one set of cross-products.
    """
    import scipy.stats  # here: the GPA jobs, which import this module, need no scipy.stats

    n_models = len(reps)
    if n_models < 3:
        raise ValueError(f"leave-one-model-out needs at least 3 models, got {n_models}")
    names = [f"model{i}" for i in range(n_models)] if names is None else [str(n) for n in names]
    if len(names) != n_models:
        raise ValueError(f"{len(names)} names for {n_models} models")
    m = int(np.shape(reps[0])[0])
    ids = [str(i) for i in range(m)] if stimulus_ids is None else [str(s) for s in stimulus_ids]
    if len(ids) != m:
        raise ValueError(f"{len(ids)} stimulus ids for {m} stimuli")

    # fits in the order of the names, rows in the given order: the start (the first model's
    # frame) may pick one of several stationary points, and the config's order must not
    given = list(names)
    if len(set(given)) != n_models:
        raise ValueError(f"model names must be distinct, got {given}")
    order = sorted(range(n_models), key=lambda i: names[i])
    reps, names = [reps[i] for i in order], [names[i] for i in order]
    jobs = n_workers(n_models, n_jobs)
    with threadpool_limits(limits=1, user_api="blas"), mapper(jobs) as pmap:
        # One preprocessing (one QR decomposition per model) and, where a fit uses them, one
        # set of cross-products, shared by the M fits and projections: a subset's
        # cross-products are sub-blocks of the full set's (docs/method.md, leave-one-model-out).
        prep = Preprocessed(reps, pmap, names=names)  # errors name the caller's models
        sizes = [a.shape[1] for a in prep.mats(reduce=True, pmap=pmap)]
        subsets = [[i for i in range(n_models) if i != k] for k in range(n_models)]
        ranks = prep.ranks(pmap=pmap)
        plans = [
            plan(prep.m, [sizes[i] for i in o], [prep.widths[i] for i in o], [ranks[i] for i in o])
            for o in subsets
        ]
        if any(route == CROSS for _, route in plans):
            prep.cross_products(pmap=pmap)

        def fit_one(k: int) -> tuple[GPAResult, np.ndarray, np.ndarray]:
            others, (method, route) = subsets[k], plans[k]
            fit = fit_preprocessed(
                prep.mats(others),
                tol,
                max_iter,
                [prep.widths[i] for i in others],
                cross=prep.cross_products(others) if route == CROSS else None,
                method=method,
                ranks=[ranks[i] for i in others],
            )
            held = prep.held_out(k)
            deviation = project_preprocessed(held, fit.consensus)[1]
            # the held-out model with its rows shuffled across stimuli, aligned as itself
            rng = np.random.default_rng(
                [int(seed), SEED_STREAMS["loo_permutations"], zlib.crc32(names[k].encode())]
            )
            shuffled = np.array(
                [
                    project_preprocessed(held[rng.permutation(m)], fit.consensus)[1]
                    for _ in range(n_permutations)
                ]
            ).reshape(n_permutations, m)
            # equal inputs, equal outputs (docs/method.md, "Dispersion")
            fit.residuals = fit.residuals[twins[k]]
            return fit, deviation[twins[-1]], shuffled

        twins = [prep.twins(o) for o in subsets] + [prep.twins()]

        results = list(pmap(fit_one, range(n_models)))
    rows, long, fits = [], [], {}
    for k, (fit, deviation, shuffled) in enumerate(results):
        fits[names[k]] = fit
        partial = fit.residuals.mean(axis=1)
        partial_pc1 = pc1_dispersion(fit.residuals)[0]
        pc1_r, oriented = _orientation(partial_pc1, partial)
        pr = scipy.stats.pearsonr(partial, deviation)
        sr = scipy.stats.spearmanr(partial, deviation)
        row = {
            "held_out": names[k],
            "pearson_r": float(pr.statistic),
            "pearson_p": float(pr.pvalue),
            "spearman_rho": float(sr.statistic),
            "spearman_p": float(sr.pvalue),
            "n": m,
            "converged": bool(fit.converged),
            "n_iter": int(fit.n_iter),
            "pc1_oriented": oriented,
        }
        if n_permutations:
            row |= permutation_baseline(partial, shuffled, pr.statistic, sr.statistic)
        rows.append(row)
        if not fit.converged:  # DESIGN 2.1: warn and record; name the fit it concerns
            log.warning(
                "leave-one-model-out: GPA without %r did not converge in %d iterations; its "
                "row in the table has converged = False",
                names[k],
                fit.n_iter,
            )
        if not oriented:  # docs/method.md, "Dispersion"
            log.warning(
                "leave-one-model-out: without %r, PC1 of the other models' dispersion hardly "
                "follows their mean dispersion (Pearson r %.3g, within ±2/√m = ±%.3g of 0): "
                "its sign is noise, and the PC1 sets chosen without %r (analysis."
                "self_selection, rows 'pc1') may have low and high swapped; its row in the "
                "table has pc1_oriented = False",
                names[k],
                pc1_r,
                2 / np.sqrt(m),
                names[k],
            )
        long.append(
            pd.DataFrame(
                {
                    "held_out": names[k],
                    "stimulus_index": np.arange(m, dtype=np.int64),
                    "stimulus_id": ids,
                    "partial_dispersion": partial,
                    "partial_pc1": partial_pc1,
                    "deviation": deviation,
                }
            )
        )
        log.info(
            "leave-one-model-out %s: pearson r=%.3f, spearman rho=%.3f%s",
            names[k],
            pr.statistic,
            sr.statistic,
            f"; its rows shuffled {n_permutations} times: mean r={row['perm_pearson_r']:.3f}, "
            f"permutation p={row['perm_pearson_p']:.3g}"
            if n_permutations
            else "",
        )
    back = [names.index(n) for n in given]  # the rows in the order the models were given
    return LOOResult(
        models=pd.DataFrame([rows[k] for k in back]),
        stimuli=pd.concat([long[k] for k in back], ignore_index=True),
        fits={n: fits[n] for n in given},
    )
