"""What the demo should show, measured from a finished run's tables and feature files.

The demo's scientific checks (docs/method.md, "The embedded demo"), each computed from the
aggregate tables by column name:

- **collapse**: per model, at the layer the analysis uses (the vision layer of GPA; every LLM
  layer chosen by the layer search), the run's own diagnostics: the mean pairwise cosine of the
  prepared features and the fraction of stimuli whose kNN set the kernel's rounding decides
  (docs/method.md, "Diagnostics");
- **planted nuisance**: Spearman ρ between each stimulus's mean dispersion and its planted
  nuisance level (manifest column ``nuisance``); per vision model, what carries it (ρ of the
  model's residual with ν, of the stimulus's distance from the centre of the model's GPA input
  with ν, and of the residual with that distance), and ρ of ν with the relative disagreement
  (each stimulus's mean over models of residual / distance);
- **low vs high**: per (vision, LLM) pair and summary (mean rank, PC1), whether the low-dispersion
  set aligns better than the high one, and whether the bootstrap interval of low − high lies
  above 0 (an interval below 0 is a significant reversal, not the effect);
- **leave-one-model-out**: Pearson r per held-out model;
- **full-set alignment**: CKNNA per pair on the full stimulus set (trained vs untrained).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from xmodal.io import read_table
from xmodal.stimuli import read_manifest

__all__ = [
    "DemoTargets",
    "collapse_table",
    "demo_targets",
    "low_high_table",
    "nuisance_by_model",
]

PathLike = str | os.PathLike


def collapse_table(root: PathLike, dataset: str) -> pd.DataFrame:
    """Per (model, layer) the analysis uses, from the run's diagnostics
    (``results/diagnostics/{dataset}/diagnostics.tsv``, rows marked ``used``: the vision layer
    of GPA, every LLM layer chosen by the layer search): ``model``, ``modality``, ``layer``,
    ``layer_name``, ``mean_cosine`` (the diagnostics' ``cos_mean``), ``frac_unresolved``,
    ``collapsed``, ``warn`` (docs/method.md, "Diagnostics")."""
    diag = read_table(Path(root) / f"results/diagnostics/{dataset}/diagnostics.tsv")
    used = diag[diag["used"]].rename(columns={"cos_mean": "mean_cosine"})
    cols = ["model", "modality", "layer", "layer_name", "mean_cosine", "frac_unresolved"]
    return used[cols + ["collapsed", "warn"]].reset_index(drop=True)


def nuisance_by_model(root: PathLike, dataset: str, vision: Sequence[str]) -> pd.DataFrame:
    """Per vision model, Spearman ρ between ``residual`` (its GPA residual), ``distance`` (the
    stimulus's distance from the centre of the model's GPA input, both from ``residuals.tsv``)
    and the planted level ``nuisance``: columns ``model``, ``rho_residual_nuisance``,
    ``rho_distance_nuisance``, ``rho_residual_distance``.

    A residual is a difference of two rows, so it grows with their distance from the centre
    (docs/method.md, "Dispersion and distance from the centre"): a model that moves high-ν
    stimuli towards its centre (ρ of distance with ν below 0) pulls the mean dispersion's ρ
    with ν down, whatever the models disagree on.
    """
    root = Path(root)
    manifest = read_manifest(root / f"resources/stimuli/{dataset}/stimuli.tsv")
    residuals = read_table(root / f"results/dispersion/{dataset}/residuals.tsv")
    return _by_model(dataset, manifest, residuals, vision)


def _by_model(
    dataset: str, manifest: pd.DataFrame, residuals: pd.DataFrame, vision: Sequence[str]
) -> pd.DataFrame:
    """:func:`nuisance_by_model` from the tables already read."""
    nuisance = manifest.set_index("stimulus_id")["nuisance"].astype(float)
    rows = []
    for model in vision:
        frame = residuals.loc[residuals["model"] == model, ["stimulus_id", "residual", "distance"]]
        frame = frame.set_index("stimulus_id").join(nuisance, how="inner")
        if len(frame) != len(manifest):
            raise ValueError(
                f"{dataset}: residuals.tsv holds {len(frame)} of the manifest's {len(manifest)} "
                f"stimuli for model {model!r}"
            )
        rho = frame.corr(method="spearman")
        rows.append(
            dict(
                model=model,
                rho_residual_nuisance=float(rho.loc["residual", "nuisance"]),
                rho_distance_nuisance=float(rho.loc["distance", "nuisance"]),
                rho_residual_distance=float(rho.loc["residual", "distance"]),
            )
        )
    return pd.DataFrame(rows)


def low_high_table(contrasts: pd.DataFrame) -> pd.DataFrame:
    """Per pair and summary: ``low``, ``high``, ``low_gt_high``, ``ci_above_0`` (the bootstrap
    interval of low − high lies entirely above 0) from the contrasts table."""
    keys = ["vision", "llm", "summary"] + (["metric"] if "metric" in contrasts else [])
    out = contrasts[keys + ["low", "high", "diff_ci_low", "diff_ci_high"]].copy()
    out["low_gt_high"] = out["low"] > out["high"]
    out["ci_above_0"] = out["diff_ci_low"] > 0
    return out.reset_index(drop=True)


@dataclass(frozen=True)
class DemoTargets:
    """The demo's measured targets (see the module docstring)."""

    collapse: pd.DataFrame
    nuisance_rho: float
    nuisance_rho_pc1: float
    #: ρ of ν with each stimulus's mean over models of residual / distance (relative disagreement)
    nuisance_rho_relative: float
    #: ρ of the mean dispersion with the mean distance from the centres (``gpa.json``)
    rho_dispersion_distance: float
    low_high: pd.DataFrame
    loo: pd.DataFrame
    full: pd.Series
    by_model: pd.DataFrame

    def n_low_gt_high(self, summary: str) -> int:
        """Pairs whose low set aligns better than the high set, for ``summary`` (mean / pc1)."""
        return int(self.low_high.loc[self.low_high["summary"] == summary, "low_gt_high"].sum())

    def n_ci_above_0(self, summary: str) -> int:
        """Pairs whose bootstrap interval of low − high lies above 0, for ``summary``."""
        sel = self.low_high["summary"] == summary
        return int(self.low_high.loc[sel, "ci_above_0"].sum())

    def summary(self) -> dict[str, float]:
        """One line of numbers for logs and benchmark tables."""
        vis = self.collapse[self.collapse["modality"] == "vision"]
        n_pairs = int((self.low_high["summary"] == "mean").sum())
        return {
            "max_mean_cosine_vision": float(vis["mean_cosine"].max()),
            "max_mean_cosine": float(self.collapse["mean_cosine"].max()),
            "max_frac_unresolved": float(self.collapse["frac_unresolved"].max()),
            "nuisance_rho": self.nuisance_rho,
            "nuisance_rho_pc1": self.nuisance_rho_pc1,
            "nuisance_rho_relative": self.nuisance_rho_relative,
            "rho_dispersion_distance": self.rho_dispersion_distance,
            "n_pairs": n_pairs,
            "low_gt_high_mean": self.n_low_gt_high("mean"),
            "low_gt_high_pc1": self.n_low_gt_high("pc1"),
            "ci_above0_mean": self.n_ci_above_0("mean"),
            "ci_above0_pc1": self.n_ci_above_0("pc1"),
            "min_loo_r": float(self.loo["pearson_r"].min()),
            "min_full_cknna": float(self.full.min()),
            "median_full_cknna": float(self.full.median()),
        }


def demo_targets(root: PathLike, dataset: str, vision: Sequence[str]) -> DemoTargets:
    """Measure the targets of the run in project folder ``root`` for ``dataset``."""
    root = Path(root)
    manifest = read_manifest(root / f"resources/stimuli/{dataset}/stimuli.tsv")
    disp = read_table(root / f"results/dispersion/{dataset}/dispersion.tsv")
    planted = manifest.merge(disp, on="stimulus_id", validate="one_to_one")
    if len(planted) != len(manifest):
        raise ValueError(f"{dataset}: dispersion.tsv and the manifest hold different stimuli")
    nuisance = planted["nuisance"].astype(float)
    rho = float(nuisance.corr(planted["mean_dispersion"], method="spearman"))
    rho_pc1 = float(nuisance.corr(planted["pc1_score"], method="spearman"))
    residuals = read_table(root / f"results/dispersion/{dataset}/residuals.tsv")
    relative = (residuals["residual"] / residuals["distance"]).groupby(residuals["stimulus_id"])
    relative = planted["stimulus_id"].map(relative.mean())
    rho_relative = float(nuisance.corr(relative, method="spearman"))
    gpa_summary = json.loads((root / f"results/dispersion/{dataset}/gpa.json").read_text())
    contrasts = read_table(root / f"results/alignment/{dataset}/contrasts.tsv")
    if "metric" in contrasts:
        contrasts = contrasts[contrasts["metric"] == "cknna"]
    grid = read_table(root / f"results/alignment/{dataset}/grid.tsv")
    full = grid[grid["condition"] == "full"]
    if "metric" in full:
        full = full[full["metric"] == "cknna"]
    return DemoTargets(
        collapse=collapse_table(root, dataset),
        nuisance_rho=rho,
        nuisance_rho_pc1=rho_pc1,
        nuisance_rho_relative=rho_relative,
        rho_dispersion_distance=float(gpa_summary["rho_dispersion_distance"]),
        low_high=low_high_table(contrasts),
        loo=read_table(root / f"results/dispersion/{dataset}/loo.tsv"),
        full=full.set_index(["vision", "llm"])["value"].astype(float).sort_index(),
        by_model=_by_model(dataset, manifest, residuals, vision),
    )
