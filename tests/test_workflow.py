"""The Snakemake workflow end to end: the embedded demo, incremental reruns, lint, DAG, report.

The demo runs once per session in a copy of the project (``workflow_dir``); the dry-run tests
then edit a copy of its config and check which jobs Snakemake would schedule.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from _project import copy_project, job_counts
from _project import run_snakemake as snakemake
from PIL import Image
from test_package import NOT_ANALYSIS_RULES

from xmodal import analysis_code_digest
from xmodal.features import FeatureFile
from xmodal.io import read_table
from xmodal.stimuli import IMAGE_DIGESTS, read_manifest

pytestmark = pytest.mark.slow


def dry_run(cwd: Path, configfile: str) -> dict[str, int]:
    proc = snakemake(cwd, "-n", "--configfile", configfile, "--cores", "2")
    return job_counts(proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def workflow_dir(demo_project) -> Path:
    """A copy of the project in which the demo has run to completion (see conftest)."""
    return demo_project


@pytest.fixture
def demo_config(workflow_dir) -> dict:
    return yaml.safe_load((workflow_dir / "config" / "demo.yaml").read_text())


def write_config(workflow_dir: Path, cfg: dict, name: str) -> str:
    path = workflow_dir / "config" / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f"config/{name}"


# ---------------------------------------------------------------- the demo, end to end


def test_demo_outputs_exist_and_are_valid(workflow_dir, demo_config):
    cfg = demo_config
    vision = [k for k, m in cfg["models"].items() if m["modality"] == "vision"]
    language = [k for k, m in cfg["models"].items() if m["modality"] == "language"]
    m = cfg["stimuli"]["n"]
    manifest = read_manifest(workflow_dir / "resources/stimuli/demo/stimuli.tsv")
    assert len(manifest) == m

    for key in vision + language:
        with h5py.File(workflow_dir / f"results/features/demo/{key}.h5", "r") as f:
            feats = f["features"]
            assert feats.dtype == np.float32
            assert feats.shape[1] == m
            assert f["layer_names"].shape == (feats.shape[0],)
            ids = [s.decode() if isinstance(s, bytes) else s for s in f["stimulus_ids"][:]]
            assert ids == manifest["stimulus_id"].tolist()
            assert f.attrs["model_key"] == key
            assert f.attrs["modality"] == cfg["models"][key]["modality"]
            assert np.isfinite(feats[-1]).all()

    disp = read_table(workflow_dir / "results/dispersion/demo/dispersion.tsv")
    assert len(disp) == m and (disp["mean_dispersion"] > 0).all()
    residuals = read_table(workflow_dir / "results/dispersion/demo/residuals.tsv")
    assert len(residuals) == m * len(vision)
    mean_from_residuals = residuals.groupby("stimulus_id")["residual"].mean()
    np.testing.assert_allclose(
        disp.set_index("stimulus_id")["mean_dispersion"].loc[mean_from_residuals.index],
        mean_from_residuals.to_numpy(),
        rtol=1e-9,
    )
    # distance from the centre: row norms of each model's GPA input, from its feature file
    layer = cfg["analysis"]["vision_layer"]
    for key in vision:
        with h5py.File(workflow_dir / f"results/features/demo/{key}.h5", "r") as f:
            x = f["features"][layer % f["features"].shape[0]].astype(np.float64)
        c = x - x.mean(axis=0)
        got = residuals[residuals["model"] == key].set_index("stimulus_id")["distance"]
        want = np.linalg.norm(c, axis=1) / np.linalg.norm(c)
        np.testing.assert_allclose(got.loc[manifest["stimulus_id"]], want, rtol=1e-9)
    mean_distance = residuals.groupby("stimulus_id")["distance"].mean()
    np.testing.assert_allclose(
        disp.set_index("stimulus_id")["mean_distance"].loc[mean_distance.index],
        mean_distance.to_numpy(),
        rtol=1e-9,
    )
    summary = json.loads((workflow_dir / "results/dispersion/demo/gpa.json").read_text())
    assert summary["rho_dispersion_distance"] == pytest.approx(
        disp["mean_dispersion"].corr(disp["mean_distance"], method="spearman"), abs=1e-12
    )

    # planted ground truth: the demo's images carry a caption-independent nuisance level
    # (clutter, occlusion, background, blur); the vision models should disagree most on the
    # most disturbed images (0.42 with the default seeds; the seed spread and the demo's other
    # targets are in tests/test_demo_training.py)
    planted = manifest.merge(disp, on="stimulus_id")
    rho = planted["nuisance"].astype(float).corr(planted["mean_dispersion"], method="spearman")
    assert rho > 0.25, rho

    loo = read_table(workflow_dir / "results/dispersion/demo/loo.tsv")
    assert sorted(loo["held_out"]) == sorted(vision)
    # each held-out model against its rows shuffled analysis.n_random times (the rule's params)
    assert (loo["n_permutations"] == cfg["analysis"]["n_random"]).all(), loo
    assert loo["perm_pearson_p"].between(1 / (cfg["analysis"]["n_random"] + 1), 1).all(), loo

    n_pairs = len(vision) * len(language)
    grid = read_table(workflow_dir / "results/alignment/demo/grid.tsv")
    assert grid.groupby(["vision", "llm"]).ngroups == n_pairs
    n_random = cfg["analysis"]["n_random"]
    n_drop = cfg["analysis"]["drop_control"]["n_random"] or n_random
    per_pair = grid.groupby(["vision", "llm"]).size()
    # full + (low, high, drop_high, drop_low) x (mean, pc1) + n_random random draws
    # + the size-matched random sets of the drop ablation (analysis.drop_control)
    assert (per_pair == 1 + 8 + n_random + n_drop).all()
    assert grid["value"].between(-1, 1).all()

    layers = read_table(workflow_dir / "results/alignment/demo/layers.tsv")
    assert layers.groupby(["vision", "llm", "metric"])["chosen"].sum().eq(1).all()
    assert (layers.loc[layers["chosen"], "valid"]).all()
    full = grid[grid["condition"] == "full"].set_index(["vision", "llm", "metric"])["value"]
    best = layers[layers["chosen"]].set_index(["vision", "llm", "metric"])["value"]
    np.testing.assert_allclose(full.sort_index(), best.sort_index(), atol=1e-6)

    contrasts = read_table(workflow_dir / "results/alignment/demo/contrasts.tsv")
    assert len(contrasts) == 2 * n_pairs
    # every conditions job took the vision models' bootstrap structures from vision_bootstrap
    for key in language:
        log = (workflow_dir / f"logs/alignment/demo/conditions/{key}.log").read_text()
        assert "bootstrap structures reused from" in log and "did not match" not in log, log
    assert (workflow_dir / "results/summary/demo.tsv").exists()

    from xmodal.figures import FIGURES

    for name in FIGURES:
        for ext in ("png", "pdf"):
            out = workflow_dir / f"results/figures/demo/{name}.{ext}"
            assert out.stat().st_size > 1000, out


def reference_kernel(z: np.ndarray) -> np.ndarray:
    """ZZᵀ in float64 from the distinct rows, spread back over the stimuli (equal rows, equal
    entries: DESIGN 2.5's kernel of the data, apart from xmodal.metrics)."""
    u, inv = np.unique(z.astype(np.float64), axis=0, return_inverse=True)
    inv = inv.ravel()
    return (u @ u.T)[np.ix_(inv, inv)]


def reference_cknna_of_kernels(kk: np.ndarray, ll: np.ndarray, k: int, same=None) -> float:
    """CKNNA as DESIGN 2.5 defines it: kNN sets by a stable sort (equal values, lower index
    first) over the entries that ``same`` (default: the diagonal) does not exclude, the unbiased
    HSIC with its transpose term."""
    same = np.eye(len(kk), dtype=bool) if same is None else same

    def mask(g):
        out = np.zeros_like(g)
        order = np.argsort(-np.where(same, -np.inf, g), axis=1, kind="stable")
        np.put_along_axis(out, order[:, :k], 1.0, axis=1)
        return out

    def hsic(a, b):
        a, b, m = a.copy(), b.copy(), len(a)
        np.fill_diagonal(a, 0)
        np.fill_diagonal(b, 0)
        terms = (a * b.T).sum() + a.sum() * b.sum() / ((m - 1) * (m - 2))
        return (terms - 2 * (a @ b).sum() / (m - 2)) / (m * (m - 3))

    mk, ml = mask(kk), mask(ll)
    both = mk * ml
    return hsic(both * kk, both * ll) / np.sqrt(hsic(mk * kk, mk * kk) * hsic(ml * ll, ml * ll))


def reference_cknna(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """CKNNA of two prepared feature matrices, in float64 and apart from xmodal.metrics."""
    return reference_cknna_of_kernels(reference_kernel(x), reference_kernel(y), k)


def prepared_demo_features(workflow_dir: Path, cfg: dict) -> dict[str, np.ndarray]:
    """Every model's features as the Platonic code prepares them (one clamp threshold per model,
    the mean of the stimuli's 95th percentiles of |x| over all layers; rows l2-normalised)."""
    prepared = {}
    for key in cfg["models"]:
        with h5py.File(workflow_dir / f"results/features/demo/{key}.h5", "r") as f:
            x = f["features"][:].astype(np.float32)  # (layers, m, d)
        by_stimulus = np.abs(x).transpose(1, 0, 2).reshape(x.shape[1], -1)
        t = np.quantile(by_stimulus, 0.95, axis=1).astype(np.float32).mean(dtype=np.float32)
        x = np.clip(x, -t, t)
        prepared[key] = x / np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12)
    return prepared


def test_demo_alignment_equals_an_independent_float64_computation(workflow_dir, demo_config):
    """Every layer-search value and every fixed set's CKNNA (with three draws of each random
    family) recomputed from the feature files (:func:`prepared_demo_features`,
    :func:`reference_cknna`). Each value lies within its own stability of the float64 one. Before
    2026-12-07 the float32 kernel gave repeated captions' rows unequal entries by position, and
    CLIP × BLOOM-m's drop-low PC1 value lay 7.5e-4 from this one with stability 1.3e-5 (5 of
    the 588 grid values beyond their stability), and the layer values of CLIP+FT × BLOOM-s and
    × BLOOM-m 5.6e-4 off (CLIP+FT × BLOOM-s's layer 3: stability 5.3e-5)."""
    cfg = demo_config
    k, layer = cfg["analysis"]["knn_k"], cfg["analysis"]["vision_layer"]
    ids = read_manifest(workflow_dir / "resources/stimuli/demo/stimuli.tsv")["stimulus_id"]
    position = {s: i for i, s in enumerate(ids)}
    prepared = prepared_demo_features(workflow_dir, cfg)

    def check(row, want):
        assert abs(float(row["value"]) - want) <= float(row["stability"]) + 1e-6, (dict(row), want)

    layers = read_table(workflow_dir / "results/alignment/demo/layers.tsv")
    for _, row in layers[layers["metric"] == "cknna"].iterrows():
        x = prepared[row["vision"]][layer]
        check(row, reference_cknna(x, prepared[row["llm"]][int(row["llm_layer"])], k))

    grid = read_table(workflow_dir / "results/alignment/demo/grid.tsv")
    sets = read_table(workflow_dir / "results/dispersion/demo/sets.tsv")
    members = {
        (name, summary, int(draw)): np.sort([position[s] for s in g["stimulus_id"]])
        for (name, summary, draw), g in sets.groupby(["set", "summary", "draw"])
    }
    grid = grid[(grid["metric"] == "cknna") & (grid["draw"].astype(int) < 3)]
    n_pairs = len(layers[["vision", "llm"]].drop_duplicates())
    assert n_pairs == 12 and len(grid) == n_pairs * (1 + 8 + 3 + 3)
    for _, row in grid.iterrows():
        key = (row["condition"], row["summary"], int(row["draw"]))
        idx = np.arange(len(ids)) if row["condition"] == "full" else members[key]
        assert len(idx) == int(row["n_stimuli"])
        x = prepared[row["vision"]][layer][idx]
        check(row, reference_cknna(x, prepared[row["llm"]][int(row["llm_layer"])][idx], k))


def test_demo_bootstrap_intervals_equal_an_independent_multiset_computation(
    workflow_dir, demo_config
):
    """The bootstrap interval of low − high (contrasts.tsv) from the resamples docs/method.md
    specifies (``integers(0, n, (n_boot, n))`` over the set's positions in stimulus order, from
    ``default_rng([seed, 0 | 1])``, low's before high's) and CKNNA of each resample as a
    multiset, written out copy by copy: copies of a stimulus never each other's neighbours,
    pairs of copies out of the U-statistic like the diagonal. Most rows' ends agree to float
    rounding (all but 2 of 24 within 1e-6 on 2026-12-07; any mistake in the resamples or the
    multiset would move every row by about the ends' sampling spread, 1e-2). Resamples carry no
    stability, and a near tie in one of a row's 400 may move an end by what rounding decides
    (2.4e-5 here; the sets' stabilities reach 2e-3), so single rows may differ up to 5e-3.
    (Before equal rows got equal kernel entries two rows were 2.5e-3 and 3.4e-3 off: the
    float64 test above is the one that catches that.)"""
    cfg = demo_config["analysis"]
    k, layer, n_boot = cfg["knn_k"], cfg["vision_layer"], cfg["n_boot"]
    ids = read_manifest(workflow_dir / "resources/stimuli/demo/stimuli.tsv")["stimulus_id"]
    position = {s: i for i, s in enumerate(ids)}
    prepared = prepared_demo_features(workflow_dir, demo_config)
    grid = read_table(workflow_dir / "results/alignment/demo/grid.tsv")
    full = grid[(grid["metric"] == "cknna") & (grid["condition"] == "full")]
    llm_layer = {
        (v, lm): int(j)
        for v, lm, j in zip(full["vision"], full["llm"], full["llm_layer"], strict=True)
    }
    sets = read_table(workflow_dir / "results/dispersion/demo/sets.tsv")
    contrasts = read_table(workflow_dir / "results/alignment/demo/contrasts.tsv")
    off = []
    for _, row in contrasts[contrasts["metric"] == "cknna"].iterrows():
        rng = np.random.default_rng([cfg["seed"], 0 if row["summary"] == "mean" else 1])
        values = {}
        for name in ("low", "high"):
            members = sets[(sets["set"] == name) & (sets["summary"] == row["summary"])]
            idx = np.sort([position[s] for s in members["stimulus_id"]])
            kk = reference_kernel(prepared[row["vision"]][layer][idx])
            ll = reference_kernel(prepared[row["llm"]][llm_layer[row["vision"], row["llm"]]][idx])
            draws = []
            for r in np.sort(rng.integers(0, len(idx), (n_boot, len(idx))), axis=1):
                same = r[:, None] == r[None, :]
                sub = np.ix_(r, r)
                draws.append(reference_cknna_of_kernels(kk[sub], ll[sub], k, same))
            values[name] = np.array(draws)
        lo, hi = np.percentile(values["low"] - values["high"], [2.5, 97.5])
        off.append(max(abs(lo - row["diff_ci_low"]), abs(hi - row["diff_ci_high"])))
    off = np.array(off)
    assert len(off) == 2 * len(full) and np.median(off) <= 1e-6 and off.max() <= 5e-3, off


def test_rerun_is_a_no_op(workflow_dir):
    proc = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", "--cores", "2")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_whole_numbers_written_as_floats_rerun_nothing(workflow_dir, tmp_path):
    """``knn_k: 10.0`` is the setting ``knn_k: 10``: the same job parameters, so nothing reruns
    (before: 30 jobs reran for knn_k alone, and GPA for vision_layer)."""
    cfg = yaml.safe_load((workflow_dir / "config" / "demo.yaml").read_text())
    a = cfg["analysis"]
    a.update(knn_k=float(a["knn_k"]), vision_layer=float(a["vision_layer"]))
    a["set_size"] = float(a["set_size"])
    build = cfg["models"]["tiny-bloom-s"]["build"]
    build["seed"] = float(build["seed"])
    (tmp_path / "floats.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert "knn_k: 10.0" in (tmp_path / "floats.yaml").read_text()
    proc = snakemake(workflow_dir, "-n", "--configfile", str(tmp_path / "floats.yaml"),
                     "--cores", "2")  # fmt: skip
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_demo_profile_works_from_another_directory(workflow_dir, tmp_path):
    """`snakemake -d DIR --profile DIR/profiles/demo` from elsewhere: the profile's Snakefile
    and config resolve against the profile folder (once a FileNotFoundError on the config)."""
    proc = snakemake(tmp_path, "-n", "-d", str(workflow_dir), "--profile",
                     str(workflow_dir / "profiles/demo"))  # fmt: skip
    assert "Nothing to be done" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- incremental reruns


def test_adding_a_language_model_schedules_only_its_work(workflow_dir, demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["models"]["tiny-llama-m"] = {
        "modality": "language",
        "id": "resources/demo/models/tiny-llama-m",
        "size_b": 0.0002,
        "label": "tiny LLaMA m (untrained)",
        "family": "LLaMA",
        "build": {"arch": "llama", "hidden_size": 80, "n_layers": 4, "seed": 11},
    }
    counts = dry_run(workflow_dir, write_config(workflow_dir, cfg, "plus_llm.yaml"))
    assert counts.get("extract") == 1
    assert counts.get("demo_model") == 1
    # one job per LLM and stage: 1 + 1 alignment jobs for the new LLM, nothing for the others
    assert counts.get("layer_search") == 1
    assert counts.get("conditions") == 1
    # the vision models' bootstrap structures are the same for every LLM: not rebuilt
    for rule in (
        "gpa", "stimulus_sets", "leave_one_model_out", "demo_stimuli", "demo_tokenizer",
        "vision_bootstrap",
    ):  # fmt: skip
        assert rule not in counts, (rule, counts)
    assert counts.get("aggregate") == 1


def test_adding_a_vision_model_reruns_gpa_and_downstream(workflow_dir, demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["models"]["tiny-mae-b"] = {
        "modality": "vision",
        "id": "resources/demo/models/tiny-mae-b",
        "size_b": 0.0001,
        "label": "tiny MAE b (untrained)",
        "family": "ViT",
        "build": {"family": "mae", "seed": 12},
    }
    counts = dry_run(workflow_dir, write_config(workflow_dir, cfg, "plus_vit.yaml"))
    n_llm = sum(m["modality"] == "language" for m in cfg["models"].values())
    assert counts.get("extract") == 1
    assert counts.get("gpa") == 1
    assert counts.get("stimulus_sets") == 1
    assert counts.get("leave_one_model_out") == 1
    assert counts.get("layer_search") == n_llm  # every LLM's job now has one more vision model
    assert counts.get("conditions") == n_llm  # and the sets changed for every pair
    assert counts.get("vision_bootstrap") == 1


def test_reordering_the_llms_regathers_their_tables(workflow_dir, demo_config):
    """The gathered tables' rows follow the LLMs' order; their steps took only the code as a
    param and Snakemake compares inputs as sets, so grid.tsv, contrasts.tsv, diagnostics.tsv
    kept the old order after a reorder (audit). Nothing is extracted."""
    cfg = copy.deepcopy(demo_config)
    llms = [k for k, m in cfg["models"].items() if m["modality"] == "language"]
    others = {k: m for k, m in cfg["models"].items() if k not in llms}
    cfg["models"] = {**others, **{k: cfg["models"][k] for k in llms[::-1]}}
    counts = dry_run(workflow_dir, write_config(workflow_dir, cfg, "llms_reversed.yaml"))
    for rule in ("aggregate", "diagnostics", "joint_aggregate"):
        assert counts.get(rule) == 1, (rule, counts)
    assert "extract" not in counts, counts


def test_changing_set_size_does_not_reextract(workflow_dir, demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["analysis"]["set_size"] = cfg["analysis"]["set_size"] - 10
    counts = dry_run(workflow_dir, write_config(workflow_dir, cfg, "smaller_k.yaml"))
    n_llm = sum(m["modality"] == "language" for m in cfg["models"].values())
    for rule in ("extract", "gpa", "leave_one_model_out", "layer_search", "demo_model"):
        assert rule not in counts, (rule, counts)
    assert counts.get("stimulus_sets") == 1
    assert counts.get("vision_bootstrap") == 1
    assert counts.get("conditions") == n_llm


def test_paper_config_builds_the_full_dag_without_data(tmp_path):
    wd = copy_project(tmp_path / "paper")
    proc = snakemake(wd, "-n", "--cores", "4")
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts.get("extract") == 16
    assert counts.get("prefetch_model") == 16
    assert counts.get("prefetch_stimuli") == 1
    assert counts.get("layer_search") == 12  # one per LLM
    assert counts.get("conditions") == 12
    assert counts.get("vision_bootstrap") == 1  # once for the 12 conditions jobs
    assert counts.get("gpa") == 1
    assert counts.get("leave_one_model_out") == 1


def test_moving_the_hub_cache_reextracts_nothing(tmp_path, tiny_vits):
    """A hub model (the paper's MAE id, a tiny stand-in in a local hub cache) downloaded and
    extracted for real, so that Snakemake holds its provenance. With ``hub_cache`` pointing
    elsewhere nothing is scheduled (before: the cache was a param of the extraction and the
    prefetch record's folder, so every model was downloaded again and re-extracted). An
    extraction forced then says where the weights are (xmodal.prefetch.check_prefetched)."""
    from xmodal.demo.models import make_hub_cache
    from xmodal.demo.stimuli import generate_stimuli

    wd = copy_project(tmp_path / "hub")
    make_hub_cache(tiny_vits["mae"], wd / "resources/hub", "timm/vit_huge_patch14_224.mae")
    generate_stimuli(wd / "resources/stimuli/hubtest", n=12, seed=0)
    paper = yaml.safe_load((wd / "config.yaml").read_text())
    keep = ("mae-h", "dinov2-g", "clip-h", "bloomz-560m", "bloomz-1b1")  # only mae-h is extracted
    cfg = {**paper, "dataset": "hubtest", "stimuli": {"source": "local"},
           "models": {k: paper["models"][k] for k in keep}}  # fmt: skip
    target = "results/features/hubtest/mae-h.h5"
    offline = {"HF_HUB_OFFLINE": "1"}
    snakemake(wd, "--configfile", write_config(wd, cfg, "here.yaml"), "--cores", "1", target,
              env=offline)  # fmt: skip
    moved = write_config(wd, {**cfg, "hub_cache": str(tmp_path / "scratch/hub")}, "moved.yaml")
    # pinned to the commit the download resolved to (as config.yaml invites), or "main" for
    # none: the same weights, so nothing (before: downloaded and extracted again); pinned to
    # another commit: both again
    record = wd / "resources/hub/.prefetched/mae-h.json"
    resolved = json.loads(record.read_text())["revision"]
    pins = {}
    for revision in (resolved, "main", "0" * 40):
        models = {**cfg["models"], "mae-h": {**cfg["models"]["mae-h"], "revision": revision}}
        pins[revision] = write_config(wd, {**cfg, "models": models}, f"pin-{revision[:4]}.yaml")
    for configfile in ("config/here.yaml", moved, pins[resolved], pins["main"]):
        proc = snakemake(wd, "-n", "--configfile", configfile, "--cores", "1", target)
        assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    proc = snakemake(wd, "-n", "--configfile", pins["0" * 40], "--cores", "1", target)
    assert job_counts(proc.stdout + proc.stderr) == {"prefetch_model": 1, "extract": 1}, proc.stdout
    # a second dataset in the project, its config pinned to that commit, shares the model's
    # download record: neither dataset downloads or re-extracts the model for the other
    # (before: its spec spelled the pin, the first dataset's none, and every switch between
    # them downloaded the model again and re-extracted it for the dataset run)
    generate_stimuli(wd / "resources/stimuli/hubtest2", n=12, seed=1)
    pinned = {**cfg["models"], "mae-h": {**cfg["models"]["mae-h"], "revision": resolved}}
    second = write_config(wd, {**cfg, "dataset": "hubtest2", "models": pinned}, "second.yaml")
    target2 = "results/features/hubtest2/mae-h.h5"
    proc = snakemake(wd, "-n", "--configfile", second, "--cores", "1", target2)
    assert job_counts(proc.stdout + proc.stderr) == {"extract": 1}, proc.stdout[-3000:]
    snakemake(wd, "--configfile", second, "--cores", "1", target2, env=offline)
    for configfile, path in ((pins[resolved], target), ("config/here.yaml", target),
                             (second, target2)):  # fmt: skip
        proc = snakemake(wd, "-n", "--configfile", configfile, "--cores", "1", path)
        assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    # the model spelt as its hub page names it, timm/vit_huge_patch14_224.mae, in either
    # dataset's config: the same weights, so nothing (before: the download and the extraction
    # again, and two datasets spelling it differently took turns at both)
    hub_name = "timm/vit_huge_patch14_224.mae"
    for models, dataset, path in ((cfg["models"], "hubtest", target),
                                  (pinned, "hubtest2", target2)):  # fmt: skip
        spelt = {**models, "mae-h": {**models["mae-h"], "id": hub_name}}
        configfile = write_config(wd, {**cfg, "dataset": dataset, "models": spelt}, "spelt.yaml")
        proc = snakemake(wd, "-n", "--configfile", configfile, "--cores", "1", path)
        assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    proc = snakemake(wd, "--configfile", moved, "--cores", "1", "--force", target,
                     env=offline, check=False)  # fmt: skip
    log = (wd / "logs/extract/hubtest/mae-h.log").read_text()
    assert proc.returncode != 0
    for text in ("were downloaded into", str((wd / "resources/hub").resolve()), str(record),
                 str(tmp_path / "scratch/hub"), "config key 'hub_cache'"):  # fmt: skip
        assert text in log, (text, log[-2000:])


# ---------------------------------------------------------------- lint, graphs, report


def test_lint_is_clean(tmp_path):
    wd = copy_project(tmp_path / "lint")
    proc = snakemake(wd, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Congratulations" in out, out


@pytest.mark.parametrize("flag", ["--rulegraph", "--dag"])
def test_graphs_render(tmp_path, flag):
    wd = copy_project(tmp_path / "graph")
    proc = snakemake(wd, flag, "--configfile", "config/demo.yaml")
    dot_src = proc.stdout
    assert dot_src.lstrip().startswith("digraph")
    for rule in ("extract", "gpa", "layer_search", "conditions", "aggregate"):
        assert rule in dot_src
    dot = shutil.which("dot")
    if dot is None:
        pytest.skip("graphviz 'dot' is not installed (make test installs it when run as root)")
    svg = subprocess.run([dot, "-Tsvg"], input=dot_src, capture_output=True, text=True, check=True)
    assert "<svg" in svg.stdout


def test_report_builds(workflow_dir):
    out = workflow_dir / "results/report/demo.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    snakemake(workflow_dir, "--configfile", "config/demo.yaml", "--report", str(out))
    html = out.read_text(errors="replace")
    assert "gallery" in html and "grid_heatmap" in html


def test_report_with_other_settings_than_the_run_is_refused(workflow_dir, demo_config):
    """The captions state the config given to --report: with knn_k 7 against results made with
    10, the report said 'analysis.knn_k (7)' eight times, exit 0 (the wiring review). Also when
    a profile asks for the report, and with -d and a profile given relative to another folder
    (both went unseen: the check read the command line without its profiles)."""
    record = workflow_dir / "results/report/demo_run_settings.json"
    assert json.loads(record.read_text())["settings"]["analysis.knn_k"] == 10
    cfg = copy.deepcopy(demo_config)
    cfg["analysis"]["knn_k"] = 7
    k7 = workflow_dir / write_config(workflow_dir, cfg, "k7.yaml")
    out = workflow_dir / "results/report/other.html"
    profile = workflow_dir / "profiles" / "k7report"
    profile.mkdir()
    (profile / "config.yaml").write_text(
        f"snakefile: ../../Snakefile\nconfigfile: {k7}\ncores: 1\nreport: {out}\n"
    )
    name = workflow_dir.name
    calls = [
        (workflow_dir, "--configfile", str(k7), "--report", str(out)),
        (workflow_dir, "--profile", "profiles/k7report"),
        (workflow_dir.parent, "-d", name, "--profile", f"{name}/profiles/demo",
         "--configfile", str(k7), "--report", str(out)),
    ]  # fmt: skip
    try:
        for cwd, *args in calls:
            proc = snakemake(cwd, *args, check=False)
            text = proc.stdout + proc.stderr
            assert proc.returncode != 0 and not out.exists(), (args, text[-3000:])
            assert "made with analysis.knn_k = 10, and this config says analysis.knn_k = 7" in text
            assert "could not read the profiles" not in text
    finally:
        shutil.rmtree(profile)


def test_a_report_after_the_run_is_refused_before_any_job(workflow_dir):
    """--report-after-run counted as a command that runs no job: the start-up refusals (a
    broken image, a changed manifest) became warnings, the extractions ran and failed, and
    Snakemake deleted a good feature file; the report's checks read the results before the run
    (the report audit). It is refused, before any job, with the way that works."""
    out = workflow_dir / "results/report/after.html"
    args = ("--configfile", "config/demo.yaml", "--cores", "1", "--report", str(out))
    proc = snakemake(workflow_dir, *args, "--report-after-run", "--forcerun", "gpa", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not out.exists(), text[-3000:]
    assert "--report-after-run: the report's checks" in text and "--report alone" in text
    assert "Finished job" not in text and "rule gpa" not in text, text[-3000:]


def test_a_report_over_figures_older_than_their_tables_is_refused(workflow_dir):
    """A run of some targets (a relabelled model, one figure redrawn) left the other figures
    older than the models table they are drawn from; --report showed them, old labels and all,
    with exit code 0 (the report hunt)."""
    table = workflow_dir / "results/alignment/demo/models.tsv"
    kept, content = table.stat(), table.read_bytes()
    out = workflow_dir / "results/report/stale.html"
    args = ("--configfile", "config/demo.yaml", "--report", str(out))
    try:
        # written again with the same content (a forced step): Snakemake compares the checksum
        # it recorded for each figure's tables and redraws nothing, so neither does the report
        # refuse (it did, with advice to run the workflow, which said 'Nothing to be done')
        os.utime(table, (kept.st_atime, kept.st_mtime + 3600))
        proc = snakemake(workflow_dir, *args, check=False)
        assert proc.returncode == 0 and out.exists(), (proc.stdout + proc.stderr)[-3000:]
        out.unlink()
        # unless the record is not the figure's on disk (Snakemake notes the figure's time when
        # it is drawn; --drop-metadata or the database backend leave an older file record)
        figure = workflow_dir / "results/figures/demo/residuals.png"
        drawn = figure.stat()
        try:
            os.utime(figure, ns=(drawn.st_atime_ns, drawn.st_mtime_ns + 10**9))
            proc = snakemake(workflow_dir, *args, check=False)
            text = proc.stdout + proc.stderr
            assert proc.returncode != 0 and not out.exists(), text[-3000:]
            assert "residuals.png (older than results/alignment/demo/models.tsv)" in text
        finally:
            os.utime(figure, ns=(drawn.st_atime_ns, drawn.st_mtime_ns))
        table.write_bytes(content.replace(b"\tvis", b"\tVis", 1))  # content changed
        os.utime(table, (kept.st_atime, kept.st_mtime + 3600))
        proc = snakemake(workflow_dir, *args, check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and not out.exists(), text[-3000:]
        assert re.search(
            r"--report: \d+ figure\(s\) are older than the tables they are drawn from "
            r"\(results/figures/demo/\w+\.png \(older than results/alignment/demo/models\.tsv\)",
            text,
        ), text[-3000:]
    finally:
        table.write_bytes(content)
        os.utime(table, (kept.st_atime, kept.st_mtime))


def test_a_run_without_the_params_trigger_does_not_vouch_for_its_settings(
    workflow_dir, demo_config
):
    """With --rerun-triggers mtime (docs/cluster.md suggests such runs after some updates), a
    changed knn_k reruns nothing; a run that remade one figure recorded knn_k 7 as the whole
    run's, and the report then stated k = 7 in eight captions over values made at k = 10."""
    record = workflow_dir / "results/report/demo_run_settings.json"
    kept = record.read_bytes()
    cfg = copy.deepcopy(demo_config)
    cfg["analysis"]["knn_k"] = 7
    k7 = str(workflow_dir / write_config(workflow_dir, cfg, "k7_mtime.yaml"))
    figure = workflow_dir / "results/figures/demo/residuals.png"
    out = workflow_dir / "results/report/mtime.html"
    try:
        figure.unlink()
        snakemake(workflow_dir, "--configfile", k7, "--rerun-triggers", "mtime", "--cores", "1")
        assert figure.exists()
        assert json.loads(record.read_text()) == {
            "settings": {**json.loads(kept)["settings"], "analysis.knn_k": 7},
            "mixed": True,
        }
        proc = snakemake(workflow_dir, "--configfile", k7, "--report", str(out), check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and not out.exists(), text[-3000:]
        assert "one without the params rerun trigger (--rerun-triggers)" in text, text[-3000:]
    finally:
        record.write_bytes(kept)


def test_results_without_snakemakes_records_are_not_kept_for_a_changed_setting(
    workflow_dir, demo_config
):
    """With .snakemake/ deleted (to clear a lock, say) a changed knn_k reran nothing: exit 0,
    "Nothing to be done", every table made at k = 10, and troubleshooting.md then told the
    user to delete the settings record, after which the report stated k = 7 (audit). Now the
    run stops naming the setting, warns where no recorded setting differs, and passes when it
    forces the analysis's first steps."""
    meta = workflow_dir / ".snakemake" / "metadata"
    aside = workflow_dir / ".snakemake" / "metadata.aside"
    record = workflow_dir / "results/report/demo_run_settings.json"
    kept = record.read_bytes()
    cfg = copy.deepcopy(demo_config)
    k = cfg["analysis"]["knn_k"]
    cfg["analysis"]["knn_k"] = k - 3
    changed = write_config(workflow_dir, cfg, "k_changed_no_records.yaml")
    meta.rename(aside)
    try:
        same = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", "--cores", "1")
        text = same.stdout + same.stderr
        assert "Snakemake holds no record of the jobs that made them" in text, text[-3000:]
        assert "--touch --forceall" in text
        proc = snakemake(workflow_dir, "-n", "--configfile", changed, "--cores", "1", check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0, text[-3000:]
        assert f"analysis.knn_k = {k} -> {k - 3}" in text and "--forcerun gpa" in text, text[-3000:]
        first = ["gpa", "leave_one_model_out", "layer_search", "vision_diagnostics"]
        first += ["image_properties", "stimuli_report", "models_table", "language_gpa"]
        forced = snakemake(workflow_dir, "-n", "--configfile", changed, "--cores", "1",
                           "--forcerun", *first)  # fmt: skip
        assert "holds no record" not in forced.stdout + forced.stderr
        # features extracted otherwise than the config says (their own attributes tell): a stop
        # naming each file and setting, unless this run extracts them again
        cfg = copy.deepcopy(demo_config)
        cfg.setdefault("extraction", {})["max_tokens"] = 8
        tokens = write_config(workflow_dir, cfg, "max_tokens_no_records.yaml")
        lms = [k for k, m in demo_config["models"].items() if m["modality"] == "language"]
        proc = snakemake(workflow_dir, "-n", "--configfile", tokens, "--cores", "1", check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "extracted otherwise than this config" in text, text[-3000:]
        for key in lms:  # 512 tokens (the default bound) or 128 (the model's context)
            stale = f"results/features/demo/{key}.h5: extraction.max_tokens 8 (the file: "
            assert stale in text, text[-3000:]
        assert "tiny-mae.h5" not in text  # vision models read no captions
        one = f"results/features/demo/{lms[0]}.h5"
        proc = snakemake(workflow_dir, "-n", "--configfile", tokens, "--cores", "1",
                         "--forcerun", one, check=False)  # fmt: skip
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and f"{one}:" not in text and f"{lms[1]}.h5:" in text, text
        forced = snakemake(workflow_dir, "-n", "--configfile", tokens, "--cores", "1",
                           "--forcerun", "extract")  # fmt: skip
        assert "extracted otherwise" not in forced.stdout + forced.stderr
        files = [f"results/features/demo/{key}.h5" for key in lms]
        forced = snakemake(workflow_dir, "-n", "--configfile", tokens, "--cores", "1",
                           "--forcerun", *[f"./{f}" for f in files])  # fmt: skip
        assert "extracted otherwise" not in forced.stdout + forced.stderr  # as Snakemake reads it
        # a touch would record them as made with this config: refused, forced or not, and
        # whatever the targets
        for targets in (["--forceall"], ["--forcerun", "extract", "--", *files]):
            proc = snakemake(workflow_dir, "--touch", "--configfile", tokens, "--cores", "1",
                             *targets, check=False)  # fmt: skip
            text = proc.stdout + proc.stderr
            assert proc.returncode != 0 and "extracted otherwise than this" in text, text
            assert not any(meta.rglob("*"))  # nothing recorded
        # a record of results of two configs vouches for none: a stop, not the advice to touch
        record.write_text(json.dumps({**json.loads(kept), "mixed": True}))
        proc = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", "--cores", "1",
                         check=False)  # fmt: skip
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "made with more than one config" in text, text[-3000:]
    finally:
        record.write_bytes(kept)
        shutil.rmtree(meta, ignore_errors=True)
        aside.rename(meta)
    after = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", "--cores", "1")
    assert "Nothing to be done" in after.stdout + after.stderr


def test_intermediate_results_without_records_are_not_kept_for_a_changed_setting(
    workflow_dir, demo_config
):
    """Snakemake suggests `--cleanup-metadata <files>` after a changed param. With the records
    of one LLM's layer search and conditions cleaned, knn_k 10 -> 7 reran the others' layer
    searches but kept that LLM's at k = 10 under tables and a report saying k = 7, exit 0
    (audit): every analysis output's record is checked, not only the final tables'."""
    meta = workflow_dir / ".snakemake" / "metadata"
    aside = workflow_dir / ".snakemake" / "metadata.kept"
    llm = next(k for k, m in demo_config["models"].items() if m["modality"] == "language")
    cleaned = [
        f"results/alignment/demo/layers/{llm}.tsv",
        f"results/alignment/demo/conditions/{llm}.tsv",
    ]
    cfg = copy.deepcopy(demo_config)
    k = cfg["analysis"]["knn_k"]
    cfg["analysis"]["knn_k"] = k - 3
    changed = write_config(workflow_dir, cfg, "k_changed_cleaned.yaml")
    shutil.copytree(meta, aside)
    try:
        snakemake(workflow_dir, "--cleanup-metadata", *cleaned)
        proc = snakemake(workflow_dir, "-n", "--configfile", changed, "--cores", "1", check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0, text[-3000:]
        assert f"{', '.join(sorted(cleaned))}: Snakemake holds no record" in text, text[-3000:]
        assert f"analysis.knn_k = {k} -> {k - 3}" in text and "--forcerun gpa" in text, text[-3000:]
        same = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", "--cores", "1")
        assert "Snakemake holds no record" in same.stdout + same.stderr  # a warning
        assert "(extraction settings included)" not in same.stdout + same.stderr
        # the language GPA at a fixed depth reads the features alone: the command the message
        # gives makes it again too (review: its tables stayed those of the chosen layers)
        lang = [f"results/language/demo/{name}" for name in ("dispersion.tsv", "layers.tsv")]
        snakemake(workflow_dir, "--cleanup-metadata", *lang)
        cfg = copy.deepcopy(demo_config)
        cfg["analysis"]["language_dispersion"]["layer"] = 0.5
        depth = write_config(workflow_dir, cfg, "depth_cleaned.yaml")
        proc = snakemake(workflow_dir, "-n", "--configfile", depth, "--cores", "1")
        said = " ".join((proc.stdout + proc.stderr).split())
        assert "results/language/demo/dispersion.tsv" in said, said[-3000:]
        steps = re.search(r"--forcerun ([a-z_ ]+)` \(no extraction", said).group(1).split()
        forced = snakemake(workflow_dir, "-n", "--configfile", depth, "--cores", "1",
                           "--forcerun", *steps)  # fmt: skip
        assert job_counts(forced.stdout + forced.stderr).get("language_gpa") == 1
    finally:
        shutil.rmtree(meta)
        aside.rename(meta)
    after = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", "--cores", "1")
    assert "Nothing to be done" in after.stdout + after.stderr


def test_a_touch_does_not_record_features_as_extracted_with_other_settings(
    workflow_dir, demo_config
):
    """docs/cluster.md recommends `--touch results/features/<dataset>/*.h5` after cosmetic
    updates. After a change of max_tokens to 8 such a touch recorded the LLMs' features of 512
    tokens as made with 8, exit 0, and no later run extracted them again (audit): refused now,
    naming each file and setting, with Snakemake's records as well as without them."""
    cfg = copy.deepcopy(demo_config)
    cfg.setdefault("extraction", {})["max_tokens"] = 8
    tokens = write_config(workflow_dir, cfg, "max_tokens_touch.yaml")
    lms = [k for k, m in demo_config["models"].items() if m["modality"] == "language"]
    files = [f"results/features/demo/{key}.h5" for key in lms]
    meta = workflow_dir / ".snakemake" / "metadata"
    before = {p: p.read_bytes() for p in meta.rglob("*") if p.is_file()}
    stamps = {f: (workflow_dir / f).stat().st_mtime_ns for f in files}
    proc = snakemake(workflow_dir, "--touch", "--configfile", tokens, "--cores", "1", "--",
                     *files, check=False)  # fmt: skip
    text = proc.stdout + proc.stderr
    said = " ".join(text.split())
    assert proc.returncode != 0 and re.search(
        r"a --touch would record results/features/demo/\S+\.h5 as made with this config", said
    ), said[-3000:]
    for f in files:  # the file refused, and the others this config would extract otherwise
        assert f"{f}: extraction.max_tokens 8 (the file: " in said, said[-3000:]
    assert "other feature files this config would extract otherwise: " in said
    assert {p: p.read_bytes() for p in meta.rglob("*") if p.is_file()} == before
    assert {f: (workflow_dir / f).stat().st_mtime_ns for f in files} == stamps
    # with the config they were made with, the touch is allowed (it records nothing new)
    same = snakemake(workflow_dir, "--touch", "--configfile", "config/demo.yaml", "--cores", "1",
                     "--", *files)  # fmt: skip
    assert "a --touch would record" not in same.stdout + same.stderr


# ---------------------------------------------------------------- what reruns (docs/cluster.md, "What reruns")

SPEED_SETTINGS = {
    "num_workers": 3,
    "batch_size": {"vision": 7, "language": 5},
    "gpu_mem_gb": 40,
    "gpus_per_node": 4,
    "gpu_model": "a100",
    "allow_pickle": True,
}


def test_speed_settings_schedule_no_job(workflow_dir, demo_config):
    """Workers, batch sizes, GPU sizes, pickle permission and the hub cache's location change no
    feature: nothing reruns (each of them alone would schedule a subset of what all of them
    together schedule)."""
    cfg = copy.deepcopy(demo_config)
    cfg["extraction"].update(SPEED_SETTINGS)
    cfg["hub_cache"] = "elsewhere/hub"  # was a param of every extraction: all re-extracted
    first = next(iter(cfg["models"]))
    cfg["models"][first]["batch_size"] = 3
    cfg["models"][first]["label"] = "renamed"  # labels only re-render tables and figures
    proc = snakemake(
        workflow_dir, "-n", "--configfile", write_config(workflow_dir, cfg, "speed.yaml"),
        "--cores", "2", *[f"results/alignment/demo/{t}.tsv" for t in ("grid", "layers")],
    )  # fmt: skip
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


#: What an update of the analysis code never reruns (tests/test_package.py checks the params)
NOT_ANALYSIS_JOBS = NOT_ANALYSIS_RULES - {"all"}


def test_a_library_update_reruns_the_analysis_and_extracts_nothing(workflow_dir, demo_config):
    """Results made by older library code are not left standing: an edit of an analysis
    module (a comment, even) reruns every analysis job from the features on disk, and nothing
    else; an edit of the extraction code reruns nothing (GPU hours) unless it raises its
    modality's FEATURES_VERSION. Before, all of them ran nothing, and tables made by the old
    code stood next to the new code's."""
    everything = job_counts(
        snakemake(workflow_dir, "-n", "--forceall", "--profile", "profiles/demo").stdout
    )
    assert NOT_ANALYSIS_JOBS & everything.keys() and everything.get("gpa") == 1
    analysis = {k: v for k, v in everything.items() if k not in NOT_ANALYSIS_JOBS}
    lib = workflow_dir / "src" / "xmodal"
    # the demo's builders: the demo is made again, stimuli, models, features and all (but
    # the models table, made from the config's labels)
    demo_again = {k: v for k, v in everything.items() if k != "models_table"}
    for module, expected in (
        ("gpa.py", analysis), ("extract/vision.py", {}), ("demo/train.py", demo_again)
    ):  # fmt: skip
        text = (lib / module).read_text()
        try:
            (lib / module).write_text(text + "# an edit\n")
            proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo")
        finally:
            (lib / module).write_text(text)
        assert job_counts(proc.stdout + proc.stderr) == expected, (module, proc.stdout)
        if not expected:
            assert "Nothing to be done" in proc.stdout + proc.stderr
    # the change that alters the vision features raises their version: exactly the vision
    # models are re-extracted
    text = (lib / "registry.py").read_text()
    raised = text.replace('{"vision": 1, "language": 1}', '{"vision": 2, "language": 1}')
    assert raised != text
    try:
        (lib / "registry.py").write_text(raised)
        proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo")
    finally:
        (lib / "registry.py").write_text(text)
    vision = [k for k, m in demo_config["models"].items() if m["modality"] == "vision"]
    assert _extracted(proc.stdout) == set(vision), proc.stdout[-3000:]
    proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    # the provenance table names the code that made the tables
    provenance = read_table(workflow_dir / "results/summary/demo_provenance.tsv")
    row = provenance[provenance["kind"] == "analysis"].iloc[0]
    assert row["sha256"] == analysis_code_digest(lib)


def _extracted(out: str) -> set[str]:
    """Model keys whose extraction a dry run schedules."""
    models, in_extract = set(), False
    for line in out.splitlines():
        if line.startswith("rule "):
            in_extract = line.startswith("rule extract:")
        elif in_extract and "wildcards:" in line:
            models.add(line.split("model=")[1].split(",")[0].strip())
    return models


def test_a_feature_file_whose_last_job_failed_is_made_again(workflow_dir):
    """Snakemake records a failed job's output as made: after a run whose re-extractions all
    failed (a setting every LLM refused, or OOM kills), the next run said "Nothing to be done"
    and kept the tables made from the earlier files (audit). The extraction's mark
    (xmodal.attempts.begin_attempt) next to the missing file makes the default target extract it
    again, with a warning naming it; a file deleted by hand (no mark) stays as documented."""
    path = workflow_dir / "results/features/demo/tiny-llama-s.h5"
    aside, mark = path.with_name("aside.h5"), path.with_name(".tiny-llama-s.h5.attempt")
    os.replace(path, aside)
    try:
        proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo")
        assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
        mark.write_text("started\n")
        proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo")
        out = proc.stdout + proc.stderr
        assert _extracted(out) == {"tiny-llama-s"}, out[-3000:]
        assert f"{path.relative_to(workflow_dir)}: the last job that made it failed" in out
    finally:
        mark.unlink(missing_ok=True)
        os.replace(aside, path)


def test_an_analysis_table_whose_job_failed_is_made_again(workflow_dir, demo_config):
    """Snakemake deletes a failed job's output and then does not make a file again that only
    other jobs read while what was made from it is in place: after a settings change whose
    per-LLM job failed (or was killed, or its table deleted by hand), the next run said
    "Nothing to be done" and kept the tables and figures of the earlier settings. The default
    target asks for every missing analysis output (common.smk missing_analysis_outputs), with
    a warning naming it; outputs of a step the config switches off stay missing."""
    per_llm = workflow_dir / "results/alignment/demo/conditions/tiny-llama-s.tsv"
    sets = workflow_dir / "results/dispersion/demo/heldout_sets.tsv"
    language = workflow_dir / "results/language/demo/dispersion.tsv"
    moved = []
    try:
        for path in (per_llm, sets, language):
            moved.append((path, path.with_name(path.name + ".aside")))
            os.replace(*moved[-1])
            if path != per_llm:
                continue
            proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo")
            out = proc.stdout + proc.stderr
            counts = job_counts(out)
            for rule in ("conditions", "aggregate", "summary", "drop_summary"):
                assert counts.get(rule) == 1, (rule, counts, out[-3000:])
            for rule in ("extract", "gpa", "layer_search", "stimulus_sets", "language_gpa"):
                assert rule not in counts, (rule, counts)
            assert "conditions/tiny-llama-s.tsv: made by an earlier run and missing now" in out
        proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo")
        counts = job_counts(proc.stdout + proc.stderr)
        for rule in ("heldout_sets", "language_gpa", "joint_sets", "language_correlation"):
            assert counts.get(rule) == 1, (rule, counts)
        # with the held-out control and the language dispersion switched off, their missing
        # outputs are not asked for
        cfg = copy.deepcopy(demo_config)
        cfg["analysis"]["heldout_layer"]["enabled"] = False
        cfg["analysis"]["language_dispersion"] = {"enabled": False}
        off = write_config(workflow_dir, cfg, "switched_off.yaml")
        proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo", "--configfile", off)
        counts = job_counts(proc.stdout + proc.stderr)
        assert counts.get("conditions", 0) >= 1, counts  # the held-out switch is its param
        for rule in ("heldout_sets", "language_gpa", "joint_sets", "language_correlation"):
            assert rule not in counts, (rule, counts)
    finally:
        for path, aside in moved:
            os.replace(aside, path)
    proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_jobs_use_the_threads_their_rules_declare(workflow_dir):
    """A job's thread pools follow its rule's ``threads`` (the vision GPA: 2; the language GPA:
    1, the default), not the machine's cores (before: min(models, cores) for every job, so the
    language GPA ran 2 threads in a job Snakemake counted as 1 core)."""
    logs = workflow_dir / "logs"
    assert "on 2 thread(s)" in (logs / "dispersion/demo/gpa.log").read_text()
    assert "on 1 thread(s)" in (logs / "language/demo/gpa.log").read_text()


def test_manifest_edits_rerun_only_the_extractions_they_change(workflow_dir, demo_config):
    """Rows only reordered re-extract every model, with a warning saying how to avoid it; an
    annotation column re-extracts nothing, a fixed caption only the language models
    (before: any edit of the manifest re-extracted every model), an image file replaced under
    the same path only the vision models (before: nothing), even with its size and
    modification time kept; a stale feature file newer than its stamp is refused; undone,
    nothing reruns."""
    from xmodal.stimuli import read_manifest, write_manifest

    manifest = workflow_dir / "resources/stimuli/demo/stimuli.tsv"
    original = manifest.read_bytes()
    models = demo_config["models"]
    language = {k for k, m in models.items() if m["modality"] == "language"}
    vision = set(models) - language
    df = read_manifest(manifest)
    image = manifest.parent / df.loc[0, "image"]
    image_bytes, times = image.read_bytes(), image.stat()
    feature = workflow_dir / f"results/features/demo/{min(vision)}.h5"
    feature_times = feature.stat()
    fixed = df.copy()
    fixed.loc[0, "caption"] = fixed.loc[0, "caption"] + " Fixed."

    def dry_run() -> str:
        proc = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", "--cores", "2")
        return proc.stdout + proc.stderr

    try:
        # rows only reordered: every model is extracted again, and a warning says so before
        # the run and how to keep the features (before: silent); put back, nothing reruns
        write_manifest(df.iloc[::-1], manifest)
        out = dry_run()
        assert _extracted(out) == set(models), out[-3000:]
        for modality, keys in (("vision", vision), ("language", language)):
            said = f"so {len(keys)} of {len(keys)} {modality} model(s) will be extracted again"
            assert said in " ".join(out.split()), out[-3000:]
        # the command the warning gives puts the rows back: nothing is extracted again
        command = re.search(r"python -m (xmodal\.stimuli order-like \S+ \S+)", out)
        assert command, out[-3000:]
        subprocess.run([sys.executable, "-m", *command[1].split()], cwd=workflow_dir, check=True)
        assert manifest.read_bytes() == original
        assert _extracted(dry_run()) == set()
        write_manifest(df.assign(rater="ab"), manifest)
        out = dry_run()
        assert _extracted(out) == set(), out[-3000:]
        assert "stimuli_report" in job_counts(out), out[-3000:]  # the manifest's readers rerun
        write_manifest(fixed, manifest)
        out = dry_run()
        assert _extracted(out) == language, out[-3000:]
        assert "what the language extractions read changed" in out, out[-3000:]
        write_manifest(df, manifest)
        Image.open(image).rotate(90).save(image, quality=50)  # another image, another size
        assert image.stat().st_size != len(image_bytes)
        out = dry_run()
        assert _extracted(out) == vision, out[-3000:]
        assert "what the vision extractions read changed" in out, out[-3000:]
        image.write_bytes(image_bytes)
        os.utime(image, ns=(times.st_atime_ns, times.st_mtime_ns))
        assert "Nothing to be done" in dry_run()
        # one byte changed in place, the size and the modification time kept (before: unseen)
        flipped = bytearray(image_bytes)
        flipped[len(flipped) // 2] ^= 0xFF
        image.write_bytes(bytes(flipped))
        os.utime(image, ns=(times.st_atime_ns, times.st_mtime_ns))
        out = dry_run()
        assert _extracted(out) == vision, out[-3000:]
        # the image tables follow the images (before: only the manifest's time reran them, so
        # the properties kept the old image's values next to the new dispersion)
        assert "rule stimuli_report:" in out, out[-3000:]
        # a stale feature file made newer than the stamp (as `snakemake --touch` leaves it)
        # would be analysed as it is: refused, naming it (before: analysed)
        os.utime(feature)
        proc = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-3000:]
        target = str(feature.relative_to(workflow_dir))
        assert f"{target} holds features of other stimuli" in out
        # an edit that changes no stamp (the manifest touched) does not hide it: the stamps'
        # times are moved on only once the feature files passed (before: the next call
        # analysed the stale file, a stamp newer than it meaning "re-extracted")
        for _ in range(2):
            os.utime(manifest)
            proc = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", check=False)
            again = proc.stdout + proc.stderr
            assert proc.returncode != 0 and f"{target} holds features" in again, again[-3000:]
        assert f"make it again by naming it: `snakemake <your options> -- {target}`" in out
        # the remedy the message gives: deleted and named as the target, it is extracted
        feature_bytes = feature.read_bytes()
        feature.unlink()
        proc = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", "--", target)
        assert min(vision) in _extracted(proc.stdout + proc.stderr), proc.stdout[-3000:]
    finally:
        manifest.write_bytes(original)
        image.write_bytes(image_bytes)
        if not feature.exists():
            feature.write_bytes(feature_bytes)
        os.utime(feature, ns=(feature_times.st_atime_ns, feature_times.st_mtime_ns))
    assert "Nothing to be done" in dry_run()


def _run_editing(workflow_dir: Path, tmp_path: Path, edit, force: str, target: str, *options: str):
    """In a copy of the finished demo: start a run (with ``options``) forcing ``force`` to make
    ``target``, call ``edit(copy)`` once the run holds its lock (its stamps are written), and
    return the exit code and the output (whitespace joined)."""
    import time

    copy = tmp_path / "project"
    if not copy.exists():
        shutil.copytree(workflow_dir, copy, symlinks=True)  # times kept: nothing else reruns
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--profile", "profiles/demo",
           "--cores", "1", *options, "--forcerun", force, "--", target]  # fmt: skip
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(copy)}
    with subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:  # fmt: skip
        locks = copy / ".snakemake/locks"
        deadline = time.monotonic() + 600
        while not any(locks.glob("*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        edit(copy)
        out, _ = proc.communicate(timeout=900)
    assert "Finished jobid" in out and f"(Rule: {force})" in out, out[-3000:]
    return proc.returncode, " ".join(out.split())


def _replace_an_image(copy: Path) -> None:
    first, second = sorted((copy / "resources/stimuli/demo/images").glob("*.jpg"))[:2]
    first.write_bytes(second.read_bytes())


def _edit_a_caption(copy: Path) -> None:
    manifest = copy / "resources/stimuli/demo/stimuli.tsv"
    text = manifest.read_text()
    assert "A small" in text
    manifest.write_text(text.replace("A small", "A tiny", 1))


def _repeat_an_id(copy: Path) -> None:
    manifest = copy / "resources/stimuli/demo/stimuli.tsv"
    data = manifest.read_bytes()
    assert b"demo001\t" in data
    manifest.write_bytes(data.replace(b"demo001\t", b"demo000\t", 1))


@pytest.mark.parametrize(
    ("edit", "force", "target", "said"),
    [
        (
            _replace_an_image, "image_properties", "results/properties/demo/images.tsv",
            ["the stimuli changed while this run was going (what the vision extractions read "
             "differs from results/stimuli/demo/extract_vision.json)"],
        ),
        (
            _edit_a_caption, "image_properties", "results/properties/demo/images.tsv",
            ["the stimuli changed while this run was going (resources/stimuli/demo/stimuli.tsv"
             " was edited; what the language extractions read differs from "
             "results/stimuli/demo/extract_language.json)"],
        ),
        (
            _repeat_an_id, "summary", "results/summary/demo.tsv",
            ["resources/stimuli/demo/stimuli.tsv was edited; "
             "resources/stimuli/demo/stimuli.tsv cannot be read now ("],
        ),
    ],
    ids=["image", "caption", "unreadable"],
)  # fmt: skip
def test_stimuli_edited_while_a_run_goes_fail_the_run_at_its_end(
    workflow_dir, tmp_path, edit, force, target, said
):
    """An image replaced after a run started (its stamps written) gave tables of the new image
    (image properties) beside dispersions of the old (the feature files), with exit code 0
    (audit): the run's end (onsuccess, check_stimuli_of_this_run) compares the stimuli with
    those it started with, and fails saying what changed. A caption edited likewise changes the
    manifest and what the language extractions read; a manifest that cannot be read at the end
    is named as such (mutation audit)."""
    rc, out = _run_editing(workflow_dir, tmp_path, edit, force, target)
    assert rc == 1, out[-3000:]
    for text in said:
        assert text in out, out[-3000:]


def test_a_run_that_needs_no_stimuli_before_any_exist_ends_without_error(tmp_path):
    """A new project's first step that reads no stimuli (the demo's training scenes) ended
    with exit code 1 after its job succeeded: "the stimuli changed while this run was going
    (… cannot be read now …)", for a manifest that did not exist when the run started either
    (audit of two datasets in one project)."""
    wd = copy_project(tmp_path / "new")
    target = "resources/demo/training/demo/scenes.npz"
    proc = snakemake(wd, "--profile", "profiles/demo", "--cores", "1", "--", target, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert (wd / target).is_file() and not (wd / "resources/stimuli/demo/stimuli.tsv").exists()
    assert "changed while this run" not in out


def test_a_python_at_a_path_with_a_space_is_refused_and_a_project_folder_with_one_works(
    tmp_path,
):
    """Snakemake starts each step script as `<python> <script>` with the path unquoted
    (snakemake/snakemake#2645): a venv under "sp ace/" failed every job with "/…/sp: No such
    file or directory" (audit of paths with spaces). Now the run stops on start naming the
    path; a dry run still shows the plan, and a project folder with a space runs."""
    wd = copy_project(tmp_path / "my project ü")
    env_root = tmp_path / "py env"  # the environment of this test run, reached by a spaced path
    env_root.symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)
    python = env_root / "bin" / Path(sys.executable).name
    seen = subprocess.run([python, "-c", "import sys; print(sys.executable)"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert "py env" in seen, seen
    target = "results/alignment/demo/models.tsv"
    env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(wd), "PYTHONUNBUFFERED": "1"}
    args = [python, "-m", "snakemake", "--profile", "profiles/demo", "--cores", "1"]
    proc = subprocess.run([*args, "--", target], cwd=wd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "at a path with a space or shell character" in out and "py env" in out, out[-3000:]
    assert "snakemake/snakemake#2645" in out and "make demo VENV=" in out
    assert f"{tmp_path}/py: No such file" not in out  # no job started
    assert not (wd / target).exists() and not list((wd / ".snakemake/locks").glob("*"))
    # --no-hooks, where onstart does not run: the check reads the command line
    proc = subprocess.run([*args, "--no-hooks", "--", target], cwd=wd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "at a path with a space" in out, out[-3000:]
    assert not (wd / target).exists()
    proc = subprocess.run([*args, "-n", "--", target], cwd=wd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # the same project folder, with a Python at a plain path: the step script runs
    snakemake(wd, "--profile", "profiles/demo", "--cores", "1", "--", target)
    assert "tiny-mae" in (wd / target).read_text()
    # a --touch starts no script: not refused
    touch = [*args, "--touch", "--forcerun", "models_table", "--", target]
    proc = subprocess.run(touch, cwd=wd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def test_a_snakemake_without_the_librarys_dependencies_names_its_python(tmp_path):
    """A Snakemake of another environment than the project's (a cluster module, pipx) stopped
    with a bare "No module named 'h5py'" (audit); now the message names its Python and how to
    install the project there. h5py is hidden here by a package that cannot be imported."""
    hidden = tmp_path / "hide" / "h5py"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'h5py'\", name='h5py')\n"
    )
    wd = copy_project(tmp_path / "project")
    proc = snakemake(wd, "-n", "--cores", "1", check=False,
                     env={"PYTHONPATH": str(hidden.parent)})  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    python = re.search(r"this Snakemake runs (\S+), which cannot import 'h5py'", out)
    assert python and Path(python[1]).parent == Path(sys.executable).parent, out[-2000:]
    assert "pip install -e '.[workflow]'" in out
    # a module of the library itself missing (a broken checkout) is not called a dependency
    (wd / "src/xmodal/language_dispersion.py").unlink()
    proc = snakemake(wd, "-n", "--cores", "1", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "No module named 'xmodal.language_dispersion'" in out, out[-2000:]
    assert "this Snakemake runs" not in out


def test_a_run_failed_by_an_edit_records_its_settings_as_mixed(workflow_dir, tmp_path, demo_config):
    """A run with another knn_k whose stimuli changed under it ends in an error; its settings
    record then says the results on disk mix settings (as after any failed run), so that
    --report refuses until a whole run succeeds (before: the old record stood unchanged)."""
    project = tmp_path / "project"
    shutil.copytree(workflow_dir, project, symlinks=True)
    cfg = copy.deepcopy(demo_config)
    cfg["analysis"]["knn_k"] -= 3
    k = write_config(project, cfg, "k_edited_mid_run.yaml")
    record = project / "results/report/demo_run_settings.json"
    assert json.loads(record.read_text())["mixed"] is False
    rc, out = _run_editing(
        workflow_dir, tmp_path, _replace_an_image, "image_properties",
        "results/properties/demo/images.tsv", "--configfile", k,
    )  # fmt: skip
    assert rc == 1 and "the stimuli changed while this run was going" in out, out[-3000:]
    saved = json.loads(record.read_text())
    assert (
        saved["mixed"] is True and saved["settings"]["analysis.knn_k"] == cfg["analysis"]["knn_k"]
    )


def test_a_touch_over_replaced_images_fails_naming_the_stale_file(workflow_dir, tmp_path):
    """A --touch run after an image was replaced records the vision feature files as made from
    the images now on disk; its end names them as holding other stimuli (mutation audit)."""
    copy = tmp_path / "project"
    shutil.copytree(workflow_dir, copy, symlinks=True)
    _replace_an_image(copy)
    proc = snakemake(copy, "--profile", "profiles/demo", "--cores", "1", "--touch", check=False)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0, out[-3000:]
    assert "holds features of other stimuli than the manifest now lists" in out, out[-3000:]


def _outputs(workflow_dir: Path) -> dict[Path, int]:
    """Every file under results/ with its modification time, but the image digest cache."""
    files = (p for p in (workflow_dir / "results").rglob("*") if p.is_file())
    return {p: p.stat().st_mtime_ns for p in sorted(files) if p.name != IMAGE_DIGESTS}


def test_an_image_that_does_not_decode_stops_the_run_before_any_job(workflow_dir):
    """A damaged image used to be found by the vision extractions, each failing on the GPU
    once per retry. It now stops the run at start-up, naming the stimulus and the file, with
    nothing run or written; a dry run warns; with the image mended, nothing is to be done."""
    manifest = read_manifest(workflow_dir / "resources/stimuli/demo/stimuli.tsv")
    sid, name = manifest["stimulus_id"][5], manifest["image"][5]
    image = workflow_dir / "resources/stimuli/demo" / name
    original = image.read_bytes()
    try:
        image.write_bytes(original[: len(original) // 3])
        proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo")
        assert "a run stops here: resources/stimuli/demo: 1 image(s) cannot be decoded" in (
            proc.stdout + proc.stderr
        )
        # (the dry run brought the stamps up to the damaged image, as dry runs do)
        before = _outputs(workflow_dir)
        proc = snakemake(workflow_dir, "--profile", "profiles/demo", check=False)
    finally:
        image.write_bytes(original)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert f"stimulus '{sid}': cannot decode image resources/stimuli/demo/{name}" in text, text
    assert "found before any job ran" in text and "--forcerun demo_stimuli" in text
    assert _outputs(workflow_dir) == before
    proc = snakemake(workflow_dir, "-n", "--profile", "profiles/demo")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_a_deleted_stamp_is_written_again_and_still_guards_the_stimuli(workflow_dir):
    """A manifest stamp deleted after the analysis (results/stimuli cleaned up) was never made
    again: the extractions that need it were up to date, so no job asked for it, and a later
    change of the images re-extracted nothing and was refused by nothing (reviewer). Every call
    now writes a missing stamp; the same content reruns nothing."""
    stamp = workflow_dir / "results/stimuli/demo/extract_vision.json"
    manifest = workflow_dir / "resources/stimuli/demo/stimuli.tsv"
    record = stamp.read_bytes()
    image = manifest.parent / read_manifest(manifest)["image"].iloc[1]
    image_bytes, times = image.read_bytes(), image.stat()

    def dry_run() -> str:
        proc = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", "--cores", "2")
        return proc.stdout + proc.stderr

    try:
        stamp.unlink()
        out = dry_run()
        assert "Nothing to be done" in out and stamp.read_bytes() == record, out[-3000:]
        stamp.unlink()
        flipped = bytearray(image_bytes)
        flipped[len(flipped) // 2] ^= 0xFF
        image.write_bytes(bytes(flipped))
        out = dry_run()
        vision = {"tiny-mae", "tiny-dinov2", "tiny-clip", "tiny-clip-ft"}
        assert _extracted(out) == vision and stamp.read_bytes() != record, out[-3000:]
    finally:
        image.write_bytes(image_bytes)
        os.utime(image, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert "Nothing to be done" in dry_run() and stamp.read_bytes() == record


def test_demo_stimuli_made_again_are_extracted_again_in_the_same_run(workflow_dir):
    """When the demo's manifest rule reruns for another reason than its settings (its script
    changed), the stamps and every extraction rerun with it in the same call. Before, that call
    analysed the old features next to the new stimulus tables, exit 0, and only the next call
    re-extracted (reviewer)."""
    script = workflow_dir / "scripts/demo_stimuli.py"
    times = script.stat()
    try:
        os.utime(script)
        proc = snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml", "--cores", "2")
        out = proc.stdout + proc.stderr
        assert "rule demo_stimuli:" in out and out.count("rule manifest_stamp:") == 2, out[-3000:]
        assert len(_extracted(out)) == 7, out[-3000:]
    finally:
        os.utime(script, ns=(times.st_atime_ns, times.st_mtime_ns))


def test_a_local_model_whose_weights_changed_in_place_is_refused(workflow_dir, demo_config):
    """A model given as a local folder (the demo's built MAE, named by its path, no build):
    once a file of that folder is rewritten after extraction (a later training run saved over
    it, same size and time), every snakemake call stops naming the feature file and the folder
    (before: its stale features were analysed); put back, it runs."""
    cfg = copy.deepcopy(demo_config)
    cfg["models"]["tiny-mae"].pop("build")  # now a local model: its folder is not a DAG output
    name = write_config(workflow_dir, cfg, "local_model.yaml")
    weights = workflow_dir / "resources/demo/models/tiny-mae/model.safetensors"
    data, times = weights.read_bytes(), weights.stat()

    def dry_run() -> subprocess.CompletedProcess:
        return snakemake(workflow_dir, "-n", "--configfile", name, "--cores", "2", check=False)

    assert dry_run().returncode == 0
    try:
        changed = bytearray(data)
        changed[-1] ^= 0xFF
        weights.write_bytes(bytes(changed))
        os.utime(weights, ns=(times.st_atime_ns, times.st_mtime_ns))
        proc = dry_run()
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-3000:]
        assert (
            "results/features/demo/tiny-mae.h5 was extracted from other weights than "
            "resources/demo/models/tiny-mae holds now" in out
        ), out[-3000:]
    finally:
        weights.write_bytes(data)
        os.utime(weights, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert dry_run().returncode == 0


def test_supplied_features_are_imported_and_never_extracted(workflow_dir, demo_config):
    """A model with ``features:`` (a file the user supplies, README "Bringing your own
    features") is imported by its own rule: a stamp made or changed later never schedules an
    extraction of it (before: the extraction deleted the user's file, then failed on a folder
    without weights). The import copies the file with its rows in manifest order, and imports
    it again when its content changes under an older modification time (a newer time alone ran
    it before); a path equal to the pipeline's own output is refused naming the config key."""
    from xmodal.features import write_features

    ids = read_manifest(workflow_dir / "resources/stimuli/demo/stimuli.tsv")["stimulus_id"]
    supplied = workflow_dir / "resources/features/my-feats.h5"
    x = np.random.default_rng(0).normal(size=(2, len(ids), 8)).astype(np.float32)
    attrs = {"model_id": "mine", "model_key": "my-feats", "modality": "vision"}
    write_features(supplied, x, list(ids)[::-1], ["b0", "b1"], attrs)
    cfg = copy.deepcopy(demo_config)
    cfg["models"]["my-feats"] = {"modality": "vision", "id": "my features", "size_b": 0.0001,
                                 "features": "resources/features/my-feats.h5"}  # fmt: skip
    name = write_config(workflow_dir, cfg, "supplied.yaml")
    out = workflow_dir / "results/features/demo/my-feats.h5"
    stamp = workflow_dir / "results/stimuli/demo/extract_vision.json"
    stamp_times = stamp.stat()

    def dry_run() -> str:
        proc = snakemake(workflow_dir, "-n", "--configfile", name, "--cores", "2")
        return proc.stdout + proc.stderr

    try:
        text = dry_run()
        assert job_counts(text).get("import_features") == 1, text[-3000:]
        assert "my-feats" not in _extracted(text), text[-3000:]
        snakemake(
            workflow_dir, "--configfile", name, "--cores", "1", str(out.relative_to(workflow_dir))
        )
        with FeatureFile(out) as got, FeatureFile(supplied, list(ids)) as ref:
            assert got.stimulus_ids == list(ids) and got._order is None  # manifest order
            np.testing.assert_array_equal(got.layer(1), ref.layer(1))
        os.utime(stamp)  # a stamp newer than the imported file: nothing extracts it
        text = dry_run()
        assert "my-feats" not in _extracted(text) and "import_features" not in job_counts(text)
        # other content with an older time (cp -p, rsync -a): imported again, by its digest
        write_features(supplied, 2 * x, list(ids)[::-1], ["b0", "b1"], attrs)
        os.utime(supplied, (1.6e9, 1.6e9))
        assert job_counts(dry_run()).get("import_features") == 1
        cfg["models"]["my-feats"]["features"] = "results/features/demo/my-feats.h5"
        bad = write_config(workflow_dir, cfg, "supplied_bad.yaml")
        proc = snakemake(workflow_dir, "-n", "--configfile", bad, check=False)
        assert proc.returncode != 0
        assert "config key 'models.my-feats.features'" in proc.stdout + proc.stderr
    finally:
        out.unlink(missing_ok=True)
        os.utime(stamp, ns=(stamp_times.st_atime_ns, stamp_times.st_mtime_ns))


@pytest.mark.parametrize("change", ["build", "dtype", "max_tokens"])
def test_feature_fields_rerun_exactly_their_models(workflow_dir, demo_config, change):
    cfg = copy.deepcopy(demo_config)
    models = cfg["models"]
    language = {k for k, m in models.items() if m["modality"] == "language"}
    if change == "build":
        key = next(k for k in models if k in language)
        models[key]["build"]["seed"] = int(models[key]["build"].get("seed", 0)) + 100
        want = {key}
    elif change == "dtype":
        cfg["extraction"]["dtype"] = "bfloat16"
        want = set(models)
    else:
        cfg["extraction"]["max_tokens"] = 40
        want = language
    proc = snakemake(
        workflow_dir, "-n", "--configfile", write_config(workflow_dir, cfg, f"{change}.yaml"),
        "--cores", "2",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert _extracted(out) == want, out[-3000:]
    counts = job_counts(out)
    n_llm = len(language)
    if want <= language and len(want) == 1:  # one LLM: its two alignment jobs, no GPA
        assert counts.get("layer_search") == 1 and counts.get("conditions") == 1, counts
        assert "gpa" not in counts, counts
    else:
        assert counts.get("layer_search") == n_llm, counts
