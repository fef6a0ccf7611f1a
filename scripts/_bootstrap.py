"""Put the workflow's own library (src/xmodal) first on sys.path for the step scripts.

Snakemake adds this directory to the path of every script it runs; importing this module
makes the library importable whether or not it is installed in the job's environment
(conda environments from envs/ hold its dependencies only). It also caps the job's threads,
hides the GPUs from a job that asked for none, and marks the output of an extraction or import
until it is made (xmodal.io.begin_attempt).
"""

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
    # (xmodal.io.begin_attempt): one that fails anywhere (the weights not in the cache, a bad
    # config) or is killed leaves the mark, and the next run makes the file again, where
    # Snakemake, which records a failed job's output as made, would say "Nothing to be done".
    # A retry (the profile's `retries`) of an attempt that failed with an error a retry repeats
    # stops here, before a model is loaded (xmodal.io.fail_attempt)
    if getattr(_job, "rule", None) in ("extract", "import_features"):
        from xmodal.io import RepeatedFailureError, begin_attempt

        try:
            begin_attempt(_job.output.features, int(getattr(_job.resources, "attempt", 1)))
        except RepeatedFailureError as err:
            with open(_job.log[0], "a", encoding="utf-8") as _fh:  # after the first error
                _fh.write(f"ERROR RepeatedFailureError: {err}\n")
            sys.exit(f"RepeatedFailureError: {err}")
