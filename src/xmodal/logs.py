"""Logging set-up for pipeline steps: everything, tracebacks included, goes to the step's log."""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType


def log_to(path: str | os.PathLike | None, level: int = logging.INFO) -> logging.Logger:
    """Send log records (and uncaught exceptions) to ``path`` and to stderr; return the root logger."""
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)

    def _hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        root.error("%s: %s", kind.__name__, err, exc_info=(kind, err, tb))

    sys.excepthook = _hook
    return root
