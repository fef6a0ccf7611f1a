"""Small shared I/O helpers: atomic writes and tidy tables."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

__all__ = [
    "DiskFullError",
    "atomic_path",
    "is_disk_full",
    "read_table",
    "remove_stale_temporaries",
    "write_table",
]


class DiskFullError(OSError):
    """The file system ran out of space (or quota) while an output was written."""


def is_disk_full(err: BaseException) -> bool:
    """True for "no space left on device" / "disk quota exceeded", also as HDF5 reports them."""
    if not isinstance(err, OSError):
        return False
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return "no space left on device" in text or "quota exceeded" in text


def _free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB"
    except OSError:
        return "unknown"


def _temp_glob(final: Path, suffix: str) -> str:
    return f".{final.name}.*.tmp{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    A crash, an exception or a kill inside the block never leaves a file at ``path``: the
    temporary file (hidden, same directory so the rename is atomic) is removed on error. Running
    out of disk space is re-raised as :class:`DiskFullError` naming ``path`` and what to do.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = final.suffix if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing {final}: the partial file was removed and nothing was "
                f"written at {final} ({_free_space(final.parent)} free now in {final.parent}). "
                f"Free space there (or move results/ to a bigger disk) and rerun; finished "
                f"outputs are kept. Original error: {err}",
            ) from err
        raise


def remove_stale_temporaries(path: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Remove temporary files that an interrupted :func:`atomic_path` write of ``path`` left.

    A job killed with SIGKILL (out of memory, time limit, ``scancel``) cannot clean up; its
    hidden ``.<name>.*.tmp<suffix>`` file stays next to the output. Call this before rewriting
    ``path`` (Snakemake's directory lock guarantees a single writer per output). Returns the
    removed paths; each removal is logged.
    """
    final = Path(path)
    suffix = final.suffix if suffix is None else suffix
    removed = []
    if final.parent.is_dir():
        for stale in sorted(final.parent.glob(_temp_glob(final, suffix))):
            with contextlib.suppress(FileNotFoundError):
                size = stale.stat().st_size
                stale.unlink()
                removed.append(stale)
                log.info(
                    "removed %s (%.1f MiB), left by an interrupted write of %s",
                    stale,
                    size / 2**20,
                    final,
                )
    return removed


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a tidy table as TSV (header, no index), atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a TSV table written by :func:`write_table`."""
    return pd.read_csv(path, sep="\t")
