"""Atomic file writes: the data goes to a temporary name in the target folder, then one rename puts it in place, so
a crash or a failing serializer never leaves a half-written file under the real name."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp) for a fresh temporary path beside `path`, then rename it to `path`; on any error the
    temporary file is removed and the error re-raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # named per process and thread rather than made by mkstemp, whose 0600 mode the renamed file would keep
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, flushed to disk before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return write_atomic(path, write)
