"""Package-level settings: idle-thread configuration and thread budgets for the step scripts."""

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
