"""Safe extraction: one short test per attack, each tarball built here with tarfile.

Every refusal is checked the same way (:func:`assert_refused`): UnsafeArchiveError, the staging dir
gone, nothing anywhere else under the test's tmp dir changed (a sentinel dir is the target of every
escape attempt), and ``current`` still on the installed version.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from watchdog_updater import extract, storage
from watchdog_updater.errors import DiskSpaceError, InstallError, UnsafeArchiveError
from watchdog_updater.extract import ExtractLimits, clean_staging, extract_release, remove_tree
from watchdog_updater.layout import Layout
from watchdog_updater.links import read_link_version, swap_link

VERSION = "1.2.3"
TOP = f"hal0-{VERSION}"
# From a member at the top of the release, back up to the test's tmp dir:
# staging = tmp/root/usr/lib/.hal0-staging-tx
UP = "../../../../"
MTIME = 1_700_000_000

Member = tuple[tarfile.TarInfo, bytes | None]


def info(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, **kw: object) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = MTIME
    data = kw.pop("data", None)
    for key, value in kw.items():
        setattr(ti, key, value)
    if isinstance(data, bytes):
        ti.size = len(data)
    return ti, data if isinstance(data, bytes) else None


def reg(name: str, data: bytes = b"data\n", mode: int = 0o644) -> Member:
    return info(name, mode=mode, data=data)


def dir_(name: str, mode: int = 0o755) -> Member:
    return info(name, tarfile.DIRTYPE, mode=mode)


def sym(name: str, target: str) -> Member:
    return info(name, tarfile.SYMTYPE, mode=0o777, linkname=target)


def hard(name: str, target: str) -> Member:
    return info(name, tarfile.LNKTYPE, linkname=target)


def tar_bytes(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def without_end_marker(members: list[Member]) -> bytes:
    """The members' headers and data, laid out as tarfile does, but no end-of-archive marker."""
    out = []
    for ti, data in members:
        out.append(ti.tobuf(tarfile.PAX_FORMAT))
        if data:
            out.append(data + bytes(-len(data) % tarfile.BLOCKSIZE))
    return b"".join(out)


@dataclass
class Env:
    tmp: Path
    layout: Layout
    staging: Path
    sentinel: Path

    def tarball(self, members: list[Member], name: str = "release.tar.gz") -> Path:
        path = self.tmp / "tarballs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(gzip.compress(tar_bytes(members), compresslevel=1))
        return path

    def raw(self, data: bytes, name: str = "raw.tar.gz") -> Path:
        path = self.tmp / "tarballs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return path

    def extract(self, tarball: Path, **limits: int) -> extract.ExtractResult:
        return extract_release(
            tarball, self.staging, version=VERSION, limits=ExtractLimits(**limits)
        )


def install_current(layout: Layout) -> None:
    """A tiny installed version 1.0.0 that ``current`` points at."""
    v = layout.version_dir("1.0.0")
    v.mkdir(parents=True)
    (v / "app.py").write_text("print('1.0.0')\n")
    swap_link(layout, layout.current_link, "1.0.0")


def make_env(tmp: Path) -> Env:
    layout = Layout(root=tmp / "root")
    layout.versions_dir.mkdir(parents=True, exist_ok=True)
    install_current(layout)
    sentinel = tmp / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret").write_text("do not touch\n")
    return Env(tmp, layout, layout.staging_dir("tx"), sentinel)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    out: dict[str, tuple[int, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            out[os.path.relpath(p, root)] = (st.st_mode, size, st.st_nlink, link)
    return out


def assert_refused(env: Env, tarball: Path, match: str, **limits: int) -> UnsafeArchiveError:
    before = snapshot(env.tmp)
    with pytest.raises(UnsafeArchiveError, match=match) as exc:
        env.extract(tarball, **limits)
    assert not env.staging.exists() and not env.staging.is_symlink()
    assert snapshot(env.tmp) == before  # nothing written anywhere, sentinel untouched
    assert read_link_version(env.layout, env.layout.current_link) == "1.0.0"
    return exc.value


def release(*extra: Member) -> list[Member]:
    return [dir_(TOP), reg(f"{TOP}/app.py", b"print('hi')\n"), *extra]


# ------------------------------------------------------------------------------------------------
# What a good release looks like


def test_extracts_release_and_strips_top_level(env: Env) -> None:
    members = [
        dir_(TOP),
        dir_(f"{TOP}/bin"),
        reg(f"{TOP}/bin/hal0", b"#!/bin/sh\necho hi\n", mode=0o755),
        reg(f"{TOP}/lib/pkg/mod.py", b"x = 1\n"),  # parents implied
        sym(f"{TOP}/bin/hal0-cli", "hal0"),
        sym(f"{TOP}/lib/pkg/up", "../../bin"),
        hard(f"{TOP}/lib/pkg/mod2.py", f"{TOP}/lib/pkg/mod.py"),
        reg(f"{TOP}/empty", b""),
    ]
    result = env.extract(env.tarball(members))

    s = env.staging
    assert result.staging == s
    assert result.files == 6 and result.unpacked_bytes == len(b"#!/bin/sh\necho hi\n") + 6
    assert sorted(os.listdir(s)) == ["bin", "empty", "lib"]
    assert (s / "bin/hal0").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((s / "bin/hal0").stat().st_mode) == 0o755
    assert stat.S_IMODE((s / "lib/pkg/mod.py").stat().st_mode) == 0o644
    assert os.readlink(s / "bin/hal0-cli") == "hal0"
    assert (s / "lib/pkg/up/hal0").is_file()
    assert (s / "lib/pkg/mod2.py").stat().st_ino == (s / "lib/pkg/mod.py").stat().st_ino
    assert (s / "bin/hal0").stat().st_mtime == MTIME
    assert (s / "bin").stat().st_mtime == MTIME
    assert stat.S_IMODE(s.stat().st_mode) == 0o755
    assert (s / "empty").stat().st_size == 0


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz", "w:bz2"])
def test_compressions_accepted(env: Env, mode: str) -> None:
    path = env.tmp / f"release.{mode}"
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for ti, data in release():
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    env.extract(path)
    assert (env.staging / "app.py").read_bytes() == b"print('hi')\n"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_in_every_tar_format(env: Env, fmt: int) -> None:
    deep = "/".join(["d" * 30] * 4) + "/" + "f" * 40  # 164 characters
    path = env.tmp / "release.tar"
    path.write_bytes(tar_bytes(release(reg(f"{TOP}/{deep}", b"deep")), fmt))
    env.extract(path)
    assert (env.staging / deep).read_bytes() == b"deep"


def test_release_made_by_gnu_tar(env: Env) -> None:
    src = env.tmp / "build" / TOP
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "hal0").write_text("#!/bin/sh\n")
    (src / "bin" / "hal0").chmod(0o755)
    (src / "bin" / "hal0-cli").symlink_to("hal0")
    os.link(src / "bin" / "hal0", src / "hal0-hardlink")
    tarball = env.tmp / "gnu.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(src.parent), TOP], check=True)
    result = env.extract(tarball)
    assert result.files == 3
    assert os.readlink(env.staging / "bin" / "hal0-cli") == "hal0"
    assert (env.staging / "hal0-hardlink").stat().st_nlink == 2


@pytest.fixture(params=["isal", "zlib"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """gzip inflated by python-isal (a dependency), or by the stdlib's zlib where it is missing."""
    if request.param == "zlib":
        monkeypatch.setattr(extract, "_inflater", lambda: ())
    else:
        assert extract._inflater(), "python-isal is a dependency: the child must find it"
    return str(request.param)


def test_concatenated_gzip_members_accepted(env: Env, inflater: str) -> None:
    data = os.urandom(300_000)
    raw = tar_bytes(release(reg(f"{TOP}/big", data)))
    cut = len(raw) // 2
    padding = bytes(1000)  # zero padding between members, as some tools write
    env.extract(env.raw(gzip.compress(raw[:cut]) + padding + gzip.compress(raw[cut:])))
    assert (env.staging / "big").read_bytes() == data


def test_each_inflater_refuses_corrupt_and_truncated_gzip(env: Env, inflater: str) -> None:
    error = assert_refused(env, env.raw(b"\x1f\x8b" + os.urandom(1000)), "corrupt")
    assert ("IsalError" in str(error)) is (inflater == "isal"), str(error)  # which one inflated
    data = gzip.compress(tar_bytes(release(reg(f"{TOP}/r", os.urandom(100_000)))))
    assert_refused(env, env.raw(data[: len(data) // 2]), "corrupt|truncated|archive ends")


def fake_isal(env: Env, monkeypatch: pytest.MonkeyPatch, init: str, isal_zlib: str = "") -> None:
    """Point the inflating child at a python-isal of our own, the way ``_inflater()`` does.

    The child runs isolated (``-I -S``): PYTHONPATH and site-packages never reach it, isal comes
    only from the directory named in its argv, so that argument is the honest way to give it a
    broken isal. The child itself runs for real.
    """
    package = env.tmp / "fake-isal" / "isal"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    if isal_zlib:
        (package / "isal_zlib.py").write_text(isal_zlib)
    monkeypatch.setattr(extract, "_inflater", lambda: (str(package.parent),))


def assert_install_error(env: Env, tarball: Path, match: str) -> InstallError:
    """A failure that is not the archive's: InstallError with a one-line message, no trace left."""
    with pytest.raises(InstallError, match=match) as exc:
        env.extract(tarball)
    assert not isinstance(exc.value, UnsafeArchiveError)
    assert "\n" not in str(exc.value), str(exc.value)
    assert "publisher" not in (exc.value.hint or "")
    assert not env.staging.exists()
    assert read_link_version(env.layout, env.layout.current_link) == "1.0.0"
    return exc.value


@pytest.mark.parametrize(
    "failure",
    [
        'ImportError("libisal.so.2: cannot open shared object file: No such file or directory")',
        'OSError(2, "No such file or directory", "/usr/lib/libisal.so.2")',
    ],
    ids=["ImportError", "OSError"],
)
def test_isal_that_does_not_import_falls_back_to_zlib(
    env: Env, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], failure: str
) -> None:
    # find_spec() finds isal, importing it fails (its libisal removed): slower, still installed.
    fake_isal(env, monkeypatch, f"raise {failure}\n")
    data = os.urandom(300_000)
    env.extract(env.tarball(release(reg(f"{TOP}/big", data))))
    assert (env.staging / "big").read_bytes() == data
    assert (env.staging / "app.py").read_bytes() == b"print('hi')\n"
    assert "inflated by zlib" in capfd.readouterr().err  # the operator can tell why it is slower


def test_decompressor_killed_by_a_signal_is_an_install_error(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the OOM killer would: the child dies of SIGKILL, the archive is fine.
    fake_isal(env, monkeypatch, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert_install_error(env, env.tarball(release()), "decompressor .* killed by SIGKILL")


def test_decompressor_crash_is_an_install_error(
    env: Env, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # isal imports but fails in use: an unexpected exception in the child, not a corrupt stream.
    broken = (
        "class error(Exception):\n    pass\n"
        "MAX_WBITS = 15\n"
        "def decompressobj(wbits):\n    raise RuntimeError('isal_zlib is broken')\n"
    )
    fake_isal(env, monkeypatch, "", broken)
    error = assert_install_error(env, env.tarball(release()), "decompressor .* failed")
    assert str(error).endswith(
        "failed: RuntimeError: isal_zlib is broken (its full output is on stderr)"
    )
    assert "Traceback (most recent call last)" in capfd.readouterr().err


def test_decompressor_read_error_is_an_install_error(tmp_path: Path) -> None:
    # The child cannot read the tarball (EBADF here, EIO on a failing disk): an OSError with an
    # errno is an I/O failure, unlike bz2's bad-data OSError, which has none.
    path = tmp_path / "release.tar.gz"
    path.write_bytes(gzip.compress(tar_bytes(release())))
    fd = os.open(path, os.O_WRONLY)
    try:
        with (
            pytest.raises(InstallError, match=r"failed: OSError: \[Errno 9\]") as exc,
            extract._Stream(fd, "gz", 1 << 20) as stream,
        ):
            stream.read(tarfile.BLOCKSIZE)
    finally:
        os.close(fd)
    assert not isinstance(exc.value, UnsafeArchiveError)
    assert "\n" not in str(exc.value)


def test_setuid_bit_stripped(env: Env) -> None:
    env.extract(
        env.tarball(
            release(
                reg(f"{TOP}/tool", mode=0o4755),
                reg(f"{TOP}/gtool", mode=0o2755),
                dir_(f"{TOP}/shared", mode=0o3755),
            )
        )
    )
    assert stat.S_IMODE((env.staging / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((env.staging / "gtool").stat().st_mode) == 0o755
    assert stat.S_IMODE((env.staging / "shared").stat().st_mode) == 0o755


def test_world_writable_stripped(env: Env) -> None:
    env.extract(env.tarball(release(reg(f"{TOP}/conf", mode=0o666), dir_(f"{TOP}/d", 0o777))))
    assert stat.S_IMODE((env.staging / "conf").stat().st_mode) == 0o644
    assert stat.S_IMODE((env.staging / "d").stat().st_mode) == 0o755


# ------------------------------------------------------------------------------------------------
# Attacks: one test each


def test_absolute_path(env: Env) -> None:
    tarball = env.tarball(release(reg(str(env.sentinel / "pwned"))))
    assert_refused(env, tarball, "absolute path")


def test_dot_dot(env: Env) -> None:
    tarball = env.tarball(release(reg(f"{TOP}/{UP}sentinel/pwned")))
    assert_refused(env, tarball, r"'\.\.' in path")


def test_symlink_escaping(env: Env) -> None:
    tarball = env.tarball(release(sym(f"{TOP}/esc", f"{UP}sentinel"), reg(f"{TOP}/esc/pwned")))
    assert_refused(env, tarball, "leaves the tree")


def test_symlink_absolute_target(env: Env) -> None:
    tarball = env.tarball(release(sym(f"{TOP}/esc", str(env.sentinel))))
    assert_refused(env, tarball, "absolute path")


def test_symlink_chain_escaping(env: Env) -> None:
    # "l" looks inside (a/b/c/s/../../../../sentinel -> sentinel) but s climbs three dirs at once.
    tarball = env.tarball(
        release(
            dir_(f"{TOP}/a/b/c"),
            sym(f"{TOP}/a/b/c/s", "../../.."),
            sym(f"{TOP}/l", f"a/b/c/s/{UP}sentinel"),
        )
    )
    assert_refused(env, tarball, "data filter|leaves the tree")


def test_symlink_chain_escaping_declared_before_its_link(env: Env) -> None:
    # Same chain with "l" first: when it is checked, "s" does not exist yet.
    tarball = env.tarball(
        release(
            dir_(f"{TOP}/a/b/c"),
            sym(f"{TOP}/l", f"a/b/c/s/{UP}sentinel"),
            sym(f"{TOP}/a/b/c/s", "../../.."),
        )
    )
    assert_refused(env, tarball, "leaves the tree")


def test_symlink_loop(env: Env) -> None:
    tarball = env.tarball(release(sym(f"{TOP}/a", "b"), sym(f"{TOP}/b", "a")))
    assert_refused(env, tarball, "symlink loop")


def test_hardlink_escaping(env: Env) -> None:
    secret = env.sentinel / "secret"
    tarball = env.tarball(release(hard(f"{TOP}/stolen", str(secret))))
    assert_refused(env, tarball, "absolute hardlink target")
    assert secret.stat().st_nlink == 1


def test_hardlink_escaping_with_dot_dot(env: Env) -> None:
    tarball = env.tarball(release(hard(f"{TOP}/stolen", f"{TOP}/{UP}sentinel/secret")))
    assert_refused(env, tarball, r"'\.\.' in hardlink target")


def test_hardlink_to_a_symlink(env: Env) -> None:
    tarball = env.tarball(release(sym(f"{TOP}/l", "app.py"), hard(f"{TOP}/h", f"{TOP}/l")))
    assert_refused(env, tarball, "not an earlier regular file")


def test_write_through_symlink(env: Env) -> None:
    tarball = env.tarball(
        release(dir_(f"{TOP}/sub"), sym(f"{TOP}/lnk", "sub"), reg(f"{TOP}/lnk/file"))
    )
    assert_refused(env, tarball, "write through the symlink")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_device_node(env: Env, kind: bytes) -> None:
    tarball = env.tarball(release(info(f"{TOP}/null", kind, devmajor=1, devminor=3)))
    assert_refused(env, tarball, "device node")


def test_fifo(env: Env) -> None:
    assert_refused(env, env.tarball(release(info(f"{TOP}/pipe", tarfile.FIFOTYPE))), "FIFO")


@pytest.mark.parametrize(
    "second",
    [reg(f"{TOP}/app.py", b"evil"), dir_(f"{TOP}/app.py"), sym(f"{TOP}/app.py", "x")],
    ids=["file", "dir", "symlink"],
)
def test_duplicate_entries(env: Env, second: Member) -> None:
    assert_refused(env, env.tarball(release(second)), "duplicate entry")


def test_duplicate_of_an_implied_dir(env: Env) -> None:
    tarball = env.tarball(release(reg(f"{TOP}/lib/x.py"), reg(f"{TOP}/lib")))
    assert_refused(env, tarball, "duplicate entry")


def test_too_many_entries(env: Env) -> None:
    tarball = env.tarball(release(*(reg(f"{TOP}/f{i}") for i in range(10))))
    assert_refused(env, tarball, "too many entries", max_entries=10)


def test_decompression_bomb(env: Env) -> None:
    bomb = [reg(f"{TOP}/zeros{i}", bytes(600_000)) for i in range(4)]  # 2.4 MB, gzips to ~10 KB
    tarball = env.tarball(release(*bomb))
    assert tarball.stat().st_size < 50_000
    assert_refused(env, tarball, "exceeds the cap", max_unpacked_bytes=1_000_000)


def test_decompression_bomb_single_member(env: Env) -> None:
    tarball = env.tarball(release(reg(f"{TOP}/zeros", bytes(8_000_000))))
    assert_refused(env, tarball, "exceeds the cap", max_unpacked_bytes=1_000_000)


def test_huge_sparse_member(env: Env) -> None:
    # GNU sparse format 0.1 in PAX records: 512 bytes stored, 1 TiB once expanded.
    ti, data = reg(f"{TOP}/huge", b"a" * 512)
    ti.pax_headers = {"GNU.sparse.map": "0,512", "GNU.sparse.size": str(2**40)}
    assert_refused(env, env.tarball(release((ti, data))), "sparse member")


def test_two_top_level_dirs(env: Env) -> None:
    tarball = env.tarball(release(dir_("other"), reg("other/x")))
    assert_refused(env, tarball, "outside the single top-level dir")


def test_two_versioned_top_level_dirs(env: Env) -> None:
    tarball = env.tarball(release(reg("hal0-6.6.6/x")))
    assert_refused(env, tarball, "more than one top-level dir")


def test_wrong_top_level_version(env: Env) -> None:
    tarball = env.tarball([dir_("hal0-9.9.9"), reg("hal0-9.9.9/app.py")])
    assert_refused(env, tarball, r"does not match the expected version \(hal0-1\.2\.3/\)")


def test_top_level_entry_not_a_directory(env: Env) -> None:
    assert_refused(env, env.tarball([reg(TOP)]), "must be a directory")


def test_empty_archive(env: Env) -> None:
    assert_refused(env, env.tarball([]), "empty")


def test_lying_header(env: Env) -> None:
    # The header says 100 bytes, 4096 follow: the parser lands in file data, which must be
    # refused as a broken header, not taken as the end of the archive.
    ti, _ = reg(f"{TOP}/liar")
    ti.size = 100
    raw = b"".join(
        [
            without_end_marker(release()),
            ti.tobuf(tarfile.PAX_FORMAT),
            b"A" * 4096,
            bytes(2 * tarfile.BLOCKSIZE),
        ]
    )
    assert_refused(env, env.raw(gzip.compress(raw)), "lying header")


def test_lying_header_beyond_end_of_archive(env: Env) -> None:
    ti, _ = reg(f"{TOP}/liar")
    ti.size = 1_000_000
    raw = without_end_marker(release()) + ti.tobuf(tarfile.PAX_FORMAT) + b"A" * 600
    assert_refused(env, env.raw(gzip.compress(raw)), "archive ends|not a valid tar archive")


def test_missing_end_marker(env: Env) -> None:
    raw = without_end_marker(release())
    assert_refused(env, env.raw(gzip.compress(raw)), "without an end-of-archive marker")


def test_data_after_end_marker(env: Env) -> None:
    raw = tar_bytes(release()) + b"smuggled" + bytes(504)
    assert_refused(env, env.raw(gzip.compress(raw)), "after the end-of-archive marker")


def test_truncated_gzip_stream(env: Env) -> None:
    data = gzip.compress(tar_bytes(release(reg(f"{TOP}/r", os.urandom(100_000)))))
    assert_refused(env, env.raw(data[: len(data) // 2]), "corrupt|truncated|archive ends")


def test_garbage_instead_of_tarball(env: Env) -> None:
    assert_refused(env, env.raw(b"\x1f\x8b" + os.urandom(1000)), "corrupt")


# ------------------------------------------------------------------------------------------------
# Disk space: a small tmpfs as the versions dir


def small_disk_env(tmp_path: Path, mount: Callable[[Path, str], None], options: str) -> Env:
    mount(tmp_path / "root/usr/lib", options)
    return make_env(tmp_path)


def numbers(message: str) -> tuple[int, int]:
    m = re.search(r"needs (?:at least )?(\d+) bytes.*?(\d+) available", message)
    assert m, message
    return int(m[1]), int(m[2])


def test_free_space_precheck_before_writing(
    tmp_path: Path, mount_tmpfs: Callable[[Path, str], None]
) -> None:
    env = small_disk_env(tmp_path, mount_tmpfs, "size=2m")
    tarball = env.tarball(release(reg(f"{TOP}/blob", os.urandom(3 * 1024**2))))
    before = snapshot(env.tmp)
    with pytest.raises(DiskSpaceError, match="compressed") as exc:
        env.extract(tarball, free_space_margin_bytes=0)
    needed, available = numbers(str(exc.value))
    assert needed > 3 * 1024**2 > 2 * 1024**2 >= available
    assert snapshot(env.tmp) == before and not env.staging.exists()


def test_free_space_check_counts_the_unpacked_size(
    tmp_path: Path, mount_tmpfs: Callable[[Path, str], None]
) -> None:
    # Compresses to almost nothing, so only the headers can tell it will not fit; the error
    # still gives the full size, although writing stopped at the first file that did not fit.
    env = small_disk_env(tmp_path, mount_tmpfs, "size=2m")
    files = [reg(f"{TOP}/z{i}", bytes(1024**2)) for i in range(3)]
    tarball = env.tarball(release(*files))
    before = snapshot(env.tmp)
    with pytest.raises(DiskSpaceError, match="whole blocks") as exc:
        env.extract(tarball, free_space_margin_bytes=0)
    needed, available = numbers(str(exc.value))
    assert needed >= 3 * 1024**2 and available <= 2 * 1024**2
    assert snapshot(env.tmp) == before and not env.staging.exists()
    assert read_link_version(env.layout, env.layout.current_link) == "1.0.0"


def test_free_space_margin_is_reserved(env: Env) -> None:
    free = os.statvfs(env.layout.versions_dir)
    margin = free.f_bavail * free.f_frsize  # asks for everything that is free, and more
    with pytest.raises(DiskSpaceError, match="margin"):
        env.extract(env.tarball(release()), free_space_margin_bytes=margin)
    assert not env.staging.exists()


def test_inode_precheck(tmp_path: Path, mount_tmpfs: Callable[[Path, str], None]) -> None:
    env = small_disk_env(tmp_path, mount_tmpfs, "size=8m,nr_inodes=64")
    tarball = env.tarball(release(*(reg(f"{TOP}/f{i}") for i in range(100))))
    with pytest.raises(DiskSpaceError, match="inodes"):
        env.extract(tarball, free_space_margin_bytes=0)
    assert not env.staging.exists()
    assert read_link_version(env.layout, env.layout.current_link) == "1.0.0"


def test_enospc_while_writing(
    tmp_path: Path, mount_tmpfs: Callable[[Path, str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checks pass on what statvfs reported; then another writer fills the disk.
    env = small_disk_env(tmp_path, mount_tmpfs, "size=4m")
    tarball = env.tarball(release(*(reg(f"{TOP}/r{i}", os.urandom(256 * 1024)) for i in range(6))))
    filler = env.layout.versions_dir / "filler"
    real = extract._free_space

    def free_space_then_fill(path: Path) -> extract._Space:
        space = real(path)
        with filler.open("wb") as f:
            f.write(bytes(space.bytes_free - 600 * 1024))
        return space

    monkeypatch.setattr(extract, "_free_space", free_space_then_fill)
    with pytest.raises(DiskSpaceError, match="disk or quota is full"):
        env.extract(tarball, free_space_margin_bytes=0)
    assert filler.exists() and not env.staging.exists()
    assert read_link_version(env.layout, env.layout.current_link) == "1.0.0"


# ------------------------------------------------------------------------------------------------
# Other failures, limits, cleanup


def test_other_os_errors_are_install_errors(env: Env) -> None:
    tarball = env.tarball(release())
    with pytest.raises(InstallError) as exc:
        extract_release(
            tarball,
            env.tmp / "no-such-dir" / "staging",
            version=VERSION,
            limits=ExtractLimits(),
        )
    assert not isinstance(exc.value, DiskSpaceError)
    with pytest.raises(InstallError, match="cannot open"):
        env.extract(env.tmp / "missing.tar.gz")


def test_existing_staging_dir_is_refused_and_kept(env: Env) -> None:
    env.staging.mkdir()
    (env.staging / "keep").write_text("x")
    with pytest.raises(InstallError, match="already exists"):
        env.extract(env.tarball(release()))
    assert (env.staging / "keep").exists()


@pytest.mark.parametrize(
    "limits",
    [
        {"max_unpacked_bytes": 0},
        {"max_entries": 0},
        {"free_space_margin_bytes": -1},
        {"max_entries": True},
        {"max_unpacked_bytes": 2**41},
    ],
)
def test_limits_are_bounded(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(limits))):
        ExtractLimits(**limits)


def test_unusable_version_string(env: Env) -> None:
    with pytest.raises(ValueError, match="version"):
        extract_release(env.tarball(release()), env.staging, version="../x", limits=ExtractLimits())


def test_clean_staging_removes_only_leftovers(env: Env) -> None:
    vd = env.layout.versions_dir
    (vd / ".hal0-staging-old" / "deep").mkdir(parents=True)
    (vd / ".hal0-trash-hal0-0.9-abc").mkdir()
    (vd / ".hal0-trash-hal0-0.9-abc" / "f").write_text("x")
    removed = clean_staging(env.layout)
    assert [p.name for p in removed] == [".hal0-staging-old", ".hal0-trash-hal0-0.9-abc"]
    assert (vd / "hal0-1.0.0" / "app.py").exists()
    assert sorted(p.name for p in vd.iterdir()) == ["hal0", "hal0-1.0.0"]


def test_remove_tree_never_follows_links(env: Env) -> None:
    tree = env.tmp / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "out").symlink_to(env.sentinel)
    link = env.tmp / "link"
    link.symlink_to(env.sentinel)
    remove_tree(tree)
    remove_tree(link)
    remove_tree(env.tmp / "missing")
    assert not tree.exists() and not link.is_symlink()
    assert (env.sentinel / "secret").exists()


def test_remove_tree_fixes_read_only_dirs() -> None:
    # Permissions do not stop root: drop to nobody in a child to make them matter.
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    base = Path(tempfile.mkdtemp(prefix="hal0-test-ro-"))
    try:
        os.chmod(base, 0o755)
        os.chown(base, 65534, 65534)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                tree = base / "tree"
                (tree / "a" / "b").mkdir(parents=True)
                (tree / "a" / "b" / "f").write_text("x")
                os.chmod(tree / "a" / "b", 0o500)
                os.chmod(tree / "a", 0o500)
                try:
                    shutil.rmtree(tree)
                except PermissionError:
                    remove_tree(tree)
                    code = 0 if not tree.exists() else 2
                else:
                    code = 3  # read-only dirs did not stop rmtree: the test would prove nothing
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        remove_tree(base)


def test_a_writeback_error_only_the_background_flush_saw_fails_the_install(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: the final syncfs may report success after the helper consumed the error.
    (A stand-in flush fails with EIO: a failing disk cannot be provoked here.)"""

    class FailedFlush(storage.BackgroundFlush):
        def __enter__(self) -> storage.BackgroundFlush:
            def eio(fd: int) -> None:
                raise OSError(errno.EIO, "syncfs: Input/output error")

            self._flush = eio
            self._every_s = 0.0
            super().__enter__()
            self._thread.join(10)  # the failed flush has happened: deterministic
            return self

    monkeypatch.setattr(extract, "BackgroundFlush", FailedFlush)
    with pytest.raises(InstallError, match="Input/output error"):
        env.extract(env.tarball(release()))
    assert not env.staging.exists()
    assert read_link_version(env.layout, env.layout.current_link) == "1.0.0"


def test_no_flush_thread_outlives_an_extraction(env: Env) -> None:
    env.extract(env.tarball(release()))
    remove_tree(env.staging)
    with pytest.raises(UnsafeArchiveError):
        env.extract(env.tarball(release(reg("../escape"))))
    assert [t for t in threading.enumerate() if t.name == "background-flush"] == []
