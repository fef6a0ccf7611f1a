"""Pipeline steps as plain functions: files in, files out. The one seam between rules and library.

Each ``run_*`` function is one step of the workflow (one Snakemake rule calls one of these
through a thin script), written so that it can be called from a notebook or a test without
Snakemake. Feature files are opened through :func:`open_features` (ids matched once, provenance
checked against the registry) and alignment layers prepared by :func:`prepared_layer`, nowhere
else. Outputs are written atomically: a failed step leaves nothing at its output paths.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

# torch (alignment, diagnostics, metrics, stats) and scipy (gpa, dispersion) are imported by the
# steps that use them: a job then loads only what its step needs (torch alone takes seconds)
import xmodal
from xmodal import language_dispersion, properties, selection
from xmodal.config import resolve_layer
from xmodal.dispersion import read_dispersion_table
from xmodal.features import FeatureFile, FeatureFileError, clamp_threshold, library_version
from xmodal.io import atomic_path, read_table, write_table
from xmodal.parallel import n_workers

if TYPE_CHECKING:
    from xmodal.metrics import KernelKNN

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: What to do when a feature file's provenance contradicts the config.
_FIX_REGISTRY = (
    "the file belongs to another model or modality: fix the config file, or delete the file and "
    "rerun so that it is extracted for this entry"
)


# ---------------------------------------------------------------- feature files


def open_features(
    path: PathLike,
    expected_ids: Sequence[str] | None = None,
    *,
    model: str | None = None,
    modality: str | None = None,
) -> FeatureFile:
    """Open a feature file for a pipeline step: ids matched to ``expected_ids`` (once), and its
    ``model_key`` / ``modality`` attributes checked against the registry entry it is used as.

    A mismatch (a language model's file registered as vision, another model's file under this
    key) is a :class:`FeatureFileError` naming the file, the attribute and the config key.
    """
    f = FeatureFile(path, expected_ids=expected_ids)
    try:
        attrs = f.attrs
        checks = (("modality", modality, f"models.{model}.modality"), ("model_key", model, None))
        for attr, want, key in checks:
            if want is None:
                continue
            have = attrs.get(attr)
            if have in (None, ""):
                raise FeatureFileError(
                    f"{f.path}: attribute {attr!r} is missing; feature files must record it "
                    f"(docs/contracts.md, 'Feature file'); expected {want!r}"
                )
            if str(have) != str(want):
                where = f" (config key '{key}')" if key else ""
                raise FeatureFileError(
                    f"{f.path}: the file says {attr}={have!r}, but it is used as model "
                    f"{model!r} with {attr}={want!r}{where}; {_FIX_REGISTRY}"
                )
        f.check_abs_q95()
    except BaseException:
        f.close()
        raise
    return f


def prepared_layer(f: FeatureFile, layer: int, threshold: float | None = None) -> np.ndarray:
    """One layer as the alignment metrics take it (docs/method.md, "Alignment"): float32,
    clamped at the file's threshold t (mean per-stimulus 95th percentile of |x|), rows l2-normalised.

    ``threshold`` (from :func:`layer_threshold`) saves recomputing t when several layers are read.
    """
    from xmodal import metrics

    t = layer_threshold(f) if threshold is None else threshold
    return metrics.prepare_layer(f.finite_layer(layer), t)


def layer_threshold(f: FeatureFile) -> float:
    """The clamp threshold t of a feature file (docs/method.md, "Alignment"); a
    :class:`FeatureFileError` naming the file when it is 0 (:func:`clamp_threshold`)."""
    return clamp_threshold(f.path, f.abs_q95())


def read_gpa_layers(
    paths: Sequence[PathLike],
    models: Sequence[str],
    layers: Sequence[int],
    modality: str,
    key: str,
    each_left_out: bool = False,
) -> tuple[list[str], list[np.ndarray]]:
    """One layer per model as float64 (GPA's input), rows in the first file's stimulus order.

    A layer that is the same for every stimulus is an error naming the model, file, layer and
    the config ``key`` that chose it; two models with identical features are warned about (they
    would count twice), and refused when no two models remain that differ: every residual is
    then 0, and the dispersion rounding noise; with ``each_left_out`` (leave-one-model-out)
    also when that holds once any one model is left out."""
    ids: list[str] | None = None
    reps = []
    for p, model, layer in zip(paths, models, layers, strict=True):
        with open_features(p, ids, model=model, modality=modality) as f:
            ids = ids or f.stimulus_ids
            idx = resolve_layer(layer, f.n_layers, p, key)
            x = f.finite_layer(idx).astype(np.float64)
            log.info("%s: layer %d of %d (%r)", model, idx, f.n_layers, f.layer_names[idx])
        if not np.any(x != x[0]):
            raise FeatureFileError(
                f"{p}: {modality} model {model!r} has the same features for every stimulus in "
                f"layer {idx} (config key '{key}'); GPA needs features that vary across stimuli. "
                "Check the model's weights, or choose another layer"
            )
        reps.append(x)
    assert ids is not None
    same = _warn_identical(models, reps, up_to_rotation=True)
    everyone = list(range(len(models)))
    fits = [(everyone, "")]
    if each_left_out:
        fits += [([i for i in everyone if i != k], f"without {models[k]!r}, ") for k in everyone]
    for members, without in fits:
        if len(members) >= 2 and _one_model(same, members):
            raise FeatureFileError(
                f"{without}the {modality} models {[models[i] for i in members]} have the same "
                "features up to a rotation, reflection and scale in the layers GPA reads "
                f"(config key '{key}'): GPA fits them onto each other exactly, every residual "
                "is 0 and their dispersion would be rounding noise. Give models whose "
                "features differ (remove all but one of them from the config file), or another "
                "layer (identical embedding tables at layer 0?)"
            )
    return ids, reps


def _one_model(same: Sequence[tuple[int, int]], members: Sequence[int]) -> bool:
    """Whether the models ``members`` are all one model by the pairs ``same``
    (:func:`_warn_identical`), joined through members only."""
    parent = {i: i for i in members}

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in same:
        if i in parent and j in parent:
            parent[root(i)] = root(j)
    return len({root(i) for i in members}) == 1


def read_vision_layers(
    paths: Sequence[PathLike], models: Sequence[str], layer: int, each_left_out: bool = False
) -> tuple[list[str], list[np.ndarray]]:
    """The same layer (config key ``analysis.vision_layer``) of every vision model: GPA's input
    (``each_left_out``: :func:`read_gpa_layers`'s, for leave-one-model-out)."""
    return read_gpa_layers(
        paths, models, [layer] * len(models), "vision", "analysis.vision_layer", each_left_out
    )


#: 1 − ‖N_iᵀN_j‖_* below which two models' prepared features are one model's (half the squared
#: Procrustes distance of the unit-norm centred features)
_SAME_UP_TO_ROTATION = 1e-9


def _warn_identical(
    models: Sequence[str], reps: Sequence[np.ndarray], up_to_rotation: bool = False
) -> list[tuple[int, int]]:
    """Warn about models with identical features; with ``up_to_rotation`` also about models
    that GPA fits onto each other exactly (the same features up to centring, scale, rotation
    and reflection: Procrustes distance ≈ 0), which count twice just the same. Returns the
    pairs ``(i, j)``, j < i, warned about."""
    same: list[tuple[int, int]] = []
    unit = []
    if up_to_rotation:
        for x in reps:
            c = x - x.mean(axis=0)
            c /= np.linalg.norm(c) or 1.0
            unit.append((c, np.linalg.norm(c, axis=1)))
    for i in range(len(reps)):
        for j in range(i):
            if reps[i].shape == reps[j].shape and np.array_equal(reps[i], reps[j]):
                same.append((i, j))
                log.warning(
                    "models %r and %r have identical features: they count twice in GPA and "
                    "leave-one-model-out (inflating its correlations); remove one of them from "
                    "the config file",
                    models[j],
                    models[i],
                )
            elif unit and np.sum((unit[i][1] - unit[j][1]) ** 2) <= 4 * _SAME_UP_TO_ROTATION:
                # distances from the centre (rotation-invariant, cheap): Σ_j (‖a_j‖ − ‖b_j‖)²
                # ≤ ‖A − B Q‖²_F = 2 (1 − ‖AᵀB‖_*), so no pair within the bound is passed over
                # (a test of each distance to 1e-6 passed over float32 copies); then the
                # Procrustes fit: 1 − ‖N_iᵀ N_j‖_* = half the squared distance
                import scipy.linalg

                gap = 1.0 - float(scipy.linalg.svdvals(unit[i][0].T @ unit[j][0]).sum())
                if gap < _SAME_UP_TO_ROTATION:
                    same.append((i, j))
                    log.warning(
                        "models %r and %r have the same features up to a rotation, reflection "
                        "and scale (GPA fits one onto the other exactly: 1 − ‖N_iᵀN_j‖_* = "
                        "%.1e): they count twice in GPA and leave-one-model-out (inflating its "
                        "correlations); remove one of them from the config file",
                        models[j],
                        models[i],
                        gap,
                    )
    return same


def read_prepared_vision(
    paths: Sequence[PathLike], models: Sequence[str], layer: int
) -> tuple[list[str], dict[str, tuple[int, np.ndarray]]]:
    """Every vision model's prepared layer for the alignment: ``{key: (layer index, x)}``."""
    ids: list[str] | None = None
    out: dict[str, tuple[int, np.ndarray]] = {}
    for p, key in zip(paths, models, strict=True):
        with open_features(p, ids, model=key, modality="vision") as f:
            ids = ids or f.stimulus_ids
            idx = resolve_layer(layer, f.n_layers, p)
            out[key] = (idx, prepared_layer(f, idx))
    assert ids is not None
    _warn_identical(list(out), [x for _, x in out.values()])
    return ids, out


def _write_json(obj: Any, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")


# ---------------------------------------------------------------- stimuli


def run_import_features(
    manifest: PathLike,
    src: PathLike,
    dst: PathLike,
    model: str,
    modality: str,
    drop_duplicates: bool = False,
) -> None:
    """Import a feature file the user supplies (config key ``models.<model>.features``): checked
    against the stimuli every extraction keeps (the manifest, without the duplicates
    ``stimuli.drop_duplicates`` leaves out) and copied with its rows in manifest order
    (:func:`xmodal.features.import_features`)."""
    from xmodal.attempts import begin_attempt, end_attempt
    from xmodal.features import import_features
    from xmodal.stimuli import analysed_stimuli, read_manifest

    begin_attempt(dst)  # until made (as an extraction: xmodal.attempts.begin_attempt)
    df = kept = read_manifest(manifest, check_images=False)
    if drop_duplicates:
        kept, _ = analysed_stimuli(df, Path(manifest).parent)
    ids = kept["stimulus_id"].tolist()
    dropped = set(df["stimulus_id"]) - set(ids)
    import_features(src, dst, model, modality, ids, dropped=dropped)
    end_attempt(dst)


def run_stimuli_report(
    manifest: PathLike, out_images: PathLike, out_duplicates: PathLike, workers: int = 1
) -> None:
    """Decode every image once (format, mode, size, EXIF orientation, conversion) and list the
    duplicate stimuli (same file, same pixels, same caption) with their ids; both logged."""
    from xmodal.stimuli import find_duplicates, read_manifest, scan_images

    df = read_manifest(manifest)
    root = Path(manifest).parent
    images = scan_images(df, root, workers=workers)
    duplicates = find_duplicates(df, root, images=images)
    log.info(
        "%d stimuli; %d in duplicate groups (%s)",
        len(df),
        duplicates["stimulus_id"].nunique(),
        ", ".join(f"{k}: {n}" for k, n in duplicates.groupby("kind").size().items()) or "none",
    )
    write_table(images, out_images)
    write_table(duplicates, out_duplicates)


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
    ids, reps = read_vision_layers(feature_paths, models, vision_layer)
    _gpa_and_dispersion(
        ids, models, reps, tol, max_iter, out_residuals, out_dispersion, out_summary, "vision"
    )


def _gpa_and_dispersion(
    ids: Sequence[str],
    models: Sequence[str],
    reps: Sequence[np.ndarray],
    tol: float,
    max_iter: int,
    out_residuals: PathLike,
    out_dispersion: PathLike,
    out_summary: PathLike,
    what: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """GPA over ``reps`` (docs/method.md, "Generalized Procrustes Analysis") and the dispersion
    tables: residuals (long), per-stimulus mean and PC1 dispersion, and the fit's summary JSON."""
    from xmodal import dispersion, gpa

    log.info(
        "%s GPA over %d models, %d stimuli, widths %s, on %d thread(s)",
        what,
        len(reps),
        len(ids),
        [r.shape[1] for r in reps],
        n_workers(len(reps)),  # as gpa.gpa chooses them (the job's threads cap it)
    )
    # fitted in the order of the models' names, reported in the given order: where the fit has
    # several stationary points the start (model 0's frame) picks one, and the config's order of
    # the models must not (docs/method.md, GPA step 2)
    order = sorted(range(len(models)), key=lambda i: str(models[i]))
    back = np.argsort(order)
    res = gpa.gpa([reps[i] for i in order], tol=tol, max_iter=max_iter)
    # per-stimulus summaries over the models in that order too (a mean's last bit follows it)
    table, explained = dispersion.dispersion_table(ids, res.residuals, res.distances)
    log.info(
        "%s GPA: %d iterations, converged=%s, final objective %.6g",
        what,
        res.n_iter,
        res.converged,
        res.objective[-1],
    )
    residuals = pd.DataFrame(
        {
            "stimulus_id": np.repeat(ids, len(models)),
            "model": np.tile(list(models), len(ids)),
            "residual": np.asarray(res.residuals)[:, back].reshape(-1),
            "distance": np.asarray(res.distances)[:, back].reshape(-1),
        }
    )
    # how much of the dispersion is distance from the centre (docs/method.md, "Dispersion and
    # distance from the centre"): rank correlation over stimuli
    # Spearman: Pearson's r of average ranks, as scipy.stats.spearmanr (which pandas' method=
    # "spearman" would import: seconds for a job that needs nothing else from it)
    ranks = table[["mean_dispersion", "mean_distance"]].rank()
    rho_distance = float(ranks["mean_dispersion"].corr(ranks["mean_distance"]))
    log.info(
        "%s dispersion: Spearman rho with the stimuli's mean distance from the models' "
        "centres %.3f",
        what,
        rho_distance,
    )
    ranks = [int(res.ranks[b]) for b in back] if res.ranks else []
    widths = [int(r.shape[1]) for r in reps]
    effective = gpa.effective_widths(len(ids), widths, ranks or None)
    for model, rank, width, counted in zip(models, ranks, widths, effective, strict=False):
        if counted < width:  # docs/method.md, GPA step 3
            span = min(width, len(ids) - 1)
            log.warning(
                "%s GPA: model %r has numerical rank %d, below min(its width, m − 1) = %d "
                "(duplicate stimuli, or a degenerate layer?); it is fitted as a model that "
                "narrow, and such a fit can have several stationary points",
                what,
                model,
                rank,
                span,
            )
    pc1_r, oriented = dispersion.pc1_orientation(table)
    if not oriented:  # docs/method.md, "Dispersion"
        log.warning(
            "%s dispersion: PC1 is nearly uncorrelated with the mean dispersion (Pearson r "
            "%.3g, within ±2/√m = ±%.3g of 0), so the sign that makes high PC1 scores 'more "
            "dispersed' is set by noise, and the PC1 low and high sets (rows 'pc1' of every "
            "table, the PC1 figures) may be each other's; read the mean dispersion's",
            what,
            pc1_r,
            2 / np.sqrt(len(ids)),
        )
    write_table(residuals, out_residuals)
    write_table(table, out_dispersion)
    _write_json(
        {
            "models": list(models),
            # what its readers check the table against (xmodal.dispersion.read_dispersion_table)
            "dispersion_sha256": dispersion.table_digest(out_dispersion),
            **dict(extra or {}),
            "widths": widths,
            "ranks": ranks,
            "m": len(ids),
            "n_iter": int(res.n_iter),
            "converged": bool(res.converged),
            "objective": [float(v) for v in res.objective],
            "tol": tol,
            "max_iter": max_iter,
            "pc1_explained_variance": float(explained),
            "pc1_r_mean_dispersion": pc1_r,
            "pc1_oriented": oriented,
            "rho_dispersion_distance": rho_distance,
            "slow_regime": bool(getattr(res, "slow_regime", False)),
        },
        out_summary,
    )


def run_stimulus_sets(
    dispersion_path: PathLike,
    analysis: Mapping[str, Any],
    out_sets: PathLike,
    n_drop_random: int = 0,
) -> None:
    """Low / high / random sets and the drop-fraction ablations, from the dispersion table;
    with ``n_drop_random`` > 0 also that many size-matched random sets of the drop sets
    (docs/method.md, "Size-matched drop control")."""
    from xmodal.config import check_against_stimuli

    table = read_dispersion_table(dispersion_path)
    check_against_stimuli({"analysis": analysis}, len(table))
    sets = selection.make_sets(
        table["stimulus_id"].tolist(),
        table["mean_dispersion"].to_numpy(),
        table["pc1_score"].to_numpy(),
        set_size=int(analysis["set_size"]),
        n_random=int(analysis["n_random"]),
        drop_fraction=float(analysis["drop_fraction"]),
        seed=int(analysis["seed"]),
        n_drop_random=n_drop_random,
    )
    if n_drop_random:
        log.info(
            "size-matched control of the drop sets: %d random sets of %d stimuli",
            n_drop_random,
            selection.drop_set_size(len(table), float(analysis["drop_fraction"])),
        )
    write_table(sets, out_sets)


def run_heldout_sets(
    dispersion_path: PathLike, analysis: Mapping[str, Any], n_splits: int, out_sets: PathLike
) -> None:
    """The sets of the held-out layer choice: low / high / random inside half B of each split
    (docs/method.md, "Held-out layer choice"; xmodal.selection.heldout_sets)."""
    table = read_dispersion_table(dispersion_path)
    sets = selection.heldout_sets(
        table["stimulus_id"].tolist(),
        table["mean_dispersion"].to_numpy(),
        table["pc1_score"].to_numpy(),
        set_size=int(analysis["set_size"]),
        n_random=int(analysis["n_random"]),
        n_splits=int(n_splits),
        seed=int(analysis["seed"]),
        knn_k=int(analysis["knn_k"]),
    )
    log.info(
        "held-out layer choice: %d splits of %d stimuli into halves of %d and %d; sets of %d "
        "inside each half B",
        n_splits,
        len(table),
        len(table) // 2,
        len(table) - len(table) // 2,
        selection.heldout_set_size(int(analysis["set_size"]), len(table)),
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
    n_permutations: int = 0,
    seed: int = 0,
) -> None:
    """GPA without each vision model in turn; correlate partial dispersion with its deviation,
    and with that of the model's rows shuffled ``n_permutations`` times (the baseline)."""
    from xmodal import dispersion

    ids, reps = read_vision_layers(feature_paths, models, vision_layer, each_left_out=True)
    table, per_stimulus = dispersion.leave_one_model_out(
        reps,
        names=list(models),
        stimulus_ids=ids,
        tol=tol,
        max_iter=max_iter,
        n_permutations=n_permutations,
        seed=seed,
    )
    write_table(table, out_table)
    write_table(per_stimulus, out_stimuli)


# ---------------------------------------------------------------- alignment


def _llm_layers(f: FeatureFile) -> Iterator[tuple[int, str, np.ndarray]]:
    """Every layer of an LLM's file, prepared, one at a time (each read once)."""
    t = layer_threshold(f)
    for i, name in enumerate(f.layer_names):
        yield i, str(name), prepared_layer(f, i, t)


def run_layer_search(
    vision_paths: Sequence[PathLike],
    llm_path: PathLike,
    vision: Sequence[str],
    llm: str,
    vision_layer: int,
    k: int,
    out_table: PathLike,
    metric_names: Sequence[str] = ("cknna",),
    out_diagnostics: PathLike | None = None,
    out_heldout: PathLike | None = None,
    n_splits: int = 0,
    seed: int = 0,
) -> None:
    """Each vision model against every layer of one LLM on the full stimulus set: the layer
    profile and the chosen layer per (vision model, metric) (docs/method.md, "Layer choice");
    with ``out_diagnostics``, the representation diagnostics of every LLM layer too
    (docs/method.md, "Diagnostics"); with ``out_heldout``, the layer chosen on half A of each of
    ``n_splits`` random splits (seed ``seed``; docs/method.md, "Held-out layer choice"), in the
    same pass over the layers."""
    from xmodal import alignment, diagnostics

    ids, prepared = read_prepared_vision(vision_paths, vision, vision_layer)
    diags: list[tuple[str, int, str, diagnostics.LayerDiagnostics]] = []

    def diagnose(index: int, name: str, x: np.ndarray, side: KernelKNN | None) -> None:
        # from the layer search's own kernel and kNN gaps when it has them (no second kernel)
        usable = side if side is not None and side.k == k else None
        diags.append((llm, index, name, diagnostics.diagnose(x, k, side=usable)))

    halves = None
    if out_heldout is not None:
        if n_splits < 1:
            raise ValueError(f"the held-out layer choice needs n_splits ≥ 1, got {n_splits}")
        halves = selection.split_halves(len(ids), n_splits, seed)[0]
    with open_features(llm_path, ids, model=llm, modality="language") as f:
        table, heldout = alignment.layer_search_tables(
            prepared,
            llm,
            _llm_layers(f),
            halves,
            k=k,
            metrics=tuple(metric_names),
            on_layer=diagnose if out_diagnostics is not None else None,
        )
    # each degenerate layer was logged once by the layer search (model, layer, why)
    if out_diagnostics is not None:
        diag_table = diagnostics.diagnostics_table(diags, ids)
        _log_diagnostics(diag_table)
        write_table(diag_table, out_diagnostics)
    for row in table.loc[table["chosen"].astype(bool)].itertuples():
        log.info(
            "%s x %s: best LLM layer %s by %s (%.4f)",
            row.vision,
            llm,
            row.layer_name,
            row.metric,
            row.value,
        )
    if heldout is not None and out_heldout is not None:
        for (vision_key, metric), g in heldout.groupby(["vision", "metric"], sort=False):
            log.info(
                "%s x %s (%s): the layer chosen on half A equals the full-set layer in %d of %d "
                "splits (layers chosen: %s)",
                vision_key,
                llm,
                metric,
                int(g["same_as_full"].sum()),
                len(g),
                ", ".join(
                    f"{i}: {n}" for i, n in g["llm_layer"].value_counts().sort_index().items()
                ),
            )
        write_table(heldout, out_heldout)
    write_table(table, out_table)


def _log_diagnostics(table: pd.DataFrame) -> None:
    """One line per model: the range of its layers' diagnostics."""
    for model, d in table.groupby("model", sort=False):
        log.info(
            "%s: %d layer(s); mean pairwise cosine %.3f–%.3f; effective dimensionality "
            "%.1f–%.1f; stimuli with unresolved neighbours %d–%d of %d; %d collapsed layer(s)",
            model,
            len(d),
            d["cos_mean"].min(),
            d["cos_mean"].max(),
            d["eff_dim"].min(),
            d["eff_dim"].max(),
            d["n_unresolved"].min(),
            d["n_unresolved"].max(),
            int(d["m"].iloc[0]),
            int(d["collapsed"].sum()),
        )


def run_vision_diagnostics(
    vision_paths: Sequence[PathLike],
    vision: Sequence[str],
    vision_layer: int,
    k: int,
    out_table: PathLike,
) -> None:
    """Representation diagnostics of every vision model's analysed layer (docs/method.md,
    "Diagnostics")."""
    from xmodal import diagnostics

    ids, prepared = read_prepared_vision(vision_paths, vision, vision_layer)
    rows = []
    for key, (idx, x) in prepared.items():
        with FeatureFile(vision_paths[list(vision).index(key)]) as f:
            name = f.layer_names[idx]
        rows.append((key, idx, name, diagnostics.diagnose(x, k)))
    table = diagnostics.diagnostics_table(rows, ids)
    _log_diagnostics(table)
    write_table(table, out_table)


def gather_diagnostics(
    vision_table: PathLike, llm_tables: Sequence[PathLike], layers_table: PathLike, out: PathLike
) -> None:
    """Every model's diagnostics in one table, with ``modality`` and ``used`` (the vision layer,
    and every LLM layer chosen for some vision model and metric); a warning names each used
    layer that is collapsed or has many stimuli with unresolved neighbours."""
    vision = read_table(vision_table)
    vision.insert(1, "modality", "vision")
    vision["used"] = True
    chosen = read_table(layers_table)
    chosen = chosen.loc[chosen["chosen"].astype(bool), ["llm", "llm_layer"]].drop_duplicates()
    used = set(zip(chosen["llm"], chosen["llm_layer"].astype(int), strict=True))
    frames = [vision]
    for p in llm_tables:
        t = read_table(p)
        t.insert(1, "modality", "language")
        t["used"] = [(m, int(i)) in used for m, i in zip(t["model"], t["layer"], strict=True)]
        frames.append(t)
    table = pd.concat(frames, ignore_index=True)
    for row in table.loc[table["used"] & table["warn"]].itertuples():
        # "collapsed" is cosines near 1 or ties at the k-th neighbour for half the stimuli: the
        # cosine and the identical rows say which (a repeated image ties its copies' columns)
        what = (
            "is collapsed"
            if row.collapsed
            else f"has {row.n_unresolved} of {row.m} stimuli with unresolved neighbours"
        )
        cell = getattr(row, "unresolved_ids", None)  # absent in tables of older runs
        named = json.loads(cell) if isinstance(cell, str) and cell else []
        # quoted: ids may hold commas and spaces (audit)
        ids = ", ".join(map(repr, named)) + (", ..." if row.n_unresolved > len(named) else "")
        copies = int(getattr(row, "n_in_duplicate_groups", 0) or 0)
        log.warning(
            "%s layer %d (%s) %s: mean pairwise cosine %.4f, %d of %d stimuli's kNN sets are "
            "decided by rounding or by stimulus order%s%s; values using it are flagged by their "
            "stability",
            row.model,
            row.layer,
            row.layer_name,
            what,
            row.cos_mean,
            row.n_unresolved,
            row.m,
            f" ({ids})" if row.n_unresolved else "",
            f"; {copies} stimuli are in {int(row.n_duplicate_groups)} groups of identical rows "
            "(repeated images or captions), whose copies tie exactly and are taken in stimulus "
            "order (docs/method.md, 'Ties')"
            if copies
            else "",
        )
    write_table(table, out)


def chosen_layers(
    layers: pd.DataFrame, path: PathLike = "layers table"
) -> dict[tuple[str, str], int]:
    """``(vision, metric) -> chosen LLM layer`` from a layer-search table (one per pair)."""
    chosen = layers.loc[layers["chosen"].astype(bool)]
    out: dict[tuple[str, str], int] = {}
    for row in chosen.itertuples():
        key = (str(row.vision), str(row.metric))
        if key in out:
            raise ValueError(f"{path}: more than one chosen layer for {key}")
        out[key] = int(row.llm_layer)
    return out


def tied_layers(
    layers: pd.DataFrame, path: PathLike = "layers table"
) -> dict[tuple[str, str], bool]:
    """``(vision, metric) -> layer_tied`` of the chosen layer, from a layer-search table (one
    without the column, as an older version wrote it: False, with a warning)."""
    if "layer_tied" not in layers.columns:
        log.warning("%s has no layer_tied column (an older version's): no choice counts as tied",
                    path)  # fmt: skip
        return {}
    chosen = layers.loc[layers["chosen"].astype(bool)]
    return {(str(r.vision), str(r.metric)): bool(r.layer_tied) for r in chosen.itertuples()}


def run_vision_bootstrap(
    vision_paths: Sequence[PathLike],
    sets_path: PathLike,
    vision: Sequence[str],
    vision_layer: int,
    k: int,
    n_boot: int,
    seed: int,
    out: PathLike,
) -> None:
    """The vision models' bootstrap structures for the low/high sets, prepared once for every
    LLM's conditions job (each reuses them where their content keys match: same features,
    sets, resamples and k; docs/method.md, "Layer choice and statistics")."""
    from xmodal import alignment, stats

    ids, prepared = read_prepared_vision(vision_paths, vision, vision_layer)
    plan = alignment.ConditionPlan(
        selection.read_sets(sets_path), ids, k=k, n_boot=n_boot, seed=seed
    )
    cache: dict[str, stats.BootstrapSide] = {}
    for key, (_, x) in prepared.items():
        plan.bootstrap_sides(x, cache=cache)
        log.info("%s: bootstrap structures of %d sets prepared", key, len(plan.plans))
    stats.save_sides(cache, out)


def run_conditions(
    vision_paths: Sequence[PathLike],
    llm_path: PathLike,
    layers_path: PathLike,
    sets_path: PathLike,
    vision: Sequence[str],
    llm: str,
    vision_layer: int,
    k: int,
    n_boot: int,
    seed: int,
    out_conditions: PathLike,
    out_contrasts: PathLike,
    metric_names: Sequence[str] = ("cknna",),
    out_drop: PathLike | None = None,
    heldout_layers_path: PathLike | None = None,
    heldout_sets_path: PathLike | None = None,
    out_heldout: PathLike | None = None,
    vision_bootstrap_path: PathLike | None = None,
    loo_stimuli_path: PathLike | None = None,
    out_self_selection: PathLike | None = None,
    draws: Mapping[str, int] | None = None,
) -> None:
    """Every stimulus set of every vision model against one LLM, at the layers chosen on the
    full set (each chosen LLM layer read and prepared once).

    ``vision_bootstrap_path``: the vision models' bootstrap structures from
    :func:`run_vision_bootstrap`, used where they match (else rebuilt, with a warning).

    ``out_drop``: the drop sets against their size-matched random draws (docs/method.md,
    "Size-matched drop control"; the sets table must hold them). ``out_heldout`` (with the layer
    search's ``heldout_layers_path`` and ``heldout_sets_path``): the sets inside half B of each
    split at the held-out and at the full-set layer (docs/method.md, "Held-out layer choice").
    ``out_self_selection`` (with the leave-one-model-out ``loo_stimuli_path``): each vision
    model on low and high sets of the main sets' size chosen without it (docs/method.md, "Sets
    chosen without the scored model"). ``draws``: the number of draws of each family of random
    sets that the config asks for (xmodal.selection.config_draws); the sets tables must hold
    exactly those.
    """
    from xmodal import alignment

    if (out_self_selection is None) != (loo_stimuli_path is None):
        raise ValueError("out_self_selection and loo_stimuli_path go together")
    heldout = None
    if out_heldout is not None:
        if heldout_layers_path is None or heldout_sets_path is None:
            raise ValueError("out_heldout needs heldout_layers_path and heldout_sets_path")
        heldout = (heldout_layers_path, heldout_sets_path, seed)
    conditions, contrasts, held, tied, self_selection = _set_alignment(
        vision_paths, llm_path, layers_path, sets_path, vision, llm, vision_layer, k, n_boot, seed,
        metric_names, heldout, vision_bootstrap_path, loo_stimuli_path, draws,
    )  # fmt: skip
    if out_drop is not None:
        drop = alignment.drop_table(conditions, tied)
        for r in drop.itertuples():
            log.info(
                "%s x %s %s (%s): drop high %.4f, drop low %.4f; random sets of %d: %.4f "
                "[%.4f, %.4f]; fraction of draws >= drop high %.2f, >= drop low %.2f",
                r.vision, llm, r.metric, r.summary, r.drop_high, r.drop_low, r.n_stimuli,
                r.random_mean, r.random_ci_low, r.random_ci_high, r.frac_random_ge_drop_high,
                r.frac_random_ge_drop_low,
            )  # fmt: skip
        write_table(drop, out_drop)
    if held is not None and out_heldout is not None:
        write_table(held, out_heldout)
    if self_selection is not None and out_self_selection is not None:
        for r in self_selection.itertuples():
            log.info(
                "%s x %s %s: sets chosen without it: low %.4f, high %.4f [low - high CI %.4f, "
                "%.4f] (with it: %.4f, %.4f; %d and %d of %d stimuli shared)",
                r.vision, llm, r.metric, r.low, r.high, r.diff_ci_low, r.diff_ci_high,
                r.low_all, r.high_all, r.n_shared_low, r.n_shared_high, r.n_stimuli,
            )  # fmt: skip
        write_table(self_selection, out_self_selection)
    write_table(conditions, out_conditions)
    write_table(contrasts, out_contrasts)


def heldout_choices(
    table: pd.DataFrame, path: PathLike = "held-out layers table"
) -> dict[tuple[str, str, int], int]:
    """``(vision, metric, split) -> LLM layer chosen on half A`` from the layer search's
    held-out table (one per key)."""
    out: dict[tuple[str, str, int], int] = {}
    for row in table.itertuples():
        key = (str(row.vision), str(row.metric), int(row.split))
        if key in out:
            raise ValueError(f"{path}: more than one held-out layer for {key}")
        out[key] = int(row.llm_layer)
    return out


def _check_halves(
    sets: pd.DataFrame, ids: Sequence[str], n_splits: int, seed: int, path: PathLike
) -> None:
    """Every set of split s lies in half B of split s as the layer search drew it (no stimulus
    of half A, on which that split's layer was chosen)."""
    halves_a, _ = selection.split_halves(len(ids), n_splits, seed)
    pos = {str(s): i for i, s in enumerate(ids)}
    for split, g in sets.groupby("split"):
        inside = set(g["stimulus_id"].astype(str).map(pos))
        overlap = inside & set(halves_a[int(split)].tolist())
        if overlap:
            raise ValueError(
                f"{path}: split {split} has {len(overlap)} stimuli in half A, on which its layer "
                "was chosen; the held-out sets and the layer search disagree (different seed or "
                "stimuli): rerun both"
            )


def _random_draws(draws: Mapping[str, int] | None) -> dict[str, int] | None:
    """The ``random`` entry of ``draws``: the sets tables other than ``sets.tsv`` have the main
    random draws and no drop control."""
    return None if draws is None else {"random": draws["random"]}


def _set_alignment(
    vision_paths: Sequence[PathLike],
    llm_path: PathLike,
    layers_path: PathLike,
    sets_path: PathLike,
    vision: Sequence[str],
    llm: str,
    vision_layer: int,
    k: int,
    n_boot: int,
    seed: int,
    metric_names: Sequence[str],
    heldout: tuple[PathLike, PathLike, int] | None = None,
    vision_bootstrap_path: PathLike | None = None,
    loo_stimuli_path: PathLike | None = None,
    draws: Mapping[str, int] | None = None,
) -> tuple[
    pd.DataFrame,
    pd.DataFrame,
    pd.DataFrame | None,
    dict[tuple[str, str], bool],
    pd.DataFrame | None,
]:
    """xmodal.alignment.condition_tables for every set of a sets table, at the LLM layers the
    layer search chose per (vision model, metric), and whether each choice was tied
    (:func:`tied_layers`); with ``heldout`` (held-out layers table,
    held-out sets table, seed of the splits) also xmodal.alignment.heldout_condition_table;
    with ``loo_stimuli_path`` also xmodal.alignment.self_selection_table (each LLM layer read
    once for all); ``draws`` as in :func:`run_conditions`."""
    from xmodal import alignment, stats

    layers = read_table(layers_path)
    chosen, tied = chosen_layers(layers, layers_path), tied_layers(layers, layers_path)
    missing = [(v, m) for v in vision for m in metric_names if (v, m) not in chosen]
    if missing:
        raise ValueError(
            f"{layers_path}: no chosen layer for {missing}; the layer search is older than the "
            "config (rerun it)"
        )
    ids, prepared = read_prepared_vision(vision_paths, vision, vision_layer)
    sets = selection.read_sets(sets_path, draws)
    held_sets = held_choice = None
    if heldout is not None:
        held_path, held_sets_path, split_seed = heldout
        held_choice = heldout_choices(read_table(held_path), held_path)
        # the held-out sets have the random draws of the main sets, and no drop sets
        held_sets = selection.read_sets(held_sets_path, _random_draws(draws))
        splits = sorted(set(held_sets["split"].astype(int)))
        chosen_splits = sorted({s for _, _, s in held_choice})
        if splits != chosen_splits or splits != list(range(len(splits))):
            raise ValueError(
                f"{held_sets_path} has {len(splits)} splits, {held_path} "
                f"{len(chosen_splits)}: made with different analysis.heldout_layer.n_splits; "
                "rerun both (rules heldout_sets and layer_search)"
            )
        _check_halves(held_sets, ids, len(splits), split_seed, held_sets_path)
    cache = None
    if vision_bootstrap_path is not None:
        cache = stats.load_sides(vision_bootstrap_path)
        stored = len(cache)
    with open_features(llm_path, ids, model=llm, modality="language") as f:
        t = layer_threshold(f)
        read = functools.partial(prepared_layer, f, threshold=t)
        # with a control that reads the layers again, each is read once (held in memory)
        again = heldout is not None or loo_stimuli_path is not None
        read = functools.cache(read) if again else read
        conditions, contrasts = alignment.condition_tables(
            prepared,
            llm,
            chosen,
            read,
            sets,
            ids,
            k=k,
            n_boot=n_boot,
            seed=seed,
            metrics=tuple(metric_names),
            boot_cache=cache,
            tied=tied,
        )
        if cache is not None and len(cache) > stored:
            log.warning(
                "%s: %d of the vision models' bootstrap structures did not match the stored "
                "ones and were rebuilt (same numbers; the file was made from other vision "
                "features, sets or settings, or on another device)",
                vision_bootstrap_path,
                len(cache) - stored,
            )
        elif cache is not None:
            log.info("vision models' bootstrap structures reused from %s", vision_bootstrap_path)
        held = None
        if held_sets is not None and held_choice is not None:
            held = alignment.heldout_condition_table(
                prepared, llm, chosen, held_choice, read, held_sets, ids, k=k,
                metrics=tuple(metric_names),
            )  # fmt: skip
        own = None
        if loo_stimuli_path is not None:
            own = _self_selection(
                prepared, llm, chosen, read, sets, ids, loo_stimuli_path, conditions, contrasts,
                k=k, n_boot=n_boot, seed=seed, metrics=tuple(metric_names), tied=tied,
            )  # fmt: skip
    return conditions, contrasts, held, tied, own


def _self_selection(
    prepared: Mapping[str, tuple[int, np.ndarray]],
    llm: str,
    chosen: Mapping[tuple[str, str], int],
    read: Callable[[int], np.ndarray],
    sets: pd.DataFrame,
    ids: Sequence[str],
    loo_stimuli_path: PathLike,
    conditions: pd.DataFrame,
    contrasts: pd.DataFrame,
    **plan: Any,
) -> pd.DataFrame:
    """Each vision model on the low and high sets of the GPA without it, by mean dispersion and
    by PC1 (the main sets' size; xmodal.selection.others_sets), scored as the main sets are, its
    random baseline the main draws (xmodal.alignment.self_selection_table)."""
    from xmodal import alignment

    main = {
        (summary, name): set(
            sets.loc[(sets["set"] == name) & (sets["summary"] == summary), "stimulus_id"]
        )
        for summary in selection.SELF_SELECTION_SCORES
        for name in ("low", "high")
    }
    loo = read_table(loo_stimuli_path)
    if "partial_pc1" not in loo.columns:
        log.warning(
            "%s has no partial_pc1 column (written by an older version): the sets chosen "
            "without each vision model are by mean dispersion only; rerun leave_one_model_out "
            "for the PC1 ones",
            loo_stimuli_path,
        )
    others = selection.others_sets(ids, loo, len(main[("mean", "low")]))
    missing = sorted(set(prepared) - set(others["vision"]))
    if missing:
        raise ValueError(
            f"{loo_stimuli_path} holds no fit without {missing}: it was made for other vision "
            "models (rerun leave_one_model_out)"
        )
    from xmodal.dispersion import partial_pc1_orientation

    parts, shared = [], {}
    oriented = {  # a PC1 whose sign is noise: its low and high sets may be swapped
        key: "partial_pc1" in loo.columns and partial_pc1_orientation(loo, key)[1]
        for key in prepared
    }
    for key in prepared:
        own = others[others["vision"] == key].drop(columns="vision")
        for (summary, name), ref in main.items():
            chosen_here = own.loc[(own["set"] == name) & (own["summary"] == summary), "stimulus_id"]
            shared[(key, summary, name)] = len(ref & set(chosen_here))
        cond, con = alignment.condition_tables(
            {key: prepared[key]}, llm, chosen, read, own, ids, **plan
        )
        parts.append((cond, con))
    return alignment.self_selection_table(
        pd.concat([p[1] for p in parts], ignore_index=True),
        pd.concat([p[0] for p in parts], ignore_index=True),
        conditions,
        contrasts,
        shared,
        oriented,
    )


def concatenate_tables(paths: Sequence[PathLike], out: PathLike) -> None:
    """Row-wise concatenation of per-LLM tables (same columns) into one aggregate table."""
    frames = [read_table(p) for p in paths]
    columns = list(frames[0].columns) if frames else []
    for p, df in zip(paths, frames, strict=True):
        if list(df.columns) != columns:
            raise ValueError(
                f"{p} has columns {list(df.columns)}, {paths[0]} has {columns}: the per-LLM "
                "tables come from different versions; rerun the older ones"
            )
    write_table(pd.concat(frames, ignore_index=True), out)


def write_models_table(records: Sequence[Mapping[str, Any]], out: PathLike) -> None:
    """``models.tsv`` from the registry's table (xmodal.registry.Registry.table)."""
    write_table(pd.DataFrame(list(records)), out)


#: The columns of the provenance table: one row for the stimuli, then one per feature file.
PROVENANCE_COLUMNS = (
    "kind", "key", "label", "modality", "source", "id", "requested_revision", "revision",
    "sha256", "n_stimuli", "stimuli_sha256", "compute_dtype", "device", "pooling", "torch", "timm",
    "transformers", "numpy", "scipy", "xmodal", "created",
)  # fmt: skip


#: the provenance columns a feature file's attribute of the same name fills
_PROVENANCE_ATTRS = ("label", "modality", "source", "requested_revision", "revision",
                     "compute_dtype", "device", "pooling", "created")  # fmt: skip


def _library_versions(path: PathLike, told: Any) -> dict[str, Any]:
    """A feature file's ``library_versions`` attribute (a JSON object, library -> version); a
    supplied file's other form is warned about, naming the file, and left out."""
    try:
        versions = json.loads(told or "{}")
    except (TypeError, ValueError):
        versions = None
    if not isinstance(versions, dict):
        log.warning(
            "%s: its 'library_versions' attribute is not a JSON object (library -> version) but "
            "%r; the provenance table leaves its library versions empty",
            path,
            str(told)[:80],
        )
        return {}
    return versions


def provenance_table(
    manifest: PathLike,
    stimuli_source: str,
    feature_paths: Sequence[PathLike],
    labels: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """What a run's numbers were computed from, to cite: the stimuli (the manifest's SHA-256,
    and for hub stimuli the dataset and the commit its revision resolved to) and, per model,
    the feature file's provenance: the model id, the requested and the resolved revision (a hub
    model's commit, which identifies its weights), the weights' SHA-256 (local and built
    models; empty for hub models), the digest of what it read of the stimuli (image files or
    captions, ``stimuli_sha256``), compute dtype, device, pooling, library versions, and when
    it was extracted. ``labels`` (model key -> label, the config's) name the models; a feature
    file keeps the label it was extracted under, which a later label change does not rewrite."""
    from xmodal.io import file_digests
    from xmodal.stimuli import read_manifest

    manifest = Path(manifest)
    stim: dict[str, Any] = {"kind": "stimuli", "source": stimuli_source, "id": str(manifest)}
    stim["sha256"] = file_digests([manifest])[0] or ""
    stim["n_stimuli"] = len(read_manifest(manifest, check_images=False))
    source_json = manifest.parent / "source.json"  # written by xmodal.prefetch (hub stimuli)
    if stimuli_source == "hub" and source_json.is_file():
        src = json.loads(source_json.read_text())
        stim.update(
            key=src.get("split", ""), id=src.get("repo", ""), created=src.get("created", ""),
            requested_revision=src.get("revision_requested") or "",
            revision=src.get("revision", ""),
        )  # fmt: skip
    rows = [stim]
    for path in feature_paths:
        with FeatureFile(path) as ff:
            attrs, n = ff.attrs, ff.m
        versions = _library_versions(path, attrs.get("library_versions"))
        key = attrs.get("model_key", Path(path).stem)
        row = {
            "kind": "model",
            "key": key,
            "id": attrs.get("model_id", ""),
            "sha256": attrs.get("weights_sha256", ""),
            "n_stimuli": n,
            "stimuli_sha256": attrs.get("stimuli_sha256", ""),
            **{k: attrs.get(k, "") for k in _PROVENANCE_ATTRS},
            **{
                k: versions.get(k, "") for k in ("torch", "timm", "transformers", "numpy", "xmodal")
            },
        }
        if attrs.get("imported_from"):  # a file the user supplied, whatever made it
            row["source"] = "supplied"
        if labels and Path(path).stem in labels:  # the file's name is the config key
            row["label"] = labels[Path(path).stem]
        rows.append(row)
    # last, the analysis code that made the tables from the features (the same in every
    # analysis job: each reruns when it changes, docs/cluster.md "What reruns"), and the
    # numerical libraries of the environment it ran in
    rows.append(
        {"kind": "analysis", "key": "xmodal", "sha256": xmodal.analysis_code_digest(),
         "n_stimuli": rows[-1]["n_stimuli"], "xmodal": xmodal.__version__,
         **{k: library_version(k) for k in ("torch", "numpy", "scipy")}}
    )  # fmt: skip
    return pd.DataFrame(rows, columns=list(PROVENANCE_COLUMNS)).fillna("")


def write_provenance(
    manifest: PathLike,
    stimuli_source: str,
    feature_paths: Sequence[PathLike],
    out: PathLike,
    labels: Mapping[str, str] | None = None,
) -> None:
    """``{dataset}_provenance.tsv`` (:func:`provenance_table`)."""
    table = provenance_table(manifest, stimuli_source, feature_paths, labels)
    versions = table.loc[table.kind == "model", ["torch", "timm", "transformers"]]
    versions = versions.drop_duplicates()
    if len(versions) > 1:  # features of one run from several library builds: say so
        log.warning("the feature files were extracted with different library versions:\n%s",
                    versions.to_string(index=False))  # fmt: skip
    write_table(table, out)


def write_summary(contrasts_path: PathLike, grid_path: PathLike, out: PathLike) -> None:
    """The summary of how consistently low > random > high across pairs (xmodal.summary)."""
    from xmodal.summary import summary_table

    write_table(summary_table(read_table(contrasts_path), read_table(grid_path)), out)


def write_drop_summary(drop_path: PathLike, out: PathLike) -> None:
    """Where the drop sets fall among their size-matched random draws, over pairs."""
    from xmodal.summary import drop_summary_table

    table = drop_summary_table(read_table(drop_path))
    for r in table.itertuples():
        log.info(
            "%s (%s): drop high > random > drop low in %d of %d valid pairs (%d unstable); "
            "random sets of the drop size minus full set: median %+.4f",
            r.metric, r.summary, r.n_drop_high_gt_random_gt_drop_low, r.n_valid, r.n_unstable,
            r.median_random_minus_full,
        )  # fmt: skip
    write_table(table, out)


def write_heldout_summary(heldout_path: PathLike, out: PathLike) -> None:
    """The low − high contrast inside the held-out halves, at the held-out and the full-set
    layer, over pairs."""
    from xmodal.summary import heldout_summary_table

    table = heldout_summary_table(read_table(heldout_path))
    for r in table.itertuples():
        log.info(
            "%s (%s), %s layer: low > high (mean over %d splits) in %d of %d valid pairs; "
            "median low - high %+.4f; held-out layer = full-set layer in a median %.2f of splits",
            r.metric, r.summary, r.layer_rule, r.n_splits, r.n_low_gt_high, r.n_valid,
            r.median_diff, r.median_frac_same_layer,
        )  # fmt: skip
    write_table(table, out)


def write_self_selection_summary(
    self_selection_path: PathLike, contrasts_path: PathLike, out: PathLike
) -> None:
    """The low − high contrast on sets chosen with and without the scored vision model, over
    pairs (xmodal.summary.self_selection_summary_table)."""
    from xmodal.summary import self_selection_summary_table

    table = self_selection_summary_table(
        read_table(self_selection_path), read_table(contrasts_path)
    )
    for r in table.itertuples():
        log.info(
            "%s (%s), sets chosen %s: low > high in %d of %d valid pairs, interval of low - "
            "high above 0 in %s of %d; median low / high %.2f over %d pairs",
            r.metric, r.summary,
            "with every vision model" if r.sets == "all" else "without the scored one",
            r.n_low_gt_high, r.n_valid, r.n_diff_ci_above_zero, r.n_with_ci,
            r.median_ratio_low_high, r.n_ratio,
        )  # fmt: skip
    write_table(table, out)


# ---------------------------------------------------------------- language-side dispersion


def run_language_gpa(
    feature_paths: Sequence[PathLike],
    llms: Sequence[str],
    layer: str | float,
    tol: float,
    max_iter: int,
    out_residuals: PathLike,
    out_dispersion: PathLike,
    out_layers: PathLike,
    out_summary: PathLike,
    layer_tables: Sequence[PathLike] = (),
) -> None:
    """GPA across the LLMs, one layer each (docs/method.md, "Language-side dispersion"):
    per-caption residuals, dispersion and the layers used.

    ``layer``: ``"chosen"`` (``layer_tables``: each LLM's layer-search table, in ``llms``
    order) or a relative depth in [0, 1]. Tables as the vision GPA's (docs/contracts.md).
    """
    if layer == "chosen" and len(layer_tables) != len(llms):
        raise ValueError(
            f"layer 'chosen' needs one layer-search table per LLM: {len(layer_tables)} given for "
            f"{len(llms)} LLMs"
        )
    tables = dict(zip(llms, layer_tables, strict=True)) if layer == "chosen" else None
    names: dict[str, list[str]] = {}
    for p, llm in zip(feature_paths, llms, strict=True):
        with open_features(p, model=llm, modality="language") as f:
            names[llm] = f.layer_names
    used = language_dispersion.language_layers(llms, names, layer, tables)
    for row in used.itertuples():
        log.info(
            "language GPA: %s layer %d (%s, relative depth %.2f; %s%s)",
            row.llm,
            row.llm_layer,
            row.layer_name,
            row.relative_depth,
            row.rule,
            f", chosen for {row.votes:g} of {row.n_vision:g} vision models"
            if row.rule == "chosen"
            else "",
        )
    ids, reps = read_gpa_layers(
        feature_paths,
        llms,
        [int(v) for v in used["llm_layer"]],
        "language",
        "analysis.language_dispersion.layer",
    )
    write_table(used, out_layers)
    _gpa_and_dispersion(
        ids, llms, reps, tol, max_iter, out_residuals, out_dispersion, out_summary, "language",
        extra={"layers": [int(v) for v in used["llm_layer"]], "layer_setting": layer},
    )  # fmt: skip


def run_language_correlation(
    vision_dispersion: PathLike,
    language_dispersion_path: PathLike,
    n_boot: int,
    seed: int,
    out_table: PathLike,
) -> None:
    """Correlation of per-caption language dispersion with per-image vision dispersion."""
    table = language_dispersion.correlation_table(
        read_dispersion_table(vision_dispersion),
        read_dispersion_table(language_dispersion_path),
        n_boot,
        seed,
    )
    for row in table.itertuples():
        log.info(
            "%s %s: %.3f [%.3f, %.3f] (n = %d)%s",
            row.summary,
            row.method,
            row.estimate,
            row.ci_low,
            row.ci_high,
            row.n,
            f" ({row.reason})" if row.reason else "",
        )
    write_table(table, out_table)


def run_joint_sets(
    vision_dispersion: PathLike,
    language_dispersion_path: PathLike,
    set_size: int,
    n_random: int,
    knn_k: int,
    seed: int,
    out_sets: PathLike,
) -> None:
    """The 2 × 2 sets (low/high vision × low/high language dispersion) and their random sets."""
    sets = language_dispersion.joint_sets(
        read_dispersion_table(vision_dispersion),
        read_dispersion_table(language_dispersion_path),
        set_size=set_size,
        n_random=n_random,
        knn_k=knn_k,
        seed=seed,
    )
    write_table(sets, out_sets)


def run_joint_conditions(
    vision_paths: Sequence[PathLike],
    llm_path: PathLike,
    layers_path: PathLike,
    sets_path: PathLike,
    vision: Sequence[str],
    llm: str,
    vision_layer: int,
    k: int,
    seed: int,
    out_conditions: PathLike,
    out_cells: PathLike,
    draws: Mapping[str, int] | None = None,
) -> None:
    """CKNNA of every vision model with one LLM (at its chosen layers) on the 2 × 2 sets and the
    size-matched random draws; the conditions table and each cell against the random draws.
    ``draws`` as in :func:`run_conditions` (the 2 × 2 sets have its ``random`` draws only)."""
    conditions, _, _, tied, _ = _set_alignment(
        vision_paths, llm_path, layers_path, sets_path, vision, llm, vision_layer, k, 0, seed,
        ("cknna",), draws=_random_draws(draws),
    )  # fmt: skip
    cells = language_dispersion.cell_table(conditions, tied)
    for r in cells.itertuples():
        log.info(
            "%s x %s, %s %s: %.4f (random %.4f [%.4f, %.4f])",
            r.vision,
            llm,
            r.summary,
            r.cell,
            r.value,
            r.random_mean,
            r.random_ci_low,
            r.random_ci_high,
        )
    write_table(conditions, out_conditions)
    write_table(cells, out_cells)


# ---------------------------------------------------------------- stimulus properties


def run_image_properties(
    manifest: PathLike, images: PathLike, out_table: PathLike, workers: int = 1
) -> None:
    """Image properties of every stimulus (docs/method.md, "Stimulus properties"; sizes from
    the stimuli report's ``images.tsv``)."""
    from xmodal.stimuli import read_manifest

    df = read_manifest(manifest)
    table = properties.image_properties(
        df, Path(manifest).parent, read_table(images), workers=workers
    )
    log.info("image properties of %d stimuli", len(df))
    write_table(table, out_table)


def run_stimulus_properties(
    manifest: PathLike,
    image_table: PathLike,
    llm_paths: Sequence[PathLike],
    llms: Sequence[str],
    out_table: PathLike,
    annotations: Sequence[str] | None = None,
) -> None:
    """Every property: caption words, each LLM's token counts (from its feature file), the
    image properties and the manifest's numeric columns (``annotations``: config
    ``analysis.annotations``; None: every numeric column)."""
    from xmodal.stimuli import read_manifest

    df = read_manifest(manifest)
    ids = [str(s) for s in df["stimulus_id"]]
    counts: dict[str, np.ndarray | None] = {}
    supplied: dict[str, str] = {}
    for path, llm in zip(llm_paths, llms, strict=True):
        with open_features(path, model=llm, modality="language") as f:
            have = f.stimulus_ids
            tokens = f.n_tokens()
            if f.attrs.get("imported_from"):  # models.<llm>.features: never extracted
                supplied[llm] = str(f.attrs["imported_from"])
        if tokens is not None:
            lookup = dict(zip(have, tokens.astype(np.float64), strict=True))
            lost = [s for s in ids if s not in lookup]
            if lost:  # stimuli left out of extraction (stimuli.drop_duplicates): no count
                log.info(
                    "%s: %d stimuli of the manifest are not in the feature file (dropped "
                    "duplicates?); their token counts are NaN: %s",
                    path,
                    len(lost),
                    lost[:5],
                )
            tokens = np.array([lookup.get(s, np.nan) for s in ids])
        counts[llm] = tokens
    properties.check_annotations(df, annotations, manifest)
    table = properties.stimulus_properties(
        df, read_table(image_table), counts, annotations, supplied=supplied
    )
    write_table(table, out_table)


def run_property_correlations(
    properties_path: PathLike,
    dispersion_path: PathLike,
    n_boot: int,
    seed: int,
    out_table: PathLike,
) -> None:
    """Spearman correlation of every property with vision dispersion (mean and PC1)."""
    table = properties.property_correlations(
        read_table(properties_path), read_dispersion_table(dispersion_path), n_boot, seed
    )
    for r in table.itertuples():
        log.info(
            "%s%s vs %s dispersion: rho = %.3f [%.3f, %.3f]%s",
            r.property,
            f" ({r.model})" if r.model else "",
            r.summary,
            r.spearman_rho,
            r.ci_low,
            r.ci_high,
            f" ({r.reason})" if r.reason else "",
        )
    write_table(table, out_table)
