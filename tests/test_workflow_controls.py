"""The controls in the workflow (docs/method.md, "Controls"): their outputs on the shared demo
run, their work inside the per-LLM jobs (no job per pair or per split), what an added LLM or a
switched-off control schedules, and the paper config's DAG."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml
from _project import copy_project, job_counts
from _project import run_snakemake as snakemake

from xmodal.io import read_table
from xmodal.selection import drop_set_size, heldout_set_size, split_halves

pytestmark = pytest.mark.slow

CONTROL_RULES = (
    "heldout_sets",
    "drop_summary",
    "heldout_summary",
    "figure_heldout_layer",
    "self_selection_summary",
)


@pytest.fixture
def demo_config(demo_project) -> dict:
    return yaml.safe_load((demo_project / "config" / "demo.yaml").read_text())


def _dry_run(wd: Path, cfg: dict, name: str) -> tuple[dict[str, int], str]:
    path = wd / "config" / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = snakemake(wd, "-n", "--configfile", f"config/{name}", "--cores", "2")
    out = proc.stdout + proc.stderr
    return job_counts(out), out


def test_demo_control_outputs(demo_project, demo_config):
    wd = demo_project
    ana = demo_config["analysis"]
    models = demo_config["models"]
    vision = [k for k, m in models.items() if m["modality"] == "vision"]
    llms = [k for k, m in models.items() if m["modality"] == "language"]
    m, n_random = demo_config["stimuli"]["n"], ana["n_random"]
    n_splits = ana["heldout_layer"]["n_splits"]
    align = wd / "results/alignment/demo"

    # item 1: the size-matched draws are sets of sets.tsv, evaluated in every conditions job
    sets = read_table(wd / "results/dispersion/demo/sets.tsv")
    drop_sets = sets[sets["set"] == "random_drop"]
    assert drop_sets.groupby("draw").size().eq(drop_set_size(m, ana["drop_fraction"])).all()
    assert drop_sets["draw"].nunique() == n_random  # drop_control.n_random: null
    drop = read_table(align / "drop.tsv")
    assert len(drop) == len(vision) * len(llms) * 2  # pairs × (mean, pc1)
    assert (drop["n_random"] == n_random).all()
    assert (drop["random_ci_low"] <= drop["random_mean"]).all()
    grid = read_table(align / "grid.tsv")
    rnd = grid[grid["condition"] == "random_drop"].groupby(["vision", "llm"])["value"].mean()
    got = drop[drop["summary"] == "mean"].set_index(["vision", "llm"])["random_mean"]
    np.testing.assert_allclose(got.loc[rnd.index], rnd.to_numpy(), rtol=1e-12)
    summary = read_table(wd / "results/summary/demo_drop.tsv")
    assert list(summary["summary"]) == ["mean", "pc1"]
    assert (summary["n_pairs"] == len(vision) * len(llms)).all()

    # item 2: the layer chosen on half A in each layer search, the sets of half B per conditions job
    held_layers = read_table(align / "heldout_layers.tsv")
    assert len(held_layers) == len(vision) * len(llms) * n_splits
    assert (held_layers["n_stimuli"] == m // 2).all()
    held_sets = read_table(wd / "results/dispersion/demo/heldout_sets.tsv")
    halves_a, _ = split_halves(m, n_splits, ana["seed"])
    ids = read_table(wd / "results/dispersion/demo/dispersion.tsv")["stimulus_id"].tolist()
    for split, g in held_sets.groupby("split"):
        assert not set(g["stimulus_id"]) & {ids[j] for j in halves_a[int(split)]}
    held = read_table(align / "heldout.tsv")
    assert len(held) == len(vision) * len(llms) * n_splits * 2 * 2  # × summaries × rules
    assert (held["n_stimuli"] == heldout_set_size(ana["set_size"], m)).all()
    same = held.pivot_table(
        index=["vision", "llm", "summary", "split"], columns="layer_rule", values="llm_layer"
    )
    merged = held_layers.set_index(["vision", "llm", "split"])["llm_layer"]
    for (v, ll, _, split), row in same.iterrows():
        assert row["heldout"] == merged.loc[(v, ll, split)]
    assert (wd / "results/summary/demo_heldout.tsv").exists()

    # the loose ends: the random baseline's stability, the 2 × 2 cells' stability
    contrasts = read_table(align / "contrasts.tsv")
    assert contrasts["random_stability"].notna().all()
    cells = read_table(wd / "results/language/demo/joint_cells.tsv")
    assert {"stability", "random_stability"} <= set(cells.columns)
    for name in ("drop25", "heldout_layer", "contrasts", "language_dispersion"):
        assert (wd / f"results/figures/demo/{name}.png").stat().st_size > 1000


def test_adding_an_llm_schedules_its_control_work_in_its_own_jobs(demo_project, demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["models"]["tiny-llama-m"] = {
        "modality": "language",
        "id": "resources/demo/models/tiny-llama-m",
        "size_b": 0.0002,
        "label": "tiny LLaMA m",
        "family": "LLaMA",
        "build": {"arch": "llama", "hidden_size": 80, "n_layers": 4, "seed": 11},
    }
    counts, out = _dry_run(demo_project, cfg, "plus_llm_controls.yaml")
    assert counts.get("layer_search") == 1 and counts.get("conditions") == 1
    for rule in ("stimulus_sets", "heldout_sets", "gpa"):
        assert rule not in counts, (rule, counts)
    assert "results/alignment/demo/heldout_layers/tiny-llama-m.tsv" in out
    assert "results/alignment/demo/drop/tiny-llama-m.tsv" in out
    assert "results/alignment/demo/heldout/tiny-llama-m.tsv" in out
    assert "results/alignment/demo/self_selection/tiny-llama-m.tsv" in out
    assert counts.get("self_selection_summary") == 1


def test_switching_the_controls_off(demo_project, demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["analysis"]["heldout_layer"]["enabled"] = False
    cfg["analysis"]["drop_control"]["enabled"] = False
    cfg["analysis"]["self_selection"]["enabled"] = False
    counts, out = _dry_run(demo_project, cfg, "no_controls.yaml")
    for rule in CONTROL_RULES:
        assert rule not in counts, (rule, counts)
    for rule in ("extract", "gpa", "leave_one_model_out"):
        assert rule not in counts
    assert counts.get("stimulus_sets") == 1  # the size-matched draws leave sets.tsv
    # no job reads or writes a control's table; the finished run's are named as left over
    # (warn_of_leftover_results), not made again
    jobs = out.split("Job stats:", 1)[-1]
    assert "heldout_layers/" not in jobs and "/drop/" not in jobs
    assert "self_selection" not in jobs
    warning = next(line for line in out.splitlines() if "results of an earlier run" in line)
    # the tables of the three controls, their jobs' tables (per-LLM ones by folder; a warning
    # that named the final tables only left two thirds unnamed, audit) and their figures
    n_llm = sum(m["modality"] == "language" for m in cfg["models"].values())
    for table in (
        "alignment/demo/drop.tsv",
        "summary/demo_drop.tsv",
        "summary/demo_self_selection.tsv",
        "dispersion/demo/heldout_sets.tsv",
        "figures/demo/heldout_layer.png",
    ):
        assert f"results/{table}" in warning, (table, warning)
    for folder in ("drop", "heldout", "heldout_layers", "self_selection"):
        assert f"results/alignment/demo/{folder}/*.tsv ({n_llm} files)" in warning, warning
    named = 7 + 4 * n_llm  # 7 tables and figures named one by one, 4 folders of n_llm
    assert int(warning.split()[0]) >= named, warning


def test_changing_the_number_of_splits_reruns_the_heldout_work(demo_project, demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["analysis"]["heldout_layer"]["n_splits"] = 20  # = n_random: a dict param tells them apart
    counts, _ = _dry_run(demo_project, cfg, "more_splits.yaml")
    n_llm = sum(m["modality"] == "language" for m in cfg["models"].values())
    assert counts.get("heldout_sets") == 1
    assert counts.get("layer_search") == n_llm and counts.get("conditions") == n_llm
    assert "stimulus_sets" not in counts and "extract" not in counts


def test_paper_config_schedules_the_controls_in_the_per_llm_jobs(tmp_path):
    wd = copy_project(tmp_path / "paper")
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    assert (
        cfg["analysis"]["heldout_layer"]["enabled"] and cfg["analysis"]["drop_control"]["enabled"]
    )
    proc = snakemake(wd, "-n", "--cores", "4")
    out = proc.stdout + proc.stderr
    counts = job_counts(out)
    n_llm = sum(m["modality"] == "language" for m in cfg["models"].values())
    assert counts.get("layer_search") == n_llm == 12
    assert counts.get("conditions") == 12
    for rule in CONTROL_RULES:
        assert counts.get(rule) == 1, (rule, counts)
    # no job per pair (48) or per split: every rule runs once, per model or per LLM
    assert max(counts.values()) <= 16, counts
    for llm in ("llama-65b", "bloomz-560m"):
        assert f"results/alignment/wit1024/heldout_layers/{llm}.tsv" in out
        assert f"results/alignment/wit1024/drop/{llm}.tsv" in out
        assert f"results/alignment/wit1024/heldout/{llm}.tsv" in out
        assert f"results/alignment/wit1024/self_selection/{llm}.tsv" in out


def test_swapped_settings_rerun_the_jobs_that_use_them(demo_project, demo_config):
    """Snakemake records params as a set of values: with n_boot and seed swapped (200 and 0),
    or knn_k and n_random (10 and 20; no longer a valid config: xmodal.config.MIN_RANDOM), the
    jobs holding both saw no change and kept stale tables. named_params records them by name."""
    cfg = copy.deepcopy(demo_config)
    a = cfg["analysis"]
    a["n_boot"], a["seed"] = a["seed"], a["n_boot"]
    assert {a["n_boot"], a["seed"]} == {0, 200}
    counts, _ = _dry_run(demo_project, cfg, "swapped.yaml")
    n_llm = sum(m["modality"] == "language" for m in cfg["models"].values())
    for rule in ("heldout_sets", "stimulus_sets", "joint_sets", "property_correlations"):
        assert counts.get(rule) == 1, (rule, counts)
    for rule in ("vision_bootstrap", "conditions", "language_correlation"):
        assert counts.get(rule) in (1, n_llm), (rule, counts)
    assert "extract" not in counts
