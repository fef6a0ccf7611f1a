"""Package-level settings: idle-thread configuration, thread budgets for the step scripts, and
what the light steps import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import xmodal


def test_configure_cpu_threads_sets_defaults_and_keeps_user_values(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "")  # so that teardown restores the original state
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "10")
    xmodal.configure_cpu_threads()
    assert os.environ["OMP_WAIT_POLICY"] == xmodal.CPU_THREAD_ENV["OMP_WAIT_POLICY"]
    assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "10"  # the user's choice stays


def test_importing_xmodal_loads_no_numerical_library():
    """The step scripts configure threads after ``import xmodal``: it must not load numpy/torch."""
    code = (
        "import sys, xmodal; "
        "print(sorted(m for m in ('numpy', 'scipy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


_LIGHT_STEPS = """
import sys
from pathlib import Path

import numpy as np

from xmodal import pipeline
from xmodal.features import FeatureFile, write_features


def loaded():
    return sorted(m for m in ("torch", "scipy.stats") if m in sys.modules)


print(loaded())
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
ids = [f"s{i}" for i in range(30)]
paths = []
for k in range(3):
    x = rng.standard_normal((2, 30, 5)).astype(np.float32)
    attrs = {"model_id": f"v{k}", "model_key": f"v{k}", "modality": "vision"}
    q = np.abs(x).max(axis=(0, 2))
    paths.append(write_features(root / f"v{k}.h5", x, ids, ["a", "b"], attrs, abs_q95=q))
with FeatureFile(paths[0]) as f:
    f.finite_layer(-1), f.abs_q95()
keys = ["v0", "v1", "v2"]
pipeline.run_gpa(paths, keys, -1, 1e-10, 1000, root / "r.tsv", root / "d.tsv", root / "g.json")
analysis = dict(set_size=8, n_random=3, drop_fraction=0.25, knn_k=3, seed=0)
pipeline.run_stimulus_sets(root / "d.tsv", analysis, root / "sets.tsv")
print(loaded())
pipeline.run_leave_one_model_out(paths, keys, -1, 1e-10, 1000, root / "l.tsv", root / "ls.tsv")
print(loaded())
from xmodal import correlate, summary  # correlations with intervals, the summaries

print(correlate.correlation_ci(rng.random(30), rng.random(30), n_boot=20, seed=0), loaded())
"""


def test_steps_that_need_no_torch_do_not_load_it(tmp_path):
    """Loading torch takes seconds, most of a light step's run time: importing the pipeline,
    writing and reading feature files, GPA and the set selection load neither torch nor
    scipy.stats; leave-one-model-out, the correlations with their intervals and the summaries
    load scipy.stats but no torch."""
    script = tmp_path / "light_steps.py"
    script.write_text(_LIGHT_STEPS)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[:3] == ["[]", "[]", "['scipy.stats']"]
    assert lines[3].endswith(" ['scipy.stats']")  # a correlation with its interval, no torch


def test_thread_budget_caps_the_cores_the_pools_use():
    from xmodal.parallel import available_cores, set_thread_budget

    free = available_cores()
    try:
        set_thread_budget(1)
        assert available_cores() == 1
        set_thread_budget(free + 5)
        assert available_cores() == free  # never more than the process may run on
        with pytest.raises(ValueError, match="at least 1"):
            set_thread_budget(0)
    finally:
        set_thread_budget(None)
    assert available_cores() == free


def test_a_step_script_takes_its_jobs_threads_as_its_budget(tmp_path):
    """``scripts/_bootstrap.py`` caps the pools at the ``threads`` of the snakemake object that
    Snakemake's preamble defines in the script (before: every core of the machine); without
    one (a script run by hand) there is no cap. Also: xmodal.parallel stays light."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    probe = (
        "import sys; sys.path.insert(0, {scripts!r}){preamble}\n"
        "import _bootstrap\n"
        "from xmodal.parallel import available_cores\n"
        "print(available_cores(), sorted(m for m in ('numpy', 'torch') if m in sys.modules))\n"
    )
    out = {}
    for name, preamble in (
        ("job", "\nclass Job: threads = 1\nsnakemake = Job()"),
        ("by hand", ""),
    ):
        path = tmp_path / f"{name.replace(' ', '_')}.py"
        path.write_text(probe.format(scripts=str(scripts), preamble=preamble))
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        out[name] = proc.stdout.split(maxsplit=1)
    assert out["job"] == ["1", "[]\n"]
    assert int(out["by hand"][0]) == len(os.sched_getaffinity(0))


def test_a_step_script_sees_gpus_only_when_its_job_asked_for_one(tmp_path):
    """Outside SLURM every job sees every GPU: an analysis job took memory on the GPU an
    extraction held. _bootstrap hides the GPUs from a job whose resources ask for none."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    seen = {}
    for gpu in (0, 1):
        path = tmp_path / f"gpu{gpu}.py"
        path.write_text(
            f"import sys; sys.path.insert(0, {str(scripts)!r})\n"
            f"class Res: gpu = {gpu}\n"
            "class Job: threads = 1; resources = Res()\n"
            "snakemake = Job()\n"
            "import os, _bootstrap\n"
            "print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))\n"
        )
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        seen[gpu] = proc.stdout.strip()
    assert seen == {0: "''", 1: "'0,1'"}


#: rules whose params cannot hide a change (values of different types: a dict and a flag, a
#: modality and a flag); named_params on them would re-extract every model once
UNNAMED_PARAMS_OK = {"extract", "import_features"}


def test_rules_with_several_params_record_them_by_name():
    """Snakemake records a job's params as the set of their values, without names: two
    settings of equal value, or two swapped, hid a change. Every rule with two or more params
    passes them through named_params (workflow/rules/common.smk)."""
    import re

    root = Path(__file__).resolve().parents[1] / "workflow"
    unnamed = []
    for path in [root.parent / "Snakefile", *sorted((root / "rules").glob("*.smk"))]:
        rule = None
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if m := re.match(r"^(?:rule|checkpoint) (\w+):", line):
                rule = m.group(1)
            if line != "    params:" or rule in UNNAMED_PARAMS_OK:
                continue
            block = []
            for nxt in lines[i + 1 :]:
                if nxt and not nxt.startswith("        "):
                    break
                block.append(nxt)
            names = [b for b in block if re.match(r"^        \w+=", b)]
            if len(names) >= 2:
                unnamed.append(f"{path.name}: rule {rule}")
    assert not unnamed, unnamed
