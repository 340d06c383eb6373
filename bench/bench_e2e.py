"""End-to-end update versus the naive script, on the systemd sandbox (issue 8).

    python -m bench.bench_e2e [--rounds 5] [--json]

Each round brings up fresh appliances (tests/kit/appliance.py: a private systemd running fake hal0
units from ``current``, a signed channel over HTTPS on loopback) with 1.0.0 running, and publishes
the same release 2.0.0: the fake hal0 plus bench_install's seeded payload, 20,000 files / 512 MiB
unpacked (built once, cached in /tmp). Run as root. Every appliance is kept until the end of the
bench (about 1 GiB each), because ext4 creates files slowly for a while after a mass delete.

- updater: ``watchdog-updater update --json`` inside the sandbox: check, download, verify both
  bundles, stage (safe extraction + syncfs), swap, restart hal0-api and OpenWebUI, gate (the
  appliance's gate: units, slots, HTTP probes, 0.5 s apart, 3 consecutive passes).
- naive: the script the seed warns about, given the manifest's URL and digest: ``curl`` to a file,
  ``sha256sum -c``, ``tar -xzf``, ``ln -sfn``, ``systemctl restart``. No signature, no flush, no
  gate, no rollback. The contenders take turns going first.
- naive + sync: the same with ``sync`` after ``tar``, so that its tree is on disk before the link
  points at it, as the updater's is (its time then includes the writeback the plain script leaves
  to the kernel, and to chance: a power cut after ``ln`` leaves ``current`` half written).
- restart: ``systemctl restart hal0-api`` alone, the floor for hal0-api's unavailable time.

During each run a poller asks hal0-api's health endpoint and every slot every 20 ms (a fresh
connection each time): hal0-api's unavailable time is the longest stretch between a failed answer
and the next good one; failed slot requests are counted. The updater's peak RSS is the largest
process of its tree (``wait4``); its baseline is the import floor, a bare interpreter that imports
what an update imports and does nothing else. The figure of merit is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_install import build_release
from tests.kit.appliance import Appliance, appliance
from tests.kit.fake_hal0 import write_release_tree
from tests.kit.sigstore_kit import PrivateSigstore

VERSION = "2.0.0"
E2E_GOAL = 1.25
RSS_GOAL_MIB = 64.0
POLL_S = 0.02


def release_tarball() -> Path:
    """The cached 2.0.0 tarball; its name carries a digest of the fake hal0's own files (they
    name this interpreter), so a stale cache is never reused."""
    with tempfile.TemporaryDirectory(prefix="hal0-e2e-") as tmp:
        tree = write_release_tree(Path(tmp), VERSION)
        digest = hashlib.sha256()
        for item in sorted(tree.rglob("*")):
            digest.update(item.relative_to(tree).as_posix().encode())
            if item.is_file():
                digest.update(item.read_bytes())
        path = Path(tempfile.gettempdir()) / f"hal0-bench-e2e-{digest.hexdigest()[:12]}.tar.gz"
        if not path.exists():
            print(f"building {path} (one-off) ...", flush=True)
            build_release(path, version=VERSION, base=tree)
    return path


# --------------------------------------------------------------------------- availability


@dataclass
class Poller:
    """Polls URLs every POLL_S from a thread; keeps (time, url, ok) samples."""

    urls: dict[str, tuple[str, int, str]]  # name -> (host, port, path)
    samples: list[tuple[float, str, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Poller:
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, (host, port, path) in self.urls.items():
                self.samples.append((time.monotonic(), name, _answers(host, port, path)))
            self._stop.wait(POLL_S)

    def longest_outage_s(self, name: str) -> float:
        longest, down_since = 0.0, None
        for t, who, ok in self.samples:
            if who != name:
                continue
            if not ok and down_since is None:
                down_since = t
            elif ok and down_since is not None:
                longest, down_since = max(longest, t - down_since), None
        if down_since is not None:  # never came back while we watched
            longest = max(longest, self.samples[-1][0] - down_since)
        return longest

    def failures(self, prefix: str) -> tuple[int, int]:
        """(failed, total) requests to the URLs whose name starts with ``prefix``."""
        mine = [ok for _, who, ok in self.samples if who.startswith(prefix)]
        return mine.count(False), len(mine)


def _answers(host: str, port: int, path: str) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _poller(app: Appliance) -> Poller:
    urls = {"api": ("127.0.0.1", app.ports.api, "/api/health")}
    for token, port in app.ports.slots.items():
        urls[f"slot-{token}"] = ("127.0.0.1", port, "/health")
    return Poller(urls)


# --------------------------------------------------------------------------- contenders


@dataclass
class Run:
    seconds: float
    api_outage_s: float
    slot_failures: int
    slot_requests: int
    peak_rss_mib: float | None = None
    phases_s: dict[str, float] = field(default_factory=dict)


# The peak RSS of a child must not be read by this process: it holds the release in memory, and a
# child forked from it starts with that peak (Linux keeps ru_maxrss across exec). A small launcher
# forks the command instead and reports the peak of the command's own process tree.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _measured(argv: list[str]) -> tuple[int, float, float]:
    """Run ``argv``; return (exit status, seconds, peak RSS in MiB of its largest process)."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - started
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    return proc.returncode, elapsed, peak_kib / 1024


# What an update imports, named by its leaf modules (taken from ``sys.modules`` at the end of a
# real ``update --json``): importing them into a bare interpreter, and doing nothing else, is the
# floor under the updater's peak RSS, measured in the same go as the updates.
UPDATE_IMPORTS = (
    "watchdog_updater._cli",
    "watchdog_updater.app",
    "watchdog_updater.updater",
    "watchdog_updater.fetch",
    "watchdog_updater.partfile",
    "watchdog_updater.extract",
    "watchdog_updater.health.runner",
    "watchdog_updater.health.probes",
    "watchdog_updater.services",
    "httpx",
    "sigstore.verify",
    "sigstore.hashes",
    "pystemd.dbuslib",
)
FLOORS = {
    "python": "pass",
    "python + sigstore.verify": "import sigstore.verify",
    "everything an update imports": "import " + ", ".join(UPDATE_IMPORTS),
}


def import_floors(runs: int = 3) -> dict[str, float]:
    """Peak RSS (MiB, median of ``runs``) of a bare interpreter running each of :data:`FLOORS`."""
    floors = {}
    for name, code in FLOORS.items():
        peaks = []
        for _ in range(runs):
            status, _, peak = _measured([sys.executable, "-c", code])
            if status != 0:
                raise RuntimeError(f"import floor {name!r} exited {status}")
            peaks.append(peak)
        floors[name] = statistics.median(peaks)
    return floors


def run_updater(app: Appliance) -> Run:
    with _poller(app) as poller:
        code, seconds, rss = _measured(app.cli_argv("update", "--json"))
    if code != 0:
        raise RuntimeError(f"update exited {code}; see {app.host.root}")
    history = app.cli_json("history")[1]["history"][-1]
    assert history["outcome"] == "committed", history
    failed, total = poller.failures("slot-")
    return Run(
        seconds, poller.longest_outage_s("api"), failed, total, rss, dict(history["durations_s"])
    )


NAIVE = r"""
set -euo pipefail
curl -fsS --cacert "$CA" -o /dev/null "$MANIFEST"
curl -fsS --cacert "$CA" -o "$TMP/hal0.tar.gz" "$URL"
echo "$SHA256  $TMP/hal0.tar.gz" | sha256sum -c --quiet
tar -xzf "$TMP/hal0.tar.gz" -C "$LIB"
$FLUSH
ln -sfn "hal0-$VERSION" "$LIB/current"
systemctl restart hal0-api.service hal0-openwebui.service
"""


def run_naive(app: Appliance, manifest: dict[str, Any], *, flush: bool = False) -> Run:
    with tempfile.TemporaryDirectory(prefix="naive-", dir=app.host.root) as tmp:
        env = {
            **os.environ,
            "CA": str(app.ca.ca_file),
            "MANIFEST": f"{app.server.base_url}/stable.json",
            "URL": manifest["url"],
            "SHA256": manifest["digest_sha256"],
            "TMP": tmp,
            "LIB": str(app.host.layout.lib_dir),
            "VERSION": VERSION,
            "FLUSH": "sync" if flush else ":",
        }
        argv = [*app.sandbox.nsenter_prefix(), "bash", "-c", NAIVE]
        with _poller(app) as poller:
            started = time.monotonic()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
            seconds = time.monotonic() - started
            time.sleep(1.0)  # let the poller see hal0-api come back after systemctl returns
    assert app.host.current() == VERSION
    failed, total = poller.failures("slot-")
    return Run(seconds, poller.longest_outage_s("api"), failed, total)


def run_restart(app: Appliance) -> float:
    with _poller(app) as poller:
        app.sandbox.systemctl("restart", "hal0-api.service")
        time.sleep(1.0)
    return poller.longest_outage_s("api")


# --------------------------------------------------------------------------- driver


def _fresh(path: Path) -> Path:
    path.mkdir()
    return path


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    tarball = release_tarball().read_bytes()
    sigstore = PrivateSigstore()
    updater: list[Run] = []
    naive: list[Run] = []
    restart: list[float] = []
    small: list[Run] = []
    naive_sync: list[Run] = []
    contenders = ("updater", "naive", "naive+sync")
    # Every appliance's tree stays until the end (as in bench_install): ext4 creates files much
    # more slowly for a while after a mass delete, and whoever ran right after one paid for it
    # (seen: the updater's stage 5.4 s first, 11-12 s after an appliance's teardown).
    runs_dir = Path(tempfile.mkdtemp(prefix="hal0-e2e-runs-"))
    try:
        for r in range(args.rounds):
            order = contenders[r % 3 :] + contenders[: r % 3]
            for who in order:
                with appliance(_fresh(runs_dir / f"{r}-{who}"), sigstore=sigstore) as app:
                    published = app.channel.release(VERSION, tarball=tarball)
                    app.channel.publish(published)
                    os.sync()  # neither contender pays for the other's (or the build's) writeback
                    if who == "updater":
                        updater.append(run_updater(app))
                    elif who == "naive":
                        restart.append(run_restart(app))
                        naive.append(run_naive(app, published.manifest))
                    else:
                        naive_sync.append(run_naive(app, published.manifest, flush=True))
            if r == 0:  # the same update of a tiny release: is the peak RSS independent of size?
                with appliance(_fresh(runs_dir / "tiny"), sigstore=sigstore) as app:
                    app.publish(VERSION)
                    small.append(run_updater(app))
            u, n = updater[-1], naive[-1]
            print(
                f"round {r + 1}: updater {u.seconds:.2f} s (stage {u.phases_s.get('stage', 0):.2f}"
                f" s), naive {n.seconds:.2f} s, naive + sync {naive_sync[-1].seconds:.2f} s; "
                f"hal0-api down {u.api_outage_s:.2f} s / {n.api_outage_s:.2f} s (restart alone "
                f"{restart[-1]:.2f} s); slot failures {u.slot_failures} / {n.slot_failures}",
                flush=True,
            )
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)

    floors = import_floors()
    phases = {k: _stats([r.phases_s.get(k, 0.0) for r in updater]) for k in updater[0].phases_s}
    result = {
        "release": {"files": 20_000, "unpacked_mib": 512, "gz_mib": len(tarball) / 1024**2},
        "rounds": args.rounds,
        "updater_s": _stats([r.seconds for r in updater]),
        "naive_s": _stats([r.seconds for r in naive]),
        "naive_sync_s": _stats([r.seconds for r in naive_sync]),
        "ratio": statistics.median(r.seconds for r in updater)
        / statistics.median(r.seconds for r in naive),
        "goal_ratio": E2E_GOAL,
        "updater_phases_s": phases,
        "updater_peak_rss_mib": _stats([r.peak_rss_mib or 0.0 for r in updater]),
        "goal_rss_mib": RSS_GOAL_MIB,
        "small_release_peak_rss_mib": small[0].peak_rss_mib,
        "import_floor_rss_mib": floors,
        "api_outage_updater_s": _stats([r.api_outage_s for r in updater]),
        "api_outage_naive_s": _stats([r.api_outage_s for r in naive]),
        "api_outage_restart_s": _stats(restart),
        "slot_failures_updater": sum(r.slot_failures for r in updater),
        "slot_requests_updater": sum(r.slot_requests for r in updater),
        "slot_failures_naive": sum(r.slot_failures for r in naive),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(report(result))
    return 0


def report(result: dict[str, Any]) -> str:
    def med(key: str) -> float:
        return float(result[key]["median"])

    phases = ", ".join(f"{k} {v['median']:.2f}" for k, v in result["updater_phases_s"].items())
    return "\n".join(
        [
            f"updater end to end   median {med('updater_s'):.2f} s",
            f"naive script         median {med('naive_s'):.2f} s",
            f"naive script + sync  median {med('naive_sync_s'):.2f} s",
            f"ratio                {result['ratio']:.2f}x (goal <= {E2E_GOAL}x)",
            f"updater phases (median s): {phases}",
            f"updater peak RSS     {med('updater_peak_rss_mib'):.1f} MiB (goal <= "
            f"{RSS_GOAL_MIB:g}); tiny release: {result['small_release_peak_rss_mib']:.1f} MiB",
            "import floor         "
            + "; ".join(f"{k} {v:.1f} MiB" for k, v in result["import_floor_rss_mib"].items()),
            f"hal0-api down        updater {med('api_outage_updater_s'):.2f} s, naive "
            f"{med('api_outage_naive_s'):.2f} s, restart alone {med('api_outage_restart_s'):.2f} s",
            f"failed slot requests updater {result['slot_failures_updater']} of "
            f"{result['slot_requests_updater']} (goal 0), naive {result['slot_failures_naive']}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
