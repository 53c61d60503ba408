"""One writer per folder: an OS advisory lock (``fcntl.flock``) on ``<folder>/.lock``, held for the writer's life.

Readers never take it. A second writer either fails at once (``timeout=0``) or waits up to ``timeout`` seconds
(``None``: forever), and then fails with a message naming the folder and the holder's pid. The lock dies with the
process that holds it, so a killed writer never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = ".lock"


class LockedError(RuntimeError):
    """Another process holds the writer lock."""


class WriterLock:
    """Exclusive writer lock on a folder. ``with WriterLock(path): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, folder, timeout: float | None = 0.0, what: str = "folder"):
        if timeout is not None and timeout < 0:
            raise ValueError(f"lock timeout must be >= 0 seconds or None, got {timeout}")
        self.folder = Path(folder)
        self.timeout = timeout
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WriterLock":
        if self._fd is not None:
            return self
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        delay = 0.01
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    if deadline is not None and time.monotonic() >= deadline:
                        holder = _read_holder(fd)
                        waited = f" after waiting {self.timeout:g} s" if self.timeout else ""
                        raise LockedError(f"{self.folder}: another writer{holder} is using this {self.what}{waited}; "
                                          f"wait for it to finish (or pass a lock timeout)") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a forgotten writer still frees its lock when collected
        try:
            self.release()
        except Exception:
            pass


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
