"""xmodal: single-stimulus intra-modal dispersion (GPA) and cross-modal convergence (CKNNA).

The library behind the Snakemake workflow. It never imports Snakemake: every function takes
arrays, paths or plain values and can be used from a notebook.
"""

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

__version__ = "0.1.0"

#: The analysis alternates BLAS calls (numpy/scipy's OpenBLAS threads) with torch ops (OpenMP
#: threads) on the same cores. Threads of either pool that spin while idle slow the other's
#: next call: on 2 cores a 1024×4096 kernel took 36 ms after a torch op instead of 28 ms, and
#: a grid layer 47 ms instead of 35 ms. These settings make idle threads sleep.
CPU_THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}


def configure_cpu_threads() -> None:
    """Let idle OpenMP and OpenBLAS threads sleep (:data:`CPU_THREAD_ENV`), unless already set.

    Takes effect only when called before numpy, scipy or torch is first imported; the workflow's
    step scripts call it first thing. Variables the user has set are left alone.
    """
    for key, value in CPU_THREAD_ENV.items():
        os.environ.setdefault(key, value)


#: The parts of the library that no analysis rule runs: feature extraction (GPU jobs), hub
#: downloads and the demo's builders. Editing them never reruns the analysis.
NOT_ANALYSIS_CODE = ("extract", "demo", "prefetch.py")


def _code_digest(root: Path, counts: Callable[[str], bool]) -> str:
    """SHA-256 of the modules under ``root`` whose relative path ``counts``, by path and bytes
    (editors' hidden copies, such as .ipynb_checkpoints/, left out)."""
    digest, n = hashlib.sha256(), 0
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        name = path.relative_to(root).as_posix()
        if counts(name) and not any(part.startswith(".") for part in name.split("/")):
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
            n += 1
    if not n:  # a wrong folder would give a digest that never changes
        raise FileNotFoundError(f"{root}: no module of xmodal's to digest")
    return digest.hexdigest()


def _package(package: str | os.PathLike | None) -> Path:
    return Path(package) if package is not None else Path(__file__).resolve().parent


def analysis_code_digest(package: str | os.PathLike | None = None) -> str:
    """A digest of the library code the analysis rules run: every module of ``package`` (this
    package by default) but :data:`NOT_ANALYSIS_CODE`, by path and bytes.

    The analysis rules carry it as a param, so that an update of the library reruns the
    analysis on the features already extracted, instead of leaving tables and figures that the
    old code made next to results of the new one (docs/cluster.md, "What reruns"). Comments
    count: an edit of a comment reruns the analysis, never an extraction.
    """
    return _code_digest(_package(package), lambda name: name.split("/")[0] not in NOT_ANALYSIS_CODE)


def demo_code_digest(package: str | os.PathLike | None = None) -> str:
    """A digest of the embedded demo's builders (``xmodal.demo``: its stimuli, tokenizer and
    trained models), carried by the demo's rules so that an update of them makes the demo
    again, as :func:`analysis_code_digest` does for the analysis."""
    return _code_digest(_package(package), lambda name: name.split("/")[0] == "demo")
