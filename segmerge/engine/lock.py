"""One training per output folder: an advisory lock with the owner's identity.

Two trainings writing into the same ``runs/`` folder mix their checkpoints and race on the MLflow
store (on a fresh folder the second one's schema migration fails). :class:`FolderLock` holds
``fcntl.flock`` on ``<folder>/.segmerge.lock`` for the whole run; the kernel releases it when the
process ends, however it ends, so a lock left by a dead process is simply taken over. The file
also records who holds it (pid, host, start time, command), which the error of a second training
names. Where ``flock`` is unavailable (some network file systems) the recorded pid decides: a lock
of a pid that no longer runs on this host is stale and taken over.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

__all__ = ["FolderLock", "FolderLocked", "LOCK_NAME"]

LOCK_NAME = ".segmerge.lock"


class FolderLocked(RuntimeError):
    """Another live process holds the folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """Exclusive lock on a folder, held until :meth:`release` (or the process ends).

    Args:
        folder: the folder to lock (created if needed).
        what: how messages name the folder (``"output folder"``).
    """

    def __init__(self, folder: str | os.PathLike, what: str = "output folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fh: Any = None
        self.took_over: dict[str, Any] | None = None

    def _owner(self) -> dict[str, Any]:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _refuse(self, owner: dict[str, Any]) -> FolderLocked:
        who = (
            f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started "
            f"{owner.get('started', '?')}"
        )
        cmd = owner.get("command")
        return FolderLocked(
            f"{self.what} {self.folder} is in use by another training ({who}"
            + (f": {cmd}" if cmd else "")
            + f"); wait for it to end, or give this one another --output. If that process is "
            f"gone, delete {self.path}"
        )

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`FolderLocked` naming the holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        previous = self._owner()
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            fh.close()
            raise self._refuse(previous) from err
        except OSError as err:  # no flock here: fall back to the recorded pid
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                fh.close()
                raise
            pid = previous.get("pid")
            if (
                isinstance(pid, int)
                and pid != os.getpid()
                and (previous.get("host") != socket.gethostname() or _pid_alive(pid))
            ):
                fh.close()
                raise self._refuse(previous) from err
        if previous.get("pid") not in (None, os.getpid()):
            self.took_over = previous  # a lock file left by a process that is gone
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(info) + "\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays, emptied: unlinking it could let two
        processes lock two different files of the same name."""
        if self._fh is None:
            return
        try:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.flush()
        except OSError:
            pass
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        finally:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
