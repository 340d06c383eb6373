"""One update at a time, across the daemon and every CLI call: flock(2) in the state dir.

The kernel drops the lock when its holder dies, so a crash never leaves it held. The holder writes
its pid and start time into the lock file so that a second caller can name it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from types import TracebackType

from watchdog_updater.errors import BusyError

__all__ = ["UpdateLock"]


class UpdateLock:
    """Exclusive, non-blocking lock; a context manager."""

    def __init__(self, path: Path, *, purpose: str = "update") -> None:
        self.path = path
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BusyError(
                self._describe_holder(), hint="wait for it to finish, then retry"
            ) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "since": time.time(), "purpose": self.purpose}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _describe_holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(info["since"])))
            purpose = info.get("purpose", "update")
            return f"busy: another {purpose} (pid {info['pid']}) holds the lock since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"busy: another process holds {self.path}"

    def __enter__(self) -> UpdateLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
