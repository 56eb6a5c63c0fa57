"""Atomic file writes, the one mechanism every package uses for what it leaves on disk.

A file is written under a temporary name in its destination folder and renamed over the
destination with ``os.replace`` (atomic on POSIX), so a reader — or a process killed mid-write —
sees the previous file or the complete new one, never a truncated one. The file gets the mode a
plain ``open(path, "w")`` would give it: the existing file's mode when it is replaced, else
``0o666`` minus the process umask (``tempfile.mkstemp`` alone would leave every file ``0600``).

:func:`inside` is the one check that a path built from data (a case id from a datalist) stays
inside the folder it is meant for; every writer of per-case outputs goes through it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_destination",
    "default_mode",
    "inside",
    "write_bytes_atomic",
    "write_text_atomic",
]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:  # Linux: /proc/self/status has "Umask:\t0022" (no race with other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere the only API is set-and-restore
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """Mode a new file (``0o666 & ~umask``) or folder (``0o777 & ~umask``) gets from plain
    ``open`` / ``os.mkdir``; for what ``tempfile`` creates (0600 files, 0700 folders)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _plain_open_mode(dest: Path) -> int:
    """Mode ``open(dest, "w")`` would leave: the existing file's, else ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(os.stat(dest).st_mode)
    except OSError:
        return default_mode()


def inside(folder: str | os.PathLike, *parts: str) -> Path:
    """``folder / parts...``, refused unless it resolves to a path inside ``folder``.

    Args:
        folder: the output folder.
        *parts: path components below it (e.g. ``f"{case_id}.nii.gz"``).

    Returns:
        The joined path (not resolved).

    Raises:
        ValueError: a component is empty, absolute or contains a separator, ``..`` or a
            control character, or the path resolves (through ``..`` or a symbolic link)
            outside ``folder``.

    Example:
        >>> inside("/tmp/out", "case1.nii.gz").as_posix()
        '/tmp/out/case1.nii.gz'
    """
    base = Path(folder)
    for part in parts:
        bad = (
            not part
            or part in (".", "..")
            or "/" in part
            or (os.altsep is not None and os.altsep in part)
            or os.sep in part
            or any(ord(ch) < 32 or ord(ch) == 127 for ch in part)
        )
        if bad:
            raise ValueError(
                f"output name {part!r} is not a plain file name (no separators, '..' or control "
                f"characters): refusing to write outside {base}"
            )
    dest = base.joinpath(*parts)
    root = base.resolve()
    if not dest.resolve().is_relative_to(root):
        raise ValueError(f"output {dest} resolves to {dest.resolve()}, outside {root}: refused")
    return dest


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
        # after the writer (which may have recreated the file) and before it becomes visible
        os.chmod(tmp, _plain_open_mode(dest))
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
