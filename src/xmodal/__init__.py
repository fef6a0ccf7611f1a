"""xmodal: single-stimulus intra-modal dispersion (GPA) and cross-modal convergence (CKNNA).

The library behind the Snakemake workflow. It never imports Snakemake: every function takes
arrays, paths or plain values and can be used from a notebook.
"""

import os

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
