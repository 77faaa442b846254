"""Atomic file output: write to a temporary file in the destination folder, then rename."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """Open a temporary binary file beside ``path``; on success it is fsynced and renamed to
    ``path`` (``os.replace``), on any error it is removed, so ``path`` is never half-written.
    ``suffix`` lets format-sniffing writers (e.g. matplotlib) see the right extension."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
