"""Logging set-up for pipeline steps: everything goes to the step's log, with secrets redacted.

An uncaught error raised by xmodal itself (a bad config value, manifest, image, feature file or
model: :class:`ValueError`/:class:`RuntimeError` subclasses defined in ``xmodal``) is logged as
one line that names what is at fault and what to do; any other error is logged with its full
traceback. ``XMODAL_TRACEBACK=1`` keeps the traceback for xmodal errors too.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType

#: Environment variables that may hold a Hugging Face access token.
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")
_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
REDACTED = "***"

__all__ = [
    "REDACTED",
    "TOKEN_ENV",
    "Progress",
    "RedactTokens",
    "forward_to",
    "log_to",
    "preview",
    "redact",
]


#: A long step logs its progress at most this often (seconds).
PROGRESS_EVERY_S = 30.0


class Progress:
    """Counts the items of a long step done (from any thread) and logs "<what>: i of n, t s so
    far" at most every :data:`PROGRESS_EVERY_S` seconds (not after the last item: the step's own
    line follows), so that a job's log shows it is moving (a SLURM job's log is often all its
    user sees)."""

    def __init__(self, log: logging.Logger, what: str, total: int) -> None:
        self.log, self.what, self.total, self.every = log, what, total, PROGRESS_EVERY_S
        self.done = 0
        self._lock = threading.Lock()
        self._start = self._last = time.perf_counter()

    def step(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.perf_counter()
            if now - self._last < self.every or self.done >= self.total:
                return
            self._last = now
            done, elapsed = self.done, now - self._start
        self.log.info("%s: %d of %d, %.0f s so far", self.what, done, self.total, elapsed)


def preview(items: Iterable[object], n: int = 5) -> str:
    """The first ``n`` items and their count, for an error message: ``['a', 'b', ...] (7 in all)``."""
    items = list(items)
    head = ", ".join(repr(s) for s in items[:n])
    return f"[{head}{', ...' if len(items) > n else ''}] ({len(items)} in all)"


def redact(text: str) -> str:
    """``text`` with every Hugging Face token (from the environment, or ``hf_...``) replaced."""
    for name in TOKEN_ENV:
        token = os.environ.get(name)
        if token and len(token) >= 8:
            text = text.replace(token, REDACTED)
    return _TOKEN_RE.sub(REDACTED, text)


class RedactTokens(logging.Filter):
    """A handler filter that removes access tokens from messages and tracebacks."""

    _fmt = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._fmt.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def is_xmodal_error(err: BaseException) -> bool:
    """Whether ``err`` is one of the project's own errors (a class of an xmodal module: a
    ValueError, RuntimeError or OSError that names what is wrong)."""
    return type(err).__module__.startswith("xmodal") and isinstance(
        err, ValueError | RuntimeError | OSError
    )


def log_to(path: str | os.PathLike | None, level: int = logging.INFO) -> logging.Logger:
    """Send log records (and uncaught exceptions) to ``path`` and to stderr; return the root logger.

    Tokens are redacted from every record. An uncaught xmodal error is logged as one line
    (``ERROR <Type>: <message>``), any other exception with its traceback.
    """
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(RedactTokens())
        root.addHandler(h)

    def _hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        if is_xmodal_error(err) and not os.environ.get("XMODAL_TRACEBACK"):
            root.error("%s: %s", kind.__name__, err)
        else:
            root.error("%s: %s", kind.__name__, err, exc_info=(kind, err, tb))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG):
            # a full disk (or a file grown past its size limit): the message is out and the
            # partial file removed; the interpreter's
            # teardown would close HDF5 files whose last write failed, and HDF5 then crashes
            # (exit 139 after the message)
            for h in root.handlers:
                h.flush()
            os._exit(1)

    sys.excepthook = _hook
    _exit_on_sigterm(root)
    return root


def _exit_on_sigterm(log: logging.Logger) -> None:
    """SIGTERM (SLURM's time limit, ``scancel``, Snakemake stopping a job) raises SystemExit,
    so that cleanup runs as on an error: temporary files of unfinished outputs are removed
    (``xmodal.io.atomic_path``) instead of staying next to them. A handler set by someone else
    is kept."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def stop(signum: int, frame: object) -> None:
        log.error("terminated (SIGTERM: a time limit, scancel or snakemake stopping the job)")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


class _Forward(logging.Handler):
    def __init__(self, emit: Callable[[str], object]) -> None:
        super().__init__(logging.INFO)
        self._emit = emit
        self.addFilter(RedactTokens())

    def emit(self, record: logging.LogRecord) -> None:
        self._emit(record.getMessage())


@contextmanager
def forward_to(emit: Callable[[str], object]) -> Iterator[None]:
    """Pass xmodal's log messages (INFO and above) to ``emit`` while the block runs: library
    steps run by the workflow while it parses (no step log there) report through Snakemake's
    logger."""
    lib = logging.getLogger("xmodal")
    handler, level = _Forward(emit), lib.level
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)
    try:
        yield
    finally:
        lib.removeHandler(handler)
        lib.setLevel(level)
