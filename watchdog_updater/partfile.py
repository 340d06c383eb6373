"""The ``.part`` file of a download: appended to, hashed, made durable, renamed into place.

Receiving is the network's thread; writing and hashing happen on one helper thread, a block at a
time, while the next block is being received. On TLS this matters: a 16 KiB record is decrypted
and parsed in Python per read, and hashing and writing the previous megabyte alongside (both
release the GIL) takes them off the critical path. At most two blocks are held (the one being
filled and the one being written), so memory stays bounded whatever the size of the download.

A disk error raised on the helper thread for a block surfaces when the next block is handed over
(in the :meth:`PartFile.write` call that fills it, 1 MiB of data later) or at
:meth:`PartFile.commit` if the data ends first; either way as :class:`DownloadError` with a hint.
:meth:`PartFile.close` swallows it, :meth:`PartFile.restart` drops it; nothing more is written
after the failed block. The file's content is always a prefix of what was received
(all of it after :meth:`PartFile.close`, unless a block failed or an interrupt cut a hand-over
short), so an interrupted download resumes from the file's real size (the hash state is rebuilt
from disk when the ``.part`` is opened again). A ``.part`` whose fsync failed is deleted instead:
it may read back data that never reached the disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

from watchdog_updater.errors import DownloadError
from watchdog_updater.storage import fsync_dir, start_writeback

__all__ = ["PartFile"]

_REHASH_CHUNK = 1024 * 1024  # reading a leftover .part back to restore the hash state
_BLOCK = 1024 * 1024  # bytes handed to the writer thread at a time
_WRITEBACK_EVERY = 32 * 1024 * 1024  # bytes written between two early-writeback requests
_RETRY_HINT = "try again: the download resumes from what was written"


class PartFile:
    """An append-only ``.part`` file with a running SHA-256 of its content.

    Not thread-safe: one receiving thread calls :meth:`write`; the writer thread is private.
    After an exception out of any method (``KeyboardInterrupt`` included), :meth:`close` and
    :meth:`discard` are safe: they write nothing after a block that failed or may not be written.
    """

    def __init__(self, path: Path, file: IO[bytes], what: str) -> None:
        self._path = path
        self._file = file
        self._what = what
        self._hash = hashlib.sha256()
        self._size = 0  # bytes accepted (received), written or not yet
        # Two buffers, allocated once: one filling while the other is written. Fresh blocks per
        # hand-over cost ~3 MiB of peak RSS (glibc keeps freed megabytes in its heaps).
        self._buffers = (bytearray(_BLOCK), bytearray(_BLOCK))
        self._filling = 0  # index of the buffer being filled
        self._filled = 0  # bytes in it
        self._in_flight: Future[None] | None = None
        self._failure: DownloadError | None = None  # once a block failed, nothing more is written
        # The failure while a hand-over is under way (made once, not per block).
        self._handing_over = DownloadError(
            f"handing {path} to its writer was interrupted", hint=_RETRY_HINT
        )
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="download-writer")
        self._unflushed = 0  # bytes written since the last early-writeback request
        self.resumed = False

    @classmethod
    def open(cls, path: Path, *, cap: int, what: str) -> PartFile:
        """Open (or create) ``path``; existing content up to ``cap`` bytes is kept for resuming."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            raise _disk_error(e, f"cannot open {path} for {what}") from e
        file: IO[bytes] | None = None
        try:
            file = os.fdopen(fd, "ab", buffering=0)
            part = cls(path, file, what)
        except BaseException as e:
            # The descriptor is ours until a PartFile holds it.
            with contextlib.suppress(OSError):
                if file is None:
                    os.close(fd)
                else:
                    file.close()
            if isinstance(e, OSError):
                raise _disk_error(e, f"cannot open {path} for {what}") from e
            raise
        try:
            part._adopt_existing(cap)
        except BaseException:
            part.close()
            raise
        return part

    def _adopt_existing(self, cap: int) -> None:
        try:
            existing = os.fstat(self._file.fileno()).st_size
            if existing > cap:
                self._file.truncate(0)
                return
            if existing:
                # Restore the hash state once from disk; from here on the hash follows the writes.
                # Opened by path again (ours is write-only): not through a symlink put there since.
                fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    remaining = existing
                    while remaining > 0:
                        block = os.read(fd, min(_REHASH_CHUNK, remaining))
                        if not block:
                            break
                        self._hash.update(block)
                        remaining -= len(block)
                finally:
                    os.close(fd)
                self._size = existing - remaining
                if remaining:
                    self._file.truncate(self._size)
        except OSError as e:
            raise _disk_error(e, f"cannot read back the partial download {self._path}") from e

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        """Accept ``data``; raises :class:`DownloadError` for a failure of an earlier block."""
        view = memoryview(data)
        while view:
            taken = min(len(view), _BLOCK - self._filled)
            self._buffers[self._filling][self._filled : self._filled + taken] = view[:taken]
            self._filled += taken
            self._size += taken
            view = view[taken:]
            if self._filled == _BLOCK:
                self._hand_over()

    def _hand_over(self) -> None:
        """Wait for the block in flight (re-raising its error), then send the filled one."""
        self._wait_in_flight()
        if self._filled:
            block = memoryview(self._buffers[self._filling])[: self._filled]
            # An interrupt (KeyboardInterrupt, SystemExit from a signal handler) may land between
            # any two of these steps. The buffer is swapped before the submit, so that close()
            # cannot write it a second time; and until its future is kept, whether the block is
            # written is unknown: failed meanwhile, so that nothing is written after it.
            self._failure = self._handing_over
            self._filling, self._filled = 1 - self._filling, 0
            self._in_flight = self._writer.submit(self._append, block)
            self._failure = None

    def _wait_in_flight(self) -> None:
        in_flight = self._in_flight
        if in_flight is not None:
            # Forgotten only once it is resolved and its failure kept: after an interrupt in this
            # wait it is still in flight, and whoever hands over next (close()) waits for it too.
            error = in_flight.exception()
            if error is not None:
                self._failure = _writer_failure(error, self._path)
            self._in_flight = None
        if self._failure is not None:
            # Writing on after a failed block would leave a gap: the file must stay a prefix.
            raise self._failure

    def _append(self, block: memoryview) -> None:
        """Writer thread: write the whole block, then hash it."""
        try:
            fd = self._file.fileno()
            rest = block
            while rest:
                rest = rest[os.write(fd, rest) :]
            self._unflushed += len(block)
            if self._unflushed >= _WRITEBACK_EVERY:
                # The final fsync has less left to do; the pages stay cached for the unpacking.
                self._unflushed = 0
                start_writeback(fd)
        except OSError as e:
            raise _disk_error(e, f"cannot write {self._path} for {self._what}") from e
        self._hash.update(block)

    def restart(self) -> None:
        """Drop everything: the server ignored our Range request and sends from byte zero."""
        self._filled = 0
        with contextlib.suppress(DownloadError):  # what it failed to write is dropped anyway
            self._wait_in_flight()
        # A block whose hand-over was interrupted may still be queued, its future lost: the
        # writer runs in order, so once this no-op has run nothing can land after the truncation.
        self._writer.submit(_nothing).result()
        self._failure = None  # an empty file is a prefix again
        try:
            self._file.truncate(0)
        except OSError as e:
            raise _disk_error(e, f"cannot truncate {self._path}") from e
        self._hash = hashlib.sha256()
        self._size = 0
        self.resumed = False

    def commit(self, dest: Path) -> str:
        """Write what is left, fsync, rename to ``dest``, fsync the directory; the SHA-256 hex."""
        self._hand_over()
        self._wait_in_flight()
        self._writer.shutdown()
        try:
            os.fsync(self._file.fileno())
            self._file.close()  # on NFS this reports a failed write-back too
        except OSError as e:
            # After a failed fsync Linux marks the pages clean: the .part may read back data that
            # never reached the disk, and an fsync retried (a later run's) reports success. Not
            # kept for resuming; the failure is sticky, so close() writes nothing more either.
            self._failure = _disk_error(
                e, f"cannot flush {self._path} to disk for {self._what} (so it was deleted)"
            )
            self.discard()
            raise self._failure from e
        try:
            self._path.replace(dest)
            fsync_dir(dest.parent)
        except OSError as e:
            raise _disk_error(e, f"cannot move the finished download into place at {dest}") from e
        return self._hash.hexdigest()

    def discard(self) -> None:
        """Delete the .part (best effort: a later open truncates an oversized one anyway)."""
        self._filled = 0
        self.close()
        with contextlib.suppress(OSError):
            self._path.unlink(missing_ok=True)

    def close(self) -> None:
        """Write what was received (best effort: the next attempt resumes from it), then close.

        After a write error nothing more is written: the file keeps the prefix it has, which the
        next open reads back. May wait for the block in flight (one block write) first.
        """
        with contextlib.suppress(DownloadError):
            self._hand_over()
            self._wait_in_flight()
        self._writer.shutdown()
        try:
            self._file.close()
        except OSError:
            # A failed write-back reported by close() (NFS): as after a failed fsync, the content
            # cannot be trusted for resuming.
            with contextlib.suppress(OSError):
                self._path.unlink(missing_ok=True)


def _nothing() -> None:
    pass


def _writer_failure(e: BaseException, path: Path) -> DownloadError:
    """The writer thread's exception as the sticky failure (an unexpected one wrapped)."""
    if isinstance(e, DownloadError):
        return e
    failure = DownloadError(f"writing {path} failed: {e!r}", hint=_RETRY_HINT)
    failure.__cause__ = e  # as `raise failure from e` would
    return failure


def _disk_error(e: OSError, message: str) -> DownloadError:
    if e.errno == errno.ENOSPC:
        hint = "free disk space in the download directory and try again"
    else:
        hint = "check that the download directory exists and is writable"
    return DownloadError(f"{message}: {e}", hint=hint)
