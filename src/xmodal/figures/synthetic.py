"""Small, complete synthetic aggregate tables in the contract format (tests, figure previews).

The numbers are made up (low-dispersion sets align better by construction); only the shapes,
columns and keys follow docs/contracts.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from xmodal.alignment import drop_table
from xmodal.dispersion import permutation_baseline
from xmodal.io import write_table
from xmodal.summary import (
    drop_summary_table,
    heldout_summary_table,
    summary_table,
)

#: What ``synthetic_inputs(plant=True)`` plants, for every metric with kNN sets (stability above
#: the 1e-3 threshold = unstable; 5e-4 = just stable) and for the vision model ``vis-2``.
PLANTED = {
    "unstable": [
        ("grid", "vis-1", "alpha-3b", "low", "mean", 2e-3),
        ("grid", "vis-2", "beta-1b", "full", "none", 1e-2),
        ("grid", "vis-0", "alpha-0.5b", "drop_low", "mean", 1.5e-3),
        ("grid", "vis-0", "beta-7b", "random", "none", 3e-3),  # every draw
        ("layers", "vis-1", "beta-1b", 4, 2e-3),
        ("layers", "vis-0", "beta-1b", "chosen", 4e-3),  # and its full-set value in the grid
    ],
    "stable": [
        ("grid", "vis-1", "alpha-3b", "high", "pc1", 5e-4),
        ("grid", "vis-2", "alpha-0.5b", "random", "none", 5e-3),  # draw 0 only: mean 5e-4
    ],
    "undefined": [
        ("grid", "vis-2", "beta-7b", "high", "mean"),
        ("layers", "vis-1", "beta-1b", 0, "constant rows"),
        ("layers", "vis-0", "alpha-3b", 5, "degenerate kernel"),  # its value stays finite
    ],
    "collapsed": "vis-2",
    "warn": ("beta-7b", 1),
    # the held-out layer choice: (vision, llm, summary, layer_rule, column, stability or None
    # for NaN, splits); a mean over splits is unstable when the mean stability exceeds 1e-3
    "heldout": [
        ("vis-1", "alpha-3b", "mean", "heldout", "low_stability", 2e-3, "all"),  # unstable
        ("vis-0", "alpha-0.5b", "mean", "heldout", "high_stability", 2e-3, [0]),  # mean 4e-4
        ("vis-2", "beta-7b", "pc1", "full", "low", None, [0]),  # undefined
    ],
    # the 2 × 2 cells: (vision or "all", llm or "all", summary, cell or "random" for the random
    # sets' stability, stability or None for NaN)
    "joint_cells": [
        ("vis-1", "alpha-3b", "mean", "vlow_lhigh", 2e-3),  # one unstable pair: an open dot
        ("all", "all", "pc1", "vhigh_llow", 2e-3),  # every pair: the bar is hatched too
        ("vis-2", "beta-7b", "mean", "vhigh_lhigh", None),  # undefined pair: a crossed bar
        ("all", "all", "pc1", "random", 2e-3),  # the random band of the PC1 panel
    ],
}

#: Splits of the synthetic held-out tables.
N_SPLITS = 5


def _stab(rng: np.random.Generator, knn: bool) -> float:
    """A stability far below the threshold (0 for most values, as on healthy data)."""
    return float(rng.choice([0.0, 1e-7])) if knn else 0.0


def _plant_alignment(layers: pd.DataFrame, grid: pd.DataFrame) -> None:
    """Set the stabilities and undefined values of :data:`PLANTED` (kNN metrics only)."""
    knn_l = layers["metric"].isin(["cknna", "mutual_knn"])
    knn_g = grid["metric"].isin(["cknna", "mutual_knn"])
    for kind in ("unstable", "stable"):
        for item in PLANTED[kind]:
            if item[0] == "layers":
                _, v, ll, li, st = item
                m = knn_l & (layers["vision"] == v) & (layers["llm"] == ll)
                m &= layers["chosen"] if li == "chosen" else layers["llm_layer"] == li
                layers.loc[m, "stability"] = st
                if li == "chosen":
                    full = knn_g & (grid["vision"] == v) & (grid["llm"] == ll)
                    grid.loc[full & (grid["condition"] == "full"), "stability"] = st
                continue
            _, v, ll, cond, summ, st = item
            m = knn_g & (grid["vision"] == v) & (grid["llm"] == ll) & (grid["condition"] == cond)
            m &= grid["summary"] == summ
            if cond == "random" and kind == "stable":
                m &= grid["draw"] == 0
            grid.loc[m, "stability"] = st
    for item in PLANTED["undefined"]:
        if item[0] == "layers":
            _, v, ll, li, reason = item
            m = (layers["vision"] == v) & (layers["llm"] == ll) & (layers["llm_layer"] == li)
            if layers.loc[m, "chosen"].any():
                raise ValueError(f"planted degenerate layer {item} is a chosen layer")
            layers.loc[m, ["valid", "reason"]] = [False, reason]
            if reason == "constant rows":
                layers.loc[m, ["value", "stability"]] = np.nan
            continue
        _, v, ll, cond, summ = item
        m = (grid["vision"] == v) & (grid["llm"] == ll) & (grid["condition"] == cond)
        grid.loc[m & (grid["summary"] == summ), ["value", "stability"]] = np.nan


def _diagnostics(
    vision: list[str],
    llms: list[str],
    layers: pd.DataFrame,
    ids: list[str],
    n_llm_layers: int,
    rng: np.random.Generator,
    plant: bool,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A diagnostics table (every vision model's layer, every LLM layer) and a duplicates table."""
    m, k = len(ids), 10
    picked = layers[layers["chosen"]]
    chosen = set(zip(picked["llm"], picked["llm_layer"], strict=True))
    rows = []

    def add(model, modality, layer, name, cos, unres, used):
        collapsed = cos >= 0.999 or unres >= 0.5
        rows.append(
            {"model": model, "modality": modality, "layer": layer, "layer_name": name, "m": m,
             "dim": 64, "k": k, "tau": 3.8e-6, "cos_mean": cos, "cos_sd": (1 - cos) / 3,
             "eff_dim": 1 + 40 * (1 - cos), "n_unresolved": round(unres * m),
             "frac_unresolved": round(unres * m) / m, "n_duplicate_groups": 0,
             "n_in_duplicate_groups": 0, "collapsed": collapsed,
             "warn": collapsed or round(unres * m) / m > 0.05, "used": used}
        )  # fmt: skip

    for v in vision:
        bad = plant and v == PLANTED["collapsed"]
        add(v, "vision", 30, "blocks.30", 0.9995 if bad else rng.uniform(0.3, 0.7),
            0.9 if bad else 0.025, True)  # fmt: skip
    for ll in llms:
        for li in range(n_llm_layers):
            warn = plant and (ll, li) == PLANTED["warn"]
            add(ll, "language", li, "embeddings" if li == 0 else f"layers.{li - 1}",
                rng.uniform(0.4, 0.9), 0.08 if warn else 0.0125, (ll, li) in chosen)  # fmt: skip
    dup = pd.DataFrame(columns=["kind", "group", "stimulus_id"])
    if plant:
        dup = pd.DataFrame(
            [("pixels", 0, ids[1]), ("pixels", 0, ids[7]), ("caption", 0, ids[2]),
             ("caption", 0, ids[5]), ("caption", 0, ids[9])],
            columns=["kind", "group", "stimulus_id"],
        )  # fmt: skip
    return pd.DataFrame(rows), dup


def synthetic_inputs(
    directory: str | Path,
    n_vision: int = 3,
    llm_families: dict[str, list[float]] | None = None,
    n_stimuli: int = 40,
    set_size: int = 10,
    n_random: int = 10,
    n_llm_layers: int = 6,
    images: bool = True,
    seed: int = 0,
    metrics: Sequence[str] = ("cknna",),
    plant: bool = False,
) -> dict[str, Path]:
    """Write every table a figure reads under ``directory``; return the ``inputs`` mapping.

    Every alignment table holds each of ``metrics``. Stabilities are 0 or far below the
    threshold, except with ``plant``: then, for every metric, the values listed in
    :data:`PLANTED` are unstable, just stable or not numbers, one vision model is collapsed and
    the manifest has duplicate stimuli (the figures' marks are tested against these).
    """
    if plant and n_llm_layers < 6:
        raise ValueError("synthetic_inputs(plant=True) plants values in LLM layers 0..5")
    rng = np.random.default_rng(seed)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    families = llm_families or {"Alpha": [0.5, 3.0], "Beta": [1.0, 7.0]}

    vision = [f"vis-{i}" for i in range(n_vision)]
    model_rows = [
        {
            "model": v,
            "modality": "vision",
            "label": f"Vision {chr(65 + i)}",
            "family": "ViT",
            "size_b": 0.6,
        }
        for i, v in enumerate(vision)
    ]
    llms: list[str] = []
    for fam, sizes in families.items():
        for s in sorted(sizes):
            key = f"{fam.lower()}-{s:g}b"
            llms.append(key)
            model_rows.append(
                {
                    "model": key,
                    "modality": "language",
                    "label": f"{fam} {s:g}b",
                    "family": fam,
                    "size_b": s,
                }
            )
    models = pd.DataFrame(model_rows)
    models["order"] = range(len(models))
    # scramble row order: figures must use the `order` column, not the row order
    models = models.sample(frac=1.0, random_state=seed).reset_index(drop=True)

    ids = [f"s{j:03d}" for j in range(n_stimuli)]
    noise = rng.uniform(0.05, 0.4, n_stimuli)
    resid = (
        noise[:, None] + rng.normal(0, 0.04, (n_stimuli, n_vision)) + np.linspace(0, 0.1, n_vision)
    )
    resid = np.abs(resid)
    # distance from each model's centre: at least the residual, varying over stimuli
    dist = resid * (1.5 + 0.5 * np.cos(np.arange(n_stimuli)))[:, None]
    residuals = pd.DataFrame(
        [{"stimulus_id": ids[j], "model": vision[i], "residual": resid[j, i], "distance": dist[j, i]} for j in range(n_stimuli) for i in range(n_vision)]
    )  # fmt: skip
    mean_d = resid.mean(axis=1)
    rc = resid - resid.mean(axis=0)
    _, _, vt = np.linalg.svd(rc, full_matrices=False)
    pc1 = rc @ vt[0]
    if np.corrcoef(pc1, mean_d)[0, 1] < 0:
        pc1 = -pc1
    dispersion = pd.DataFrame(
        {
            "stimulus_id": ids,
            "position": range(n_stimuli),
            "mean_dispersion": mean_d,
            "pc1_score": pc1,
            "rank_mean": np.argsort(np.argsort(mean_d, kind="stable"), kind="stable"),
            "rank_pc1": np.argsort(np.argsort(pc1, kind="stable"), kind="stable"),
            "mean_distance": dist.mean(axis=1),
        }
    )

    k = set_size
    set_rows = []
    for summ, col in (("mean", mean_d), ("pc1", pc1)):
        order = np.argsort(col, kind="stable")
        set_rows += [("low", summ, 0, ids[j]) for j in order[:k]]
        set_rows += [("high", summ, 0, ids[j]) for j in order[-k:]]
    for r in range(n_random):
        set_rows += [("random", "none", r, ids[j]) for j in rng.choice(n_stimuli, k, replace=False)]
    n_drop = n_stimuli // 4
    order = np.argsort(mean_d, kind="stable")
    set_rows += [("drop_high", "mean", 0, ids[j]) for j in order[: n_stimuli - n_drop]]
    set_rows += [("drop_low", "mean", 0, ids[j]) for j in order[n_drop:]]
    for r in range(n_random):
        pick = rng.choice(n_stimuli, n_stimuli - n_drop, replace=False)
        set_rows += [("random_drop", "none", r, ids[j]) for j in pick]
    sets = pd.DataFrame(set_rows, columns=["set", "summary", "draw", "stimulus_id"])

    loo_pts, loo_rows = [], []
    for i, v in enumerate(vision):
        partial = np.delete(resid, i, axis=1).mean(axis=1)
        dev = resid[:, i] + rng.normal(0, 0.05, n_stimuli)
        loo_pts += [
            {
                "held_out": v,
                "stimulus_id": ids[j],
                "partial_dispersion": partial[j],
                "deviation": dev[j],
            }
            for j in range(n_stimuli)
        ]
        pr, pp = stats.pearsonr(partial, dev)
        sr, sp = stats.spearmanr(partial, dev)
        # the baseline of the held-out model's rows shuffled (xmodal.dispersion), from its own
        # generator: drawn from rng, it would change every table made after it
        shuffle = np.random.default_rng([seed, 14, i])
        shuffled = np.array([dev[shuffle.permutation(n_stimuli)] for _ in range(max(n_random, 1))])
        loo_rows.append(
            {
                "held_out": v,
                "pearson_r": pr,
                "pearson_p": pp,
                "spearman_rho": sr,
                "spearman_p": sp,
                "n": n_stimuli,
                **permutation_baseline(partial, shuffled, pr, sr),
            }
        )
    loo_stimuli, loo = pd.DataFrame(loo_pts), pd.DataFrame(loo_rows)

    layer_rows, grid_rows, con_rows = [], [], []
    for mi, metric in enumerate(metrics):
        knn = metric in ("cknna", "mutual_knn")
        for v in vision:
            for ll in llms:
                base = rng.uniform(0.1, 0.3) * (1 + 0.4 * mi)
                depth = np.linspace(0, 1, n_llm_layers)
                prof = base * (
                    0.3 + 0.7 * np.sin(np.pi * np.clip(depth * 0.8 + 0.1, 0, 1))
                ) + rng.normal(0, 0.005, n_llm_layers)
                best = int(np.argmax(prof))
                for li in range(n_llm_layers):
                    layer_rows.append(
                        {"vision": v, "llm": ll, "vision_layer": 30, "llm_layer": li,
                         "layer_name": "embeddings" if li == 0 else f"layers.{li - 1}",
                         "metric": metric, "value": prof[li], "stability": _stab(rng, knn),
                         "valid": True, "reason": "", "chosen": li == best}
                    )  # fmt: skip

                def row(cond, summ, draw, n, value, v=v, ll=ll, best=best, metric=metric, knn=knn):
                    grid_rows.append(
                        {"vision": v, "llm": ll, "llm_layer": best, "condition": cond,
                         "summary": summ, "draw": draw, "n_stimuli": n, "metric": metric,
                         "value": value, "stability": _stab(rng, knn)}
                    )  # fmt: skip

                full = prof[best]
                row("full", "none", 0, n_stimuli, full)
                row("drop_high", "mean", 0, n_stimuli - n_drop, full * 1.1)
                row("drop_low", "mean", 0, n_stimuli - n_drop, full * 0.9)
                for r, x in enumerate(full * 1.02 + rng.normal(0, 0.01, n_random)):
                    row("random_drop", "none", r, n_stimuli - n_drop, x)
                rnd = full + rng.normal(0, 0.02, n_random)
                for r, x in enumerate(rnd):
                    row("random", "none", r, k, x)
                lift0 = rng.uniform(0.95, 1.9)  # some pairs barely modulated
                for summ, lift in (("mean", lift0), ("pc1", 0.9 * lift0 + 0.1)):
                    row("low", summ, 0, k, full * lift + rng.normal(0, 0.01))
                    row("high", summ, 0, k, full * min(0.8, lift - 0.1) + rng.normal(0, 0.01))
    layers, grid = pd.DataFrame(layer_rows), pd.DataFrame(grid_rows)
    if plant:
        _plant_alignment(layers, grid)
    for (v, ll, metric), g in grid.groupby(["vision", "llm", "metric"], sort=False):
        knn = metric in ("cknna", "mutual_knn")
        rnd = g.loc[g["condition"] == "random", "value"].to_numpy(float)
        rstab = float(g.loc[g["condition"] == "random", "stability"].to_numpy(float).mean())
        rdefined = bool(np.isfinite(rnd).all())
        for summ in ("mean", "pc1"):
            lo_r = g[(g["condition"] == "low") & (g["summary"] == summ)].iloc[0]
            hi_r = g[(g["condition"] == "high") & (g["summary"] == summ)].iloc[0]
            low, high = lo_r["value"], hi_r["value"]
            diff = low - high
            ci = 0.04 if knn and np.isfinite(diff) else np.nan
            con_rows.append(
                {"vision": v, "llm": ll, "metric": metric, "summary": summ, "low": low,
                 "high": high, "low_stability": lo_r["stability"],
                 "high_stability": hi_r["stability"],
                 "random_mean": rnd.mean() if rdefined else np.nan,
                 "random_ci_low": np.percentile(rnd, 2.5) if rdefined else np.nan,
                 "random_ci_high": np.percentile(rnd, 97.5) if rdefined else np.nan,
                 "random_stability": rstab,
                 "frac_random_ge_low": float(np.mean(rnd >= low))
                 if rdefined and np.isfinite(low) else np.nan,
                 "diff_low_high": diff, "diff_ci_low": diff - ci, "diff_ci_high": diff + ci,
                 "n_boot": 200 if knn else 0}
            )  # fmt: skip
    diagnostics, duplicates = _diagnostics(vision, llms, layers, ids, n_llm_layers, rng, plant)
    drop = drop_table(grid)
    heldout_layers, heldout = _heldout_tables(layers, grid, n_stimuli, set_size, rng, plant)

    manifest_dir = d / "stimuli"
    (manifest_dir / "images").mkdir(parents=True, exist_ok=True)
    captions = [
        f"Synthetic scene {j}: a {c} square on a plain background"
        for j, c in enumerate(rng.choice(["red", "green", "blue", "yellow"], n_stimuli))
    ]
    manifest = pd.DataFrame(
        {"stimulus_id": ids, "image": [f"images/{s}.png" for s in ids], "caption": captions}
    )
    if images:
        from PIL import Image

        for j, s in enumerate(ids):
            arr = np.zeros((24, 24, 3), dtype=np.uint8)
            arr[...] = rng.integers(0, 255, 3)
            arr[6:18, 6:18] = (255 * (j / max(n_stimuli - 1, 1)), 80, 160)
            Image.fromarray(arr).save(manifest_dir / "images" / f"{s}.png")

    extension = _extension_tables(rng, dispersion, manifest, vision, llms, n_random, seed, plant)
    out = {
        "dispersion": d / "dispersion.tsv",
        "residuals": d / "residuals.tsv",
        "sets": d / "sets.tsv",
        "loo_stimuli": d / "loo_stimuli.tsv",
        "loo": d / "loo.tsv",
        "layers": d / "layers.tsv",
        "grid": d / "grid.tsv",
        "contrasts": d / "contrasts.tsv",
        "models": d / "models.tsv",
        "summary": d / "summary.tsv",
        "diagnostics": d / "diagnostics.tsv",
        "duplicates": d / "duplicates.tsv",
        "drop": d / "drop.tsv",
        "drop_summary": d / "drop_summary.tsv",
        "heldout_layers": d / "heldout_layers.tsv",
        "heldout": d / "heldout.tsv",
        "heldout_summary": d / "heldout_summary.tsv",
        "manifest": manifest_dir / "stimuli.tsv",
        **{name: d / f"{name}.tsv" for name in extension},
    }
    tables = {
        "dispersion": dispersion,
        "residuals": residuals,
        "sets": sets,
        "loo_stimuli": loo_stimuli,
        "loo": loo,
        "layers": layers,
        "grid": grid,
        "contrasts": pd.DataFrame(con_rows),
        "models": models,
        "summary": summary_table(pd.DataFrame(con_rows), grid),
        "diagnostics": diagnostics,
        "duplicates": duplicates,
        "drop": drop,
        "drop_summary": drop_summary_table(drop),
        "heldout_layers": heldout_layers,
        "heldout": heldout,
        "heldout_summary": heldout_summary_table(heldout),
        "manifest": manifest,
        **extension,
    }
    for name, df in tables.items():
        write_table(df, out[name])
    return out


def _heldout_tables(
    layers: pd.DataFrame,
    grid: pd.DataFrame,
    n_stimuli: int,
    set_size: int,
    rng: np.random.Generator,
    plant: bool,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The held-out layer choice over :data:`N_SPLITS` splits: the layer chosen on half A (the
    full-set layer in most splits, its neighbour in some) and the sets inside half B at that
    layer and at the full-set layer (a smaller contrast at the held-out layer, by construction).
    With ``plant``, the values of :data:`PLANTED` ``["heldout"]``."""
    half = n_stimuli // 2
    k_b = int(np.floor(set_size * (n_stimuli - half) / n_stimuli + 0.5))
    choice_rows, rows = [], []
    chosen = layers[layers["chosen"]]
    n_layers = int(layers["llm_layer"].max()) + 1
    for r in chosen.itertuples():
        knn = r.metric in ("cknna", "mutual_knn")
        full = grid[(grid["vision"] == r.vision) & (grid["llm"] == r.llm)]
        full = full[(full["metric"] == r.metric) & (full["condition"] == "full")]["value"].item()
        for split in range(N_SPLITS):
            moved = rng.random() < 0.3
            layer = min(n_layers - 1, int(r.llm_layer) + 1) if moved else int(r.llm_layer)
            choice_rows.append(
                {"vision": r.vision, "llm": r.llm, "metric": r.metric, "split": split,
                 "n_stimuli": half, "llm_layer": layer, "layer_name": f"layers.{layer - 1}",
                 "value": full * rng.uniform(0.95, 1.05), "stability": _stab(rng, knn),
                 "full_layer": int(r.llm_layer), "same_as_full": layer == int(r.llm_layer)}
            )  # fmt: skip
            lift = rng.uniform(1.0, 1.6)
            for summary in ("mean", "pc1"):
                for rule, index, shrink in (("heldout", layer, 0.6), ("full", r.llm_layer, 1.0)):
                    low = full * (1 + shrink * (lift - 1)) + rng.normal(0, 0.01)
                    high = full * (1 - shrink * 0.2) + rng.normal(0, 0.01)
                    rnd = full + rng.normal(0, 0.02, 10)
                    rows.append(
                        {"vision": r.vision, "llm": r.llm, "metric": r.metric,
                         "summary": summary, "split": split, "layer_rule": rule,
                         "llm_layer": int(index), "n_stimuli": k_b, "low": low, "high": high,
                         "low_stability": _stab(rng, knn), "high_stability": _stab(rng, knn),
                         "random_mean": rnd.mean(), "random_ci_low": np.percentile(rnd, 2.5),
                         "random_ci_high": np.percentile(rnd, 97.5),
                         "random_stability": _stab(rng, knn), "n_random": rnd.size,
                         "frac_random_ge_low": float(np.mean(rnd >= low)),
                         "diff_low_high": low - high}
                    )  # fmt: skip
    heldout = pd.DataFrame(rows)
    if plant:
        knn = heldout["metric"].isin(["cknna", "mutual_knn"])
        for v, ll, summary, rule, col, value, splits in PLANTED["heldout"]:
            m = (heldout["vision"] == v) & (heldout["llm"] == ll) & (heldout["summary"] == summary)
            m &= (heldout["layer_rule"] == rule) & knn
            if splits != "all":
                m &= heldout["split"].isin(splits)
            if value is None:
                heldout.loc[m, [col, "diff_low_high"]] = np.nan
            else:
                heldout.loc[m, col] = value
    return pd.DataFrame(choice_rows), heldout


def _extension_tables(
    rng: np.random.Generator,
    dispersion: pd.DataFrame,
    manifest: pd.DataFrame,
    vision: list[str],
    llms: list[str],
    n_random: int,
    seed: int,
    plant: bool = False,
) -> dict[str, pd.DataFrame]:
    """Language-side dispersion, its correlation, the 2 × 2 cells and stimulus properties.

    Language dispersion is made to correlate with vision dispersion; image size and aspect are
    constant (as for equal-size images), so their correlations are undefined (reported n/a).
    The correlation tables are computed from the made-up values by the library's own functions.
    """
    from xmodal.language_dispersion import CELLS, correlation_table
    from xmodal.properties import caption_words, property_correlations

    ids = dispersion["stimulus_id"].tolist()
    m = len(ids)
    mean_l = 0.5 * dispersion["mean_dispersion"].to_numpy() + rng.uniform(0.05, 0.2, m)
    pc1_l = 0.5 * dispersion["pc1_score"].to_numpy() + rng.normal(0, 0.05, m)
    language = pd.DataFrame(
        {
            "stimulus_id": ids,
            "position": range(m),
            "mean_dispersion": mean_l,
            "pc1_score": pc1_l,
            "rank_mean": np.argsort(np.argsort(mean_l, kind="stable"), kind="stable"),
            "rank_pc1": np.argsort(np.argsort(pc1_l, kind="stable"), kind="stable"),
        }
    )
    correlation = correlation_table(dispersion, language, n_boot=50, seed=seed)
    cell_rows = []
    n = max(4, m // 8)
    for v in vision:
        for ll in llms:
            base = rng.uniform(0.1, 0.3)
            rnd = base + rng.normal(0, 0.02, max(n_random, 1))
            for summary in ("mean", "pc1"):
                for name, v_level, l_level in CELLS:
                    lift = (0.06 if v_level == "low" else -0.04) + (
                        0.02 if l_level == "low" else -0.01
                    )
                    value = base + lift + rng.normal(0, 0.01)
                    cell_rows.append(
                        {"vision": v, "llm": ll, "llm_layer": 2, "metric": "cknna",
                         "summary": summary, "cell": name, "vision_level": v_level,
                         "language_level": l_level, "n_stimuli": n, "value": value,
                         "stability": 0.0, "random_mean": rnd.mean(),
                         "random_ci_low": np.percentile(rnd, 2.5),
                         "random_ci_high": np.percentile(rnd, 97.5), "random_stability": 0.0,
                         "frac_random_ge": float(np.mean(rnd >= value)), "n_random": rnd.size}
                    )  # fmt: skip
    cells = pd.DataFrame(cell_rows)
    if plant:
        for v, ll, summary, cell, value in PLANTED["joint_cells"]:
            hit = cells["summary"] == summary
            hit &= (cells["cell"] == cell) if cell != "random" else True
            hit &= (cells["vision"] == v) if v != "all" else True
            hit &= (cells["llm"] == ll) if ll != "all" else True
            if cell == "random":
                cells.loc[hit, "random_stability"] = value
            elif value is None:
                cells.loc[hit, ["value", "stability", "frac_random_ge"]] = np.nan
            else:
                cells.loc[hit, "stability"] = value
    words = np.array([caption_words(c) for c in manifest["caption"]], dtype=float)
    noise = dispersion["mean_dispersion"].to_numpy()
    values = {
        "caption_words": words,
        "image_pixels": np.full(m, 576.0),
        "aspect_ratio": np.ones(m),
        "bytes_per_pixel": rng.uniform(0.2, 1.5, m),
        "colourfulness": rng.uniform(0, 80, m),
        "edge_density": np.clip(0.3 * noise + rng.normal(0, 0.03, m), 0, 1),
        "entropy": rng.uniform(2, 7, m),
    }
    parts = [
        pd.DataFrame({"stimulus_id": ids, "property": p, "model": "", "value": v})
        for p, v in values.items()
    ]
    for i, ll in enumerate(llms):
        parts.append(
            pd.DataFrame(
                {"stimulus_id": ids, "property": "caption_tokens", "model": ll,
                 "value": words + 1 + (rng.integers(0, 3, m) if i else 0)}
            )
        )  # fmt: skip
    properties = pd.concat(parts, ignore_index=True)
    return {
        "language_dispersion": language,
        "language_correlation": correlation,
        "joint_cells": cells,
        "properties": properties,
        "property_correlations": property_correlations(properties, dispersion, 50, seed),
    }
