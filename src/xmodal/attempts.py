"""The marks of a job's attempts: which outputs a failed or killed job left unmade, and which
errors a retry of the job would repeat.

A job that makes a feature file marks it from its first line until it is made
(:func:`begin_attempt`, :func:`end_attempt`); the workflow reads the marks left next to missing
files (:func:`unfinished_outputs`). An attempt that fails with an error a retry repeats records
it in its mark (:func:`fail_attempt`; for the jobs that make no feature file, a mark next to
the job's log), and the next attempt of that run stops at once (:func:`check_not_repeated`).
Light on purpose (no numerical library): ``scripts/_bootstrap.py`` imports it in every job
before the job's log is set up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from xmodal.logs import is_xmodal_error

__all__ = [
    "RepeatedFailureError",
    "attempt_marker",
    "begin_attempt",
    "check_not_repeated",
    "end_attempt",
    "fail_attempt",
    "forget_failures",
    "marked_paths",
    "passing_error",
    "unfinished_outputs",
]


class RepeatedFailureError(RuntimeError):
    """A retried job not run again: its last attempt failed with an error a retry repeats."""


def attempt_marker(path: str | os.PathLike) -> Path:
    """The hidden file that says a job is making ``path`` (:func:`begin_attempt`)."""
    final = Path(path)
    return final.with_name(f".{final.name}.attempt")


#: The line of an attempt mark that records an error a retry repeats (:func:`fail_attempt`).
_REPEATS = "fails again on retry: "


def begin_attempt(path: str | os.PathLike, attempt: int = 1) -> None:
    """Mark that a job is making ``path``; :func:`end_attempt` removes the mark once it is made,
    so a job that fails or is killed leaves it.

    Snakemake 9 records a failed job's outputs as made (with the new parameters), so a run
    after one whose every re-extraction failed said "Nothing to be done" and kept what the
    earlier file made; the mark next to a missing ``path`` tells the workflow
    (:func:`unfinished_outputs`).

    ``attempt`` is Snakemake's (2 and up: the profile's ``retries`` resubmitted the job). When
    the attempt before it failed with an error a retry repeats (:func:`fail_attempt`), this one
    raises :class:`RepeatedFailureError` at once (:func:`check_not_repeated`), instead of
    loading a model for hours to fail the same way.
    """
    check_not_repeated(path, attempt)
    marker = attempt_marker(path)
    try:  # before any work: an output folder nobody can write to fails here, not after hours
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            f"started {time.strftime('%Y-%m-%dT%H:%M:%S%z')} on {socket.gethostname()}\n"
        )
    except OSError as err:
        from xmodal.io import _disk_full, _unwritable, is_disk_full  # numpy, pandas: not at start

        if isinstance(err, PermissionError) or err.errno == errno.EROFS:
            raise _unwritable(err, Path(path)) from None
        if is_disk_full(err):
            raise _disk_full(err, Path(path), str(marker)) from err
        raise


def check_not_repeated(path: str | os.PathLike, attempt: int = 1) -> None:
    """Raise :class:`RepeatedFailureError`, naming the error, when the mark of ``path`` records
    that an earlier attempt of this run's job failed with an error a retry repeats
    (:func:`fail_attempt`); attempt 1 always runs.

    ``attempt`` is Snakemake's, or 0 where the job's resources do not say it: a new run of
    Snakemake drops the records of earlier runs at its start (:func:`forget_failures`), so a
    record is then this run's.
    """
    marker = attempt_marker(path)
    if attempt == 1 or not marker.is_file():
        return
    with contextlib.suppress(OSError, UnicodeDecodeError):
        lines = marker.read_text(encoding="utf-8").splitlines()
        failed = [line.removeprefix(_REPEATS) for line in lines if line.startswith(_REPEATS)]
        if failed:
            which = f"attempt {attempt}" if attempt > 1 else "a retry"
            raise RepeatedFailureError(
                f"{path}: {which} not run: the attempt before it failed with an "
                "error that a retry repeats (more memory, more time and another node change "
                f"nothing): {failed[-1].rstrip('.')}. Fix that and run Snakemake again (a "
                "new run tries again)"
            )


#: Error numbers of a file, not of the moment: a missing file or folder, no permission, a
#: read-only file system, a bad name. Other error numbers (an I/O error, a stale NFS handle, a
#: time-out, no memory, a full disk) may pass on retry.
_LASTING_ERRNOS = frozenset(
    {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS,
     errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG}
)  # fmt: skip


#: An error number in an error's text: ``[Errno 5]`` (Python), ``errno = 5`` (HDF5, as h5py
#: raises it, also inside a KeyError).
_ERRNO_TEXT = re.compile(r"\[errno (\d+)\]|errno = (\d+)")


def passing_error(err: BaseException) -> bool:
    """Whether ``err`` may pass when the job is retried (more memory and time, maybe another
    node): an ``OSError`` with an error number other than those of the file itself (an I/O
    error, a stale NFS handle, a full disk), or any error whose text names such a number (h5py
    reports a failed read of a feature file as ``KeyError(... errno = 5 ...)``, audit), running
    out of memory (host or GPU), or an error whose class sets ``repeats_on_retry = False`` (no
    usable GPU on the node; a failed download)."""
    if isinstance(err, MemoryError) or not getattr(err, "repeats_on_retry", True):
        return True
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno not in _LASTING_ERRNOS
    text = str(err).lower()
    named = _ERRNO_TEXT.search(text)
    if named:
        return int(named[1] or named[2]) not in _LASTING_ERRNOS
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "not enough memory" in text
    )


def fail_attempt(path: str | os.PathLike, err: BaseException, *, create: bool = False) -> None:
    """Record in the mark of :func:`begin_attempt` that the job making ``path`` failed with
    ``err``, when a retry of the job would fail with it again: the project's own errors about
    the model, its weights, the stimuli or the config, unless it or an error that led to it
    may pass on retry (:func:`passing_error`: the file system, memory, the node). An error
    of the file system whose class sets ``repeats_on_retry = True`` (a file past the size
    limit, which the next node has too) is recorded as well.

    Without ``create`` only an existing mark is written to; with it, a missing one is made
    (the mark of a job's log, for the jobs that :func:`begin_attempt` does not mark).
    """
    chain, link = [], err
    while link is not None and link not in chain:  # the errors that led to it, in order
        chain.append(link)
        link = link.__cause__ or link.__context__
    repeats = is_xmodal_error(err) and (
        getattr(err, "repeats_on_retry", None) is True
        or (
            not isinstance(err, OSError | RepeatedFailureError)
            and not any(passing_error(e) for e in chain)
        )
    )
    marker = attempt_marker(path)
    if repeats and (create or marker.is_file()):
        line = f"{_REPEATS}{' '.join(f'{type(err).__name__}: {err}'.split())}\n"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if marker.is_file() and line in marker.read_text(encoding="utf-8"):
                return  # recorded once (the extraction's script, then the bootstrap at exit)
            with open(marker, "a", encoding="utf-8") as fh:
                fh.write(line)


def forget_failures(paths: Iterable[str | os.PathLike]) -> None:
    """Drop :func:`fail_attempt`'s records from the marks of ``paths``: a new run of Snakemake
    (the workflow calls this at its start) retries its jobs, whatever an earlier run's
    attempts failed with (the user may have fixed it), even where its own attempt 1 dies
    before it writes its mark (a node failure). A mark left with nothing in it goes."""
    for path in paths:
        marker = attempt_marker(path)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = marker.read_text(encoding="utf-8")
            if _REPEATS in text:
                lines = text.splitlines(keepends=True)
                kept = "".join(x for x in lines if not x.startswith(_REPEATS))
                if kept:
                    marker.write_text(kept)
                else:
                    marker.unlink()


def marked_paths(folder: str | os.PathLike) -> list[Path]:
    """The paths under ``folder`` that have a mark (:func:`attempt_marker`), for
    :func:`forget_failures`; none where ``folder`` does not exist."""
    return sorted(
        m.with_name(m.name[1:].removesuffix(".attempt"))
        for m in Path(folder).rglob(".*.attempt")
        if m.is_file()
    )


def end_attempt(path: str | os.PathLike) -> None:
    """Remove :func:`begin_attempt`'s mark: ``path`` is made."""
    attempt_marker(path).unlink(missing_ok=True)


def unfinished_outputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The ``paths`` that are missing while the mark of a job that made them is there: their
    last job failed or was killed (:func:`begin_attempt`)."""
    return [Path(p) for p in paths if not Path(p).exists() and attempt_marker(p).is_file()]
