"""Atomic file output: write to a temporary file in the destination folder, then rename."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """Open a temporary binary file beside ``path``; on success it is fsynced and renamed to
    ``path`` (``os.replace``), on any error it is removed, so ``path`` is never half-written.
    ``suffix`` lets format-sniffing writers (e.g. matplotlib) see the right extension."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as err:  # name the target and its folder, not the temporary file
        reason = "does not exist" if not path.parent.is_dir() else "is not writable"
        raise type(err)(
            err.errno, f"cannot write {path}: its folder {path.parent} {reason}"
        ) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_figure(
    fig, path: str | os.PathLike, dpi: int = 100, metadata: dict[str, str] | None = None
) -> None:
    """Save a matplotlib figure as PNG atomically, with ``metadata`` as its text chunks."""
    with atomic_write(path, suffix=".png") as fh:
        fig.savefig(fh, format="png", dpi=dpi, metadata=metadata)
