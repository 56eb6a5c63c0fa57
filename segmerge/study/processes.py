"""The study's child processes: the jobs that run (method, seed) units at once, one per slot
(device), each unit's training / evaluation subprocess, and stopping them all on Ctrl-C or
SIGTERM (every running training saves its checkpoint first)."""

from __future__ import annotations

import concurrent.futures as futures
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["Processes", "Stopped", "child_env", "pid_alive"]

T = TypeVar("T")


class Stopped(Exception):
    """A run ended because the study is being interrupted (not a failure of the run)."""


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pid_alive(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` runs and (where /proc tells) is a training of ``folder``."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OSError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.is_file():
        try:
            return str(folder) in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return True
    return True


def child_env(
    config_dir: Path, threads: int, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a child process: unbuffered output, the study's configs folder, its
    thread share (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``), then ``extra``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", SEGMERGE_CONFIGS=str(config_dir))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra or {})
    return env


class Processes:
    """The running children of one study, keyed by (method, seed).

    ``lock`` also guards the MLflow client calls of the job threads.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._procs: dict[tuple[str, int], subprocess.Popen] = {}

    @property
    def stopping(self) -> bool:
        """Whether the study is being interrupted."""
        return self._stop.is_set()

    def run(self, key: tuple[str, int], cmd: list[str], log_path: Path, env: dict[str, str]) -> int:
        """Run ``cmd`` with its output appended to ``log_path``; its pid in ``.train.pid``.

        Raises:
            Stopped: the study is being interrupted (before the start, or the child failed then).
        """
        pid_file = log_path.parent / ".train.pid"
        with open(log_path, "a") as log_file:
            log_file.write(f"$ {shlex.join(cmd)}\n")  # copy-pastable into a shell
            log_file.flush()
            with self.lock:
                if self._stop.is_set():
                    raise Stopped()
                # Own session: a Ctrl-C in the terminal reaches the study only, which forwards
                # exactly one SIGINT (a second one would make the trainer stop without saving).
                proc = subprocess.Popen(
                    cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
                self._procs[key] = proc
            pid_file.write_text(f"{proc.pid}\n")
            try:
                code = proc.wait()
            finally:
                with self.lock:
                    self._procs.pop(key, None)
                pid_file.unlink(missing_ok=True)
        if self._stop.is_set() and code != 0:
            raise Stopped()
        return code

    def interrupt(self) -> None:
        """Stop: one SIGINT to every child (the trainer checkpoints, then exits), waiting up to
        5 minutes for them before killing."""
        self._stop.set()
        with self.lock:
            procs = list(self._procs.values())
        for proc in procs:
            try:
                proc.send_signal(signal.SIGINT)
            except OSError:
                pass
        deadline = time.monotonic() + 300
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def schedule(
        self,
        units: Sequence[tuple[str, int]],
        slots: Sequence[str | None],
        work: Callable[[int, str, int, str | None], T],
        on_interrupt: Callable[[], None] = lambda: None,
    ) -> list[T | None]:
        """``work(i, method, seed, slot)`` for every unit (``i`` from 1), one thread per slot,
        each unit on a free slot; ``None`` for a unit stopped by an interruption.

        Raises:
            KeyboardInterrupt: Ctrl-C or SIGTERM (in the main thread), after every child stopped
                and ``on_interrupt`` ran.
        """
        free: queue.Queue[str | None] = queue.Queue()
        for slot in slots:
            free.put(slot)

        def job(i: int, method: str, seed: int) -> T | None:
            if self._stop.is_set():
                return None
            device = free.get()
            try:
                return work(i, method, seed, device)
            except Stopped:
                return None
            finally:
                free.put(device)

        previous = None
        if threading.current_thread() is threading.main_thread():
            # SIGTERM stops like Ctrl-C: the running trainings save their checkpoints first
            previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        pool = futures.ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="job")
        try:
            pending = [pool.submit(job, i, m, s) for i, (m, s) in enumerate(units, 1)]
            while not all(f.done() for f in pending):
                futures.wait(pending, timeout=0.5)
            return [f.result() for f in pending]
        except KeyboardInterrupt:
            self.interrupt()
            pool.shutdown(wait=True, cancel_futures=True)
            on_interrupt()
            raise
        finally:
            pool.shutdown(wait=True)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
