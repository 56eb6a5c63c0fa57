"""Atomic file writes, the one mechanism every package uses for what it leaves on disk.

A file is written under a temporary name in its destination folder and renamed over the
destination with ``os.replace`` (atomic on POSIX), so a reader — or a process killed mid-write —
sees the previous file or the complete new one, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_destination", "write_bytes_atomic", "write_text_atomic"]


@contextlib.contextmanager
def atomic_destination(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it.

    Args:
        path: destination file; its folder is created if needed.
        suffix: ending of the temporary name (writers that choose a format from the extension,
            such as nibabel or matplotlib, need e.g. ``".tmp.nii.gz"`` or ``".png"``).

    Example:
        >>> import tempfile, pathlib
        >>> dest = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_destination(dest) as tmp:
        ...     _ = pathlib.Path(tmp).write_text("done")
        >>> dest.read_text()
        'done'
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (optionally fsynced before the rename)."""
    with atomic_destination(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode())
