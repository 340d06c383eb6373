"""The .part file on its own: exact content and hash whatever the chunking, and a prefix on disk
after any failure (a resumed download must never have a gap)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from watchdog_updater import partfile
from watchdog_updater.errors import DownloadError
from watchdog_updater.partfile import PartFile

MIB = 1024 * 1024
DATA = random.Random(8).randbytes(7 * MIB + 4321)


def chunks(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut at random points: tiny pieces, pieces across block edges, and huge ones."""
    rng = random.Random(seed)
    out, at = [], 0
    while at < len(data):
        n = rng.choice([1, 100, 16 * 1024, 65_536, MIB - 1, MIB + 1, 3 * MIB])
        out.append(data[at : at + n])
        at += n
    return out


@pytest.mark.parametrize("seed", range(4))
def test_any_chunking_gives_the_exact_file_and_hash(tmp_path: Path, seed: int) -> None:
    part = PartFile.open(tmp_path / "x.part", cap=len(DATA), what="tarball")
    for piece in chunks(DATA, seed):
        part.write(piece)
    assert part.size == len(DATA)
    digest = part.commit(tmp_path / "x")
    part.close()
    assert digest == hashlib.sha256(DATA).hexdigest()
    assert (tmp_path / "x").read_bytes() == DATA
    assert not (tmp_path / "x.part").exists()


def test_close_writes_all_received_and_reopen_resumes(tmp_path: Path) -> None:
    path = tmp_path / "x.part"
    part = PartFile.open(path, cap=len(DATA), what="tarball")
    part.write(DATA[: 2 * MIB + 5])
    part.close()
    assert path.read_bytes() == DATA[: 2 * MIB + 5]
    again = PartFile.open(path, cap=len(DATA), what="tarball")
    assert again.size == 2 * MIB + 5
    again.write(DATA[2 * MIB + 5 :])
    assert again.commit(tmp_path / "x") == hashlib.sha256(DATA).hexdigest()
    again.close()
    assert (tmp_path / "x").read_bytes() == DATA


def test_restart_drops_everything_written_and_pending(tmp_path: Path) -> None:
    part = PartFile.open(tmp_path / "x.part", cap=len(DATA), what="tarball")
    part.write(os.urandom(3 * MIB + 7))
    part.restart()
    assert part.size == 0
    part.write(DATA)
    assert part.commit(tmp_path / "x") == hashlib.sha256(DATA).hexdigest()
    part.close()
    assert (tmp_path / "x").read_bytes() == DATA


def test_after_a_failed_block_nothing_more_is_written(
    tmp_path: Path, mount_tmpfs: Callable[[Path, str], None]
) -> None:
    """ENOSPC cuts a block short; space comes back before close(): close must not append the next
    block after the short one (that would leave a gap, and a resumed download a corrupt file)."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=16m")
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (14 * MIB + MIB // 2))  # about 1.5 MiB left
    path = disk / "x.part"
    part = PartFile.open(path, cap=len(DATA), what="tarball")
    with pytest.raises(DownloadError, match="No space left on device") as caught:
        for piece in chunks(DATA, 1):
            part.write(piece)
    assert caught.value.hint is not None and "free disk space" in caught.value.hint
    filler.unlink()  # space again: a careless close() would now write the block it holds
    part.close()
    on_disk = path.read_bytes()
    assert DATA.startswith(on_disk)
    assert len(on_disk) < part.size  # some received bytes were not written: and none after a gap
    again = PartFile.open(path, cap=len(DATA), what="tarball")  # resumes from the prefix
    again.write(DATA[len(on_disk) :])
    assert again.commit(disk / "x") == hashlib.sha256(DATA).hexdigest()
    again.close()


# -- interrupts, disk faults, descriptors ------------------------------------------------------


class _Os:
    """partfile's view of :mod:`os`, with some functions replaced (faults on demand)."""

    def __init__(self, **replaced: Callable[..., Any]) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


def _waiting(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked on a condition (here: waiting for a future)."""
    assert thread.ident is not None
    frame = sys._current_frames().get(thread.ident)
    return (
        frame is not None
        and frame.f_code.co_filename == threading.__file__
        and frame.f_code.co_name == "wait"
    )


@contextlib.contextmanager
def _interrupt_before_opcode(n: int) -> Iterator[list[int]]:
    """Raise KeyboardInterrupt before the ``n``-th bytecode of partfile's code run on this thread,
    where a signal handler's exception may land too; yields [bytecodes seen before it]."""
    seen = [0]

    def opcodes(frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode":
            if seen[0] == n:
                raise KeyboardInterrupt  # this also ends the tracing
            seen[0] += 1
        return opcodes

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code.co_filename != partfile.__file__:
            return None
        frame.f_trace_opcodes = True
        return opcodes

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        yield seen
    finally:
        sys.settrace(previous)


@pytest.mark.parametrize("block_fails", [True, False])
def test_interrupt_while_waiting_for_a_block_writes_nothing_after_it_unless_it_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_fails: bool
) -> None:
    """Ctrl-C while write() waits for the block in flight, which then fails (ENOSPC): close(), as
    download()'s finally calls it, must not append the next block after it. The block stays in
    flight: close() waits for it, and if it was written, writes the rest as usual."""
    main = threading.main_thread()
    if threading.current_thread() is not main:
        pytest.skip("signal handlers run on the main thread only")
    blocks = [bytes([i]) * MIB for i in (1, 2, 3)]
    second_submitted = threading.Event()  # from then on, the main thread waits for block 2 only
    interrupted = threading.Event()
    release = threading.Event()

    def write(fd: int, data: memoryview) -> int:
        if bytes(data[:1]) == b"\2" and second_submitted.wait(10):
            # Signalled again until handled: one that comes just before the wait blocks is only
            # handled when the wait ends.
            deadline = time.monotonic() + 10
            while not interrupted.is_set() and time.monotonic() < deadline:
                if _waiting(main):
                    signal.pthread_kill(main.ident or 0, signal.SIGUSR1)
                interrupted.wait(0.01)
            release.wait(10)  # the interrupt is handled before this block's outcome is known
            if block_fails:
                raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if not interrupted.is_set():
            interrupted.set()
            raise KeyboardInterrupt

    monkeypatch.setattr(partfile, "os", _Os(write=write))
    previous = signal.signal(signal.SIGUSR1, interrupt)
    path = tmp_path / "x.part"
    try:
        part = PartFile.open(path, cap=len(DATA), what="tarball")
        try:
            with pytest.raises(KeyboardInterrupt):
                part.write(blocks[0])
                part.write(blocks[1])
                second_submitted.set()
                part.write(blocks[2])  # fills block 3, then waits for block 2: interrupted
        finally:
            release.set()
            part.close()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert path.read_bytes() == (blocks[0] if block_fails else b"".join(blocks))


@pytest.mark.parametrize(
    ("first_fails", "then"), [(False, "close"), (True, "close"), (False, "restart")]
)
def test_an_interrupt_anywhere_in_write_leaves_no_gap_and_no_block_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_fails: bool, then: str
) -> None:
    """A signal handler's exception (Ctrl-C, SystemExit) lands between two bytecodes: injected
    before each of partfile's in turn while two blocks are written. close() afterwards leaves a
    prefix of what was received (no block written twice, none after a failed or lost one), and
    restart() leaves nothing of before, not even a block whose hand-over was cut short."""
    size = 4096  # the interleavings are those of 1 MiB blocks, many times faster
    monkeypatch.setattr(partfile, "_BLOCK", size)
    blocks = [bytes([1]) * size, bytes([2]) * size]
    main = threading.current_thread()
    done = threading.Event()  # the interrupted PartFile was closed or restarted

    def write(fd: int, data: memoryview) -> int:
        # Held back until the main thread waits for it or is done with the interrupted writes: a
        # block whose future was lost then lands after restart()'s truncation, unless it waits.
        _until(lambda: done.is_set() or _waiting(main))
        if first_fails and bytes(data[:1]) == b"\1":
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    monkeypatch.setattr(partfile, "os", _Os(write=write))
    n = 0
    while True:
        done.clear()
        path = tmp_path / f"{n}.part"
        part = PartFile.open(path, cap=len(DATA), what="tarball")
        interrupted = False
        with _interrupt_before_opcode(n):
            try:
                for block in blocks:
                    part.write(block)
            except KeyboardInterrupt:
                interrupted = True
            except DownloadError:
                assert first_fails
        if then == "restart":
            part.restart()
            done.set()
            again = DATA[: size + 100]
            part.write(again)
            assert part.commit(tmp_path / str(n)) == hashlib.sha256(again).hexdigest()
            part.close()
            assert (tmp_path / str(n)).read_bytes() == again, f"interrupted before bytecode {n}"
        else:
            done.set()
            part.close()
            on_disk = path.read_bytes()
            assert b"".join(blocks).startswith(on_disk), f"interrupted before bytecode {n}"
        if not interrupted:
            break
        n += 1
    assert n > 20  # every bytecode of the writes was tried


@pytest.mark.parametrize(
    ("code", "hint"), [(errno.EIO, "is writable"), (errno.ENOSPC, "free disk space")]
)
def test_a_failed_fsync_deletes_the_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, hint: str
) -> None:
    """After a failed fsync Linux marks the pages clean: the .part could read back data that never
    reached the disk, so it is not kept for resuming (nor re-created by close(), which
    download()'s finally calls after the failed commit)."""

    def fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(partfile, "os", _Os(fsync=fsync))
    path = tmp_path / "x.part"
    part = PartFile.open(path, cap=len(DATA), what="tarball")
    part.write(DATA)
    with pytest.raises(DownloadError, match=os.strerror(code)) as caught:
        part.commit(tmp_path / "x")
    assert caught.value.hint is not None and hint in caught.value.hint
    assert isinstance(caught.value.__cause__, OSError)
    assert not path.exists()
    part.close()
    assert not path.exists()
    assert not (tmp_path / "x").exists()


def test_a_failed_close_deletes_the_part(tmp_path: Path) -> None:
    """close(2) reports a failed write-back too (NFS): the .part is no more trustworthy then."""

    class FailingClose(io.FileIO):
        def close(self) -> None:
            if not self.closed:
                super().close()
                raise OSError(errno.EIO, "Input/output error")

    path = tmp_path / "x.part"
    part = PartFile(path, FailingClose(path, "ab"), "tarball")
    part.write(DATA[:100])
    part.close()
    assert not path.exists()


@pytest.mark.parametrize("failing", ["fdopen", "constructor"])
def test_a_failed_open_leaks_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """os.fdopen() or the constructor fails after os.open(): the descriptor is closed."""
    opened: list[int] = []

    def open_(path: Path, flags: int, mode: int = 0o777) -> int:
        opened.append(os.open(path, flags, mode))
        return opened[-1]

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    def constructor(*args: Any) -> None:
        raise MemoryError

    if failing == "fdopen":
        monkeypatch.setattr(partfile, "os", _Os(open=open_, fdopen=fdopen))
        expected: type[BaseException] = DownloadError
    else:
        monkeypatch.setattr(partfile, "os", _Os(open=open_))
        monkeypatch.setattr(PartFile, "__init__", constructor)
        expected = MemoryError
    with pytest.raises(expected) as caught:
        PartFile.open(tmp_path / "x.part", cap=MIB, what="tarball")
    assert len(opened) == 1
    # Closed, not left to the garbage collector: caught holds open()'s frame, and its locals.
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(opened[0])
    del caught


def test_resuming_reads_the_part_back_not_through_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The .part is opened a second time to hash it: a symlink put there in between is refused."""
    path = tmp_path / "x.part"
    path.write_bytes(DATA[:MIB])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not the download")

    def open_then_swap(path_: Path, flags: int, mode: int = 0o777) -> int:
        fd = os.open(path_, flags, mode)
        if not path.is_symlink():
            path.unlink()
            path.symlink_to(elsewhere)
        return fd

    monkeypatch.setattr(partfile, "os", _Os(open=open_then_swap))
    with pytest.raises(DownloadError, match="cannot read back"):
        PartFile.open(path, cap=len(DATA), what="tarball")


def test_an_unexpected_writer_error_surfaces_at_the_next_hand_over_with_its_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not an OSError (a bug, MemoryError): a DownloadError all the same, chained, with a hint."""
    boom = RuntimeError("boom")

    def write(fd: int, data: memoryview) -> int:
        raise boom

    monkeypatch.setattr(partfile, "os", _Os(write=write))
    path = tmp_path / "x.part"
    part = PartFile.open(path, cap=len(DATA), what="tarball")
    part.write(DATA[:MIB])  # block 1 handed over: it fails on the writer thread
    part.write(DATA[MIB : 2 * MIB - 1])  # nothing waits for block 1 yet
    with pytest.raises(DownloadError, match="boom") as caught:
        part.write(DATA[2 * MIB - 1 : 2 * MIB])  # block 2 is full: its hand-over waits for 1
    assert caught.value.__cause__ is boom
    assert caught.value.hint is not None
    part.close()
    assert path.read_bytes() == b""
