"""Small, complete synthetic aggregate tables in the contract format (tests, figure previews).

The numbers are made up (low-dispersion sets align better by construction); only the shapes,
columns and keys follow docs/contracts.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from xmodal.io import write_table
from xmodal.summary import summary_table


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
) -> dict[str, Path]:
    """Write every table a figure reads under ``directory``; return the ``inputs`` mapping."""
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
    residuals = pd.DataFrame(
        [{"stimulus_id": ids[j], "model": vision[i], "residual": resid[j, i]} for j in range(n_stimuli) for i in range(n_vision)]
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
        loo_rows.append(
            {
                "held_out": v,
                "pearson_r": pr,
                "pearson_p": pp,
                "spearman_rho": sr,
                "spearman_p": sp,
                "n": n_stimuli,
            }
        )
    loo_stimuli, loo = pd.DataFrame(loo_pts), pd.DataFrame(loo_rows)

    layer_rows, grid_rows, con_rows = [], [], []
    for v in vision:
        for ll in llms:
            base = rng.uniform(0.1, 0.3)
            depth = np.linspace(0, 1, n_llm_layers)
            prof = base * (
                0.3 + 0.7 * np.sin(np.pi * np.clip(depth * 0.8 + 0.1, 0, 1))
            ) + rng.normal(0, 0.005, n_llm_layers)
            best = int(np.argmax(prof))
            for li in range(n_llm_layers):
                layer_rows.append(
                    {"vision": v, "llm": ll, "vision_layer": 30, "llm_layer": li,
                     "layer_name": "embeddings" if li == 0 else f"layers.{li - 1}", "metric": "cknna",
                     "value": prof[li], "chosen": li == best}
                )  # fmt: skip

            def row(cond, summ, draw, n, value, v=v, ll=ll, best=best):
                grid_rows.append(
                    {"vision": v, "llm": ll, "llm_layer": best, "condition": cond, "summary": summ,
                     "draw": draw, "n_stimuli": n, "metric": "cknna", "value": value}
                )  # fmt: skip

            full = prof[best]
            row("full", "none", 0, n_stimuli, full)
            row("drop_high", "mean", 0, n_stimuli - n_drop, full * 1.1)
            row("drop_low", "mean", 0, n_stimuli - n_drop, full * 0.9)
            rnd = full + rng.normal(0, 0.02, n_random)
            for r, x in enumerate(rnd):
                row("random", "none", r, k, x)
            lift0 = rng.uniform(0.95, 1.9)  # some pairs barely modulated
            for summ, lift in (("mean", lift0), ("pc1", 0.9 * lift0 + 0.1)):
                low, high = (
                    full * lift + rng.normal(0, 0.01),
                    full * min(0.8, lift - 0.1) + rng.normal(0, 0.01),
                )
                row("low", summ, 0, k, low)
                row("high", summ, 0, k, high)
                diff = low - high
                con_rows.append(
                    {"vision": v, "llm": ll, "metric": "cknna", "summary": summ, "low": low, "high": high,
                     "random_mean": rnd.mean(), "random_ci_low": np.percentile(rnd, 2.5),
                     "random_ci_high": np.percentile(rnd, 97.5),
                     "frac_random_ge_low": float(np.mean(rnd >= low)), "diff_low_high": diff,
                     "diff_ci_low": diff - 0.04, "diff_ci_high": diff + 0.04, "n_boot": 200}
                )  # fmt: skip

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

    extension = _extension_tables(rng, dispersion, manifest, vision, llms, n_random, seed)
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
        "manifest": manifest_dir / "stimuli.tsv",
        **{name: d / f"{name}.tsv" for name in extension},
    }
    tables = {
        "dispersion": dispersion,
        "residuals": residuals,
        "sets": sets,
        "loo_stimuli": loo_stimuli,
        "loo": loo,
        "layers": pd.DataFrame(layer_rows),
        "grid": pd.DataFrame(grid_rows),
        "contrasts": pd.DataFrame(con_rows),
        "models": models,
        "summary": summary_table(pd.DataFrame(con_rows), pd.DataFrame(grid_rows)),
        "manifest": manifest,
        **extension,
    }
    for name, df in tables.items():
        write_table(df, out[name])
    return out


def _extension_tables(
    rng: np.random.Generator,
    dispersion: pd.DataFrame,
    manifest: pd.DataFrame,
    vision: list[str],
    llms: list[str],
    n_random: int,
    seed: int,
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
                         "random_mean": rnd.mean(), "random_ci_low": np.percentile(rnd, 2.5),
                         "random_ci_high": np.percentile(rnd, 97.5),
                         "frac_random_ge": float(np.mean(rnd >= value)), "n_random": rnd.size}
                    )  # fmt: skip
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
        "joint_cells": pd.DataFrame(cell_rows),
        "properties": properties,
        "property_correlations": property_correlations(properties, dispersion, 50, seed),
    }
