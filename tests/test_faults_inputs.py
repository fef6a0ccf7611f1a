"""Bad input and faults at the library level: each ends in one clear message, no partial output.

Covers what the other test files do not (see docs/troubleshooting.md for the full table):
config errors as a user sees them from ``snakemake -n``, truncated / non-image / huge images,
non-UTF-8 manifests, corrupt and truncated HDF5, models that need repository code, access
tokens never logged or stored, a full disk, and a writer killed with SIGKILL mid-write.
"""

from __future__ import annotations

import copy
import datetime
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from xmodal.config import (
    DATASET_KEY,
    GPU_MODEL,
    MODEL_KEY,
    ConfigError,
    check_against_stimuli,
    check_config,
    load_config_file,
    non_finite_numbers,
    normalise_integers,
    schema_errors,
)
from xmodal.features import FeatureFile, FeatureFileError, write_features
from xmodal.io import DiskFullError, write_table
from xmodal.stimuli import ImageDataset, StimulusError, load_rgb, read_manifest

ROOT = Path(__file__).resolve().parents[1]
ATTRS = {"model_id": "org/tiny", "model_key": "tiny", "modality": "language", "source": "test"}
FAKE_TOKEN = "hf_" + "Zq7" * 12  # shaped like a Hugging Face token; never a real one


def _features(
    n_layers: int = 3, m: int = 7, dim: int = 5
) -> tuple[np.ndarray, list[str], list[str]]:
    x = np.random.default_rng(0).standard_normal((n_layers, m, dim)).astype(np.float32)
    return x, [f"s{i}" for i in range(m)], [f"layers.{i}" for i in range(n_layers)]


# ======================================================================= config, as the user sees it
@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project (no results) for dry runs with bad configs."""
    from _project import copy_project

    return copy_project(tmp_path_factory.mktemp("cfg") / "project")


def _demo_cfg() -> dict:
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


def _unknown_key(cfg: dict) -> None:
    cfg["analysis"]["sett_size"] = 3


def _wrong_type(cfg: dict) -> None:
    cfg["analysis"]["set_size"] = "sixteen"


def _unsafe_key(cfg: dict) -> None:
    cfg["models"]["../../etc"] = cfg["models"].pop("tiny-mae")


def _two_vision(cfg: dict) -> None:
    for key in ("tiny-mae", "tiny-dinov2"):
        del cfg["models"][key]


def _k_ge_set_size(cfg: dict) -> None:
    cfg["analysis"]["knn_k"] = cfg["analysis"]["set_size"]


def _few_resamples(cfg: dict) -> None:
    cfg["analysis"]["n_boot"] = 3


def _few_random_sets(cfg: dict) -> None:
    cfg["analysis"]["drop_control"] = {"n_random": 2}


def _tol_as_text(cfg: dict) -> None:
    cfg["analysis"]["gpa"]["tol"] = "1e-10"  # what YAML 1.1 makes of an unquoted 1e-10


def _negative_seed(cfg: dict) -> None:
    cfg["analysis"]["seed"] = -1  # used to fail mid-run in numpy, naming no key


def _tol_one(cfg: dict) -> None:
    cfg["analysis"]["gpa"]["tol"] = 1.0  # "converged" after one iteration


def _tiny_set_size(cfg: dict) -> None:
    cfg["analysis"].update(set_size=3, knn_k=2)


def _model_too_big(cfg: dict) -> None:
    cfg["extraction"].update(gpu_mem_gb=16, gpus_per_node=1)
    cfg["models"]["tiny-bloom-s"]["size_b"] = 70


def _missing_local_dir(cfg: dict) -> None:
    cfg["models"]["tiny-mae"].pop("build")
    cfg["models"]["tiny-mae"]["id"] = "./models/not-there"


def _demo_key_with_local_source(cfg: dict) -> None:
    cfg["stimuli"]["source"] = "local"  # keeps n, seed and train, which only the demo reads


def _gpu_model_with_hyphen(cfg: dict) -> None:
    cfg["extraction"]["gpu_model"] = "a100-80gb"


def _metrics_without_cknna(cfg: dict) -> None:
    cfg["analysis"]["metrics"] = ["mutual_knn"]


def _metrics_without_cknna_at_a_depth(cfg: dict) -> None:
    cfg["analysis"]["metrics"] = ["mutual_knn"]
    cfg["analysis"].setdefault("language_dispersion", {})["layer"] = 0.5


CONFIG_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    # schema errors: one line per problem naming the config file and the dotted key
    "unknown_key": (
        _unknown_key,
        r"Invalid configuration in \S*unknown_key\.yaml: key 'analysis': "
        r"Additional properties are not allowed \('sett_size'",
    ),
    "wrong_type": (
        _wrong_type,
        r"Invalid configuration in \S*wrong_type\.yaml: key 'analysis\.set_size': "
        r"'sixteen' is not of type 'integer'",
    ),
    "numeric_model_key": (
        lambda cfg: cfg["models"].update({123: cfg["models"].pop("tiny-mae")}),
        r"numeric_model_key\.yaml: key 123 at line \d+: YAML 1\.1 reads it as the number 123, "
        r"and keys are names: put it in quotes \('123'\)",
    ),
    "boolean_nested_key": (  # `on:` in a section: the schema named it True (review)
        lambda cfg: cfg["analysis"].update({True: 1}),
        r"boolean_nested_key\.yaml: key true at line \d+: YAML 1\.1 reads it as the boolean "
        r"True, and keys are names: put it in quotes \('true'\)",
    ),
    "octal_id": (  # `id: 012` in YAML is the number 10
        lambda cfg: cfg["models"]["tiny-mae"].update(id=10),
        r"key 'models\.tiny-mae\.id': 10 is not of type 'string' \(YAML read the value as a "
        r"number: unquoted 012 is the octal number 10",
    ),
    "unsafe_model_key": (
        _unsafe_key,
        r"Invalid configuration in \S*unsafe_model_key\.yaml: key 'models': "
        r"'\.\./\.\./etc' does not match",
    ),
    # xmodal.config.check_config, through a WorkflowError: one message
    "fewer_than_3_vision": (_two_vision, r"'models': GPA .* at least 3 vision models, found 2"),
    "k_ge_set_size": (_k_ge_set_size, r"'analysis.knn_k' \(\d+\) is more than half of"),
    "tol_as_text": (
        _tol_as_text,
        r"'analysis.gpa.tol': '1e-10' is not of type 'number' "
        r"\(YAML 1.1 reads 1e-10 as text: .*1.0e-10",
    ),
    "negative_seed": (_negative_seed, r"'analysis.seed': -1 is less than the minimum of 0"),
    "tol_one": (_tol_one, r"'analysis.gpa.tol': 1.0 is greater than or equal to the maximum"),
    # 3 resamples made "intervals above 0" in 10 of 12 pairs where 200 made none
    "n_boot_3": (_few_resamples, r"'analysis.n_boot' \(3\) is too few resamples .* at least 100"),
    # 1 or 2 draws put drop sets "outside the random 95% interval" in 2 of 3 pairs of no effect
    "n_random_2": (
        _few_random_sets,
        r"'analysis.drop_control.n_random' \(2\) is too few random sets .* at least 20",
    ),
    # before: accepted (NaN is neither below nor above a bound), then training stopped at its
    # first step with "training loss became nan"
    "lr_nan": (
        lambda cfg: cfg["models"]["tiny-mae"]["build"]["train"].update(lr=float("nan")),
        r"config key 'models\.tiny-mae\.build\.train\.lr': nan is not a finite number",
    ),
    # at start-up, not after extraction (the unbiased HSIC needs 4 stimuli per set)
    "set_size_3": (_tiny_set_size, r"'analysis.set_size' \(3\) is too small: .* at least 4"),
    # xmodal.registry: the model no node's GPUs can hold, and a local directory that is not there
    "model_too_big": (
        _model_too_big,
        r"'models.tiny-bloom-s': .*extraction.gpu_mem_gb.*extraction.gpus_per_node",
    ),
    "missing_local_dir": (_missing_local_dir, r"'models.tiny-mae.id': './models/not-there' looks"),
    # before: silently ignored (all the manifest's stimuli analysed)
    "demo_key_with_local_source": (
        _demo_key_with_local_source,
        r"'stimuli.n' is read only with 'stimuli.source: demo'.*source 'local'",
    ),
    # before: accepted, then refused by the SLURM plugin at the first submission, naming no key
    "gpu_model_with_hyphen": (
        _gpu_model_with_hyphen,
        r"key 'extraction\.gpu_model': 'a100-80gb' does not match",
    ),
    # before: accepted, then language_gpa failed after the layer searches ("rerun its layer search")
    "metrics_without_cknna": (
        _metrics_without_cknna,
        r"'analysis.metrics': .*2 × 2 sets by CKNNA.*\(\['mutual_knn'\]\) has no cknna",
    ),
    # before: accepted, then the 2 × 2 job failed with "the layer search is older than the
    # config (rerun it)", which no rerun could fix
    "metrics_without_cknna_at_a_depth": (
        _metrics_without_cknna_at_a_depth,
        r"'analysis.metrics': .*2 × 2 sets by CKNNA.*\(\['mutual_knn'\]\) has no cknna",
    ),
    # before: accepted and ignored (the extraction logged that it ignored it), and a change
    # re-extracted the model for nothing
    "revision_of_a_built_model": (
        lambda c: c["models"]["tiny-mae"].update(revision="v1.0"),
        r"'models\.tiny-mae\.revision': 'v1\.0' pins a hub commit, and this model is built by "
        r"the demo \(build\): nothing would read it",
    ),
    # before: accepted and ignored, the MAE trained from its own random start
    "init_of_a_mae": (
        lambda c: c["models"]["tiny-mae"]["build"].update(init="tiny-clip"),
        r"models\.tiny-mae\.build\.init: only a clip_ft model starts from another",
    ),
    # before: trained on the 3000 scenes there are, and recorded n_scenes 999999
    "more_scenes_than_there_are": (
        lambda c: c["models"]["tiny-mae"]["build"]["train"].update(n_scenes=999999),
        r"models\.tiny-mae\.build\.train\.n_scenes: 999999 scenes asked for, and there are "
        r"3000 \(stimuli\.train\.n\)",
    ),
    # before: accepted, then the build job failed in torch ("Overflow when unpacking long long")
    "build_seed_beyond_64_bits": (
        lambda c: c["models"]["tiny-mae"]["build"].update(seed=2**64),
        r"key 'models\.tiny-mae\.build\.seed': 18446744073709551616 is greater than the maximum",
    ),
}


def _dry_run(project: Path, config_text: str, name: str) -> subprocess.CompletedProcess:
    from _project import run_snakemake as snakemake

    (project / "config" / name).write_text(config_text)
    return snakemake(project, "-n", "--configfile", f"config/{name}", "--cores", "1", check=False)


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_one_message_naming_the_key(project: Path, case: str) -> None:
    edit, pattern = CONFIG_CASES[case]
    cfg = copy.deepcopy(_demo_cfg())
    edit(cfg)
    proc = _dry_run(project, yaml.safe_dump(cfg, sort_keys=False), f"{case}.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert re.search(pattern, out), out
    assert "Traceback" not in out, out
    assert not (project / "results").exists()


def test_chosen_annotation_columns_are_checked_at_start_up(project: Path) -> None:
    """A column ``analysis.annotations`` names that the manifest lacks, or that holds other text
    than numbers, stops the run at start-up naming the key, the manifest and the column (with
    the stimulus of a bad field); without the setting such a column is only left out."""
    from xmodal.demo.stimuli import generate_stimuli
    from xmodal.stimuli import write_manifest

    manifest = project / "resources/stimuli/annot/stimuli.tsv"
    generate_stimuli(manifest.parent, n=12, seed=0)
    cfg = _demo_cfg()
    cfg["dataset"], cfg["stimuli"] = "annot", {"source": "local"}
    cfg["analysis"].update(set_size=4, knn_k=2, annotations=["nuisance", "ratng"])
    cfg["analysis"]["heldout_layer"]["enabled"] = False  # its halves of 12 stimuli are too small
    proc = _dry_run(project, yaml.safe_dump(cfg, sort_keys=False), "annot.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert re.search(
        r"config key 'analysis\.annotations' \(\['nuisance', 'ratng'\]\), manifest \S*"
        r"stimuli\.tsv: no column 'ratng' in the manifest \(its annotation columns: "
        r"\['nuisance', 'clutter', 'occlusion', 'background', 'blur'\]\)",
        out,
    ), out
    table = read_manifest(manifest)
    table.loc[3, "clutter"] = "0,5"
    write_manifest(table, manifest)
    cfg["analysis"]["annotations"] = ["clutter"]
    proc = _dry_run(project, yaml.safe_dump(cfg, sort_keys=False), "annot.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    sid = table.loc[3, "stimulus_id"]
    assert "manifest column 'clutter': 1 of its 12 filled fields are not finite numbers" in out
    assert f"[\"{sid}: '0,5'\"] (1 in all); write plain numbers, with '.' as the decimal" in out
    # every numeric column: clutter is left out with a warning at start-up, no error; and so is
    # a column of percentages, which the properties job used to leave out at info level
    del cfg["analysis"]["annotations"]
    table["coverage"] = [f"{5 * i}%" for i in range(len(table))]
    write_manifest(table, manifest)
    proc = _dry_run(project, yaml.safe_dump(cfg, sort_keys=False), "annot.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "manifest column 'clutter': 1 of its 12 filled fields are not finite numbers" in out
    assert "manifest column 'coverage' holds numbers in a form that is not read" in out, out
    assert out.count("the column is left out of the stimulus properties") == 2, out
    shutil.rmtree(manifest.parent)


def test_a_number_yaml_reads_as_octal_or_base_60_names_file_line_and_key(project: Path) -> None:
    """YAML 1.1 reads ``set_size: 0120`` as 80 and ``knn_k: 1:10`` as 70: the run went on with
    another set size than the one written. Refused at start-up naming the file, line and key;
    a leading zero that changes nothing (``007``) and quoted text pass."""
    text = (ROOT / "config" / "demo.yaml").read_text()
    for written, read, base in (("0120", 80, "octal"), ("2:00", 120, "base 60")):
        bad = text.replace("  set_size: 120\n", f"  set_size: {written}\n", 1)
        assert bad != text
        proc = _dry_run(project, bad, "octal.yaml")
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Traceback" not in out, out
        line = bad[: bad.index(f"set_size: {written}")].count("\n") + 1
        assert (
            f"config/octal.yaml: key 'set_size' at line {line}: YAML 1.1 reads {written} as "
            f"{read} ({base}); write the number without a leading zero or colon" in out
        ), out
    ok = text.replace("  seed: 0\n", "  seed: 00\n")
    assert ok != text
    proc = _dry_run(project, ok, "octal.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_keys_and_values_yaml_reads_otherwise_are_named_as_written(tmp_path: Path) -> None:
    """A model key `010:` was named 'models.8' and `on:` 'models.True', with the advice to quote
    '8' and 'True' (the second then failing the key pattern); `knn_k: 08` (text: 8 is no octal
    digit) got no hint; a nested number given with --config to a key of several forms was told
    to "write it unquoted", which it was. Each is named as written now."""
    from xmodal.config import ConfigError, load_config_file, schema_errors

    for written, read in (
        ("010", "the number 8"),
        ("on", "the boolean True"),
        ("1.5", "the number 1.5"),
    ):
        path = tmp_path / "keys.yaml"
        path.write_text(
            f"models:\n  tiny-mae: {{modality: vision}}\n  {written}: {{modality: vision}}\n"
        )
        with pytest.raises(ConfigError) as err:
            load_config_file(path)
        assert str(err.value) == (
            f"{path}: key {written} at line 3: YAML 1.1 reads it as {read}, and keys are names: "
            f"put it in quotes ('{written}')"
        )
    path.write_text("models:\n  '010': {modality: vision}\n  'on': {}\n")
    assert set(load_config_file(path)["models"]) == {"010", "on"}
    schema = ROOT / "workflow" / "schemas" / "config.schema.yaml"
    cfg = _demo_cfg()
    cfg["analysis"]["knn_k"] = "08"
    (line,) = schema_errors(cfg, schema, "config/x.yaml")
    assert line.endswith(
        "'08' is not of type 'integer' (YAML 1.1 reads 08 as text: a leading zero makes a number "
        "octal, and 8 and 9 are no octal digits; write the number without the leading zero)"
    ), line
    cfg = _demo_cfg()
    cfg["analysis"].setdefault("language_dispersion", {})["layer"] = "0.5"
    given = {"analysis": {"language_dispersion": {"layer": "0.5"}}}
    (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line=given)
    assert line.startswith(
        "Invalid configuration in --config: key 'analysis.language_dispersion.layer'"
    )
    assert "--config gives every value inside analysis={...} as text" in line, line
    assert "unquoted" not in line, line
    # a value that no form accepts, read as text or not: the forms, not a move to a YAML file
    # (where it is refused as well; audit)
    cfg["analysis"]["language_dispersion"]["layer"] = "last"
    given["analysis"]["language_dispersion"]["layer"] = "last"
    (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line=given)
    assert line.startswith(
        "Invalid configuration in --config: key 'analysis.language_dispersion.layer'"
    )
    assert "as text" not in line and "'chosen' was expected" in line, line
    # nor for a number that a config file refuses too (010 is octal 8 in YAML 1.1)
    cfg, given = _demo_cfg(), {"analysis": {"knn_k": "010"}}
    cfg["analysis"]["knn_k"] = "010"
    (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line=given)
    assert "as text" not in line, line
    cfg["analysis"]["knn_k"] = given["analysis"]["knn_k"] = "12"  # the hint where it helps
    (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line=given)
    assert "--config gives every value inside analysis={...} as text" in line, line
    # a number a config file refuses as well: why, not only "'0' is not of type 'number'"
    # (which read as if 0 were no number), nor a move to a YAML file that refuses it too
    for key, text, why in (
        ("drop_fraction", "0", "0 is less than or equal to the minimum of 0"),
        ("knn_k", "True", "True is not of type 'integer'"),
        ("set_size", "120.5", "120.5 is not of type 'integer'"),
    ):
        cfg, given = _demo_cfg(), {"analysis": {key: text}}
        cfg["analysis"][key] = text
        (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line=given)
        assert line.endswith(
            "(--config gives every value inside analysis={...} as text; in a YAML file it "
            f"would be refused too: {why})"
        ), line
    cfg, given = _demo_cfg(), {"analysis": {"language_dispersion": {"layer": "1.5"}}}
    cfg["analysis"]["language_dispersion"] = {"layer": "1.5"}
    (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line=given)
    assert "in a YAML file it would be refused too: 1.5 is not valid under" in line, line
    assert "'chosen' was expected; 1.5 is greater than the maximum of 1" in line, line
    # a key with nothing after it (its settings commented out) is null, not an empty mapping
    cfg = _demo_cfg()
    cfg["analysis"]["knn_k"] = cfg["analysis"]["drop_control"] = None
    lines = schema_errors(cfg, schema, "config/x.yaml")
    assert [line.split(": key ")[1].split(":")[0] for line in lines] == [
        "'analysis.drop_control'",
        "'analysis.knn_k'",
    ], lines
    for line in lines:
        assert line.endswith(
            "(YAML reads a key with nothing after it as null: give it a value, or remove the "
            "key where it has a default)"
        ), line


def test_a_job_refuses_a_config_edited_after_its_run_started(project: Path) -> None:
    """A SLURM job reads the config files again: edited while it was queued, it extracted in
    bfloat16 and made a table with knn_k 5 where the run had scheduled (and recorded) float32
    and 10, exit 0. The run passes its config to its jobs (XMODAL_RUN_CONFIG); a job (any
    process that is not the run's own, here --mode subprocess) with another one fails naming
    the changed keys; the same config, or none passed, goes on."""
    from _project import run_snakemake as snakemake
    from snakemake.utils import validate

    from xmodal.config import RUN_CONFIG_ENV, apply_defaults, config_json, normalise_integers

    schema = ROOT / "workflow" / "schemas" / "config.schema.yaml"
    cfg = _demo_cfg()
    normalise_integers(cfg, yaml.safe_load(schema.read_text()))
    validate(cfg, str(schema))  # its defaults, as the workflow's start-up sets them
    apply_defaults(cfg)
    (project / "config" / "job.yaml").write_text((ROOT / "config" / "demo.yaml").read_text())
    args = ("--mode", "subprocess", "-n", "--configfile", "config/job.yaml", "--cores", "1")
    target = "results/summary/demo_models.tsv"
    for env in ({RUN_CONFIG_ENV: config_json(cfg)}, {}):
        proc = snakemake(project, *args, target, env=env, check=False)
        assert "the config changed" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    scheduled = copy.deepcopy(cfg)
    scheduled["analysis"]["knn_k"] = 5
    scheduled["extraction"]["dtype"] = "float32"
    proc = snakemake(project, *args, target, env={RUN_CONFIG_ENV: config_json(scheduled)},
                     check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert (
        "the config changed after this run started (analysis.knn_k: 5 -> 10; "
        f'extraction.dtype: "float32" -> "auto", in {project}/config/job.yaml)'
    ) in out, out[-3000:]
    assert "Edit the config only between runs (docs/cluster.md)" in out


_LEAF = st.none() | st.booleans() | st.integers() | st.text(max_size=4)
_CONFIGS = st.recursive(
    st.dictionaries(st.text("abc", min_size=1, max_size=2), _LEAF, max_size=3),
    lambda inner: st.dictionaries(st.text("abc", min_size=1, max_size=2), inner, max_size=3),
    max_leaves=12,
)


@settings(deadline=None)  # the first example imports xmodal.config
@given(_CONFIGS, st.data())
def test_changed_settings_names_exactly_the_keys_that_changed(cfg, data) -> None:
    """What a job that read an edited config names: nothing for the same config, and for one
    leaf changed or removed, exactly that dotted key with both values."""
    from xmodal.config import changed_settings, config_json

    same = json.loads(config_json(cfg))
    assert changed_settings(same, json.loads(config_json(copy.deepcopy(cfg)))) == []
    paths = [p for p in _leaf_paths(same) if p]
    if not paths:
        return
    path = data.draw(st.sampled_from(paths))
    edited = copy.deepcopy(same)
    node = edited
    for part in path[:-1]:
        node = node[part]
    old = node[path[-1]]
    if data.draw(st.booleans()):
        del node[path[-1]]
        want = f"{'.'.join(path)}: {json.dumps(old)} -> absent"
    else:
        node[path[-1]] = new = ["changed"]
        want = f"{'.'.join(path)}: {json.dumps(old)} -> {json.dumps(new)}"
    assert changed_settings(same, edited) == [want]


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, dict):
        return [q for k, v in tree.items() for q in _leaf_paths(v, (*prefix, k))]
    return [prefix]


def test_memory_per_cpu_in_default_resources_is_refused(project: Path) -> None:
    """``mem_mb_per_cpu`` in default-resources (a site's usual advice) won over every job's
    computed ``mem_mb`` in the SLURM plugin: LLaMA-65B asked for 8 GB instead of 139 GiB, and
    failed after loading its weights on every retry. Refused at start-up, saying what to do."""
    from _project import run_snakemake as snakemake

    (project / "config" / "mem.yaml").write_text((ROOT / "config" / "demo.yaml").read_text())
    args = ("-n", "--configfile", "config/mem.yaml", "--cores", "1", "--default-resources")
    proc = snakemake(project, *args, "mem_mb_per_cpu=2000", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert "default-resources sets mem_mb_per_cpu (in your profile, or with --default-" in out
    assert "Remove mem_mb_per_cpu from default-resources" in out, out
    proc = snakemake(project, *args, "mem_mb=2000", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_yaml_merge_keys_work_and_unreadable_files_are_named(tmp_path: Path) -> None:
    """A config sharing settings through an anchor and a merge key (`<<: *vit`), which
    Snakemake reads, stopped every run with a PyYAML traceback; so did a --configfile of JSON
    indented with tabs (Snakemake reads it as JSON, YAML refuses tabs). Model keys YAML reads
    as null or a date were "read as a number", with advice to quote 'None'."""
    from xmodal.config import ConfigError, check_config, load_config_file

    path = tmp_path / "merge.yaml"
    path.write_text(
        "models:\n  a: &vit\n    modality: vision\n    size_b: 0.3\n"
        "  b:\n    <<: *vit\n    size_b: 0.6\n"
    )
    models = load_config_file(path)["models"]
    assert models["b"] == {"modality": "vision", "size_b": 0.6}  # its own key wins
    path.write_text("models:\n  a: &vit {modality: vision}\n  b: {<<: *vit, id: x, id: y}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'id'"):
        load_config_file(path)
    tabs = tmp_path / "tabs.json"
    tabs.write_text(json.dumps(_demo_cfg(), indent="\t"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tabs))}: not a YAML file .*tab"):
        load_config_file(tabs)
    for key, kind in ((None, "null"), (datetime.date(2024, 1, 1), "date")):
        cfg = _demo_cfg()
        cfg["models"][key] = cfg["models"].pop("tiny-mae")
        with pytest.raises(ConfigError, match=rf"YAML read this model key as a {kind} "):
            check_config(cfg)


def test_duplicate_model_key_names_file_and_lines(project: Path) -> None:
    text = (ROOT / "config" / "demo.yaml").read_text()
    block = text[text.index("  tiny-mae:") : text.index("  tiny-dinov2:")]
    dup = text.replace(block, block + block.replace("seed: 1}", "seed: 9}"), 1)
    proc = _dry_run(project, dup, "dup.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"config/dup\.yaml: duplicate key 'tiny-mae' at line \d+", out), out
    assert "Traceback" not in out, out


def test_a_nested_command_line_value_is_named_as_given_with_config(project: Path) -> None:
    """``--config 'analysis={knn_k: 10}'`` reaches the workflow as the text '10' (snakemake reads a
    mapping's values with YAML's base loader); the error blamed the config file, which says 10."""
    from _project import run_snakemake as snakemake

    proc = snakemake(
        project, "-n", "--configfile", "config/demo.yaml", "--config", "analysis={knn_k: 10}",
        "--cores", "1", check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert re.search(
        r"Invalid configuration in --config: key 'analysis\.knn_k': '10' is not of type "
        r"'integer' \(--config gives every value inside analysis=\{\.\.\.\} as text: put the "
        r"setting in a YAML file and give it with --configfile\)",
        out,
    ), out
    assert "Traceback" not in out and "demo.yaml: key" not in out, out
    # a top-level value that looks like a number is that number, even quoted (snakemake strips
    # the quotes): 007 arrives as 7
    proc = snakemake(
        project, "-n", "--configfile", "config/demo.yaml", "--config", 'dataset="007"',
        "--cores", "1", check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert (
        "Invalid configuration in --config: key 'dataset': 7 is not of type 'string' (--config "
        "reads a value that looks like a number as that number, quoted or not: set it in quotes "
        "in a YAML file and give that with --configfile)"
    ) in out, out
    # the same value from the file is named as the file's
    cfg = _demo_cfg()
    cfg["analysis"]["knn_k"] = "10"
    schema = ROOT / "workflow" / "schemas" / "config.schema.yaml"
    (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line={"analysis": {"seed": 1}})
    assert line.startswith("Invalid configuration in config/x.yaml: key 'analysis.knn_k'"), line
    # a section --config gave part of is the file's where the error is the file's; a list item
    # given on the command line is --config's; a misspelt word gets no "as text" hint
    cfg = _demo_cfg()
    cfg["analysis"]["knn_kk"] = 3
    (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line={"analysis": {"seed": 1}})
    assert line.startswith("Invalid configuration in config/x.yaml: key 'analysis'"), line
    cfg = _demo_cfg()
    cfg["analysis"]["metrics"] = ["cknna", "cknnaa"]
    given = {"analysis": {"metrics": ["cknna", "cknnaa"]}}
    (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line=given)
    assert line.startswith("Invalid configuration in --config: key 'analysis.metrics.1'"), line
    assert "as text" not in line
    # an unknown key --config gave (`--config n_boot=10`) was blamed on the file (audit): it is
    # named as --config's, with where the name is a setting; one in the file stays the file's
    cfg = {**_demo_cfg(), "n_boot": 10}
    (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line={"n_boot": 10})
    assert line.startswith("Invalid configuration in --config: key '(top level)'"), line
    assert "('n_boot' was unexpected)" in line and "a key at analysis.n_boot" in line, line
    (line,) = schema_errors(cfg, schema, "config/x.yaml", command_line={"seed": 1})
    assert line.startswith("Invalid configuration in config/x.yaml: key '(top level)'"), line


def test_unsafe_model_key_refused_by_check_config_too() -> None:
    """A config that bypasses the schema (e.g. a notebook) is still refused, naming the key."""
    cfg = _demo_cfg()
    _unsafe_key(cfg)
    with pytest.raises(ConfigError, match=r"'models\.\.\./\.\./etc'.*must match"):
        check_config(cfg)


def _numeric_keys(value: object, path: tuple = ()) -> list[tuple]:
    """Paths of every number (not boolean) in a parsed config."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [path]
    if isinstance(value, dict):
        return [q for k, v in value.items() for q in _numeric_keys(v, (*path, k))]
    if isinstance(value, list):
        return [q for i, v in enumerate(value) for q in _numeric_keys(v, (*path, i))]
    return []


def _dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _config_refusal(cfg: dict) -> str | None:
    """What start-up says of ``cfg`` (the schema's first line, else check_config's), or None."""
    lines = schema_errors(cfg, ROOT / "workflow" / "schemas" / "config.schema.yaml")
    if lines:
        return lines[0]
    try:
        check_config(cfg)
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize("name", ["demo.yaml", "demo_untrained.yaml", "../config.yaml"])
def test_every_number_of_the_configs_refused_as_nan_or_infinity_naming_its_key(name: str) -> None:
    """YAML reads ``.nan`` and ``.inf`` as numbers. NaN passed every bound of the schema (a NaN
    ``train.lr`` stopped training at its first step, a NaN ``analysis.gpa.tol`` the GPA job after
    every extraction, a NaN ``extraction.gpu_mem_gb`` was blamed on the first model), and
    ``.inf`` every key without an upper bound. Every number of the shipped configs, set to each,
    is refused at start-up by a message naming that key."""
    base = load_config_file(ROOT / "config" / name)
    paths = _numeric_keys(base)
    assert len(paths) > 30  # the walk found the configs' numbers
    for path in paths:
        for value in (float("nan"), float("inf"), float("-inf")):
            cfg = copy.deepcopy(base)
            node = cfg
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
            said = _config_refusal(cfg)
            assert said is not None, (path, value)
            assert f"'{_dotted(path)}'" in said, (path, value, said)


_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
_TREES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(st.characters(categories=["L", "N"]), max_size=6), inner, max_size=4
        )
    ),
    max_leaves=25,
)


def _leaf_paths(value: object, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict) and value:
        return [q for k, v in value.items() for q in _leaf_paths(v, (*path, k))]
    if isinstance(value, list) and value:
        return [q for i, v in enumerate(value) for q in _leaf_paths(v, (*path, i))]
    return [path] if path else []


@settings(max_examples=200, deadline=None)
@given(tree=_TREES, data=st.data())
def test_non_finite_numbers_are_found_exactly_where_planted(tree: object, data) -> None:
    """Planted NaN and infinities, anywhere in a nested config, are all found, with their keys
    and in the config's order; finite numbers, booleans, text and None never are."""
    assert non_finite_numbers(tree) == []
    leaves = _leaf_paths(tree)
    if not leaves:
        return
    chosen = data.draw(st.sets(st.sampled_from(range(len(leaves))), max_size=len(leaves)))
    planted = {}
    for i in sorted(chosen):
        value = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        node = tree
        for part in leaves[i][:-1]:
            node = node[part]
        node[leaves[i][-1]] = value
        planted[_dotted(leaves[i])] = value
    found = non_finite_numbers(tree)
    assert [k for k, _ in found] == [_dotted(leaves[i]) for i in sorted(chosen)]
    for key, value in found:
        assert (value != value and planted[key] != planted[key]) or value == planted[key]


def test_the_schema_states_the_librarys_name_patterns() -> None:
    """The dataset name, model keys and extraction.gpu_model are written twice: in the schema
    (its message, for users) and in xmodal.config (matched whole, which the schema's search
    cannot do). They must say the same."""
    schema = load_config_file(ROOT / "workflow" / "schemas" / "config.schema.yaml")
    props = schema["properties"]
    assert props["dataset"]["pattern"] == DATASET_KEY.pattern
    assert props["models"]["propertyNames"]["pattern"] == MODEL_KEY.pattern
    gpu = props["extraction"]["properties"]["gpu_model"]["pattern"]
    assert gpu == f"^{GPU_MODEL.pattern}$"


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_accepted_model_keys_stay_inside_results(key: str) -> None:
    cfg = _demo_cfg()
    cfg["models"][key] = cfg["models"].pop("tiny-mae")
    try:
        check_config(cfg)
    except ConfigError:
        return
    root = Path("/r/results/features/demo")
    assert (root / f"{key}.h5").resolve().parent == root
    assert "/" not in key and "\\" not in key and not key.startswith(".")


@pytest.mark.parametrize(
    ("layer", "says"),
    [
        (
            "0.5",
            r"\('chosen' was expected; '0\.5' is not of type 'number'\) \(a number in "
            r"quotes is text: write 0\.5 unquoted\)",
        ),
        (1.5, r"1\.5 is greater than the maximum of 1"),
        ("nan", r"'nan' is not of type 'number'\)$"),
        # digits YAML does not read as a number: no advice to write them unquoted
        ("０.５", r"'０\.５' is not of type 'number'\)$"),
        ("5e-1", r"\(YAML 1\.1 reads 5e-1 as text: write the number with a decimal point"),
    ],
)
def test_a_value_of_several_forms_says_which_forms(layer: object, says: str) -> None:
    """A key that takes one of several forms (``oneOf``) used to answer only "is not valid under
    any of the given schemas", leaving the user to guess what it takes."""
    cfg = _demo_cfg()
    cfg["analysis"].setdefault("language_dispersion", {})["layer"] = layer
    (line,) = schema_errors(cfg, ROOT / "workflow" / "schemas" / "config.schema.yaml")
    assert "key 'analysis.language_dispersion.layer'" in line
    assert re.search(says, line), line


def test_whole_number_floats_become_integers_where_the_schema_says_integer() -> None:
    """``10.0`` for ``10`` (JSON Schema calls it an integer) is read as 10, so that the job
    parameters, and so the rerun triggers, are the same; numbers stay numbers."""
    schema = load_config_file(ROOT / "workflow" / "schemas" / "config.schema.yaml")
    cfg = _demo_cfg()
    want = copy.deepcopy(cfg)
    cfg["analysis"].update(knn_k=10.0, vision_layer=-2.0, drop_fraction=0.25)
    cfg["analysis"]["drop_control"] = {"n_random": 20.0}
    cfg["models"]["tiny-mae"]["build"]["seed"] = 1.0
    cfg["models"]["tiny-mae"]["build"]["train"]["lr"] = 2.0  # a number: stays a float
    cfg["extraction"] = {"gpu_mem_gb": 40.0, "max_tokens": 64.0}
    changed = normalise_integers(cfg, schema)
    assert sorted(changed) == sorted(
        ["analysis.knn_k", "analysis.vision_layer", "analysis.drop_control.n_random",
         "models.tiny-mae.build.seed", "extraction.max_tokens"]
    )  # fmt: skip
    assert cfg["analysis"]["knn_k"] == 10 and type(cfg["analysis"]["knn_k"]) is int
    assert cfg["analysis"]["vision_layer"] == want["analysis"]["vision_layer"] == -2
    assert type(cfg["models"]["tiny-mae"]["build"]["seed"]) is int
    assert type(cfg["models"]["tiny-mae"]["build"]["train"]["lr"]) is float
    assert (
        type(cfg["extraction"]["gpu_mem_gb"]) is float and cfg["analysis"]["drop_fraction"] == 0.25
    )
    cfg["analysis"]["knn_k"] = 10.5  # not a whole number: left for the schema to refuse
    assert normalise_integers(cfg, schema) == [] and cfg["analysis"]["knn_k"] == 10.5


def test_set_size_larger_than_stimuli_says_what_to_do() -> None:
    cfg = _demo_cfg()
    k = cfg["analysis"]["set_size"]
    with pytest.raises(ConfigError, match=rf"'analysis.set_size' \({k}\).*100 stimuli.*at most 50"):
        check_against_stimuli(cfg, 100)
    check_against_stimuli(cfg, 2 * k)


def test_drop_fraction_that_keeps_too_few_names_drop_fraction() -> None:
    cfg = _demo_cfg()
    cfg["analysis"]["drop_fraction"] = 0.96
    with pytest.raises(ConfigError) as err:
        check_against_stimuli(cfg, 240)
    msg = str(err.value)
    assert "'analysis.drop_fraction' (0.96) drops 230 of the 240 stimuli and keeps 10" in msg
    assert "knn_k'" not in msg.split(";")[0]  # the fraction is at fault, not the neighbour count
    cfg["analysis"]["drop_fraction"] = 0.25
    check_against_stimuli(cfg, 240)


# ======================================================================= stimulus manifest / images
@pytest.fixture
def manifest_copy(tmp_path: Path, tiny_manifest: Path) -> Path:
    shutil.copytree(tiny_manifest.parent, tmp_path / "m")
    return tmp_path / "m" / "stimuli.tsv"


def _image_of(manifest: Path, row: int) -> Path:
    return manifest.parent / read_manifest(manifest)["image"][row]


def test_truncated_jpeg_names_stimulus(manifest_copy: Path) -> None:
    img = _image_of(manifest_copy, 0)  # stim-00, an RGB JPEG
    assert img.suffix == ".jpg"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        StimulusError, match=r"stimulus 'stim-00': cannot decode.*truncated.*replace"
    ):
        load_rgb(img, "stim-00")
    # the up-front check decodes fully (PIL's header-only verify() passes a truncated JPEG)
    with pytest.raises(StimulusError, match=r"1 image\(s\).*'stim-00'.*line 2"):
        read_manifest(manifest_copy, verify_images=True)


def test_text_file_named_jpg_through_a_dataloader_worker(manifest_copy: Path) -> None:
    """The error crosses the DataLoader worker boundary with the stimulus id intact."""
    from torch.utils.data import DataLoader

    img = _image_of(manifest_copy, 6)  # stim-06
    img.write_text("this is not an image\n")
    df = read_manifest(manifest_copy)
    loader = DataLoader(
        ImageDataset(df, manifest_copy.parent, transform=lambda im: np.asarray(im).shape[2]),
        batch_size=4,
        num_workers=1,
    )
    with pytest.raises(
        StimulusError, match=r"stimulus 'stim-06': cannot decode image .*s06"
    ) as err:
        list(loader)
    # the message (torch adds the worker's traceback above it) names the file, not Pillow's
    # name for the bytes it read ('<_io.BytesIO object at 0x…>')
    message = str(err.value).strip().splitlines()[-1]
    assert "stim-06" in message and "BytesIO" not in message, message
    # and the Pillow that refused it: Pillow 11 and 12 refuse valid uncompressed YCbCr TIFFs
    # ("image file is truncated"), where "replace the image file" alone would mislead
    import PIL

    assert f"; Pillow {PIL.__version__}); if other software opens it, update Pillow" in message


@pytest.mark.parametrize("kind", ["folder", "named pipe"])
def test_an_image_path_that_is_no_file_names_the_stimulus(manifest_copy: Path, kind: str) -> None:
    """Read for its bytes, a named pipe would block the loader forever: refused at once."""
    df = read_manifest(manifest_copy)
    img = _image_of(manifest_copy, 2)
    img.unlink()
    img.mkdir() if kind == "folder" else os.mkfifo(img)
    with pytest.raises(
        StimulusError, match=r"stimulus 'stim-02': cannot read image .*s02.*\(not a regular file\)"
    ):
        ImageDataset(df, manifest_copy.parent)[2]


def test_non_utf8_manifest_names_line_and_stimulus(manifest_copy: Path) -> None:
    lines = manifest_copy.read_bytes().split(b"\n")
    lines[3] = lines[3] + " caf\xe9".encode("latin-1")
    manifest_copy.write_bytes(b"\n".join(lines))
    with pytest.raises(StimulusError) as err:
        read_manifest(manifest_copy)
    msg = str(err.value)
    assert str(manifest_copy) in msg and "line 4 (stimulus 'stim-02')" in msg
    assert "not valid UTF-8" in msg and "save the manifest as UTF-8" in msg


@pytest.mark.parametrize("fmt, mode", [("JPEG", "CMYK"), ("PNG", "RGBA")])
def test_huge_image_is_reduced_and_logged(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fmt: str,
    mode: str,
) -> None:
    import xmodal.stimuli as stimuli

    monkeypatch.setattr(stimuli, "MAX_SIDE", 40)  # stands in for 4096: the code path is the same
    path = tmp_path / f"big.{fmt.lower()}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).convert(mode).save(
        path, fmt
    )
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        im = load_rgb(path, "stim-big")
    assert im.mode == "RGB" and max(im.size) <= 40
    assert (
        "stimulus 'stim-big': huge image" in caplog.text and "(130 x 90) reduced to" in caplog.text
    )
    assert f"converting {mode} image" in caplog.text


def test_decompression_bomb_sized_image_is_decoded_not_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60 x 50 = 3000 > 2 x limit: PIL refuses
    path = tmp_path / "bomb.png"
    Image.new("L", (60, 50), 7).save(path)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        im = load_rgb(path, "stim-bomb")
    assert im.size == (60, 50) and im.mode == "RGB"
    assert "decompression-bomb limit; decoding it anyway" in caplog.text
    assert Image.MAX_IMAGE_PIXELS == 1000  # the limit is restored


# ======================================================================= feature files
def test_truncated_hdf5_asks_to_delete_and_rerun(tmp_path: Path) -> None:
    x, ids, names = _features(4, 50, 64)
    path = write_features(tmp_path / "m.h5", x, ids, names, ATTRS)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(FeatureFileError, match=r"truncated or corrupt.*delete it and rerun") as err:
        with FeatureFile(path) as ff:
            ff.validate(ids)
    assert str(path) in str(err.value)


def test_corrupt_hdf5_never_escapes_as_a_raw_error(tmp_path: Path) -> None:
    """Garbage written over any part of a file: FeatureFileError (naming it) or valid data."""
    x, ids, names = _features(3, 20, 16)
    good = write_features(tmp_path / "good.h5", x, ids, names, ATTRS).read_bytes()
    n_error = 0
    for offset in range(0, len(good) - 32, max(1, len(good) // 48)):
        bad = bytearray(good)
        bad[offset : offset + 32] = b"\xa5" * 32
        path = tmp_path / f"bad{offset}.h5"
        path.write_bytes(bytes(bad))
        try:
            with FeatureFile(path) as ff:
                ff.validate(ids)
                _ = ff.attrs, ff.abs_q95()
        except FeatureFileError as err:
            assert str(path) in str(err)
            n_error += 1
        path.unlink()
    assert n_error > 0


def test_file_without_schema_version_is_an_older_schema(tmp_path: Path) -> None:
    x, ids, names = _features()
    path = write_features(tmp_path / "old.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r+") as f:
        del f.attrs["schema_version"]
    with pytest.raises(FeatureFileError, match=r"schema_version is None.*re-extract"):
        FeatureFile(path)


# ======================================================================= models and secrets
def _with_remote_code(src: Path, dest: Path, model_type: str) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    cfg["model_type"] = model_type
    (dest / "config.json").write_text(json.dumps(cfg))
    sentinel = dest / "REMOTE_CODE_RAN"
    (dest / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    return sentinel


def test_model_that_needs_remote_code_is_refused(tmp_path: Path, tiny_lms: dict[str, Path]) -> None:
    from xmodal.extract import RemoteCodeError
    from xmodal.extract.language import load_language_model

    sentinel = _with_remote_code(tiny_lms["llama"], tmp_path / "custom", "xmodal-evil")
    with pytest.raises(
        RemoteCodeError, match=r"custom.*evil\.EvilModel.*trust_remote_code is always off"
    ):
        load_language_model(str(tmp_path / "custom"))
    assert not sentinel.exists()


def test_auto_map_on_a_builtin_architecture_is_ignored_and_logged(
    tmp_path: Path, tiny_lms: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from xmodal.extract.language import load_language_model

    sentinel = _with_remote_code(tiny_lms["llama"], tmp_path / "native", "llama")
    with caplog.at_level("WARNING"):
        model, _, info = load_language_model(str(tmp_path / "native"))
    assert type(model).__name__ == "LlamaModel" and not sentinel.exists()
    assert "ignoring it and using transformers' own implementation" in info["remote_code_note"]
    assert "model_type 'llama'" in caplog.text


def test_hub_token_never_in_logs_or_feature_attrs(
    tmp_path: Path,
    tiny_lms: dict[str, Path],
    tiny_manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_root_logging: None,
) -> None:
    from xmodal.extract import extract_features
    from xmodal.logs import log_to

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    log_path = tmp_path / "extract.log"
    log_to(log_path)
    entry = {"modality": "language", "id": str(tiny_lms["bloom"]), "size_b": 0.0001}
    out = extract_features("tiny-bloom", entry, tiny_manifest, tmp_path / "f.h5", progress=False)
    # anything that does mention it (an exception message, a URL) is redacted on the way out
    logging.getLogger("xmodal.test").warning("request with token %s failed", FAKE_TOKEN)
    try:
        raise RuntimeError(f"401 for Authorization: Bearer {FAKE_TOKEN}")
    except RuntimeError:
        logging.getLogger("xmodal.test").exception("download failed")
    for h in logging.getLogger().handlers:
        h.flush()
    text = log_path.read_text()
    assert "wrote" in text and "request with token *** failed" in text and "Bearer ***" in text
    assert FAKE_TOKEN not in text
    with h5py.File(out) as f:
        assert not any(FAKE_TOKEN in str(v) for v in f.attrs.values())
    # a token that is not hf_-shaped is refused as an attribute too
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-value-42")
    x, ids, names = _features()
    with pytest.raises(FeatureFileError, match="'note' looks like it holds an access token"):
        write_features(tmp_path / "g.h5", x, ids, names, {**ATTRS, "note": "s3cr3t-value-42"})
    assert not (tmp_path / "g.h5").exists()


def test_error_messages_preview_the_first_items_and_count_them_all() -> None:
    from xmodal.logs import preview

    assert preview(["a"]) == "['a'] (1 in all)"
    assert preview(f"s{i}" for i in range(7)) == "['s0', 's1', 's2', 's3', 's4', ...] (7 in all)"
    assert preview([0, 1, 2, 3], n=3) == "[0, 1, 2, ...] (4 in all)"
    assert preview([]) == "[] (0 in all)"


_HOOK_SCRIPT = """
import sys
sys.path.insert(0, {src!r})
from xmodal.logs import log_to
log_to({log!r})
from {package}{module} import {error}
raise {error}({message!r})
"""


@pytest.mark.parametrize(
    "module, error, one_line",
    [
        ("config", "ConfigError", True),
        ("features", "FeatureFileError", True),
        ("io", "DiskFullError", True),
        ("io", "UnwritableOutputError", True),
        ("builtins", "KeyError", False),
    ],
)
def test_uncaught_xmodal_error_is_one_line_without_traceback(
    tmp_path: Path, module: str, error: str, one_line: bool
) -> None:
    log = tmp_path / "step.log"
    message = "config key 'analysis.set_size' (60) is too large; set it to at most 32"
    package = "" if module == "builtins" else "xmodal."
    code = _HOOK_SCRIPT.format(
        src=str(ROOT / "src"), log=str(log), package=package, module=module, error=error,
        message=message,
    )  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    text = log.read_text()
    shown = repr(message) if error == "KeyError" else message  # KeyError quotes its argument
    assert f"ERROR root: {error}: {shown}" in text and f"{error}: {shown}" in proc.stderr
    # xmodal's own errors (ValueError/RuntimeError/OSError subclasses): no traceback;
    # anything else keeps it
    assert ("Traceback" not in text) is one_line, text


# ======================================================================= faults while writing
def test_disk_full_during_hdf5_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, ids, names = _features()
    path = write_features(tmp_path / "m.h5", x, ids, names, ATTRS)  # a finished earlier result
    before = path.read_bytes()
    real_setitem = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def full(self: h5py.Dataset, key: object, value: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second layer does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(DiskFullError) as err:
        write_features(path, x * 2, ids, names, ATTRS)
    msg = str(err.value)
    assert f"disk full while writing {path}" in msg and "Free space there" in msg
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]  # no temp file left
    assert path.read_bytes() == before  # the earlier result is untouched


def test_disk_full_during_table_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    def full(self: pd.DataFrame, target: object, **kwargs: object) -> None:
        Path(str(target)).write_text("stimulus_id\tval")  # a partial write, then the error
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*t\.tsv"):
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.tsv")
    assert list(tmp_path.iterdir()) == []


def test_a_scratch_file_past_the_size_limit_names_the_output_and_the_file_system(
    tmp_path: Path,
) -> None:
    """A spill file grown past the largest file its file system takes (EFBIG, no ``ulimit -f``)
    is the output's FileTooLargeError: it names the scratch file, the output it was for and the
    folder to move, and the scratch file is gone. (The ``ulimit -f`` wording is tested in a
    job below; this process has no such limit.)"""
    import resource

    from xmodal.io import FileTooLargeError, scratch_path

    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY
    out = tmp_path / "f" / "m.h5"
    out.parent.mkdir()
    with pytest.raises(FileTooLargeError) as err:
        with scratch_path(out, ".spill") as tmp:
            tmp.write_bytes(b"x" * 10)
            raise OSError(errno.EFBIG, "File too large")
    msg = str(err.value)
    assert err.value.errno == errno.EFBIG
    assert msg.startswith(f"[Errno 27] file too large while writing scratch file {tmp} for {out}: ")
    assert f"the file system of {out.parent} takes no larger file; move results/" in msg
    assert list(out.parent.iterdir()) == []


def test_a_full_disk_behind_another_libraries_error_is_said_naming_the_output(
    tmp_path: Path,
) -> None:
    """torch's writer reported a full disk as ``RuntimeError: [enforce fail …] unexpected
    pos``, with the ENOSPC only in its context, and h5py as ``RuntimeError(… errno = 28 …)``
    naming the hidden temporary file (audit): both are the output's DiskFullError now; an
    error with no full disk behind it is not."""
    from xmodal.io import atomic_path, is_disk_full

    def torch_like() -> RuntimeError:
        try:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                # as torch raises it: the ENOSPC its context, not its cause
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904
        except RuntimeError as err:
            return err

    h5py_like = RuntimeError(
        "Can't decrement id ref count (file write failed: time = x, filename = "
        "'.m.h5.abc.tmp.h5', file descriptor = 5, errno = 28, error message = 'No space "
        "left on device', buf = 0x1, total write size = 8, bytes this sub-write = 8)"
    )
    for err in (torch_like(), h5py_like):
        assert is_disk_full(err)
        with pytest.raises(DiskFullError, match=r"disk full while writing .*vision_bootstrap\.pt"):
            with atomic_path(tmp_path / "vision_bootstrap.pt"):
                raise err
        assert list(tmp_path.iterdir()) == []
    assert not is_disk_full(RuntimeError("unexpected pos, errno = 5, error message = 'EIO'"))


_WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {src!r})
import numpy as np
from xmodal.features import write_features

m, dim, n_layers = 256, 1024, 40
ids = [f"s{{i}}" for i in range(m)]
def layers():
    rng = np.random.default_rng(0)
    for i in range(n_layers):
        if i == 3:
            Path({marker!r}).write_text("mid-write")
            time.sleep(120)  # killed here, with 3 layers (3 MiB) in the temporary file
        yield rng.standard_normal((m, dim)).astype(np.float32)
write_features({out!r}, layers(), ids, [f"layers.{{i}}" for i in range(n_layers)],
               {{"model_id": "x", "model_key": "x", "modality": "language"}}, abs_q95=np.ones(m))
"""


def test_sigkill_mid_write_leaves_no_file_and_the_rerun_cleans_up(tmp_path: Path) -> None:
    out, marker = tmp_path / "x.h5", tmp_path / "marker"
    code = _WRITER.format(src=str(ROOT / "src"), out=str(out), marker=str(marker))
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the writer never reached the middle of its write"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = list(tmp_path.glob(".x.h5.*.tmp.h5"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    # the rerun writes the file and removes what the killed write left behind
    x, ids, names = _features(2, 4, 3)
    write_features(out, x, ids, names, ATTRS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker", "x.h5"]
    with FeatureFile(out) as ff:
        ff.validate(ids)


def _logged_job(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` as a step script does: the library first on the path, its log at
    ``tmp_path / 'job.log'`` (xmodal.logs.log_to)."""
    import xmodal

    script = tmp_path / "job.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(Path(xmodal.__file__).parents[1])!r})\n"
        f"from xmodal.logs import log_to; log_to({str(tmp_path / 'job.log')!r})\n"
        "import numpy as np, pandas as pd\nfrom xmodal.features import write_features\n" + body
    )
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True)


def test_a_feature_file_on_a_full_disk_is_one_message_and_exit_code_1(tmp_path: Path) -> None:
    """HDF5 closing a file whose last write failed crashed the interpreter's teardown: the step
    exited 139 (segfault) after its DiskFullError, with HDF5's noise below it (reviewer). Run on
    a 400 KiB tmpfs, so root only."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(small)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root and tmpfs to fill a disk")
    try:
        proc = _logged_job(
            tmp_path,
            "x = np.random.default_rng(0).random((4, 480, 200)).astype('float32')\n"
            f"write_features({str(small / 'f.h5')!r}, x, [f's{{i}}' for i in range(480)], "
            "[f'l{i}' for i in range(4)], {'model_key': 'x', 'modality': 'vision'})\n",
        )
        assert proc.returncode == 1, proc.stderr[-2000:]
        log = (tmp_path / "job.log").read_text()
        assert f"DiskFullError: [Errno 28] disk full while writing {small / 'f.h5'}" in log
        assert not list(small.iterdir())  # no partial file, no temporary
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_file_past_the_size_limit_is_one_message_naming_the_output(tmp_path: Path) -> None:
    """A job under ``ulimit -f`` (or on a file system with a largest file) failed with a bare
    ``OSError: [Errno 27] File too large`` naming neither the output nor the limit, or HDF5's
    RuntimeError naming the hidden temporary file (audit); both are the output's
    FileTooLargeError now, one line in the log, and nothing is left in the folder."""
    out = tmp_path / "out"
    out.mkdir()
    proc = _logged_job(
        tmp_path,
        "import resource\nfrom xmodal.io import write_table\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    write_table(pd.DataFrame({{'a': np.arange(20000)}}), {str(out / 't.tsv')!r})\n"
        "except OSError as err:\n"
        "    print(type(err).__name__, err)\n"
        "x = np.random.default_rng(0).random((2, 50, 64)).astype('float32')\n"
        f"write_features({str(out / 'f.h5')!r}, x, [f's{{i}}' for i in range(50)], "
        "['l0', 'l1'], {'model_key': 'x', 'modality': 'vision'})\n",
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    table = f"FileTooLargeError [Errno 27] file too large while writing {out / 't.tsv'}: "
    assert proc.stdout.startswith(table) and "at most 20000 bytes (ulimit -f)" in proc.stdout
    log = (tmp_path / "job.log").read_text()
    said = f"FileTooLargeError: [Errno 27] file too large while writing {out / 'f.h5'}: "
    assert said in log and "at most 20000 bytes (ulimit -f)" in log
    assert "Traceback" not in log + proc.stderr  # no HDF5 noise at the interpreter's teardown
    assert not list(out.iterdir())  # no partial file, no temporary
