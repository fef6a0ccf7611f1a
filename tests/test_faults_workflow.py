"""Faults at the workflow level: killed jobs, a held lock, a job that fails for good; and the
small demo's analysis rerun under ids and settings that must not change its numbers.

A smaller demo (64 stimuli) runs once per module in a copy of the project with ``--keep-going``;
every test then works on its own copy of that finished directory (metadata and mtimes kept), so
the tests do not depend on each other. Where a later stage of the analysis is not runnable
(yet), the tests check what the extraction stage guarantees and say so.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from _project import SNAKEMAKE, copy_project, job_counts
from _project import run_snakemake as snakemake

pytestmark = pytest.mark.slow

CONFIG = "config/small.yaml"
DATASET = "demo"
SETUP_RULES = ("demo_stimuli", "demo_tokenizer", "demo_model", "gpa", "stimulus_sets")


#: the analysis tables (figures are left out: they cost time and add nothing here)
TARGETS = [
    f"results/dispersion/{DATASET}/loo.tsv",
    f"results/alignment/{DATASET}/grid.tsv",
    f"results/alignment/{DATASET}/layers.tsv",
    f"results/alignment/{DATASET}/contrasts.tsv",
    f"results/summary/{DATASET}.tsv",
]


def _small_config() -> dict:
    """The demo, smaller: 64 stimuli, 3 vision x 2 language models, few draws."""
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/demo.yaml").read_text())
    cfg["stimuli"]["n"] = 64
    for key in ("tiny-clip-ft", "tiny-bloom-m"):
        del cfg["models"][key]
    for entry in cfg["models"].values():  # untrained stand-ins: training adds nothing here
        entry["build"] = {k: v for k, v in entry["build"].items() if k not in ("train", "init")}
    # sets of at least 2k stimuli (xmodal.config.min_set_size): k = 5 for sets of 16
    cfg["analysis"].update(set_size=16, knn_k=5, n_random=20, n_boot=100)
    # sets of 16 of 64 leave 8 per half: too few for the held-out layer choice with k = 5
    cfg["analysis"]["heldout_layer"] = {"enabled": False}
    return cfg


def _keys(modality: str) -> list[str]:
    return [k for k, m in _small_config()["models"].items() if m["modality"] == modality]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy in which the small demo has run (``--keep-going``: as far as it gets)."""
    wd = copy_project(tmp_path_factory.mktemp("faults") / "project")
    (wd / CONFIG).write_text(yaml.safe_dump(_small_config(), sort_keys=False))
    proc = snakemake(
        wd, "--configfile", CONFIG, "--cores", "2", "--keep-going", *TARGETS, check=False
    )
    for path in [_feature(k) for k in _small_config()["models"]] + TARGETS:
        assert (wd / path).is_file(), (path, (proc.stdout + proc.stderr)[-6000:])
    return wd


@pytest.fixture
def project(finished: Path, tmp_path: Path) -> Path:
    """This test's own copy of the finished project."""
    dest = tmp_path / "project"
    shutil.copytree(finished, dest, symlinks=True)
    return dest


def _feature(key: str) -> str:
    return f"results/features/{DATASET}/{key}.h5"


def _dry(wd: Path, *args: str) -> tuple[dict[str, int], str]:
    proc = snakemake(wd, "-n", "--configfile", CONFIG, "--cores", "2", *(args or TARGETS))
    out = proc.stdout + proc.stderr
    return job_counts(out), out


def _mtimes(wd: Path) -> dict[str, int]:
    files = (p for p in (wd / "results").rglob("*.h5") if not p.name.startswith("."))
    return {str(p.relative_to(wd)): p.stat().st_mtime_ns for p in files}


def test_killed_extraction_reruns_only_that_model(project: Path) -> None:
    # a run killed during tiny-llama-s's HDF5 write: no file at its final path, a hidden temp
    # file next to it, and none of its dependants (they never got to run)
    (project / _feature("tiny-llama-s")).unlink()
    stale = project / f"results/features/{DATASET}/.tiny-llama-s.h5.k1ll3d.tmp.h5"
    stale.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 4096)
    for path in [*(project / "results/alignment").rglob("tiny-llama-s.tsv"), *TARGETS[1:]]:
        Path(project, path).unlink()
    counts, out = _dry(project)
    assert counts.get("extract") == 1 and "model=tiny-llama-s" in out, out
    # one alignment job per LLM and stage (each reads the LLM's file once for every vision model)
    assert counts.get("layer_search") == 1 and counts.get("conditions") == 1, counts
    for rule in (*SETUP_RULES, "leave_one_model_out"):
        assert rule not in counts, (rule, counts)
    before = _mtimes(project)
    snakemake(project, "--configfile", CONFIG, "--cores", "2", *TARGETS)
    after = _mtimes(project)
    assert after.pop(_feature("tiny-llama-s")) and not stale.exists()
    assert after == before  # every other model's features were kept as they were
    _, out = _dry(project)
    assert "Nothing to be done" in out, out


def test_second_run_in_the_same_directory_gets_snakemakes_lock_message(project: Path) -> None:
    vision = [_feature(k) for k in _keys("vision")]
    for path in vision:
        (project / path).unlink()  # three extractions: the first run holds the lock a while
    env = {"PATH": f"{Path(SNAKEMAKE).parent}:/usr/bin:/bin", "HOME": str(project)}
    log = project / "first.log"
    with log.open("w") as fh:
        first = subprocess.Popen(
            [SNAKEMAKE, "--configfile", CONFIG, "--cores", "1", *vision],
            cwd=project,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "rule extract" not in log.read_text():
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        second = snakemake(project, "--configfile", CONFIG, "--cores", "1", *TARGETS, check=False)
        out = second.stdout + second.stderr
        assert first.poll() is None, "the first run ended before the second one started"
    finally:
        first.wait(timeout=300)
    assert second.returncode != 0
    assert "Directory cannot be locked" in out and "--unlock" in out, out
    assert "Traceback" not in out, out
    assert first.returncode == 0, log.read_text()[-4000:]


def test_report_refuses_outputs_an_interrupted_run_left_incomplete(project: Path) -> None:
    """A run killed with SIGKILL leaves outputs Snakemake marks incomplete (it redoes them
    next time); --report used to show them as results, with exit code 0."""
    from base64 import urlsafe_b64encode

    out = TARGETS[0]
    marker = project / ".snakemake/incomplete" / urlsafe_b64encode(out.encode()).decode()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("{}")
    args = ["--configfile", CONFIG, "--report", "report.html"]
    proc = snakemake(project, *args, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (project / "report.html").exists(), text
    assert f"1 output(s) are marked incomplete by an interrupted run ({out})" in text, text


def test_job_failing_for_good_stops_only_its_dependants(project: Path) -> None:
    cfg = copy.deepcopy(_small_config())
    broken = project / "resources/broken-llm"
    broken.mkdir(parents=True)
    (broken / "README").write_text("not a model\n")
    cfg["models"]["broken-llm"] = {
        "modality": "language",
        "id": "resources/broken-llm",
        "size_b": 0.0001,
    }
    (project / "config/broken.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    # finished work that must survive, and work that must still get done despite the failure
    redo = f"results/alignment/{DATASET}/layers/tiny-llama-s.tsv"
    (project / redo).unlink()
    before = _mtimes(project)
    args = ["--configfile", "config/broken.yaml", "--cores", "2", "--keep-going", *TARGETS]
    proc = snakemake(project, *args, "--retries", "2", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Error in rule extract" in out and "model=broken-llm" in out, out
    assert "logs/extract/demo/broken-llm.log" in out
    log = (project / "logs/extract/demo/broken-llm.log").read_text()
    assert "resources/broken-llm: no config.json" in log and "Traceback" not in log, log
    # the profile's retries: attempts 2 and 3 stop before loading anything
    # (xmodal.attempts.fail_attempt)
    assert "attempt 3 not run: the attempt before it failed with an error" in log, log
    assert (project / redo).is_file(), out[-4000:]  # independent work went on
    features = project / f"results/features/{DATASET}"
    # no file; only the mark of the failed attempt, which the next run reads
    assert [p.name for p in features.glob("*broken-llm*")] == [".broken-llm.h5.attempt"]
    mark = features / ".broken-llm.h5.attempt"
    assert "fails again on retry: ExtractionError: resources/broken-llm: no" in mark.read_text()
    # a new run retries it, whatever the earlier run's attempts failed with (onstart: a dry
    # run, and one with nothing to do, keep the record)
    broken = ["--configfile", "config/broken.yaml", "--cores", "1"]
    table = f"results/alignment/{DATASET}/models.tsv"  # made again: a model was added
    # and an analysis job's record, next to its log (scripts/_bootstrap.py)
    logged = project / f"logs/dispersion/{DATASET}/.gpa.log.attempt"
    logged.write_text("fails again on retry: TableError: an earlier run's\n")
    for args in (["-n", table], [_feature("tiny-mae")]):
        snakemake(project, *broken, *args)
        assert "fails again on retry" in mark.read_text() and logged.exists()
    snakemake(project, *broken, table)
    assert "fails again on retry" not in mark.read_text() and mark.read_text()
    assert not logged.exists()  # nothing else in it: the mark goes
    assert not list(features.glob(".*.tmp.h5"))
    reasons = [line for line in out.splitlines() if "reason:" in line or "wildcards:" in line]
    assert _mtimes(project) == before, reasons  # finished outputs were not redone or removed
    for path in TARGETS:
        assert (project / path).is_file(), path
    assert not list((project / "results/alignment").rglob("broken-llm.tsv"))


def test_set_size_larger_than_the_stimuli_fails_naming_the_key(project: Path) -> None:
    cfg = _small_config()
    cfg["analysis"]["set_size"] = 40  # > 64 / 2
    (project / "config/bigk.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    sets = project / f"results/dispersion/{DATASET}/sets.tsv"
    before = sets.read_bytes()
    args = ["--configfile", "config/bigk.yaml", "--cores", "1", "--until", "stimulus_sets"]
    proc = snakemake(project, *args, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    # refused while the workflow is read, before any job (it used to stop at stimulus_sets,
    # after every extraction: on a cluster, after the GPU jobs)
    message = "for 64 stimuli: config key 'analysis.set_size' (40) is larger than half the 64"
    assert message in out and "set it to at most 32" in out and "Traceback" not in out, out
    assert "Select jobs to execute" not in out, out
    assert sets.read_bytes() == before and not list(sets.parent.glob(".*.tmp*"))


def test_a_manifest_to_make_again_from_other_settings_is_made_alone_first(
    project: Path,
) -> None:
    """stimuli.seed changed. Before, one run made the manifest again and extracted nothing
    (Snakemake skips jobs downstream of a rerunning job through an `ancient` input), so its
    tables mixed the new stimuli's properties with the old features, exit 0. Now that run
    stops, naming the keys and the command; the manifest alone is made; the next run
    re-extracts every model. A dry run warns and changes nothing."""
    cfg = _small_config()
    cfg["stimuli"]["seed"] = 1
    (project / "config/seed1.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    manifest = f"resources/stimuli/{DATASET}/stimuli.tsv"
    old = (project / manifest).read_bytes()
    seed1 = ("--configfile", "config/seed1.yaml", "--cores", "2")
    proc = snakemake(project, "-n", *seed1, *TARGETS)
    out = proc.stdout + proc.stderr
    assert "a run stops here: the manifest" in out and "'seed': 1" in out, out[-3000:]
    for quiet in (("--unlock",), ("--summary",), ("--list-rules",)):  # commands that run no job
        assert snakemake(project, *quiet, "--configfile", "config/seed1.yaml").returncode == 0
    proc = snakemake(project, *seed1, *TARGETS, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "'seed': 0" in out and "'seed': 1" in out, out[-3000:]
    advice = f"`snakemake <your options> --forcerun demo_stimuli -- {manifest}`"
    assert f"Make it alone first ({advice})" in out, out[-3000:]
    assert (project / manifest).read_bytes() == old
    # the manifest alone is that run, also written with ./ (an absolute path is no target of
    # Snakemake's: "No rule to produce")
    for target in (manifest, f"./{manifest}"):
        proc = snakemake(project, "-n", *seed1, "--forcerun", "demo_stimuli", "--", target)
        out = proc.stdout + proc.stderr
        assert "a run stops here" not in out and "demo_stimuli" in out, (target, out[-2000:])
    # the advice works whatever Snakemake's triggers say (here: params are not one)
    snakemake(
        project, *seed1, "--rerun-triggers", "mtime", "--forcerun", "demo_stimuli", "--", manifest
    )
    assert (project / manifest).read_bytes() != old
    proc = snakemake(project, "-n", *seed1, *TARGETS)
    out = proc.stdout + proc.stderr
    extracted, rule = set(), ""
    for line in out.splitlines():
        rule = line if line.startswith("rule ") else rule
        if rule.startswith("rule extract:") and "wildcards:" in line:
            extracted.add(line.split("model=")[1].split(",")[0].strip())
    assert extracted == set(cfg["models"]), out[-3000:]


def test_a_nuisance_design_in_the_config_makes_the_demo_stimuli_again(project: Path) -> None:
    """stimuli.nuisance_beta set on a finished demo: its stimuli are other stimuli, so the run
    stops as for any other stimuli setting; the manifest made alone records the design and
    holds levels drawn from it; the next dry run re-extracts without stopping."""
    from xmodal.demo.stimuli import sample_scenes
    from xmodal.stimuli import read_manifest

    cfg = _small_config()
    cfg["stimuli"]["nuisance_beta"] = [1.3, 4]
    (project / "config/design.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    manifest = f"resources/stimuli/{DATASET}/stimuli.tsv"
    design = ("--configfile", "config/design.yaml", "--cores", "2")
    proc = snakemake(project, "-n", *design, *TARGETS)
    out = proc.stdout + proc.stderr
    assert "a run stops here: the manifest" in out and "'nuisance_beta': [1.3, 4.0]" in out, out
    snakemake(project, *design, "--forcerun", "demo_stimuli", "--", manifest)
    settings = json.loads((project / manifest).with_name("settings.json").read_text())
    assert settings == {"n": 64, "nuisance_beta": [1.3, 4.0], "seed": cfg["stimuli"]["seed"]}
    table = read_manifest(project / manifest)  # annotation columns are read as text
    scenes = sample_scenes(64, cfg["stimuli"]["seed"], "eval", nuisance_beta=(1.3, 4.0))
    np.testing.assert_allclose(
        table["nuisance"].astype(float), [s.nuisance for s in scenes], atol=5e-5
    )
    proc = snakemake(project, "-n", *design, *TARGETS)
    out = proc.stdout + proc.stderr
    assert "a run stops here" not in out and "rule extract:" in out, out[-3000:]


def test_unconfigured_model_key_matches_no_rule(finished: Path) -> None:
    """Wildcards are limited to configured keys: a crafted target path is not buildable."""
    for target in (
        _feature("not-configured"),
        f"results/features/{DATASET}/../../../../tmp/evil.h5",
    ):
        proc = snakemake(
            finished, "-n", "--configfile", CONFIG, "--cores", "1", target, check=False
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "MissingRuleException" in out, out
        assert "Traceback" not in out, out


#: common.smk's resource functions that size a rule and grow with each retry
SIZED_BY = ("retry_resources", "gpa_resources", "loo_resources", "pair_resources")


def test_analysis_memory_grows_with_each_retry() -> None:
    """A job killed for exceeding its memory is resubmitted (profile `retries`) with more."""
    root = Path(__file__).resolve().parents[1]
    from xmodal.resources import ANALYSIS_KINDS, analysis_resources

    rules = "".join(p.read_text() for p in (root / "workflow/rules").glob("*.smk"))
    assert "analysis_resources(kind, attempt)" in rules  # retry_resources, in common.smk
    for kind in ANALYSIS_KINDS:
        first, third = analysis_resources(kind, 1), analysis_resources(kind, 3)
        assert third["mem_mb"] == 3 * first["mem_mb"] and third["runtime"] == 3 * first["runtime"]
    for rule in ("gpa", "leave_one_model_out", "stimulus_sets", "layer_search",
                 "vision_bootstrap", "conditions"):  # fmt: skip
        body = rules.split(f"\nrule {rule}:\n")[1].split("\nrule ")[0]
        assert any(f"**{f}(" in body for f in SIZED_BY), rule
    # every rule that SLURM runs sets its own memory and runtime: a --default-resources on
    # the command line replaces the profile's whole list, and vision_diagnostics, language_gpa,
    # image_properties and stimuli_report were left with neither (no -t, Snakemake's guess of
    # memory from the input size)
    for chunk in rules.split("\nrule ")[1:]:
        name, body = chunk.split(":", 1)[0], chunk.split("\n\n\n")[0]
        if "localrule: True" in body:
            continue
        sized = any(f"**{f}(" in body for f in SIZED_BY)
        assert sized or ("mem_mb=" in body and "runtime=" in body), name
    slurm = yaml.safe_load((root / "profiles/slurm/config.yaml").read_text())
    assert int(slurm["retries"]) >= 1 and slurm.get("rerun-incomplete") is True


def test_a_manifest_edit_copied_in_with_an_older_time_reruns_what_reads_it(
    project: Path,
) -> None:
    """A corrected manifest copied in with its older time (cp -p, rsync -a) left the stimulus
    properties, which read the manifest by time, as they were: "Nothing to be done" and the
    old annotations' values (audit). The call that sees the new content gives the manifest the
    current time: the properties are made again, and no model is extracted."""
    import os

    from xmodal.stimuli import read_manifest, write_manifest

    props = f"results/properties/{DATASET}/properties.tsv"
    snakemake(project, "--configfile", CONFIG, "--cores", "2", props)
    manifest = project / f"resources/stimuli/{DATASET}/stimuli.tsv"
    df = read_manifest(manifest)
    old = manifest.stat().st_mtime - 3600
    write_manifest(df.assign(nuisance=[f"{1 - float(v):.6g}" for v in df["nuisance"]]), manifest)
    os.utime(manifest, (old, old))
    _properties_follow_the_inverted_nuisance(project, df)


def _properties_follow_the_inverted_nuisance(project: Path, df: pd.DataFrame) -> str:
    """After the manifest's ``nuisance`` became 1 - nuisance (``df``: before): the stimulus
    properties, and no extraction, are planned, made, hold the new values and are then up to
    date. Returns the dry run's output."""
    from xmodal.io import read_table

    props = f"results/properties/{DATASET}/properties.tsv"
    counts, out = _dry(project, props)
    assert counts.get("stimulus_properties") == 1 and "extract" not in counts, out[-3000:]
    snakemake(project, "--configfile", CONFIG, "--cores", "2", props)
    table = read_table(project / props)
    got = table[table["property"] == "manifest:nuisance"].set_index("stimulus_id")["value"]
    want = 1 - df.set_index("stimulus_id")["nuisance"].astype(float)
    np.testing.assert_allclose(got.loc[want.index], want, atol=1e-6)
    assert _dry(project, props)[0] == {}
    return out


def test_a_manifest_whose_time_cannot_be_set_is_let_through_when_newer_than_its_readers(
    project: Path,
) -> None:
    """A lab's stimuli, shared read-only, whose keeper fixed the manifest in place: every call
    stopped ("its modification time cannot be set"), though the manifest was newer than every
    result read from it, so Snakemake reran those steps anyway (audit of 2026-12-07 as a user
    who cannot write there; here the file is made immutable, which stops root too). Now such a
    call goes on; with a result of those steps newer than the manifest, it stops, naming every
    such result: the list of readers is checked against Snakemake's plan (every job's inputs)."""
    import os

    from xmodal.stimuli import read_manifest, write_manifest

    manifest = project / f"resources/stimuli/{DATASET}/stimuli.tsv"
    rel = str(manifest.relative_to(project))
    # every job of the default target, with its inputs and outputs, as Snakemake lists them
    plan = snakemake(project, "-n", "--forceall", "--configfile", CONFIG, "--cores", "1").stdout
    readers = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", plan):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        files = dict(re.findall(r"^\s+(input|output): (.*)$", block, flags=re.M))
        if rule and rel in files.get("input", "").split(", "):
            if rule[1] not in ("extract", "manifest_stamp"):  # these follow its content
                readers += files["output"].split(", ")
    assert len(readers) >= 7, plan[-3000:]  # stimuli report, properties, provenance, gallery
    props = f"results/properties/{DATASET}/properties.tsv"
    df = read_manifest(manifest)

    def edit(values):
        subprocess.run(["chattr", "-i", str(manifest)], check=False, capture_output=True)
        write_manifest(df.assign(nuisance=values), manifest)  # in place: a new time
        if subprocess.run(["chattr", "+i", str(manifest)], capture_output=True).returncode:
            pytest.skip("chattr +i is not possible here (not root, or the file system)")
        with pytest.raises(PermissionError):
            os.utime(manifest)

    try:
        edit([f"{1 - float(v):.6g}" for v in df["nuisance"]])
        out = _properties_follow_the_inverted_nuisance(project, df)
        assert "its time cannot be set" in out and "so they run again" in out, out[-3000:]
        # edited again, but results of those steps are newer than it: refused, each named
        edit([f"{float(v) / 2:.6g}" for v in df["nuisance"]])
        later = manifest.stat().st_mtime + 5
        for path in readers:
            (project / path).parent.mkdir(parents=True, exist_ok=True)
            (project / path).touch()
            os.utime(project / path, (later, later))
        proc = snakemake(project, "-n", "--configfile", CONFIG, "--cores", "2", props, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "its modification time cannot be set" in out, out[-3000:]
        for path in readers:
            assert f"'{path}'" in out, (path, out[-3000:])
    finally:
        subprocess.run(["chattr", "-i", str(manifest)], check=False, capture_output=True)


def test_results_of_a_control_switched_off_are_named_as_left_over(project: Path) -> None:
    """A control switched off (or a metric taken out) left its earlier tables and figures next
    to the current ones, not updated and unmentioned (audit: a self-selection summary of an
    earlier set size). A call of the default target names them; one of chosen targets not.
    So are the per-LLM tables of a language model taken out of the config (audit), not those
    of the models in it."""
    left = [
        project / f"results/summary/{DATASET}_heldout.tsv",  # heldout_layer is off here
        project / f"results/figures/{DATASET}/sets_rank.cka.png",  # cka is not a metric here
        project / f"results/alignment/{DATASET}/conditions/gone-llm.tsv",  # no such LLM
    ]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from an earlier run\n")
    proc = snakemake(project, "-n", "--configfile", CONFIG, "--cores", "1")
    out = proc.stdout + proc.stderr
    assert "3 results of an earlier run that this config does not make" in out, out[-3000:]
    for path in left:
        assert str(path.relative_to(project)) in out
    counts, out = _dry(project)  # chosen targets
    assert "results of an earlier run" not in out


def test_numeric_looking_ids_give_the_same_numbers_as_prefixed_ids(project: Path) -> None:
    """The whole workflow on the same stimuli under ids pandas would have turned into numbers
    or missing values: every table keeps the ids as written, every number is unchanged."""
    from xmodal.io import read_table
    from xmodal.stimuli import read_manifest, write_manifest

    manifest = project / f"resources/stimuli/{DATASET}/stimuli.tsv"
    df = read_manifest(manifest)
    tricky = ["0180", "180", "1.50", "1.5", "NA", "nan", "null", "None", "True", "1e3", "-0",
              "007", "7", " 7", "a b", "#1"]  # fmt: skip
    new_ids = tricky + [f"{i:04d}" for i in range(len(df) - len(tricky))]
    rename = dict(zip(df["stimulus_id"], new_ids, strict=True))
    before = {t: read_table(project / t) for t in TARGETS}
    disp_path = f"results/dispersion/{DATASET}/dispersion.tsv"
    before_disp = read_table(project / disp_path)
    write_manifest(df.assign(stimulus_id=new_ids), manifest)
    snakemake(project, "--configfile", CONFIG, "--cores", "2", *TARGETS, disp_path)

    after_disp = read_table(project / disp_path)
    assert after_disp["stimulus_id"].tolist() == [rename[s] for s in before_disp["stimulus_id"]]
    np.testing.assert_array_equal(after_disp["mean_dispersion"], before_disp["mean_dispersion"])
    sets = read_table(project / f"results/dispersion/{DATASET}/sets.tsv")
    assert set(sets["stimulus_id"]) <= set(new_ids)
    for target in TARGETS:
        a, b = before[target], read_table(project / target)
        assert list(a.columns) == list(b.columns), target
        for col in a.select_dtypes("number").columns:
            np.testing.assert_array_equal(b[col].to_numpy(), a[col].to_numpy(), err_msg=target)


def test_all_metrics_in_the_grid_leave_cknna_unchanged(project: Path) -> None:
    """analysis.metrics with all four metrics: every table carries the metric, CKNNA's numbers
    are those of the CKNNA-only run, the CKA values are the library's reference functions on
    the prepared layers, and only the kNN metrics get a bootstrap (docs/method.md, metrics)."""
    from xmodal import metrics as mt
    from xmodal.features import FeatureFile
    from xmodal.io import read_table
    from xmodal.pipeline import prepared_layer

    names = ["cknna", "mutual_knn", "unbiased_cka", "cka"]
    before = {t: read_table(project / t) for t in TARGETS}
    cfg = _small_config()
    cfg["analysis"]["metrics"] = names
    (project / "config/metrics.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    snakemake(project, "--configfile", "config/metrics.yaml", "--cores", "2", *TARGETS)
    grid, layers, contrasts, summary = (
        read_table(project / f"results/{t}")
        for t in (
            f"alignment/{DATASET}/grid.tsv",
            f"alignment/{DATASET}/layers.tsv",
            f"alignment/{DATASET}/contrasts.tsv",
            f"summary/{DATASET}.tsv",
        )
    )
    for table in (grid, layers, contrasts, summary):
        assert set(table["metric"]) == set(names)
    for target, table in zip(TARGETS[1:], (grid, layers, contrasts, summary), strict=True):
        old = before[target].reset_index(drop=True)
        new = table[table["metric"] == "cknna"].reset_index(drop=True)
        pd.testing.assert_frame_equal(
            new[old.columns], old, check_exact=True, check_dtype=False, obj=target
        )
    chosen = layers[layers["chosen"]]
    assert len(chosen) == len(_keys("vision")) * len(_keys("language")) * len(names)
    for row in chosen[chosen["metric"].isin(["unbiased_cka", "cka"])].itertuples():
        with (
            FeatureFile(project / _feature(row.vision)) as fv,
            FeatureFile(project / _feature(row.llm)) as fl,
        ):
            x, y = prepared_layer(fv, int(row.vision_layer)), prepared_layer(fl, int(row.llm_layer))
        ref = (mt.unbiased_cka if row.metric == "unbiased_cka" else mt.cka)(x, y)
        assert abs(row.value - ref) < 1e-5, (row.vision, row.llm, row.metric, row.value, ref)
    boot = contrasts.groupby("metric")["n_boot"].max()
    assert (boot[["cknna", "mutual_knn"]] > 0).all() and (boot[["unbiased_cka", "cka"]] == 0).all()
    cka_rows = summary[summary["metric"].isin(["unbiased_cka", "cka"])]
    assert cka_rows["n_diff_ci_above_zero"].isna().all()
    assert summary.loc[summary["metric"] == "cknna", "n_diff_ci_above_zero"].notna().all()
