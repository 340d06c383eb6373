"""storage.BackgroundFlush: flushes while a tree is written, stops before its descriptor closes,
and never loses a writeback error."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from watchdog_updater.storage import BackgroundFlush, syncfs


def flush_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "background-flush"]


def test_flushes_the_real_filesystem_repeatedly_then_stops(tmp_path: Path) -> None:
    calls: list[float] = []

    def counting_syncfs(fd: int) -> None:
        syncfs(fd)  # the real syscall, on a real descriptor
        calls.append(time.monotonic())

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with BackgroundFlush(fd, 0.05, counting_syncfs) as flusher:
            (tmp_path / "data").write_bytes(os.urandom(1 << 20))
            deadline = time.monotonic() + 10
            while len(calls) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
        left = time.monotonic()
        assert flush_threads() == []  # joined on exit
        time.sleep(0.2)
        assert len(calls) >= 3 and all(t <= left for t in calls)  # none after exit
        flusher.raise_error()  # nothing went wrong
    finally:
        os.close(fd)


def test_a_short_job_never_flushes(tmp_path: Path) -> None:
    calls: list[int] = []
    with BackgroundFlush(0, 60.0, calls.append):
        pass
    assert calls == [] and flush_threads() == []


def test_an_error_seen_only_by_a_background_flush_is_raised_afterwards() -> None:
    """The kernel reports a writeback error to one syncfs per open file: if the helper got it,
    the final flush would not. (EIO cannot be provoked on this machine's disks: the flush is a
    stand-in that fails the way syncfs does.)"""
    calls: list[int] = []
    failed = threading.Event()

    def failing_syncfs(fd: int) -> None:
        calls.append(fd)
        failed.set()
        raise OSError(errno.EIO, "syncfs: Input/output error")

    with BackgroundFlush(7, 0.01, failing_syncfs) as flusher:
        assert failed.wait(10)
        time.sleep(0.05)  # it would have flushed again by now
    assert calls == [7]  # stopped at the first error
    with pytest.raises(OSError) as exc:
        flusher.raise_error()
    assert exc.value.errno == errno.EIO
