"""Download + hash + verify: ``Fetcher.download`` then the tarball's Sigstore bundle, vs
``curl -s URL | sha256sum``.

    python -m bench.bench_download [--mib 512] [--runs 3] [--dest-dir DIR] [--tls] [--json]

A release server (tests/kit/release_server.py) runs in its own process and serves the payload from
memory on loopback, with a bundle for it signed by the test kit's private Sigstore. Each updater
run happens in a fresh child process, which times ``download()`` (stream + SHA-256 + fsync) plus
the bundle's verification by digest twice: cold (sigstore's imports and the trusted root load at
that verification) and warm (already loaded, as for the tarball in an update, where the manifest's
verification loaded them), and reports its own peak RSS (``resource.getrusage``). Prints the
median of ``--runs`` for both sides and their ratio. ``--dest-dir`` picks where the file is written
(default: a temporary directory on the disk that holds this checkout; ``/dev/shm`` takes the disk
out).
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _serve(mib: int, tls: bool) -> None:
    """Child: serve MiB of random data at /payload.bin, signed; print what a client needs; wait."""
    from tests.kit.channel import ISSUER, identity_for
    from tests.kit.release_server import ReleaseServer
    from tests.kit.sigstore_kit import PrivateSigstore
    from tests.kit.tls import TestCA

    data = os.urandom(mib * 1024 * 1024)
    ca = TestCA() if tls else None
    sigstore = PrivateSigstore()
    identity = identity_for("9.9.9")
    with ReleaseServer(tls=ca) as server, tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "payload.bin.bundle"
        bundle.write_bytes(sigstore.sign(data, identity=identity, issuer=ISSUER))
        url = server.publish("/payload.bin", data)
        info = {
            "url": url,
            "sha256": hashlib.sha256(data).hexdigest(),
            "ca_file": str(ca.ca_file) if ca else None,
            "bundle": str(bundle),
            "trusted_root": str(sigstore.write_trusted_root(Path(tmp) / "trusted_root.json")),
            "identity": identity,
            "issuer": ISSUER,
        }
        print(json.dumps(info), flush=True)
        sys.stdin.read()  # until the parent closes our stdin
    if ca is not None:
        ca.close()


def _client(dest: str, size: int, info: dict[str, str]) -> None:
    """Child: download + verify twice; print times, digest, peak RSS.

    First cold (sigstore's imports and the trusted root load at the verification, as in a
    process that verifies nothing else), then warm (already loaded, as for a tarball in an
    update: the manifest's verification loaded them).
    """
    from watchdog_updater.fetch import Fetcher, FetchSettings
    from watchdog_updater.trust import BundleVerifier, SignerPolicy

    ca_file = info["ca_file"]
    verifier = BundleVerifier.for_spec(info["trusted_root"])  # loads at the first verification
    policy = SignerPolicy.exact(info["identity"], info["issuer"])
    bundle = Path(info["bundle"]).read_bytes()
    times: list[float] = []
    with Fetcher(FetchSettings(), ca_file=Path(ca_file) if ca_file else None) as fetcher:
        for _ in ("cold", "warm"):
            Path(dest).unlink(missing_ok=True)
            start = time.perf_counter()
            result = fetcher.download(
                info["url"], Path(dest), max_bytes=size, expected_size=size, what="payload"
            )
            verifier.verify_digest(result.sha256_hex, bundle, policy, what="payload.bin.bundle")
            times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {
        "elapsed": times[0],
        "elapsed_warm": times[1],
        "sha256": result.sha256_hex,
        "peak_rss_kib": peak_kib,
    }
    print(json.dumps(report))


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


def _run_fetcher(dest: Path, size: int, info: dict[str, str]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.bench_download", "--client", str(dest), str(size)]
    start = time.perf_counter()
    out = subprocess.run(
        argv, check=True, capture_output=True, text=True, cwd=ROOT, input=json.dumps(info)
    ).stdout
    report: dict[str, Any] = json.loads(out)
    report["wall"] = time.perf_counter() - start
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dest-dir", type=Path, default=None)
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a test CA")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if args.serve:
        _serve(args.mib, args.tls)
        return 0
    if args.client:
        dest, size = args.client
        _client(dest, int(size), json.loads(sys.stdin.read()))
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
        fetch_times, warm_times, fetch_walls, rss = [], [], [], []
        for _ in range(args.runs):
            for name, template in BASELINES.items():
                t, got = _run_shell(template, url, ca_file)
                assert got in (digest, None), f"{name}: digest mismatch"
                base_times[name].append(t)
            report = _run_fetcher(dest, size, info)
            assert report["sha256"] == digest, "fetcher digest mismatch"
            fetch_times.append(report["elapsed"])
            warm_times.append(report["elapsed_warm"])
            fetch_walls.append(report["wall"])
            rss.append(report["peak_rss_kib"])
        srv.stdin.close()
        srv.wait(timeout=30)

    result = {
        "payload_mib": args.mib,
        "scheme": "https" if args.tls else "http",
        "runs": args.runs,
        "updater_s": fetch_times,
        "updater_warm_s": warm_times,
        "updater_process_s": fetch_walls,
        "baselines_s": base_times,
        "peak_rss_mib": max(rss) / 1024,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    fetch_m = statistics.median(fetch_times)
    warm_m = statistics.median(warm_times)
    print(f"payload  {args.mib} MiB over {result['scheme']} loopback, {args.runs} runs")
    print(f"dest     {args.dest_dir or 'disk (a temporary directory under bench/)'}")

    def row(name: str, times: list[float]) -> None:
        runs = ", ".join(f"{t:.3f}" for t in times)
        print(f"{name:<32} median {statistics.median(times):7.3f} s   [{runs}]")

    row("download + verify (cold)", fetch_times)
    row("download + verify (warm)", warm_times)
    row("client process (both)", fetch_walls)
    for name, times in base_times.items():
        row(name, times)
        base = statistics.median(times)
        print(f"{'':<32} ratio updater/this: cold {fetch_m / base:.3f}, warm {warm_m / base:.3f}")
    print(f"updater peak RSS (child)         {max(rss) / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
