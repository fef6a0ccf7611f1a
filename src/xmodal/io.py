"""Small shared I/O helpers: atomic writes and the one reader/writer of the pipeline's tables.

Every table the pipeline writes is a tab-separated file with a header row, no quoting, written by
:func:`write_table` and read back by :func:`read_table`. Identifiers (stimulus ids, model keys,
layer names, condition names) are text in every file and every reader: ``007``, ``7``, ``1.50``
and ``NA`` are four different stimulus ids (docs/contracts.md, "Tables").
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import logging
import os
import re
import resource
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

# re-exported: scripts/extract.py imports it from here, and an edit of that script re-extracts
# every model (docs/cluster.md, "What reruns"); the attempt marks are xmodal.attempts'
from xmodal.attempts import fail_attempt

log = logging.getLogger(__name__)

__all__ = [
    "TEXT_COLUMNS",
    "DiskFullError",
    "FileTooLargeError",
    "TableError",
    "UnwritableOutputError",
    "atomic_path",
    "chmod_like_new",
    "directory_digest",
    "fail_attempt",
    "file_digests",
    "is_disk_full",
    "is_file_too_large",
    "read_table",
    "remove_stale_temporaries",
    "scratch_path",
    "write_table",
]

#: Columns that hold identifiers or labels: always read as text, never as numbers or missing
#: values. Any column whose name ends in ``_id`` is text too.
TEXT_COLUMNS = frozenset(
    {
        "stimulus_id", "image", "caption", "model", "vision", "llm", "held_out", "layer_name",
        "condition", "summary", "set", "metric", "label", "family", "modality", "reason",
        "kind", "group", "side", "property", "split", "source",
        # the stimuli report's images.tsv: Pillow's mode "1" (bilevel) is text, not the number 1
        "mode", "format", "conversion", "bytes_sha256", "pixels_sha256",
        # the provenance table (xmodal.pipeline.provenance_table): a commit "1e3" or a version
        # "5.10" read as a number would change it
        "key", "id", "requested_revision", "revision", "sha256", "stimuli_sha256",
        "compute_dtype", "device", "pooling", "torch", "timm", "transformers", "numpy", "scipy",
        "xmodal", "created",
    }
)  # fmt: skip
#: How a missing number is written (and read back).
NA_REP = "NaN"
_NA_TEXT = frozenset({"", "NaN", "nan"})


class TableError(ValueError):
    """A pipeline table that cannot be written or read as its contract says."""


class DiskFullError(OSError):
    """The file system ran out of space (or quota) while an output was written."""


class UnwritableOutputError(PermissionError):
    """An output cannot be written: its folder is not writable by this user."""


class FileTooLargeError(OSError):
    """An output grew past the largest file this process or file system may write."""

    #: a retry on another node meets the same limit (xmodal.attempts.fail_attempt)
    repeats_on_retry = True


def _errno_behind(err: BaseException, codes: tuple[int, ...], texts: tuple[str, ...]) -> bool:
    """True when ``err``, or an error that led to it, is an OSError with one of ``codes`` or
    says one of ``texts`` (lower case) or HDF5's ``errno = <code>,``."""
    seen, link = [], err
    while link is not None and link not in seen:
        seen.append(link)
        if isinstance(link, OSError) and link.errno in codes:
            return True
        text = str(link).lower()
        if any(t in text for t in texts) or any(f"errno = {c}," in text for c in codes):
            return True
        link = link.__cause__ or link.__context__
    return False


def is_disk_full(err: BaseException) -> bool:
    """True for "no space left on device" / "disk quota exceeded", also as HDF5 reports them,
    and for an error of another kind that one of these led to or names (torch's writer said
    ``RuntimeError: [enforce fail …] unexpected pos``, h5py ``RuntimeError(… errno = 28 …)``
    when the disk filled, audit)."""
    return _errno_behind(
        err, (errno.ENOSPC, errno.EDQUOT), ("no space left on device", "quota exceeded")
    )


def is_file_too_large(err: BaseException) -> bool:
    """True for "file too large" (EFBIG: the shell's ``ulimit -f``, or a file system's largest
    file), also as HDF5 and torch report it (see :func:`is_disk_full`)."""
    return _errno_behind(err, (errno.EFBIG,), ("file too large",))


def _free_space(directory: Path) -> str:
    try:
        return f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB"
    except OSError:
        return "unknown"


def _temp_glob(final: Path, suffix: str) -> str:
    return f".{final.name}.*.tmp{suffix}"


def _temporary_next_to(final: Path, suffix: str | None) -> Path:
    """Create an empty hidden ``.<name>.*.tmp<suffix>`` file next to ``final``, with the mode
    any new file gets there: created 0666 and left to the umask, or to the folder's default
    ACL (``mkstemp`` creates 0600, and a chmod to 0666 & ~umask after it set a default ACL's
    mask to nothing: the lab group of a shared folder could not read the results, audit)."""
    tail = f".tmp{final.suffix if suffix is None else suffix}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        while True:
            name = final.parent / f".{final.name}.{secrets.token_hex(4)}{tail}"
            try:
                _create_new(name)
            except FileExistsError:
                continue
            return name
    except OSError as err:
        if not isinstance(err, PermissionError) and err.errno != errno.EROFS:
            raise
        raise _unwritable(err, final) from None


def _create_new(path: Path) -> None:
    """Create the empty file ``path`` (none may be there), as any program creates a new file:
    mode 0666 for the umask or the folder's default ACL to reduce."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _unwritable(err: OSError, final: Path) -> UnwritableOutputError:
    why = "it is on a read-only file system" if err.errno == errno.EROFS else "no permission"
    return UnwritableOutputError(
        err.errno,
        f"cannot write {final}: {why} to create files in {final.parent} "
        f"({err.strerror}); make that folder writable (chmod u+w) or run where you can write",
    )


def _disk_full(err: BaseException, final: Path, what: str) -> DiskFullError:
    return DiskFullError(
        errno.ENOSPC,
        f"disk full while writing {what}: the partial file was removed and nothing was "
        f"written at {final} ({_free_space(final.parent)} free now in {final.parent}). "
        f"Free space there (or move results/ to a bigger disk) and rerun; finished "
        f"outputs are kept. Original error: {err}",
    )


def _too_large(err: BaseException, final: Path, what: str) -> FileTooLargeError:
    try:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (OSError, ValueError):
        limit = resource.RLIM_INFINITY
    why = (
        f"this job may write files of at most {limit} bytes (ulimit -f); raise the limit "
        "where the job starts"
        if limit != resource.RLIM_INFINITY
        else f"the file system of {final.parent} takes no larger file; move results/ to "
        "one that does"
    )
    return FileTooLargeError(
        errno.EFBIG,
        f"file too large while writing {what}: {why}. The partial file was removed and "
        f"nothing was written at {final}. Original error: {err}",
    )


def _output_error(err: BaseException, final: Path, what: str) -> OSError | None:
    """The output's own error for a full disk or a file grown too large behind ``err``."""
    if isinstance(err, (DiskFullError, FileTooLargeError)):
        return None
    if is_disk_full(err):
        return _disk_full(err, final, what)
    if is_file_too_large(err):
        return _too_large(err, final, what)
    return None


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str | None = None, *, sweep: bool = True
) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    A crash, an exception or a kill inside the block never leaves a file at ``path``: the
    temporary file (hidden, same directory so the rename is atomic) is removed on error, and one
    that a killed earlier write of ``path`` left is removed first (``sweep``; off for files
    that several processes may write at once, such as the digest caches, whose writers would
    remove each other's). The file's data reach the disk before the rename. Running out of disk
    space is re-raised as :class:`DiskFullError` naming ``path`` and what to do, a file grown
    past the size limit (EFBIG) as :class:`FileTooLargeError`.
    """
    final = Path(path)
    if sweep:
        remove_stale_temporaries(final, suffix)  # a killed earlier write's
    tmp = _temporary_next_to(final, suffix)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # what a new file gets here
    try:
        yield tmp
        if tmp.is_file() and stat.S_IMODE(tmp.stat().st_mode) != mode:
            os.chmod(tmp, mode)  # a writer that made the file again (0600)
        _fsync(tmp)  # on disk before the rename: a node that crashes leaves no empty result
        os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        said = _output_error(err, final, str(final))
        if said is not None:
            raise said from err
        raise


@contextlib.contextmanager
def scratch_path(path: str | os.PathLike, suffix: str) -> Iterator[Path]:
    """Yield a hidden scratch file next to ``path`` (the output it helps write); always removed.

    For data too large for memory on its way into ``path``. The file is named like
    :func:`atomic_path`'s temporaries (``suffix`` after ``.tmp``), so that
    :func:`remove_stale_temporaries` with the same ``suffix`` removes one a killed job left.
    Running out of disk space is re-raised as :class:`DiskFullError` naming ``path``, a file
    grown past the size limit as :class:`FileTooLargeError`.
    """
    final = Path(path)
    tmp = _temporary_next_to(final, suffix)
    try:
        yield tmp
    except BaseException as err:
        said = _output_error(err, final, f"scratch file {tmp} for {final}")
        if said is not None:
            raise said from err
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; a file system that cannot is
    left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        # a file system that cannot fsync (or a folder it will not) is left as it is; a failed
        # write-back (EIO, a full disk) means the data are not there
        if path.is_dir() or err.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EROFS):
            return
        raise
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # POSIX has no read-only query; restore at once
    os.umask(mask)
    return mask


def chmod_like_new(path: str | os.PathLike) -> None:
    """Give ``path``, and everything under it if it is a folder, the modes that a new file or
    folder gets in its folder (for files written by libraries that create them 0600, e.g.
    safetensors): those of a probe created there, so that the umask, a default ACL and a
    folder's setgid bit act as on any new file (0666 & ~umask alone set a default ACL's mask
    to nothing and cleared the setgid bit of the model folders, audit)."""
    root = Path(path)
    modes: dict[tuple[Path, bool], int] = {}
    for p in [root, *(root.rglob("*") if root.is_dir() else ())]:
        if p.is_symlink() or not p.exists():
            continue
        key = (p.parent, p.is_dir())
        if key not in modes:
            modes[key] = _new_mode(*key)
        os.chmod(p, modes[key])


def _new_mode(folder: Path, is_dir: bool) -> int:
    """The permission bits (with setgid for a folder) of a file, or folder, newly made in
    ``folder``: a probe is made and removed; 0666 or 0777 & ~umask where none can be made."""
    probe = folder / f".mode-probe.{secrets.token_hex(4)}"
    try:
        if is_dir:
            probe.mkdir(0o777)
        else:
            _create_new(probe)
    except OSError:
        return (0o777 if is_dir else 0o666) & ~_umask()
    try:
        return stat.S_IMODE(probe.stat().st_mode)
    finally:
        if is_dir:
            probe.rmdir()
        else:
            probe.unlink()


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
                try:
                    stale.unlink()
                except OSError as err:  # a read-only folder or mount: the write says so
                    if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                        raise
                    log.warning("cannot remove %s (%s)", stale, err.strerror)
                    continue
                removed.append(stale)
                log.info(
                    "removed %s (%.1f MiB), left by an interrupted write of %s",
                    stale,
                    size / 2**20,
                    final,
                )
    return removed


def _is_text(column: str) -> bool:
    return column in TEXT_COLUMNS or column.endswith("_id")


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a tidy table as TSV (header, no index, no quoting), atomically.

    Text is written exactly as it is; a value holding a tab or a line break cannot be stored in a
    TSV line and is refused (:class:`TableError` naming the column and row). Missing numbers are
    written as ``NaN``; floats keep every digit (``repr``), so reading back is exact.
    """
    names = [str(c) for c in df.columns]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # read back, the second would be renamed (``x.1``) and its numbers lost
        raise TableError(f"{path}: column name(s) {repeated} appear more than once")
    odd = next((n for n in names if re.search("[\t\r\n]", n) or not n.strip()), None)
    if odd is not None:
        raise TableError(f"{path}: column name {odd!r} is empty or holds a tab or line break")
    # float32 as float64: pandas 3 writes a float32 by its shortest float32 spelling (0.1),
    # which reads back as another float64 than the value (pandas 2 wrote 0.10000000149011612);
    # pandas' nullable Float32 as Float64
    narrow = {
        c: np.float64 if isinstance(t, np.dtype) else "Float64"
        for c, t in df.dtypes.items()
        if t.kind == "f" and getattr(t, "itemsize", 8) < 8
    }
    if narrow:
        df = df.astype(narrow)
    for col in df.columns:
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            text = df[col].astype(str)
            bad = text.str.contains("[\t\r\n]", regex=True)
            if bad.any():
                row = int(bad.to_numpy().nonzero()[0][0])
                raise TableError(
                    f"{path}: column {col!r}, row {row + 1} holds a tab or line break "
                    f"({text.iloc[row][:60]!r}); a TSV field cannot contain one"
                )
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, quoting=csv.QUOTE_NONE, na_rep=NA_REP)


#: a number as a spreadsheet may rewrite it: a decimal comma (``0,5``), quoted (``"0.5"``)
_MISSPELT_NUMBER = r"""\s*["']?\s*[+-]?(\d+[.,]?\d*|[.,]\d+)([eE][+-]?\d+)?\s*["']?\s*"""


def _exact_floats(values: pd.Series, parsed: pd.Series) -> pd.Series:
    """``parsed`` with each float read again by Python's ``float``, which rounds correctly:
    pandas 2's parser is off by one unit in the last place for about a third of the values
    :func:`write_table` writes exactly (pandas 3's is exact), so that two dispersions one unit
    apart could read back as a tie."""
    if parsed.dtype.kind != "f":
        return parsed
    present = parsed.notna().to_numpy()
    exact = parsed.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    try:
        exact[present] = np.array([float(v) for v in values.to_numpy()[present]], dtype=np.float64)
    except ValueError:  # a spelling pandas reads and Python does not: pandas' value
        return parsed
    return pd.Series(exact, index=parsed.index, name=parsed.name)


def _parse_column(path: Path, name: str, values: pd.Series, number: bool = False) -> pd.Series:
    """A column of a table read as text, turned into numbers or booleans where it holds them.

    A column that must hold numbers (``number``), or most of whose values are numbers, with a
    value that is not one (``0,5``, ``"0.5"``, ``n/a``) is refused, naming the row and value:
    kept as text it would fail later, in a step that cannot say which file was wrong. So is a
    column whose values that are not numbers are all numbers misspelt (every decimal point a
    comma, as a spreadsheet in such a locale writes a whole column).
    """
    if _is_text(name):
        return values
    present = values[~values.isin(_NA_TEXT)]
    if len(present) and present.isin(("True", "False")).all() and len(present) == len(values):
        if not number:
            return values == "True"
    parsed = pd.to_numeric(values.mask(values.isin(_NA_TEXT)), errors="coerce")
    bad = parsed.isna() & ~values.isin(_NA_TEXT)
    if not bad.any():
        return _exact_floats(values, parsed)
    misspelt = values[bad].str.fullmatch(_MISSPELT_NUMBER).all()
    if number or misspelt or 2 * int(bad.sum()) < len(present):
        row = int(bad.to_numpy().nonzero()[0][0])
        raise TableError(
            f"{path}: column {name!r}, row {row + 1} (line {row + 2}) holds {values.iloc[row]!r}"
            f"{f' (and {int(bad.sum()) - 1} rows more)' if bad.sum() > 1 else ''} where a "
            "number is expected (a decimal point, not a comma; no quotes; NaN or empty for a "
            "missing value)"
        )
    return values  # a text column the contract does not list: keep it as text


def read_table(path: str | os.PathLike, numbers: Iterable[str] = ()) -> pd.DataFrame:
    """Read a table written by :func:`write_table`: identifiers as text, numbers as numbers.

    Columns in :data:`TEXT_COLUMNS` (and ``*_id``) stay exactly as written (no ``NA`` parsing, no
    number parsing: ``0180`` stays ``0180``); other columns become numbers (``NaN`` or empty =
    missing) or booleans (``True``/``False``) when every value is one. ``numbers``: columns the
    caller needs as numbers; a missing one, or a value in one that is not a number, is a
    :class:`TableError` naming the file, column and row (as is a value that is not a number in
    a column that otherwise holds numbers).
    """
    path = Path(path)
    try:
        raw = pd.read_csv(
            path,
            sep="\t",
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            quoting=csv.QUOTE_NONE,
            encoding="utf-8",
        )
    except FileNotFoundError:
        raise TableError(f"{path}: table not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise TableError(f"{path}: not a tab-separated table with a header row ({err})") from err
    except pd.errors.EmptyDataError:
        raise TableError(f"{path}: the table is empty (not even a header row)") from None
    numbers = set(numbers)
    lacking = sorted(numbers - set(raw.columns))
    if lacking:
        raise TableError(f"{path}: no column(s) {lacking} (columns: {list(raw.columns)})")
    return pd.DataFrame(
        {c: _parse_column(path, str(c), raw[c], str(c) in numbers) for c in raw.columns},
        index=raw.index,
    )


# ============================================================================ file digests
#: the format of a digest cache (:func:`file_digests`)
_DIGEST_CACHE_VERSION = 1
#: a file changed less than this long before it was read may change again within the same
#: timestamp (file systems that keep whole seconds): its digest is not cached ("racy" files)
_RACY_NS = 2_000_000_000


def _file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def _read_digest_cache(path: Path | None) -> dict[str, list]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") == _DIGEST_CACHE_VERSION and isinstance(data.get("files"), dict):
            return data["files"]
    except (OSError, ValueError, AttributeError):
        pass  # missing or damaged: every file is read
    return {}


def file_digests(
    paths: Sequence[str | os.PathLike], cache: str | os.PathLike | None = None
) -> list[str | None]:
    """Each file's SHA-256 (None where it is not a readable regular file).

    With ``cache`` (a JSON file, rewritten atomically when it changes), a file whose size,
    modification time, change time and inode are those recorded with its digest is not read
    again, so that a dry run reads only new or changed files. Any write to a file changes its
    change time, which no tool sets back, so a file replaced by one of the same size and the
    same modification time is still read. A file changed less than 2 s before it was read is
    not cached: on a file system that keeps whole seconds, its next change could leave every
    timestamp as it was. A folder or a named pipe is not opened.
    """
    cache = None if cache is None else Path(cache)
    known = _read_digest_cache(cache)
    # absolute, but '..' kept: abspath collapsed link/../x as text, where the OS follows the
    # symbolic link first, so the digest was of another file than the extraction reads
    files = [os.fspath(Path(p).absolute()) for p in paths]
    digests: dict[str, str | None] = {}
    todo: dict[str, list[int]] = {}  # file -> its stat key, taken before it is read
    for path in dict.fromkeys(files):  # each file once, in order
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):  # a folder or a pipe is not read
            digests[path] = None
            continue
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = known.get(path)
        if isinstance(entry, list) and entry[:-1] == key:
            digests[path] = entry[-1]
        else:
            todo[path] = key
    if todo:
        if len(todo) >= 1000:
            log.info("reading %d files for their SHA-256 (%s, …)", len(todo), next(iter(todo)))
        with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:  # hashlib frees the GIL
            digests.update(zip(todo, pool.map(_file_sha256, todo), strict=True))
    if cache is not None:
        now = time.time_ns()
        entries = {
            path: known[path] if path not in todo else [*todo[path], digest]
            for path, digest in digests.items()
            if digest is not None
            and (path not in todo or now - max(todo[path][1], todo[path][2]) >= _RACY_NS)
        }
        if entries != known:
            with atomic_path(cache, sweep=False) as tmp:
                record = {"version": _DIGEST_CACHE_VERSION, "files": entries}
                tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    return [digests[path] for path in files]


def directory_digest(folder: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """SHA-256 of a folder's regular files (its top level, not its subfolders): their names and
    contents (:func:`file_digests`, with ``cache``), so that a copy of the folder has the same
    digest and any file added, removed, renamed or rewritten changes it."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    pairs = list(zip(names, file_digests([folder / n for n in names], cache), strict=True))
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()
