"""Threads for independent per-model steps (GPA fits, per-model kernels): one place for the pool."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

__all__ = ["Mapper", "available_cores", "executor", "mapper", "n_workers", "set_thread_budget"]

#: ``map`` or a thread pool's ``map``: how independent per-model steps are run.
Mapper = Callable[..., Iterable[Any]]

#: the most threads this process's pools may use (a workflow job's ``threads``); None: no cap
_budget: int | None = None


@contextmanager
def executor(jobs: int) -> Iterator[ThreadPoolExecutor | None]:
    """A pool of ``jobs`` threads (closed on exit), or None for one job."""
    if jobs <= 1:
        yield None
        return
    with ThreadPoolExecutor(jobs) as pool:
        yield pool


@contextmanager
def mapper(jobs: int) -> Iterator[Mapper]:
    """``map`` for one job, else the ``map`` of a pool of ``jobs`` threads (closed on exit)."""
    with executor(jobs) as pool:
        yield map if pool is None else pool.map


def set_thread_budget(threads: int | None) -> None:
    """Cap :func:`available_cores` at ``threads`` (None: no cap).

    The workflow's step scripts set it to their job's ``threads`` (``scripts/_bootstrap.py``),
    so that a job's thread pools and BLAS use the CPUs Snakemake counted for it (``--cores``
    locally, ``cpus_per_task`` on SLURM), not every core of the machine.
    """
    global _budget
    if threads is not None and int(threads) < 1:
        raise ValueError(f"a thread budget must be at least 1, got {threads!r}")
    _budget = None if threads is None else int(threads)


def available_cores() -> int:
    """CPU cores this process may use: those it may run on (its CPU affinity), at most the
    thread budget (:func:`set_thread_budget`)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cores = max(1, os.cpu_count() or 1)
    return cores if _budget is None else min(cores, _budget)


def n_workers(n_tasks: int, n_jobs: int | None = None) -> int:
    """Threads for ``n_tasks`` independent per-model steps: ``n_jobs`` if given (at least 1),
    else one per available core (:func:`available_cores`), at most one per task."""
    return min(n_tasks, available_cores()) if n_jobs is None else max(1, int(n_jobs))
