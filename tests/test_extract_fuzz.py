"""A fuzzed tarball corpus through the extractor (hypothesis).

Every example is unpacked exactly as the updater does it (``extract_release`` into
``layout.staging_dir(...)`` beside an installed, current version), with small caps so that each
one is fast. Five campaigns:

- valid archives, built member by member to follow every rule: each must unpack to exactly what it
  holds, and one byte or one entry more than a cap must be refused (so no property below can
  pass by refusing everything);
- hostile archives: names (nested, ``..``, absolute, ``./``, very long, unicode, raw bytes,
  duplicates, outside ``hal0-<version>/``), every member type, link targets (inside, escaping,
  absolute, chains, loops, writes through links), modes, sizes up to past the cap, ownership,
  PAX records;
- symlink graphs: chains of links through ``..`` and through each other, then writes through them;
- PAX records: the keys tarfile reads, with odd values (negative, huge, non-numeric, floats,
  escaping paths), on one member of a valid release;
- mutations of valid releases: bytes flipped, set, inserted, deleted, blocks copied or the stream
  cut, in the tar stream before compression or in the gzip stream. Drawn by hypothesis rather than
  a seeded ``random``: a failure shrinks to one minimal edit and is replayed from the database.

Whatever the archive, :func:`extract_checked` accepts exactly two outcomes: success, after which
the staging dir holds what an independent reading of the archive says (and that reading finds no
broken rule), with no special files, no setuid/setgid/sticky or group/world-write bits, no link
resolving outside it, no file owned by anyone else; or :class:`UnsafeArchiveError`, after which the
staging dir is gone. Any other exception fails the example. Either way nothing outside the
staging dir changed and ``current`` still points at the installed version. Absolute names and
link targets are rooted at the example's own tmp dir, so that an escape lands where the
snapshot sees it.

The bugs these campaigns found (non-finite PAX mtimes, negative PAX sizes, symlink targets longer
than PATH_MAX) are fixed; their reductions are the regression tests at the end, and the strategies
draw those inputs too.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import io
import lzma
import os
import posixpath
import random
import signal
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from tests import test_extract
from tests.test_extract import (
    MTIME,
    TOP,
    UP,
    Env,
    Member,
    dir_,
    hard,
    info,
    make_env,
    reg,
    release,
    snapshot,
    sym,
    tar_bytes,
)
from watchdog_updater.errors import UnsafeArchiveError
from watchdog_updater.extract import ExtractResult
from watchdog_updater.links import read_link_version

CAP = 32 * 1024  # max_unpacked_bytes: small, so that near-cap members stay cheap
MAX_ENTRIES = 24
LIMITS = {"max_unpacked_bytes": CAP, "max_entries": MAX_ENTRIES, "free_space_margin_bytes": 0}
PATH_MAX = 4095  # bytes in a normalised member name, as the extractor and the kernel allow
EXAMPLE_SECONDS = 20.0  # one extraction takes ~50 ms; past this it is a hang, not a slow machine

# Filesystem work and a child interpreter per extraction make timings noisy: no deadline. Each
# example makes its own dir under the function's tmp_path, so sharing the fixture is safe.
FUZZ = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
SAFE_TYPES = (*FILE_TYPES, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE)


# ------------------------------------------------------------------------------------------------
# Archives as drawn


def rooted(path: str, root: Path) -> str:
    """An absolute path from a strategy, moved under the example's tmp dir."""
    return f"{root}{path}" if path.startswith("/") else path


@dataclass(frozen=True)
class Spec:
    """One member as drawn; absolute ``name``, ``link`` and PAX paths are :func:`rooted`."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes | None = None
    link: str = ""
    mode: int = 0o644
    mtime: int = MTIME
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    pax: tuple[tuple[str, str], ...] = ()

    def member(self, root: Path) -> Member:
        ti, data = info(
            rooted(self.name, root),
            self.type,
            mode=self.mode,
            data=self.data,
            linkname=rooted(self.link, root),
            mtime=self.mtime,
            uid=self.uid,
            gid=self.gid,
            uname=self.uname,
            gname=self.gname,
        )
        if self.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            ti.devmajor, ti.devminor = 1, 3  # /dev/null
        ti.pax_headers = {k: rooted(v, root) if "path" in k else v for k, v in self.pax}
        return ti, data


@dataclass(frozen=True)
class Archive:
    specs: tuple[Spec, ...]
    fmt: int = tarfile.PAX_FORMAT

    def tarball(self, env: Env) -> bytes:
        """The gzip-compressed archive, as releases are."""
        raw = tar_bytes([s.member(env.tmp) for s in self.specs], self.fmt)
        return gzip.compress(raw, compresslevel=1)


# ------------------------------------------------------------------------------------------------
# What a successful extraction must have written, and what no extraction may leave


Node = tuple[str, bytes | str]  # ("d", b""), ("f", contents) or ("l", symlink target)
DIR: Node = ("d", b"")


@dataclass
class Model:
    tree: dict[str, Node] = field(default_factory=lambda: {"": DIR})  # rel -> node
    explicit: set[str] = field(default_factory=set)
    hardlinks: dict[str, str] = field(default_factory=dict)  # rel -> rel of its source
    files: int = 0  # non-directory members
    unpacked: int = 0  # sum of regular-file sizes
    count: int = 0


def normalised(name: str, what: str) -> list[str]:
    """The components of a member name or hardlink target; asserts it stays in the top dir."""
    assert not name.startswith("/"), f"accepted an absolute {what}: {name!r}"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    assert ".." not in parts, f"accepted '..' in a {what}: {name!r}"
    assert parts and parts[0] == TOP, f"accepted a {what} outside {TOP}/: {name!r}"
    return parts[1:]


def read_model(raw: bytes) -> Model:
    """An independent reading of an archive the extractor accepted, asserting docs/security.md.

    Strict where it matters (duplicates, specials, escapes, writes through anything but a dir,
    caps), lenient where it is harmless (a hardlink to a hardlink).
    """
    model = Model()
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            for m in tf:
                add_member(model, tf, m)
    except tarfile.TarError as e:
        pytest.fail(f"the extractor accepted an archive tarfile cannot read: {e}")
    assert model.count <= MAX_ENTRIES and model.unpacked <= CAP, "accepted past a cap"
    return model


def add_member(model: Model, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
    tree = model.tree
    model.count += 1
    assert not m.issparse() and m.type in SAFE_TYPES, f"accepted {m.name!r}, type {m.type!r}"
    parts = normalised(m.name, "member name")
    rel = "/".join(parts)
    assert rel not in model.explicit, f"accepted a duplicate of {m.name!r}"
    model.explicit.add(rel)
    for i in range(1, len(parts)):
        parent = tree.setdefault("/".join(parts[:i]), DIR)
        assert parent == DIR, f"accepted {m.name!r}, written through a {parent[0]!r}"
    if m.isdir():
        tree[rel] = DIR
        return
    assert rel not in tree, f"accepted {m.name!r} over a directory"
    model.files += 1
    if m.issym():
        assert m.linkname and not m.linkname.startswith("/"), f"accepted {m.linkname!r}"
        tree[rel] = ("l", m.linkname)
    elif m.islnk():
        source = "/".join(normalised(m.linkname, "hardlink target"))
        assert source in model.explicit and tree[source][0] == "f", f"accepted {m.name!r}"
        tree[rel] = tree[source]
        model.hardlinks[rel] = source
    else:
        assert m.size >= 0, f"accepted {m.name!r} of size {m.size}"
        extracted = tf.extractfile(m)
        assert extracted is not None
        tree[rel] = ("f", extracted.read())
        model.unpacked += m.size


def read_tree(staging: Path) -> tuple[dict[str, Node], dict[str, tuple[int, int]]]:
    """The tree under ``staging``, links never followed, and the (dev, ino) of each entry;
    asserts what no extraction may write."""
    tree: dict[str, Node] = {}
    ids: dict[str, tuple[int, int]] = {}
    inodes: set[tuple[int, int]] = set()  # (dev, ino) of everything in the tree
    file_links: dict[tuple[int, int], tuple[int, int]] = {}  # -> (st_nlink, names in the tree)
    # Relative to descriptors all along: member paths may be near PATH_MAX on their own.
    for dirpath, dirnames, filenames, dirfd in os.fwalk(staging):
        here = os.path.relpath(dirpath, staging)
        here = "" if here == "." else here
        if not here:
            st_ = os.fstat(dirfd)
            check_entry("", st_)
            tree[""] = DIR
            inodes.add((st_.st_dev, st_.st_ino))
        for name in dirnames + filenames:
            rel = posixpath.join(here, name) if here else name
            st_ = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            check_entry(rel, st_)
            inode = ids[rel] = (st_.st_dev, st_.st_ino)
            inodes.add(inode)
            if stat.S_ISDIR(st_.st_mode):
                tree[rel] = DIR
            elif stat.S_ISLNK(st_.st_mode):
                tree[rel] = ("l", os.readlink(name, dir_fd=dirfd))
            else:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
                with os.fdopen(fd, "rb") as f:
                    tree[rel] = ("f", f.read())
                file_links[inode] = (st_.st_nlink, file_links.get(inode, (0, 0))[1] + 1)
    for nlink, names in file_links.values():
        assert nlink == names, "a file in staging is hardlinked to a file outside it"
    root = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for rel, (kind, target) in tree.items():
            if kind == "l":
                assert_resolves_inside(root, staging, rel, target, inodes)
    finally:
        os.close(root)
    return tree, ids


def assert_resolves_inside(
    root: int, staging: Path, rel: str, target: bytes | str, inside: set[tuple[int, int]]
) -> None:
    """The kernel resolves the link (every hop, physically) to something in the tree; a link it
    cannot resolve (dangling, a loop) must still point inside once its target is created."""
    where = f"{rel} -> {target!r} resolves outside the staging dir"
    try:
        fd = os.open(rel, os.O_PATH | os.O_CLOEXEC, dir_fd=root)
    except OSError:
        real = os.path.realpath(staging / rel)
        top = os.path.realpath(staging)
        assert os.path.commonpath([real, top]) == top, f"{where}: {real}"
        return
    try:
        st_ = os.fstat(fd)
    finally:
        os.close(fd)
    assert (st_.st_dev, st_.st_ino) in inside, where


def check_entry(rel: str, st_: os.stat_result) -> None:
    kind = stat.S_IFMT(st_.st_mode)
    assert kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK), f"{rel!r}: special file {kind:o}"
    # Ownership recorded in the archive is never applied: as root that would hand files out.
    assert (st_.st_uid, st_.st_gid) == (os.geteuid(), os.getegid()), f"{rel!r}: owner"
    if kind != stat.S_IFLNK:
        mode = stat.S_IMODE(st_.st_mode)
        assert not mode & 0o7022, f"{rel!r}: mode {mode:o} (setuid/setgid/sticky or g/o write)"


def assert_extracted(env: Env, result: ExtractResult, raw: bytes) -> None:
    model = read_model(raw)
    tree, ids = read_tree(env.staging)
    assert tree == model.tree, "the staging dir differs from the archive"
    for rel, source in model.hardlinks.items():
        assert ids[rel] == ids[source], f"{rel} is not a hardlink to {source}"
    assert result == ExtractResult(env.staging, files=model.files, unpacked_bytes=model.unpacked)


# ------------------------------------------------------------------------------------------------
# The harness


class Hang(Exception):
    """An extraction ran past EXAMPLE_SECONDS (not an OSError: the extractor would wrap that)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Turn a hang into a failing example; pytest-timeout's own alarm is restored after."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"the extraction was still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001))


def unpacked_stream(blob: bytes) -> bytes:
    """The tar stream inside ``blob``, decompressed as the extractor sniffs it (by magic)."""
    for magic, decompress in (
        (b"\x1f\x8b", gzip.decompress),
        (b"\xfd7zXZ\x00", lzma.decompress),
        (b"BZh", bz2.decompress),
    ):
        if blob.startswith(magic):
            try:
                return decompress(blob)
            except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:
                pytest.fail(f"the extractor accepted a stream {decompress.__module__} refuses: {e}")
    return blob


def example_env(tmp_path: Path) -> Env:
    """A fresh host per example (installed 1.0.0, a sentinel dir); pytest prunes old tmp dirs."""
    return make_env(Path(tempfile.mkdtemp(dir=tmp_path)))


def extract_checked(env: Env, blob: bytes) -> ExtractResult | None:
    """Extract ``blob`` as the updater does and assert the invariants of the outcome.

    Returns the result, or None when the archive was refused.
    """
    tarball = env.raw(blob)
    before = snapshot(env.tmp)
    secret = (env.sentinel / "secret").read_bytes()
    result: ExtractResult | None = None
    try:
        with time_limit(EXAMPLE_SECONDS):
            extracted = env.extract(tarball, **LIMITS)
    except UnsafeArchiveError as e:  # any other exception propagates and fails the example
        assert e.message and str(e) == e.message and e.diagnostics().startswith(e.message)
        assert e.hint, "every refusal tells the operator what to do"
        assert not env.staging.exists() and not env.staging.is_symlink()  # as documented
    else:
        assert_extracted(env, extracted, unpacked_stream(blob))
        # Out of the snapshot's way, by a rename: removing deep trees costs more than the rest.
        env.staging.rename(env.tmp.with_name(f"{env.tmp.name}-unpacked"))
        result = extracted
    assert snapshot(env.tmp) == before
    assert (env.sentinel / "secret").read_bytes() == secret
    assert read_link_version(env.layout, env.layout.current_link) == "1.0.0"
    if currently_in_test_context():  # for --hypothesis-show-statistics
        event("refused" if result is None else "unpacked")
    return result


# ------------------------------------------------------------------------------------------------
# Strategies: the pieces


def _text_segment(s: str) -> bool:
    return s not in (".", "..")


SEGMENTS = st.one_of(
    st.sampled_from(["a", "b", "bin", "lib", "app.py", "data", " ", "-x", "a b", "\\", "\n"]),
    st.text(
        st.characters(exclude_characters="/\0", exclude_categories=["Cs"]), min_size=1, max_size=8
    ).filter(_text_segment),
    # Raw non-UTF-8 bytes (surrogate escapes), DEL and control bytes, names of 252-255 bytes.
    st.sampled_from(["\udcff", "caf\udce9", "\x7f\x01", "é" * 127, "x" * 255, "\U0001f600" * 63]),
)
# A chain of dirs: with the top dir, names up to PATH_MAX (the longer ones are skipped).
DEEP = st.integers(1, 16).map(lambda depth: ["d" * 250] * depth)
TOO_LONG = ["y" * 256, "é" * 128, "d/" * 2100 + "f"]  # a 256-byte component; a 4.2 KB path
MODES = st.one_of(
    st.sampled_from([0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o777, 0o666, 0o000, 0o7777]),
    st.integers(0, 0o7777),
)
MTIMES = st.sampled_from([MTIME, 0, -1, 2**33, 2**33 + 1, 2**36])
IDS = st.sampled_from([0, 1000, 65534, 2**21 - 1, 2**32 - 1])
OWNER_NAMES = st.sampled_from(["", "root", "nobody", "ü" * 40, "\udcff"])
NAME_FORMS = ["{top}/{rel}", "./{top}/{rel}", "{top}/./{rel}", "{top}//{rel}"]


def random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)  # test data, not secrets


def file_data(budget: int) -> st.SearchStrategy[bytes]:
    """Empty, small, a repeated byte (compresses to nothing), or incompressible up to ``budget``."""
    sizes = sorted({n for n in (0, 1, 511, 512, 513, budget // 2, budget) if n <= budget})
    return st.one_of(
        st.binary(max_size=min(64, budget)),
        st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255), st.sampled_from(sizes)),
        st.builds(random_bytes, st.integers(0, 2**32), st.sampled_from(sizes)),
    )


ATTRIBUTES = st.tuples(MODES, MTIMES, IDS, IDS, OWNER_NAMES, OWNER_NAMES)


def with_attributes(draw: st.DrawFn, spec: Spec) -> Spec:
    """``spec`` with any mode, mtime and ownership: all stripped or ignored, never refused."""
    mode, mtime, uid, gid, uname, gname = draw(ATTRIBUTES)
    return dataclasses.replace(
        spec, mode=mode, mtime=mtime, uid=uid, gid=gid, uname=uname, gname=gname
    )


def joined(*parts: str) -> str:
    return "/".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------------
# Strategies: valid archives (the model)


@st.composite
def valid_archives(draw: st.DrawFn) -> Archive:
    """Archives following every rule, in any order: implied and explicit dirs, files up to the
    cap, hardlinks to earlier files, symlinks to anything inside (existing or not, other links
    included, drawn in order so that chains cannot loop)."""
    kinds: dict[str, str] = {"": "d"}  # rel -> "d", "f", "h" or "l"
    explicit: set[str] = set()
    specs: list[Spec] = []
    budget = CAP
    for _ in range(draw(st.integers(0, MAX_ENTRIES - 2))):  # room for the top dir and a filler
        parent = draw(st.sampled_from(sorted(r for r, k in kinds.items() if k == "d")))
        new = draw(st.lists(SEGMENTS, min_size=1, max_size=3) | DEEP)
        rel = joined(parent, *new)
        prefixes = [joined(parent, *new[:i]) for i in range(1, len(new))]
        if rel in kinds or any(kinds.get(p, "d") != "d" for p in prefixes):
            continue
        if len(f"{TOP}/{rel}".encode(errors="surrogateescape")) > PATH_MAX:
            continue
        implied = [r for r, k in kinds.items() if k == "d" and r and r not in explicit]
        choices = ["f", "f", "d", "l"] + ["h"] * any(
            k == "f" and r in explicit for r, k in kinds.items()
        )
        kind = draw(st.sampled_from(choices + ["D"] * bool(implied)))
        if kind == "D":  # an explicit entry for a dir implied so far
            rel, kind, prefixes = draw(st.sampled_from(sorted(implied))), "d", []
        for p in prefixes:
            kinds[p] = "d"
        form = draw(st.sampled_from(NAME_FORMS))
        name = form.format(top=TOP, rel=rel) + ("/" if kind == "d" and draw(st.booleans()) else "")
        spec = Spec(name, tarfile.DIRTYPE)
        if kind == "f":
            data = draw(file_data(budget))
            budget -= len(data)
            spec = Spec(name, draw(st.sampled_from(FILE_TYPES)), data)
        elif kind == "h":
            source = draw(st.sampled_from(sorted(r for r in explicit if kinds[r] == "f")))
            link = draw(st.sampled_from(NAME_FORMS)).format(top=TOP, rel=source)
            spec = Spec(name, tarfile.LNKTYPE, link=link)
        elif kind == "l":
            start = posixpath.dirname(rel)
            target = draw(
                st.one_of(
                    st.sampled_from(sorted(kinds)),  # anything drawn so far, "" is the top
                    st.sampled_from(sorted(r for r, k in kinds.items() if k == "d")).map(
                        lambda d: joined(d, "missing")  # dangling, but inside
                    ),
                )
            )
            link = posixpath.relpath(target or ".", start or ".")
            spec = Spec(name, tarfile.SYMTYPE, link=link)
        kinds[rel] = kind
        explicit.add(rel)
        specs.append(with_attributes(draw, spec))
    if not specs or draw(st.booleans()):  # the top dir's own entry, anywhere
        top = Spec(draw(st.sampled_from([TOP, f"{TOP}/", f"./{TOP}"])), tarfile.DIRTYPE)
        specs.insert(draw(st.integers(0, len(specs))), top)
    return Archive(tuple(specs), draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])))


def filled(archive: Archive, cap: str, over: int) -> Archive:
    """``archive`` filled up to the size or the count cap, plus ``over`` bytes or entries."""
    used = sum(len(s.data or b"") for s in archive.specs if s.type in FILE_TYPES)
    count = len(archive.specs)
    # Longer than any drawn segment: these names are fresh.
    if cap == "bytes":
        extra = [Spec(f"{TOP}/\x01filler", data=bytes(CAP - used + over))]
    else:
        extra = [Spec(f"{TOP}/\x01filler-{i}") for i in range(MAX_ENTRIES - count + over)]
    return Archive(archive.specs + tuple(extra), archive.fmt)


# ------------------------------------------------------------------------------------------------
# Strategies: hostile archives


ESCAPING_FORMS = [
    "/{rel}",  # absolute, rooted at the tmp dir
    "/sentinel/{rel}",
    "{top}/" + UP + "sentinel/{rel}",
    "{top}/{rel}/../../{rel}",
    "../{rel}",
    "{rel}",  # outside the top dir
    "hal0-6.6.6/{rel}",
    "{top}x/{rel}",
    "HAL0-1.2.3/{rel}",
]
ODD_NAMES = [TOP, f"{TOP}/", ".", "./", "..", f"{TOP}/..", *(f"{TOP}/{n}" for n in TOO_LONG)]


def hostile_name(draw: st.DrawFn, earlier: list[str]) -> str:
    rel = draw(st.lists(SEGMENTS, min_size=1, max_size=3).map("/".join))
    # Mostly names that pass, so that archives get to the later checks; shrinks towards those.
    how = draw(st.integers(0, 9))
    if how < 5:
        return draw(st.sampled_from(NAME_FORMS)).format(top=TOP, rel=rel)
    if how < 7:  # nested under an earlier member: a dir, or through a link or a file
        return f"{draw(st.sampled_from(earlier)).rstrip('/')}/{rel}"
    if how == 7:
        return draw(st.sampled_from(earlier))  # a duplicate
    if how == 8:
        return draw(st.sampled_from(ESCAPING_FORMS)).format(top=TOP, rel=rel)
    return draw(st.sampled_from(ODD_NAMES))


def symlink_targets(name: str, earlier: list[str]) -> st.SearchStrategy[str]:
    start = posixpath.dirname(name.lstrip("/")) or "."
    to_earlier = st.sampled_from(earlier).map(
        lambda e: posixpath.relpath(e.lstrip("/") or ".", start)
    )
    return st.one_of(
        to_earlier,  # inside, or a chain through an earlier link
        st.tuples(to_earlier, st.integers(1, 4)).map(lambda t: t[0] + "/.." * t[1]),
        st.lists(
            st.sampled_from(["..", ".", "a", "b", "bin", TOP, "sentinel"]), min_size=1, max_size=6
        ).map("/".join),
        st.sampled_from(
            [UP + "sentinel", "/sentinel", "/sentinel/secret", ".", "", "x/" * 2047, "a/" * 2048]
        ),
        st.just(posixpath.basename(name.rstrip("/")) or "."),  # itself: a loop
    )


def hardlink_targets(earlier: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(earlier),
        st.sampled_from(
            [
                "/sentinel/secret",
                f"{TOP}/{UP}sentinel/secret",
                "sentinel/secret",
                f"{TOP}/missing",
                TOP,
                "",
            ]
        ),
    )


PAX_RECORDS = st.one_of(
    st.just(()),
    st.just((("GNU.sparse.map", "0,512"), ("GNU.sparse.size", str(2**40)))),
    st.just((("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"), ("GNU.sparse.realsize", "9"))),
    st.integers(-511, 2 * CAP).map(lambda n: (("size", str(n)),)),  # a lying size
    st.sampled_from(["1e12", "-1.5", "0", " 7", "x", "inf", "nan"]).map(lambda v: (("mtime", v),)),
    st.sampled_from(["/sentinel/pwned", f"{TOP}/{UP}sentinel/p", f"{TOP}/a\0b", f"{TOP}/ok"]).map(
        lambda v: (("path", v),)
    ),
    st.sampled_from([UP + "sentinel", "/sentinel", "x\0y", "app.py"]).map(
        lambda v: (("linkpath", v),)
    ),
    st.just((("uid", "-1"), ("gid", "x"), ("uname", "\udcff"))),
    st.just((("hdrcharset", "BINARY"),)),
)
PASSING_TYPES = st.sampled_from([*FILE_TYPES, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE])
REFUSED_TYPES = st.sampled_from(
    [
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.FIFOTYPE,
        tarfile.GNUTYPE_SPARSE,
        b"V",  # a volume label
        b"Z",  # no such type
    ]
)


@st.composite
def hostile_archives(draw: st.DrawFn) -> Archive:
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    specs: list[Spec] = [Spec(f"{TOP}/", tarfile.DIRTYPE)] if draw(st.booleans()) else []
    earlier = [TOP, f"{TOP}/app.py"]  # names for duplicates, parents and link targets
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(PASSING_TYPES if draw(st.integers(0, 4)) < 4 else REFUSED_TYPES)
        name = hostile_name(draw, earlier)
        link = ""
        if kind == tarfile.SYMTYPE:
            link = draw(symlink_targets(name, earlier))
        elif kind == tarfile.LNKTYPE:
            link = draw(hardlink_targets(earlier))
        data = draw(file_data(CAP + 1)) if kind in FILE_TYPES else None
        pax = (
            draw(PAX_RECORDS) if fmt == tarfile.PAX_FORMAT and draw(st.integers(0, 3)) == 3 else ()
        )
        specs.append(with_attributes(draw, Spec(name, kind, data, link, pax=pax)))
        earlier.append(name)
    return Archive(tuple(specs), fmt)


@st.composite
def symlink_graphs(draw: st.DrawFn) -> Archive:
    """Real dirs, links in them whose targets climb with ``..`` and pass through each other, then
    files written under some links; in any order. Nothing may resolve or be written outside."""
    dirs = ["a", "a/b", "a/b/c", "d"]
    homes = draw(st.lists(st.sampled_from(["", *dirs]), min_size=1, max_size=5))
    links = [joined(home, f"l{i}") for i, home in enumerate(homes)]
    steps = st.sampled_from(["..", ".", "a", "b", "c", "d", *(f"l{i}" for i in range(len(links)))])
    specs = [Spec(f"{TOP}/{d}", tarfile.DIRTYPE) for d in dirs]
    for link in links:
        target = draw(st.lists(steps, min_size=1, max_size=6).map("/".join))
        specs.append(Spec(f"{TOP}/{link}", tarfile.SYMTYPE, link=target))
    for link in draw(st.lists(st.sampled_from(links), max_size=2, unique=True)):
        specs.append(Spec(f"{TOP}/{link}/pwned", data=b"x"))
    return Archive(tuple(draw(st.permutations(specs))))


# ------------------------------------------------------------------------------------------------
# Strategies: PAX records on one member of a valid release


PAX_KEYS = st.sampled_from(
    [
        "path",
        "linkpath",
        "size",
        "mtime",
        "atime",
        "uid",
        "gid",
        "uname",
        "gname",
        "hdrcharset",
        "comment",
        "GNU.sparse.size",
        "GNU.sparse.realsize",
        "GNU.sparse.map",
        "GNU.sparse.name",
        "GNU.sparse.major",
        "GNU.sparse.minor",
        "SCHILY.xattr.security.capability",
    ]
)
PAX_VALUES = st.one_of(
    st.integers(-(2**66), 2**66).map(str),
    st.floats().map(str),  # "inf", "nan", "1e+300", "-0.0"
    st.sampled_from(["", " 7", "0x10", "1_0", "1e3", "+5", "0,512", "0", "1", "BINARY"]),
    st.sampled_from(["/sentinel/pwned", f"{TOP}/{UP}sentinel/p", UP + "sentinel", f"{TOP}/a\0b"]),
    st.sampled_from([TOP, f"{TOP}/app.py", f"{TOP}/bin", f"{TOP}/new", "app.py", "hal0"]),
    st.text(max_size=12),
)


def _release_specs() -> list[Spec]:
    return [
        Spec(TOP, tarfile.DIRTYPE),
        Spec(f"{TOP}/app.py", data=b"print('hi')\n"),
        Spec(f"{TOP}/bin", tarfile.DIRTYPE),
        Spec(f"{TOP}/bin/hal0", data=b"#!/bin/sh\n", mode=0o755),
        Spec(f"{TOP}/bin/hal0-cli", tarfile.SYMTYPE, link="hal0"),
        Spec(f"{TOP}/hal0-hard", tarfile.LNKTYPE, link=f"{TOP}/bin/hal0"),
    ]


@st.composite
def releases_with_pax_records(draw: st.DrawFn) -> Archive:
    specs = _release_specs()
    at = draw(st.integers(0, len(specs) - 1))
    records = draw(st.dictionaries(PAX_KEYS, PAX_VALUES, min_size=1, max_size=3))
    specs[at] = dataclasses.replace(specs[at], pax=tuple(records.items()))
    return Archive(tuple(specs))


# ------------------------------------------------------------------------------------------------
# Strategies: mutations of valid releases


def _bases() -> list[bytes]:
    long_name = f"{TOP}/" + "/".join(["ü" * 30] * 4) + "/mod.py"  # past 100 bytes: extra headers
    tree = release(
        dir_(f"{TOP}/bin"),
        reg(f"{TOP}/bin/hal0", b"#!/bin/sh\necho hi\n", mode=0o755),
        sym(f"{TOP}/bin/hal0-cli", "hal0"),
        hard(f"{TOP}/hal0-hard", f"{TOP}/bin/hal0"),
        reg(long_name, b"x = 1\n" * 40),
    )
    data = release(reg(f"{TOP}/blob", random_bytes(1, 20_000)), reg(f"{TOP}/zeros", bytes(8000)))
    return [
        tar_bytes(tree, tarfile.PAX_FORMAT),
        tar_bytes(tree, tarfile.GNU_FORMAT),
        tar_bytes(data, tarfile.PAX_FORMAT),
    ]


BASES = _bases()
MUTATION_OPS = ["flip", "set", "insert", "delete", "truncate", "copy-block"]


@st.composite
def mutated_releases(draw: st.DrawFn) -> bytes:
    """A valid release with 1-4 edits, to the tar stream (then compressed) or to the gzip one."""
    raw = draw(st.sampled_from(BASES))
    in_tar = draw(st.booleans())
    data = bytearray(raw if in_tar else gzip.compress(raw, compresslevel=6, mtime=0))
    for _ in range(draw(st.integers(1, 4))):
        size = len(data)
        # Anywhere (in the tar stream, mostly file data: the result must unpack faithfully), or
        # in the first headers, or at the very end (gzip CRC and length, the end marker).
        where = draw(st.integers(0, 3))
        if where < 2:
            pos = draw(st.integers(0, size))
        elif where == 2:
            pos = draw(st.integers(0, min(1536, size)))
        else:
            pos = draw(st.integers(max(size - 16, 0), size))
        op = draw(st.sampled_from(MUTATION_OPS))
        if op == "flip" and pos < size:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and pos < size:
            data[pos] = draw(
                st.sampled_from([0, 0xFF, ord("0"), ord("/"), ord("."), ord("7")])
                | st.integers(0, 255)
            )
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 600))]
        elif op == "truncate":
            del data[pos:]
        elif op == "copy-block":  # a header or data block repeated elsewhere
            block = pos // 512 * 512
            at = draw(st.integers(0, size // 512)) * 512
            data[at:at] = data[block : block + 512]
    return gzip.compress(bytes(data), compresslevel=1) if in_tar else bytes(data)


# ------------------------------------------------------------------------------------------------
# The properties


@settings(FUZZ, max_examples=90)
@given(
    valid_archives(),
    st.sampled_from([None, None, ("bytes", 0), ("bytes", 1), ("entries", 0), ("entries", 1)]),
)
def test_valid_archives_unpack_exactly_and_one_more_is_refused(
    tmp_path: Path, archive: Archive, fill: tuple[str, int] | None
) -> None:
    env = example_env(tmp_path)
    if fill is None:
        assert extract_checked(env, archive.tarball(env)) is not None, "a valid archive refused"
    elif fill[1] == 0:  # exactly at a cap: still valid
        assert extract_checked(env, filled(archive, *fill).tarball(env)) is not None
    else:
        assert extract_checked(env, filled(archive, *fill).tarball(env)) is None


@settings(FUZZ, max_examples=130)
@given(hostile_archives())
def test_hostile_archives_unpack_safely_or_are_refused(tmp_path: Path, archive: Archive) -> None:
    env = example_env(tmp_path)
    extract_checked(env, archive.tarball(env))


@settings(FUZZ, max_examples=80)
@given(symlink_graphs())
def test_symlink_graphs_never_resolve_or_write_outside(tmp_path: Path, archive: Archive) -> None:
    env = example_env(tmp_path)
    extract_checked(env, archive.tarball(env))


@settings(FUZZ, max_examples=140)
@given(mutated_releases())
def test_mutated_releases_unpack_faithfully_or_are_refused(tmp_path: Path, blob: bytes) -> None:
    env = example_env(tmp_path)
    extract_checked(env, blob)


@settings(FUZZ, max_examples=90)
@given(releases_with_pax_records())
def test_pax_records_unpack_faithfully_or_are_refused(tmp_path: Path, archive: Archive) -> None:
    env = example_env(tmp_path)
    extract_checked(env, archive.tarball(env))


def test_campaign_starting_points_unpack(tmp_path: Path) -> None:
    # The mutation and PAX campaigns mean something only if what they start from is accepted.
    env = example_env(tmp_path)  # only to root absolute paths: the release has none
    blobs = [*(gzip.compress(raw) for raw in BASES), Archive(tuple(_release_specs())).tarball(env)]
    for blob in blobs:
        assert extract_checked(example_env(tmp_path), blob) is not None


# ------------------------------------------------------------------------------------------------
# The checks themselves can fail


def _plant_fifo(env: Env) -> None:
    os.mkfifo(env.staging / "fifo")


def _plant_setuid(env: Env) -> None:
    os.chmod(env.staging / "app.py", 0o4755)


def _plant_escape(env: Env) -> None:
    os.symlink(f"{UP}sentinel", env.staging / "esc")


def _plant_dangling_escape(env: Env) -> None:
    os.symlink(f"{UP}not-yet", env.staging / "later")


def _plant_hardlink_outside(env: Env) -> None:
    os.link(env.sentinel / "secret", env.staging / "stolen")


def _plant_changed_content(env: Env) -> None:
    (env.staging / "app.py").write_bytes(b"evil")


def _plant_foreign_owner(env: Env) -> None:
    os.chown(env.staging / "app.py", 65534, 65534)


@pytest.mark.parametrize(
    ("plant", "caught_by"),
    [
        (_plant_fifo, "special file"),
        (_plant_setuid, "mode 4755"),
        (_plant_escape, "resolves outside"),
        (_plant_dangling_escape, "resolves outside"),
        (_plant_hardlink_outside, "hardlinked to a file outside"),
        (_plant_changed_content, "differs from the archive"),
        (_plant_foreign_owner, "owner"),
    ],
)
def test_success_checks_catch_damage(
    tmp_path: Path, plant: Callable[[Env], None], caught_by: str
) -> None:
    # A good extraction passes; the same one with damage planted in it does not.
    env = make_env(tmp_path)
    raw = tar_bytes(release())
    result = env.extract(env.raw(gzip.compress(raw)), **LIMITS)
    assert_extracted(env, result, raw)
    plant(env)
    with pytest.raises(AssertionError, match=caught_by):
        assert_extracted(env, result, raw)


def _stray_file_then_refuse(tarball: Path, staging: Path, **kwargs: object) -> ExtractResult:
    (staging.parent / "stray").write_text("x")
    raise UnsafeArchiveError("refused, but wrote beside the staging dir first")


def _foreign_error(tarball: Path, staging: Path, **kwargs: object) -> ExtractResult:
    raise KeyError("not a product error")


def _hang(tarball: Path, staging: Path, **kwargs: object) -> ExtractResult:
    time.sleep(60)
    raise AssertionError("time_limit did not interrupt the sleep")


@pytest.mark.parametrize(
    ("extractor", "caught_by"),
    [(_stray_file_then_refuse, AssertionError), (_foreign_error, KeyError), (_hang, Hang)],
)
def test_refusal_checks_catch_damage(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extractor: Callable[..., ExtractResult],
    caught_by: type[Exception],
) -> None:
    # Env.extract calls tests.test_extract.extract_release: stand in a misbehaving extractor.
    monkeypatch.setattr(test_extract, "extract_release", extractor)
    monkeypatch.setattr(f"{__name__}.EXAMPLE_SECONDS", 0.5)
    env = make_env(tmp_path)
    with pytest.raises(caught_by):
        extract_checked(env, gzip.compress(tar_bytes(release())))


# ------------------------------------------------------------------------------------------------
# Bugs the campaigns found (fixed), each reduced to a release plus one or two members


@pytest.mark.parametrize("mtime", ["inf", "-inf", "1e400", "nan"])
def test_non_finite_pax_mtime_is_refused(tmp_path: Path, mtime: str) -> None:
    env = make_env(tmp_path)
    ti, data = reg(f"{TOP}/f", b"abc")
    ti.pax_headers = {"mtime": mtime}
    blob = gzip.compress(tar_bytes(release((ti, data))))
    with pytest.raises(UnsafeArchiveError):
        env.extract(env.raw(blob), **LIMITS)


def test_negative_pax_size_is_refused(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    ti, data = reg(f"{TOP}/negative", b"")
    ti.pax_headers = {"size": "-511"}  # tarfile then moves on by _block(-511) == 0 bytes
    blob = gzip.compress(tar_bytes(release((ti, data), reg(f"{TOP}/big", b"B" * 1400))))
    with pytest.raises(UnsafeArchiveError):
        env.extract(env.raw(blob), max_unpacked_bytes=1000, free_space_margin_bytes=0)


def test_overlong_symlink_target_is_refused_as_unsafe(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    blob = gzip.compress(tar_bytes(release(sym(f"{TOP}/l", "a/" * 2048))))
    with pytest.raises(UnsafeArchiveError):
        env.extract(env.raw(blob), **LIMITS)
    assert not env.staging.exists()
