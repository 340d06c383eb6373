"""Download throughput: ``Fetcher.download`` (stream + SHA-256 + fsync) vs ``curl -s URL | sha256sum``.

    python -m bench.bench_download [--mib 512] [--runs 3] [--dest-dir DIR] [--tls]

A release server (tests/kit/release_server.py) runs in its own process and serves the payload from
memory on loopback. Each Fetcher run happens in a fresh child process, which reports the time of the
``download()`` call and its own peak RSS (``resource.getrusage``). Prints the median of ``--runs``
for both sides and their ratio. ``--dest-dir`` picks where the file is written (default: a
temporary directory on the disk that holds this checkout; ``/dev/shm`` takes the disk out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _serve(mib: int, tls: bool) -> None:
    """Child: serve MiB of random data at /payload.bin; print URL, digest (and CA file); wait."""
    from tests.kit.release_server import ReleaseServer
    from tests.kit.tls import TestCA

    data = os.urandom(mib * 1024 * 1024)
    ca = TestCA() if tls else None
    with ReleaseServer(tls=ca) as server:
        url = server.publish("/payload.bin", data)
        info = {
            "url": url,
            "sha256": hashlib.sha256(data).hexdigest(),
            "ca_file": str(ca.ca_file) if ca else None,
        }
        print(json.dumps(info), flush=True)
        sys.stdin.read()  # until the parent closes our stdin
    if ca is not None:
        ca.close()


def _client(url: str, dest: str, size: int, ca_file: str | None) -> None:
    """Child: one Fetcher.download; print elapsed seconds, digest and peak RSS as JSON."""
    from watchdog_updater.fetch import Fetcher, FetchSettings

    with Fetcher(FetchSettings(), ca_file=Path(ca_file) if ca_file else None) as fetcher:
        start = time.perf_counter()
        result = fetcher.download(
            url, Path(dest), max_bytes=size, expected_size=size, what="benchmark payload"
        )
        elapsed = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"elapsed": elapsed, "sha256": result.sha256_hex, "peak_rss_kib": peak_kib}))


# Baselines: the one in the brief, one with a SHA-NI-capable hasher (coreutils sha256sum may be
# several times slower than OpenSSL), and the bare transfer.
BASELINES = {
    "curl | sha256sum": "curl -s {cacert}{url} | sha256sum",
    "curl | openssl sha256": "curl -s {cacert}{url} | openssl dgst -sha256 -r",
    "curl -o /dev/null": "curl -s {cacert}{url} -o /dev/null",
}


def _run_shell(template: str, url: str, ca_file: str | None) -> tuple[float, str | None]:
    cacert = f"--cacert {ca_file} " if ca_file else ""
    start = time.perf_counter()
    out = subprocess.run(
        ["bash", "-o", "pipefail", "-c", template.format(cacert=cacert, url=url)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    words = out.split()
    return time.perf_counter() - start, words[0] if words else None


def _run_fetcher(
    url: str, dest: Path, size: int, ca_file: str | None
) -> tuple[float, float, str, int]:
    dest.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "bench.bench_download", "--client", url, str(dest), str(size)]
    if ca_file:
        argv.append(ca_file)
    start = time.perf_counter()
    out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    wall = time.perf_counter() - start
    report = json.loads(out)
    return report["elapsed"], wall, report["sha256"], report["peak_rss_kib"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dest-dir", type=Path, default=None)
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a test CA")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.mib, args.tls)
        return 0
    if args.client:
        url, dest, size, *ca = args.client
        _client(url, dest, int(size), ca[0] if ca else None)
        return 0
    if shutil.which("curl") is None:
        print("curl not found", file=sys.stderr)
        return 1

    serve_argv = [sys.executable, "-m", "bench.bench_download", "--serve", "--mib", str(args.mib)]
    if args.tls:
        serve_argv.append("--tls")
    size = args.mib * 1024 * 1024
    with (
        subprocess.Popen(
            serve_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
        ) as srv,
        tempfile.TemporaryDirectory(dir=args.dest_dir or ROOT / "bench") as tmp,
    ):
        assert srv.stdout is not None and srv.stdin is not None
        info = json.loads(srv.stdout.readline())
        url, digest, ca_file = info["url"], info["sha256"], info["ca_file"]
        dest = Path(tmp) / "payload.bin"
        base_times: dict[str, list[float]] = {name: [] for name in BASELINES}
        fetch_times, fetch_walls, rss = [], [], []
        for _ in range(args.runs):
            for name, template in BASELINES.items():
                t, got = _run_shell(template, url, ca_file)
                assert got in (digest, None), f"{name}: digest mismatch"
                base_times[name].append(t)
            t, wall, got, peak = _run_fetcher(url, dest, size, ca_file)
            assert got == digest, "fetcher digest mismatch"
            fetch_times.append(t)
            fetch_walls.append(wall)
            rss.append(peak)
        srv.stdin.close()
        srv.wait(timeout=30)

    fetch_m = statistics.median(fetch_times)
    wall_m = statistics.median(fetch_walls)
    print(
        f"payload  {args.mib} MiB over {'https' if args.tls else 'http'} loopback, {args.runs} runs"
    )
    print(f"dest     {args.dest_dir or 'disk (a temporary directory under bench/)'}")

    def row(name: str, times: list[float]) -> None:
        runs = ", ".join(f"{t:.3f}" for t in times)
        print(f"{name:<28} median {statistics.median(times):7.3f} s   [{runs}]")

    row("Fetcher.download (call)", fetch_times)
    row("Fetcher.download (process)", fetch_walls)
    for name, times in base_times.items():
        row(name, times)
        base = statistics.median(times)
        print(f"{'':<28} ratio Fetcher/this {fetch_m / base:.3f} (process {wall_m / base:.3f})")
    print(f"Fetcher peak RSS (child)     {max(rss) / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
