"""Package-level settings: idle-thread configuration for the step scripts."""

from __future__ import annotations

import os
import subprocess
import sys

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
