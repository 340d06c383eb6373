"""The .part file on its own: exact content and hash whatever the chunking, and a prefix on disk
after any failure (a resumed download must never have a gap)."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

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
