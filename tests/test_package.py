"""Package-level settings: idle-thread configuration, thread budgets for the step scripts, what
the light steps import, and the Makefile's set-up guard."""

from __future__ import annotations

import os
import re
import shutil
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
            # the analysis code's digest is 64 hex digits: no setting has its value
            names = [b for b in block if re.match(r"^        (?!code=)\w+=", b)]
            if len(names) >= 2:
                unnamed.append(f"{path.name}: rule {rule}")
    assert not unnamed, unnamed


#: The rules whose jobs a library update must not rerun: GPU extraction, downloads, the stamps
#: that decide re-extraction, and the demo's builders (NOT_ANALYSIS_CODE is their code).
NOT_ANALYSIS_RULES = {
    "extract", "prefetch_model", "prefetch_stimuli", "manifest_stamp", "demo_stimuli",
    "demo_training_scenes", "demo_tokenizer", "demo_model", "all",
}  # fmt: skip


def test_every_analysis_rule_carries_the_analysis_code_digest():
    """A library update reruns the analysis made by the old code: every rule but
    :data:`NOT_ANALYSIS_RULES` has the param ``code=ANALYSIS_CODE``; of those, the demo's
    builders have ``code=DEMO_CODE`` and the others none."""
    root = Path(__file__).resolve().parents[1] / "workflow"
    seen: dict[str, str | None] = {}
    for path in [root.parent / "Snakefile", *sorted((root / "rules").glob("*.smk"))]:
        text = path.read_text()
        # each rule's text, to the next rule (the figure rules: one unnamed rule in a loop)
        for m in re.finditer(r"^ *rule(?: (\w+))?:\n(.*?)(?=^ *rule[ :]|\Z)", text, re.M | re.S):
            code = re.findall(r"^ +code=(\w+),$", m.group(2), re.M)
            assert len(code) <= 1, (m.group(1), code)
            seen[m.group(1) or "figure_*"] = code[0] if code else None
    assert {"gpa", "layer_search", "figure_*", "provenance", "extract"} <= seen.keys()
    assert sorted(k for k, v in seen.items() if v != "ANALYSIS_CODE") == sorted(NOT_ANALYSIS_RULES)
    # the demo's builders make the demo again when their own code changes
    assert sorted(k for k, v in seen.items() if v == "DEMO_CODE") == sorted(
        k for k in NOT_ANALYSIS_RULES if k.startswith("demo_")
    )


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_analysis_code_digest_follows_the_analysis_modules_only(tmp_path):
    """Any edit of an analysis module changes the digest (a comment too, and a renamed or a
    new module); extraction, prefetch, the demo and editors' hidden copies do not."""
    base = {
        "__init__.py": "X = 1\n",
        "gpa.py": "def f():\n    return 1\n",
        "figures/panel.py": "Y = 2\n",
        "extract/vision.py": "Z = 3\n",
        "demo/train.py": "W = 4\n",
        "prefetch.py": "V = 5\n",
    }
    ref = xmodal.analysis_code_digest(_package(tmp_path / "ref", base))
    assert re.fullmatch(r"[0-9a-f]{64}", ref)
    assert xmodal.analysis_code_digest(_package(tmp_path / "same", base)) == ref  # not the path

    def digest(name: str, **changes: str | None) -> str:
        files = {k: v for k, v in {**base, **changes}.items() if v is not None}
        return xmodal.analysis_code_digest(_package(tmp_path / name, files))

    for i, changes in enumerate([
        {"gpa.py": "def f():\n    return 2\n"},
        {"gpa.py": base["gpa.py"] + "# a comment\n"},
        {"figures/panel.py": "Y = 3\n"},
        {"gpa.py": None, "gpa2.py": base["gpa.py"]},  # renamed
        {"stats.py": "U = 6\n"},  # a new module
        {"__init__.py": "X = 2\n"},
    ]):  # fmt: skip
        assert digest(f"changed{i}", **changes) != ref, changes
    for i, changes in enumerate([
        {"extract/vision.py": "Z = 4\n"},
        {"demo/train.py": "W = 5\n", "demo/new.py": ""},
        {"prefetch.py": "V = 6\n"},
        {".ipynb_checkpoints/gpa-checkpoint.py": "junk\n"},
        {"figures/.hidden/x.py": "junk\n"},
    ]):  # fmt: skip
        assert digest(f"same{i}", **changes) == ref, changes
    # the installed package: its own folder, as the workflow hashes it
    src = Path(__file__).resolve().parents[1] / "src" / "xmodal"
    assert xmodal.analysis_code_digest() == xmodal.analysis_code_digest(src)
    # the demo's builders: demo/ and nothing else
    demo = xmodal.demo_code_digest(tmp_path / "ref")
    assert xmodal.demo_code_digest(_package(tmp_path / "d1", {**base, "gpa.py": "G = 0\n"})) == demo
    assert xmodal.demo_code_digest(_package(tmp_path / "d2", {**base, "demo/train.py": ""})) != demo
    # a folder without modules (a wrong path) is an error, not a digest that never changes
    (tmp_path / "empty").mkdir()
    for of_code in (xmodal.analysis_code_digest, xmodal.demo_code_digest):
        with pytest.raises(FileNotFoundError, match="no module"):
            of_code(tmp_path / "empty")


@pytest.mark.parametrize(
    ("folder", "refused"),
    [("Bob's", True), ("p(2)", True), ("my project", True), ("price$", True), ("ok-ü_1.0", False)],
)
def test_the_makefile_stops_before_a_venv_at_a_path_a_shell_would_split(
    tmp_path: Path, folder: str, refused: bool
) -> None:
    """Snakemake starts every step script with the venv's python path unquoted
    (snakemake/snakemake#2645): `make demo` in such a folder installed for minutes, then
    failed every job. The Makefile now stops first, naming VENV=; another path goes on
    (`make -n`: the recipe is expanded, where the guard stops, and printed, not run)."""
    root = Path(__file__).resolve().parents[1]
    where = tmp_path / folder
    where.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(root / name, where / name)
    proc = subprocess.run(["make", "-n", ".venv/bin/python"], cwd=where, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert not (where / ".venv").exists()
    stopped = "has a space or shell character" in proc.stderr
    assert stopped is refused and (proc.returncode != 0) is refused, proc.stderr
    if refused:
        assert "snakemake/snakemake#2645" in proc.stderr and "VENV=" in proc.stderr
    else:
        assert "-m venv .venv" in proc.stdout, proc.stdout
