"""Threads for independent per-model steps (GPA fits, per-model kernels): one place for the pool."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

__all__ = ["Mapper", "available_cores", "executor", "mapper"]

#: ``map`` or a thread pool's ``map``: how independent per-model steps are run.
Mapper = Callable[..., Iterable[Any]]


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


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
