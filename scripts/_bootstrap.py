"""Put the workflow's own library (src/xmodal) first on sys.path for the step scripts.

Snakemake adds this directory to the path of every script it runs; importing this module
makes the library importable whether or not it is installed in the job's environment
(conda environments from envs/ hold its dependencies only). It also caps the job's threads,
hides the GPUs from a job that asked for none, marks the output of an extraction or import
until it is made (xmodal.attempts.begin_attempt), and stops a retry of a job whose attempt
before it failed with an error that a retry repeats (xmodal.attempts.fail_attempt).
"""

import atexit
import os
import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parents[1] / "src")
# First, even when already present further down: Snakemake appends its own process's sys.path
# to a script's, after site-packages, where an editable install of another checkout would win.
if sys.path[:1] != [_SRC]:
    sys.path[:] = [_SRC] + [p for p in sys.path if p != _SRC]

import __main__  # noqa: E402
import xmodal  # noqa: E402  (light: imports no numerical library)
from xmodal.parallel import set_thread_budget  # noqa: E402  (light too)

xmodal.configure_cpu_threads()  # before numpy/torch load their thread pools
# the job's threads (the snakemake object Snakemake's preamble put in the script's globals)
# cap its thread pools and BLAS: what --cores, or cpus_per_task on SLURM, counted for it
_job = getattr(__main__, "snakemake", None)
if _job is not None:
    set_thread_budget(int(_job.threads))
    # a job that asked for no GPU sees none: on a workstation every job sees every GPU, and an
    # analysis job would take memory on the GPU an extraction holds (docs/cluster.md, "GPUs on
    # one machine"); analysis.gpu gives the alignment jobs one
    if not int(getattr(getattr(_job, "resources", None), "gpu", 0) or 0):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # a job that makes a feature file marks it from its first line until it is made
    # (xmodal.attempts.begin_attempt): one that fails anywhere (the weights not in the cache, a
    # bad config) or is killed leaves the mark, and the next run makes the file again, where
    # Snakemake, which records a failed job's output as made, would say "Nothing to be done".
    # Every job: an uncaught error that a retry repeats (the project's own errors about the
    # model, the stimuli, the config or a feature file) is recorded in that mark, or in one
    # next to the job's log (xmodal.attempts.fail_attempt), and a retry (the profile's
    # `retries`) of that attempt stops here, before a model or a feature file is loaded
    from xmodal.attempts import (
        RepeatedFailureError,
        begin_attempt,
        check_not_repeated,
        end_attempt,
        fail_attempt,
    )

    # the attempt, where the job's resources say it (0: not said; attempts.check_not_repeated)
    _attempt = int(getattr(getattr(_job, "resources", None), "attempt", 0) or 0)
    _makes_features = getattr(_job, "rule", None) in ("extract", "import_features")
    _log = getattr(_job, "log", None)
    _mark = _job.output.features if _makes_features else (_log[0] if _log else None)
    try:
        if _mark is None:  # a job without a log (not one of this workflow's) has no mark
            pass
        elif _makes_features:
            begin_attempt(_mark, _attempt)
        elif _attempt == 1:  # a first attempt starts clean
            end_attempt(_mark)
        else:
            check_not_repeated(_mark, _attempt)
    except RepeatedFailureError as err:
        with open(_job.log[0], "a", encoding="utf-8") as _fh:  # after the first error
            _fh.write(f"ERROR RepeatedFailureError: {err}\n")
        sys.exit(f"RepeatedFailureError: {err}")

    def _note_failure() -> None:
        """At exit: record the uncaught error the script ended with, which the interpreter
        keeps in sys.last_exc (sys.last_value before Python 3.12), when a retry repeats it."""
        err = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
        if err is not None and _mark is not None:
            fail_attempt(_mark, err, create=not _makes_features)

    atexit.register(_note_failure)
