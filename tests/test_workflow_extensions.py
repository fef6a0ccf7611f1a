"""The extension rules in the workflow: their outputs on the shared demo run, what an added LLM
or a changed setting reruns, and the paper config's DAG."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from _project import copy_project, job_counts
from _project import run_snakemake as snakemake

from xmodal.io import read_table

pytestmark = pytest.mark.slow

EXTENSION_RULES = (
    "language_gpa",
    "language_correlation",
    "joint_sets",
    "joint_conditions",
    "joint_aggregate",
    "image_properties",
    "stimulus_properties",
    "property_correlations",
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


def test_demo_extension_outputs(demo_project, demo_config):
    wd = demo_project
    models = demo_config["models"]
    vision = [k for k, m in models.items() if m["modality"] == "vision"]
    llms = [k for k, m in models.items() if m["modality"] == "language"]
    m = demo_config["stimuli"]["n"]
    lang = wd / "results/language/demo"

    disp = read_table(lang / "dispersion.tsv")
    assert len(disp) == m and (disp["mean_dispersion"] > 0).all()
    assert len(read_table(lang / "residuals.tsv")) == m * len(llms)
    # the layer per LLM is the most frequent cknna choice of its layer search, ties to the lower
    layers, search = (
        read_table(lang / "layers.tsv"),
        read_table(wd / "results/alignment/demo/layers.tsv"),
    )
    assert layers["llm"].tolist() == llms
    for row in layers.itertuples():
        picks = search[
            search["chosen"] & (search["llm"] == row.llm) & (search["metric"] == "cknna")
        ]
        votes = Counter(picks["llm_layer"])
        best = max(votes.values())
        assert row.llm_layer == min(v for v, c in votes.items() if c == best)
        assert row.votes == best and row.n_vision == len(vision)

    corr = read_table(lang / "correlation.tsv")
    assert len(corr) == 4 and corr["estimate"].between(-1, 1).all()
    assert (corr["ci_low"] <= corr["estimate"]).all() and (
        corr["estimate"] <= corr["ci_high"]
    ).all()

    sets = read_table(lang / "joint_sets.tsv")
    sizes = sets.groupby(["set", "summary", "draw"]).size()
    assert sizes.nunique() == 1  # every 2 x 2 set and every random set: the same n
    cells = read_table(lang / "joint_cells.tsv")
    assert len(cells) == len(vision) * len(llms) * 2 * 4
    assert cells["value"].between(-1, 1).all() and (cells["n_stimuli"] == sizes.iloc[0]).all()
    assert (cells["n_random"] == demo_config["analysis"]["n_random"]).all()

    props = read_table(wd / "results/properties/demo/properties.tsv")
    # 7 built-in properties, one token count per LLM, the manifest's 5 numeric columns
    own = ["nuisance", "clutter", "occlusion", "background", "blur"]
    assert len(props) == m * (7 + len(llms) + len(own))
    assert list(dict.fromkeys(props["property"]))[-len(own) :] == [f"manifest:{c}" for c in own]
    assert props["value"].notna().all()  # demo images decode; every LLM file records tokens
    # token counts are those of each model's own tokenizer
    from transformers import AutoTokenizer

    from xmodal.stimuli import read_manifest

    manifest = read_manifest(wd / "resources/stimuli/demo/stimuli.tsv")
    tok = AutoTokenizer.from_pretrained(wd / models[llms[0]]["id"])
    want = [len(tok(c)["input_ids"]) for c in manifest["caption"][:20]]
    got = props[(props["property"] == "caption_tokens") & (props["model"] == llms[0])]["value"]
    assert got.tolist()[:20] == want
    pc = read_table(wd / "results/properties/demo/correlations.tsv")
    assert len(pc) == 2 * (7 + len(llms) + len(own))
    # the demo's images all have the same size: undefined correlations are reported as such
    flat = pc[pc["property"].isin(["image_pixels", "aspect_ratio"])]
    assert flat["spearman_rho"].isna().all() and (flat["reason"] == "constant property").all()
    assert np.isfinite(pc.loc[pc["property"] == "entropy", "spearman_rho"]).all()
    for name in ("language_dispersion", "properties", "gallery"):
        assert (wd / f"results/figures/demo/{name}.png").stat().st_size > 1000


def test_adding_an_llm_reruns_only_its_work_and_the_extension_jobs(demo_project, demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["models"]["tiny-llama-m"] = {
        "modality": "language",
        "id": "resources/demo/models/tiny-llama-m",
        "size_b": 0.0002,
        "label": "tiny LLaMA m",
        "family": "LLaMA",
        "build": {"arch": "llama", "hidden_size": 80, "n_layers": 4, "seed": 11},
    }
    counts, out = _dry_run(demo_project, cfg, "ext_plus_llm.yaml")
    n_llm = sum(m["modality"] == "language" for m in cfg["models"].values())
    assert counts.get("extract") == 1 and counts.get("layer_search") == 1, counts
    # language dispersion depends on every LLM: its jobs, and every LLM's 2 x 2 job (new sets)
    assert counts.get("language_gpa") == 1 and counts.get("language_correlation") == 1
    assert counts.get("joint_sets") == 1 and counts.get("joint_aggregate") == 1
    assert counts.get("joint_conditions") == n_llm
    # token counts: the cheap combining job, never the image pass
    assert counts.get("stimulus_properties") == 1 and counts.get("property_correlations") == 1
    assert "image_properties" not in counts, counts
    for rule in ("gpa", "stimulus_sets", "leave_one_model_out", "stimuli_report"):
        assert rule not in counts, (rule, counts)


def test_language_dispersion_switch_and_layer_setting(demo_project, demo_config):
    cfg = copy.deepcopy(demo_config)
    cfg["analysis"]["language_dispersion"] = {"enabled": False}
    counts, out = _dry_run(demo_project, cfg, "ext_off.yaml")
    assert "Nothing to be done" in out, out[-2000:]
    cfg["analysis"]["language_dispersion"] = {"enabled": True, "layer": 0.5}
    counts, out = _dry_run(demo_project, cfg, "ext_depth.yaml")
    assert counts.get("language_gpa") == 1 and counts.get("joint_sets") == 1, counts
    for rule in ("extract", "layer_search", "conditions", "gpa", "image_properties"):
        assert rule not in counts, (rule, counts)


def test_paper_config_schedules_the_extension_rules(tmp_path):
    wd = copy_project(tmp_path / "paper")
    proc = snakemake(wd, "-n", "--cores", "4")
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts.get("joint_conditions") == 12  # one per LLM
    for rule in EXTENSION_RULES:
        if rule != "joint_conditions":
            assert counts.get(rule) == 1, (rule, counts)
    for fig in ("language_dispersion", "properties", "gallery"):
        assert counts.get(f"figure_{fig}") == 1
