"""Benchmark: unpack + flush + swap of a 20,000-file / 512 MiB release vs ``tar -xzf && sync``.

Run as ``python -m bench.bench_install`` (``--help`` for options). The release tarball is built once
(seeded, so every run measures the same bytes) and cached under ``/tmp``. Both contenders extract
on the same filesystem (``--workdir``), every run writes a fresh tree (trees are only removed at the
end: ext4 slows file creation down for minutes after a mass delete, as it avoids reusing recently
freed inodes), the input tarball is warm in the page cache, the order of the contenders alternates,
and each contender's time includes its flush to disk. The figure of merit is the ratio of medians.
Needs about 2 x rounds x 512 MiB of free space in ``--workdir``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from watchdog_updater.extract import ExtractLimits, extract_release, remove_tree
from watchdog_updater.layout import Layout
from watchdog_updater.links import promote_staging, swap_link

VERSION = "9.9.9"
FILES = 20_000
TOTAL_BYTES = 512 * 1024**2
SEED = 20_240_601
CACHE = Path(tempfile.gettempdir()) / f"hal0-bench-release-{FILES}-{TOTAL_BYTES >> 20}MiB.tar.gz"


def _file_sizes(rng: random.Random) -> list[int]:
    """A release-like mix: a few large blobs, many small sources, summing to TOTAL_BYTES."""
    big = [8 * 1024**2] * 24  # wheels, models, bundled assets: 192 MiB
    rest = TOTAL_BYTES - sum(big)
    weights = [rng.lognormvariate(0.0, 1.2) for _ in range(FILES - len(big))]
    scale = rest / sum(weights)
    small = [max(1, int(w * scale)) for w in weights]
    small[-1] += rest - sum(small)
    sizes = big + small
    rng.shuffle(sizes)
    return sizes


def _text_block(rng: random.Random) -> bytes:
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz_", k=rng.randint(2, 12)))
        for _ in range(4000)
    ]
    out = io.BytesIO()
    while out.tell() < 4 * 1024**2:
        out.write(b" ".join(rng.choices(words, k=16)) + b"\n")
    return out.getvalue()


def _add_parents(tf: tarfile.TarFile, name: str, seen: set[str]) -> None:
    """Add a directory entry for every ancestor of ``name`` not added yet (tar order: parents
    first). A trailing slash makes ``name`` itself count as a directory."""
    parts = name.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d not in seen:
            seen.add(d)
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1_700_000_000
            tf.addfile(info)


def build_release(path: Path, *, version: str = VERSION, base: Path | None = None) -> None:
    """Write the seeded release tarball: half random bytes, half text-like (compressible).

    ``base``, a directory, is laid down first as the release's own files (a runnable fake hal0
    for the end-to-end bench); the seeded payload follows, the same bytes for every version.
    """
    rng = random.Random(SEED)
    text = _text_block(rng)
    sizes = _file_sizes(rng)
    top = f"hal0-{version}"
    tmp = path.with_suffix(".part")
    # gzip -6 in a child process keeps the build time reasonable (one-off, cached).
    with tmp.open("wb") as out:
        gz = subprocess.Popen(["gzip", "-6", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert gz.stdin is not None
        with tarfile.open(fileobj=gz.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            dirs: list[str] = []
            for d in range(40):
                for s in range(20):
                    dirs.append(f"{top}/pkg{d:02d}/mod{s:02d}")
            seen: set[str] = set()
            if base is not None:
                for item in sorted(base.rglob("*")):
                    name = f"{top}/{item.relative_to(base).as_posix()}"
                    if name in seen:
                        continue
                    _add_parents(tf, name, seen)
                    info = tf.gettarinfo(str(item), arcname=name)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = 1_700_000_000
                    seen.add(name)
                    if item.is_file():
                        with item.open("rb") as f:
                            tf.addfile(info, f)
                    else:
                        tf.addfile(info)
            for name in [top, *dirs]:
                _add_parents(tf, name + "/", seen)
            for i, size in enumerate(sizes):
                info = tarfile.TarInfo(f"{dirs[i % len(dirs)]}/f{i:05d}.dat")
                info.size = size
                info.mode = 0o755 if i % 50 == 0 else 0o644
                info.mtime = 1_700_000_000
                if i % 2:
                    data = rng.randbytes(size)
                else:
                    start = rng.randrange(len(text) - min(size, len(text)) + 1)
                    chunk = text[start : start + size]
                    data = (chunk * (size // len(chunk) + 1))[:size]
                tf.addfile(info, io.BytesIO(data))
        gz.stdin.close()
        if gz.wait() != 0:
            raise RuntimeError("gzip failed")
    tmp.rename(path)


def _settle() -> None:
    """Flush and let the journal settle, so no run pays for the previous one's writeback."""
    os.sync()
    time.sleep(2)


def _run_tar(tarball: Path, work: Path, round_no: int) -> float:
    dest = work / f"tar-{round_no}"
    dest.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(dest)], check=True)
    subprocess.run(["sync"], check=True)
    elapsed = time.perf_counter() - t0
    _settle()
    return elapsed


def _run_updater(tarball: Path, work: Path, round_no: int) -> float:
    layout = Layout(root=work / f"updater-{round_no}")
    layout.lib_dir.mkdir(parents=True)
    staging = layout.staging_dir("bench")
    t0 = time.perf_counter()
    extract_release(tarball, staging, version=VERSION, limits=ExtractLimits())
    t1 = time.perf_counter()
    promote_staging(staging, layout.version_dir(VERSION))
    swap_link(layout, layout.current_link, VERSION)
    elapsed = time.perf_counter() - t0
    print(f"  updater: extract+flush {t1 - t0:.2f} s, promote+swap {elapsed - (t1 - t0):.3f} s")
    _settle()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--tarball", type=Path, default=CACHE)
    parser.add_argument("--json", action="store_true", help="end with one JSON document")
    args = parser.parse_args(argv)

    if not args.tarball.exists():
        print(f"building {args.tarball} (one-off) ...", flush=True)
        t0 = time.perf_counter()
        build_release(args.tarball)
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    size = args.tarball.stat().st_size
    print(f"release: {FILES} files, {TOTAL_BYTES >> 20} MiB unpacked, {size / 1024**2:.0f} MiB gz")

    work = Path(tempfile.mkdtemp(prefix="hal0-bench-", dir=args.workdir))
    try:
        args.tarball.read_bytes()  # warm the input in the page cache for both contenders
        _settle()
        tar_times: list[float] = []
        upd_times: list[float] = []
        for r in range(args.rounds):
            # Alternate the order so neither contender always runs on a "fresher" disk.
            if r % 2:
                upd_times.append(_run_updater(args.tarball, work, r))
                tar_times.append(_run_tar(args.tarball, work, r))
            else:
                tar_times.append(_run_tar(args.tarball, work, r))
                upd_times.append(_run_updater(args.tarball, work, r))
            print(f"round {r + 1}: tar+sync {tar_times[-1]:.2f} s, updater {upd_times[-1]:.2f} s")
        tar_med = statistics.median(tar_times)
        upd_med = statistics.median(upd_times)
        print(f"median tar -xzf + sync:              {tar_med:.2f} s")
        print(f"median extract + promote + swap:     {upd_med:.2f} s")
        print(f"ratio: {upd_med / tar_med:.2f}x (goal <= 1.20x)")
        if args.json:
            doc = {"files": FILES, "unpacked_mib": TOTAL_BYTES >> 20, "gz_mib": size / 1024**2}
            print(json.dumps({**doc, "updater_s": upd_times, "tar_sync_s": tar_times}))
    finally:
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
