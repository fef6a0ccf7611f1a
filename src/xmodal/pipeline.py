"""Pipeline steps as plain functions: files in, files out.

Each function is one step of the workflow (one Snakemake rule calls one of these through a
thin script), written so that it can be called from a notebook or a test without Snakemake.
Outputs are written atomically: a failed step leaves nothing at its output paths.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from xmodal import alignment, dispersion, gpa, metrics, selection
from xmodal.features import FeatureFile
from xmodal.io import atomic_path, read_table, write_table

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def resolve_layer(index: int, n_layers: int, path: PathLike) -> int:
    """Turn a possibly negative layer index (-2 = penultimate block) into 0..n_layers-1."""
    resolved = index + n_layers if index < 0 else index
    if not 0 <= resolved < n_layers:
        raise IndexError(f"{path}: layer {index} does not exist (the file has {n_layers} layers)")
    return resolved


def read_layer(
    path: PathLike, layer: int, expected_ids: Sequence[str] | None = None
) -> tuple[list[str], int, np.ndarray]:
    """Read one layer of a feature file, validated (and re-ordered) against ``expected_ids``.

    Returns the stimulus ids, the resolved layer index and the (m, dim) float32 matrix.
    """
    with FeatureFile(path, expected_ids=expected_ids) as f:
        f.validate(expected_ids=expected_ids, layers=False)
        idx = resolve_layer(layer, f.n_layers, path)
        return list(f.stimulus_ids), idx, f.finite_layer(idx)


def read_vision_layers(paths: Sequence[PathLike], layer: int) -> tuple[list[str], list[np.ndarray]]:
    """Read the same layer of several vision models, rows in the first file's stimulus order."""
    ids: list[str] | None = None
    reps = []
    for p in paths:
        file_ids, _, x = read_layer(p, layer, expected_ids=ids)
        ids = ids or file_ids
        reps.append(x.astype(np.float64))
    assert ids is not None
    return ids, reps


def _write_json(obj: Any, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")


# ---------------------------------------------------------------- dispersion


def run_gpa(
    feature_paths: Sequence[PathLike],
    models: Sequence[str],
    vision_layer: int,
    tol: float,
    max_iter: int,
    out_residuals: PathLike,
    out_dispersion: PathLike,
    out_summary: PathLike,
) -> None:
    """GPA across the vision models; write residuals, per-stimulus dispersion and a summary."""
    ids, reps = read_vision_layers(feature_paths, vision_layer)
    log.info(
        "GPA over %d models, %d stimuli, widths %s", len(reps), len(ids), [r.shape[1] for r in reps]
    )
    res = gpa.gpa(reps, tol=tol, max_iter=max_iter)
    log.info(
        "GPA: %d iterations, converged=%s, final objective %.6g",
        res.n_iter,
        res.converged,
        res.objective[-1],
    )
    R = np.asarray(res.residuals)
    residuals = pd.DataFrame(
        {
            "stimulus_id": np.repeat(ids, len(models)),
            "model": np.tile(list(models), len(ids)),
            "residual": R.reshape(-1),
        }
    )
    table, explained = dispersion.dispersion_table(ids, R)
    write_table(residuals, out_residuals)
    write_table(table, out_dispersion)
    _write_json(
        {
            "models": list(models),
            "widths": [int(r.shape[1]) for r in reps],
            "m": len(ids),
            "n_iter": int(res.n_iter),
            "converged": bool(res.converged),
            "objective": [float(v) for v in res.objective],
            "tol": tol,
            "max_iter": max_iter,
            "pc1_explained_variance": float(explained),
            "slow_regime": bool(getattr(res, "slow_regime", False)),
        },
        out_summary,
    )


def run_stimulus_sets(
    dispersion_path: PathLike, analysis: Mapping[str, Any], out_sets: PathLike
) -> None:
    """Low / high / random sets and the drop-fraction ablations, from the dispersion table."""
    from xmodal.config import check_against_stimuli

    table = read_table(dispersion_path)
    check_against_stimuli({"analysis": analysis}, len(table))
    sets = selection.make_sets(
        table["stimulus_id"].astype(str).tolist(),
        table["mean_dispersion"].to_numpy(),
        table["pc1_score"].to_numpy(),
        set_size=int(analysis["set_size"]),
        n_random=int(analysis["n_random"]),
        drop_fraction=float(analysis["drop_fraction"]),
        seed=int(analysis["seed"]),
    )
    write_table(sets, out_sets)


def run_leave_one_model_out(
    feature_paths: Sequence[PathLike],
    models: Sequence[str],
    vision_layer: int,
    tol: float,
    max_iter: int,
    out_table: PathLike,
    out_stimuli: PathLike,
) -> None:
    """GPA without each vision model in turn; correlate partial dispersion with its deviation."""
    ids, reps = read_vision_layers(feature_paths, vision_layer)
    table, per_stimulus = dispersion.leave_one_model_out(
        reps, names=list(models), stimulus_ids=ids, tol=tol, max_iter=max_iter
    )
    write_table(table, out_table)
    write_table(per_stimulus, out_stimuli)


# ---------------------------------------------------------------- alignment


def _prepared_layers(f: FeatureFile) -> Iterator[tuple[int, str, np.ndarray]]:
    t = metrics.threshold_from_quantiles(f.abs_q95())
    for i, name in enumerate(f.layer_names):
        yield i, str(name), metrics.prepare_layer(f.finite_layer(i), t)


def _prepared_vision(path: PathLike, layer: int, ids: Sequence[str] | None = None):
    with FeatureFile(path, expected_ids=ids) as f:
        f.validate(expected_ids=ids, layers=False)
        idx = resolve_layer(layer, f.n_layers, path)
        t = metrics.threshold_from_quantiles(f.abs_q95())
        return list(f.stimulus_ids), idx, metrics.prepare_layer(f.finite_layer(idx), t)


def run_layer_search(
    vision_path: PathLike,
    llm_path: PathLike,
    vision: str,
    llm: str,
    vision_layer: int,
    k: int,
    out_table: PathLike,
) -> None:
    """CKNNA of one vision layer against every layer of an LLM on the full stimulus set."""
    ids, idx, vx = _prepared_vision(vision_path, vision_layer)
    with FeatureFile(llm_path, expected_ids=ids) as f:
        # ids checked here; every layer is checked for finiteness as it is read, once
        f.validate(expected_ids=ids, layers=False)
        table = alignment.layer_profile_table(vision, llm, idx, vx, _prepared_layers(f), k=k)
    best = table.loc[table["chosen"]].iloc[0]
    log.info(
        "%s x %s: best LLM layer %s (CKNNA %.4f)", vision, llm, best["layer_name"], best["value"]
    )
    write_table(table, out_table)


def run_conditions(
    vision_path: PathLike,
    llm_path: PathLike,
    layers_path: PathLike,
    sets_path: PathLike,
    vision: str,
    llm: str,
    vision_layer: int,
    k: int,
    n_boot: int,
    seed: int,
    out_conditions: PathLike,
    out_contrasts: PathLike,
) -> None:
    """CKNNA on every stimulus subset at the LLM layer chosen on the full set."""
    layers = read_table(layers_path)
    chosen = int(layers.loc[layers["chosen"].astype(bool), "llm_layer"].iloc[0])
    ids, _, vx = _prepared_vision(vision_path, vision_layer)
    with FeatureFile(llm_path, expected_ids=ids) as f:
        f.validate(expected_ids=ids, layers=False)  # only the chosen layer is read
        t = metrics.threshold_from_quantiles(f.abs_q95())
        lx = metrics.prepare_layer(f.finite_layer(chosen), t)
    sets = read_table(sets_path)
    sets["stimulus_id"] = sets["stimulus_id"].astype(str)
    conditions, contrasts = alignment.condition_table(
        vision, llm, chosen, vx, lx, sets, ids, k=k, n_boot=n_boot, seed=seed
    )
    write_table(conditions, out_conditions)
    write_table(contrasts, out_contrasts)


def concatenate_tables(paths: Sequence[PathLike], out: PathLike) -> None:
    """Row-wise concatenation of per-pair tables (same columns) into one aggregate table."""
    frames = [read_table(p) for p in paths]
    write_table(pd.concat(frames, ignore_index=True), out)


def write_models_table(models: Mapping[str, Mapping[str, Any]], out: PathLike) -> None:
    """Model labels, families and sizes for the figures, in plotting order.

    Vision models keep config order; language models are grouped by family (in order of
    first appearance) and ordered by size within a family.
    """
    rows = [
        {
            "model": key,
            "modality": m["modality"],
            "label": m.get("label", key),
            "family": m.get("family", ""),
            "size_b": float(m["size_b"]),
            "config_order": i,
        }
        for i, (key, m) in enumerate(models.items())
    ]
    df = pd.DataFrame(rows)
    family_rank = {f: i for i, f in enumerate(dict.fromkeys(df["family"]))}
    df["_mod"] = (df["modality"] != "vision").astype(int)
    df["_fam"] = df["family"].map(family_rank)
    df["_size"] = np.where(df["modality"] == "vision", 0.0, df["size_b"])
    df = df.sort_values(["_mod", "_fam", "_size", "config_order"], kind="stable")
    df["order"] = np.arange(len(df))
    write_table(df[["model", "modality", "label", "family", "size_b", "order"]], out)


def write_summary(contrasts_path: PathLike, grid_path: PathLike, out: PathLike) -> None:
    """The one-line summary of how consistently low > random > high across pairs."""
    from xmodal.summary import summary_table

    write_table(summary_table(read_table(contrasts_path), read_table(grid_path)), out)
