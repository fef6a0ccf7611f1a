"""Settings that must mean what they say: tests for the mutants of xmodal.config, registry,
resources and attempts that the rest of the suite let survive (mutation audit of 2026-12-06:
114 mutants, 91 killed, 4 equivalent). Each test names the mutant it kills."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from xmodal.config import (
    ConfigError,
    check_against_stimuli,
    check_config,
    check_report_settings,
    config_json,
    heldout_set_size,
    hub_cache_dir,
    load_config_file,
    record_run_settings,
    recorded_settings_changes,
    report_settings,
)
from xmodal.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
PAPER = load_config_file(ROOT / "config.yaml")
DEMO = load_config_file(ROOT / "config" / "demo.yaml")


def _analysis(**kw) -> dict:
    base = {"set_size": 8, "knn_k": 4, "drop_fraction": 0.25, "heldout_layer": {"enabled": False}}
    return {"analysis": {**base, **kw}}


# ------------------------------------------------------------------------------ config.py
def test_heldout_set_size_uses_the_larger_half_of_an_odd_m():  # C15_heldout_nb_floor
    """K_B = min(⌊K·|B|/m + ½⌋, ⌊|B|/2⌋) with |B| = m − ⌊m/2⌋ (docs/method.md): for m = 11,
    |B| = 6 and K = 5 gives ⌊2.73 + ½⌋ = 3 (with |B| = ⌊m/2⌋ = 5 it would be 2)."""
    assert heldout_set_size(5, 11) == 3
    assert heldout_set_size(4, 9) == 2  # |B| = 5: ⌊2.22 + ½⌋ = 2, cap 2


def test_a_drop_fraction_that_keeps_exactly_the_fewest_stimuli_is_accepted():  # C19_nkeep_le
    """20 stimuli, knn_k 4 (need max(4, 8) = 8 kept), drop_fraction 0.6 drops 12, keeps 8."""
    check_against_stimuli(_analysis(drop_fraction=0.6), 20)
    with pytest.raises(ConfigError, match="analysis.drop_fraction"):
        check_against_stimuli(_analysis(drop_fraction=0.65), 20)  # drops 13, keeps 7


def test_heldout_sets_one_below_the_neighbour_minimum_are_refused_at_start_up():
    """C21_heldout_kb_need_minus1: m = 20, K = 6 → K_B = ⌊6·10/20 + ½⌋ = 3 < max(4, 2·2) = 4."""
    cfg = _analysis(set_size=6, knn_k=2, heldout_layer={"enabled": True})
    assert heldout_set_size(6, 20) == 3
    with pytest.raises(ConfigError, match=r"half B of the 20 stimuli would hold 3"):
        check_against_stimuli(cfg, 20)
    cfg["analysis"]["heldout_layer"]["enabled"] = False
    check_against_stimuli(cfg, 20)


def test_a_config_without_a_language_model_is_refused():  # C08_no_language_ok
    cfg = copy.deepcopy(DEMO)
    check_config(cfg)
    cfg["models"] = {k: m for k, m in cfg["models"].items() if m["modality"] == "vision"}
    with pytest.raises(ConfigError, match=r"config key 'models': no language model"):
        check_config(cfg)


def test_a_changed_annotations_setting_refuses_the_report(tmp_path):  # C30_report_no_annotations
    record = tmp_path / "run_settings.json"
    cfg = copy.deepcopy(DEMO)
    cfg["analysis"]["annotations"] = ["nuisance", "clutter"]
    record_run_settings(record, cfg, whole=True, succeeded=True)
    check_report_settings(record, cfg)
    other = copy.deepcopy(cfg)
    other["analysis"]["annotations"] = ["nuisance"]
    with pytest.raises(ConfigError, match=r"analysis\.annotations = \['nuisance', 'clutter'\]"):
        check_report_settings(record, other)


def test_a_whole_run_clears_the_untold_note(tmp_path):  # C32_untold_kept
    """A partial run over results no record told of notes 'untold'; the next whole successful
    run made every result with its config, so the note goes: a later partial run that changes
    a setting is then reported as such, not as one over results of unknown settings."""
    record = tmp_path / "run_settings.json"
    cfg = copy.deepcopy(DEMO)
    record_run_settings(record, cfg, whole=False, succeeded=True, earlier=True)
    assert json.loads(record.read_text()).get("untold") is True
    record_run_settings(record, cfg, whole=True, succeeded=True)
    assert json.loads(record.read_text()) == {"settings": report_settings(cfg), "mixed": False}
    other = copy.deepcopy(cfg)
    other["analysis"]["knn_k"] = int(cfg["analysis"]["knn_k"]) + 1
    record_run_settings(record, other, whole=False, succeeded=True)
    with pytest.raises(ConfigError, match="changed the settings the report states"):
        check_report_settings(record, other)


def test_a_touched_record_vouches_for_no_config(tmp_path):  # C35_recorded_touched_ignored
    """recorded_settings_changes (common.smk, results without Snakemake records): a record
    marked by --touch cannot say the results match this config, even with equal settings."""
    record = tmp_path / "run_settings.json"
    cfg = copy.deepcopy(DEMO)
    record.write_text(json.dumps({"settings": report_settings(cfg), "touched": True}))
    assert recorded_settings_changes(record, cfg) == [
        "the record says they were made with more than one config, or marked by --touch"
    ]
    record.write_text(json.dumps({"settings": report_settings(cfg)}))
    assert recorded_settings_changes(record, cfg) == []


def test_an_octal_number_in_a_list_is_named(tmp_path):  # C40_octal_seq_unchecked
    path = tmp_path / "c.yaml"
    path.write_text("stimuli:\n  nuisance_beta: [010, 3]\n")
    with pytest.raises(
        ConfigError, match=r"key 'nuisance_beta' at line 2: YAML 1.1 reads 010 as 8"
    ):
        load_config_file(path)
    path.write_text("stimuli:\n  nuisance_beta: [007, 3]\n")  # octal and decimal agree
    assert load_config_file(path) == {"stimuli": {"nuisance_beta": [7, 3]}}


def test_hub_cache_is_the_configured_folder_or_the_default():  # C41_hub_cache_ignored
    assert hub_cache_dir({"hub_cache": "/scratch/hub"}) == "/scratch/hub"
    assert hub_cache_dir({"hub_cache": None}) == hub_cache_dir({}) == "resources/hub"


def test_config_json_does_not_depend_on_key_order():  # C43_config_json_unsorted
    assert config_json({"b": 1, "a": {"d": 2, "c": 3}}) == config_json(
        {"a": {"c": 3, "d": 2}, "b": 1}
    )


# ---------------------------------------------------------------------------- registry.py
def test_a_models_allow_pickle_false_overrides_the_site_true():  # R05_site_pickle_overrides_model
    cfg = copy.deepcopy(PAPER)
    cfg["extraction"]["allow_pickle"] = True
    first, second = list(cfg["models"])[:2]
    cfg["models"][first]["allow_pickle"] = False
    reg = Registry.from_config(cfg)
    assert reg[first].allow_pickle is False and reg[second].allow_pickle is True


def test_a_file_cut_by_an_earlier_smaller_max_tokens_differs():  # R13_maxtok_context_any_source
    """A feature file cut at 32 tokens because max_tokens was 32 is not what max_tokens 64
    makes (only a model context shorter than the limit is)."""
    cfg = copy.deepcopy(PAPER)
    cfg["extraction"]["max_tokens"] = 64
    lm = Registry.from_config(cfg)["llama-65b"]
    made = {"model_id": lm.id, "revision": "0" * 40, "requested_revision": "",
            "compute_dtype": "bfloat16", "device": "cuda:0", "features_version": 1,
            "max_length": 32, "max_length_source": "max_tokens"}  # fmt: skip
    assert lm.differs_from(made) == ["extraction.max_tokens 64 (the file: 32 tokens, max_tokens)"]
    assert lm.differs_from({**made, "max_length_source": "model context"}) == []


def test_a_vision_model_needing_more_than_90_percent_of_one_gpu_is_refused():
    """R19_vision_fit_full_gpu: float32, 17.5B → 70 + 3.5 = 73.5 GB > 0.9 × 80 = 72 (< 80)."""
    cfg = copy.deepcopy(PAPER)
    vit = next(k for k, m in cfg["models"].items() if m["modality"] == "vision")
    cfg["models"][vit]["size_b"] = 17.5
    with pytest.raises(ConfigError, match=rf"'models.{vit}': a vision model runs on one GPU"):
        Registry.from_config(cfg)
    cfg["models"][vit]["size_b"] = 17.0  # 68 + 3.4 = 71.4 GB fits
    Registry.from_config(cfg)


def test_a_models_batch_size_sizes_its_jobs_memory():  # R23_resources_no_batch
    from xmodal.resources import extraction_resources

    cfg = copy.deepcopy(PAPER)
    vit = next(k for k, m in cfg["models"].items() if m["modality"] == "vision")
    cfg["models"][vit]["batch_size"] = 256
    e = Registry.from_config(cfg)[vit]
    want = extraction_resources("vision", e.size_b, gpu_mem_gb=80, num_workers=8,
                                bytes_per_param=4, batch_size=256)  # fmt: skip
    assert e.resources()["mem_mb"] == want["mem_mb"]
    small = Registry.from_config(PAPER)[vit].resources()["mem_mb"]  # batch_size 64
    assert e.resources()["mem_mb"] - small >= 20 * 1024  # 28 GB of batches, not 7


def test_an_empty_label_falls_back_to_the_key():  # R30_label_none_text
    cfg = copy.deepcopy(PAPER)
    key = list(cfg["models"])[0]
    cfg["models"][key]["label"] = ""
    assert Registry.from_config(cfg)[key].label == key


# --------------------------------------------------------------------------- resources.py
def test_loo_runtime_caps_the_rank_at_m_minus_1():  # S19_loo_k_uncapped
    """k = min(width, m − 1): 1,536 stimuli of 4096-wide models are rank 1,535."""
    from xmodal.resources import loo_minutes

    assert loo_minutes(1536, [4096] * 4, 100, 2) == 60


def test_no_gpus_on_the_node_is_no_gpu(monkeypatch):  # S23_slurm_gpus_zero
    from xmodal.resources import slurm_gpus

    for k in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    assert slurm_gpus() == {}
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    assert slurm_gpus() == {"SLURM_GPUS_ON_NODE": "2"}


# ---------------------------------------------------------------------------- attempts.py
def test_an_existing_output_with_a_mark_is_not_unfinished(tmp_path):  # A12_unfinished_existing
    from xmodal.attempts import begin_attempt, unfinished_outputs

    out = tmp_path / "m.h5"
    out.write_bytes(b"old")  # a file made earlier; this job's attempt is under way
    begin_attempt(out)
    assert unfinished_outputs([out]) == []
    out.unlink()
    assert unfinished_outputs([out]) == [out]


def test_a_node_of_more_than_8_gpus_sizes_the_extraction_job():  # R22_resources_maxgpus_default
    """gpus_per_node 16 with 16 GB GPUs: LLaMA-65B (about 137 GB) needs 10 GPUs, which the
    start-up check accepts; the job's resources must ask for them, not stop at 8."""
    cfg = copy.deepcopy(PAPER)
    cfg["extraction"].update(gpu_mem_gb=16, gpus_per_node=16)
    e = Registry.from_config(cfg)["llama-65b"]
    assert e.gpus() == 10
    assert e.resources()["gpu"] == 10
