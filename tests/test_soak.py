"""Soak: "100 consecutive update/rollback cycles: no growth in open files, disk use beyond retention,
or memory of the daemon".

ONE daemon process runs for the whole test and does every update and rollback itself. It is the
real CLI daemon (``tests/kit/warp_daemon.py``) with one seam: its scheduler clock jumps to the
planned run on SIGUSR1. Without it the daemon installs at most once a minute (cron has minute
granularity, the plan is loaded only at start), i.e. 100 cycles would take 3+ hours. Each cycle
publishes on the signed HTTPS test channel, then makes the daemon's scheduled run due:

1. a *broken* release (it ships a ``BROKEN`` file, and the gate's command probe fails while
   ``current`` holds one): the scheduled job checks the channel, downloads, verifies, unpacks,
   swaps, gates, the gate fails at its deadline, the job swaps back, gates the old version and
   quarantines the release - the automatic rollback;
2. a *good* release: installed through the gate and committed (retention GC).

Probation is off: a realistic window would make each cycle take minutes (probation itself is
tested in test_probation_flow.py and test_systemd_gate.py).

So each cycle runs two child jobs through the daemon's pipe, lease, watchdog-ping (sd_notify) and
metrics machinery; ``/metrics`` is scraped every few cycles and must count exactly what happened.
After every job the disk is held to the retention policy; from the warm-up cycle on, the daemon's
open fds and threads must stay the same and its RSS must not grow beyond a small bound.
``WATCHDOG_SOAK_CYCLES=N`` runs fewer cycles; ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.version import Version
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.channel import Published, ReleaseChannel, simple_release_tarball
from tests.kit.fake_hal0 import free_port
from tests.kit.host import PROJECT, Host
from tests.kit.release_server import ReleaseServer
from tests.kit.tls import TestCA
from tests.kit.warp_daemon import WARP_SIGNAL
from tests.test_daemon import Recorder, wait_until
from tests.test_metrics import Scrape
from watchdog_updater.journal import Journal
from watchdog_updater.links import installed_versions, read_link_version
from watchdog_updater.state import StateStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CYCLES = int(os.environ.get("WATCHDOG_SOAK_CYCLES", "100"))
WARMUP = max(1, min(10, CYCLES // 2))  # the baseline: by then every code path has run
KEEP = 3  # [update.install] keep
SCRAPE_EVERY = 5
# Idle between jobs, the daemon holds a fixed set of fds (std streams, wake pipe, metrics socket)
# and threads (main, metrics-http): one more of either is a leak, so neither has a tolerance.
# RSS moves by tens of KiB between idle samples (allocator arenas), but it also grows with
# history.jsonl, which has no cap: the metrics collector re-reads the whole file after every change
# (measured: ~3 KiB of RSS per entry, ~0.6 MiB from cycle 10 to 100; without metrics RSS is flat).
# 2 MiB holds that and still catches a leak of ~8 KiB per job.
RSS_GROWTH_LIMIT_KIB = 2048
# Version strings grow by a digit ("1.10.1" -> "1.100.1") in names, contents, URLs and signing
# certificates: a few bytes per retained file, while one more release would add ~40 KiB.
SLACK_BYTES = 1024
MARKER = "BROKEN"
PAYLOAD = {f"src/hal0/mod{i:02d}.py": f"# module {i}\n".encode() * 40 for i in range(30)}
CACHE_FILES = ("manifest.json", "manifest.json.bundle", "hal0-{v}.tar.gz", "hal0-{v}.tar.gz.bundle")
JOB_TIMEOUT_S = 60.0


def good(cycle: int) -> str:
    return f"1.{cycle}.1" if cycle else "1.0.0"


def broken(cycle: int) -> str:
    return f"1.{cycle}.0"  # newer than the last good release, older than this cycle's


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Footprint:
    """The daemon's main process (from /proc) and the disk it manages, at one moment."""

    rss_kib: int
    rss_anon_kib: int  # heap and stacks, without the mapped files of the interpreter
    fds: tuple[str, ...]  # what each fd points at, without socket/pipe inode numbers
    threads: int
    retained_bytes: int  # version dirs + download cache
    history_bytes: int
    quarantine_bytes: int
    other_state_bytes: int  # the rest of the state dir: schedule, channel memory, lock

    def line(self) -> str:
        return (
            f"RSS {self.rss_kib} KiB (anon {self.rss_anon_kib}), {len(self.fds)} fds, "
            f"{self.threads} threads; "
            f"versions+cache {self.retained_bytes} B, history.jsonl {self.history_bytes} B, "
            f"quarantine.json {self.quarantine_bytes} B, other state {self.other_state_bytes} B"
        )


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def fd_targets(pid: int) -> tuple[str, ...]:
    targets = (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    return tuple(sorted(target.split(":[")[0] for target in targets))


def children(pid: int) -> list[str]:
    """Child processes of the daemon, zombies included (an unreaped job is a leak too)."""
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def file_bytes(path: Path) -> int:
    """Sum of regular-file sizes under ``path`` (or of ``path`` itself); 0 if missing."""
    if path.is_file():
        return path.stat().st_size
    if not path.exists():
        return 0
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def measure(pid: int, host: Host) -> Footprint:
    status = proc_status(pid)
    layout = host.layout
    state = layout.state_dir
    versions = sum(file_bytes(p) for p in layout.versions_dir.iterdir() if p != layout.lib_dir)
    cache = file_bytes(layout.cache_dir)
    history = file_bytes(state / "history.jsonl")
    quarantine = file_bytes(state / "quarantine.json")
    return Footprint(
        rss_kib=int(status["VmRSS"].split()[0]),
        rss_anon_kib=int(status["RssAnon"].split()[0]),
        fds=fd_targets(pid),
        threads=int(status["Threads"]),
        retained_bytes=versions + cache,
        history_bytes=history,
        quarantine_bytes=quarantine,
        other_state_bytes=file_bytes(state) - cache - history - quarantine,
    )


# --------------------------------------------------------------------------- invariants


def check_rest_point(host: Host, current: str) -> list[str]:
    """What must hold whenever the daemon is idle; returns the installed versions."""
    layout = host.layout
    assert read_link_version(layout, layout.current_link) == current
    previous = read_link_version(layout, layout.previous_link)
    installed = installed_versions(layout)
    # Retention, restated independently: the newest `keep` good (not quarantined) versions, plus
    # current and previous on top. A version quarantined by the last rollback stays until the
    # next commit's retention: at most one, and only the newest.
    quarantined = set(StateStore(layout.state_dir).quarantine())
    good = [v for v in installed if v not in quarantined]
    newest = sorted(good, key=Version, reverse=True)[:KEEP]
    beyond = set(installed) - set(newest) - {current, previous}
    pending = beyond & quarantined
    assert beyond == pending, f"retention left {sorted(beyond)} behind (installed: {installed})"
    assert len(pending) <= 1 and all(Version(v) == max(map(Version, installed)) for v in pending), (
        f"quarantined versions kept: {sorted(pending)} (installed: {installed})"
    )
    cached = sorted(p.name for p in layout.cache_dir.iterdir()) if layout.cache_dir.exists() else []
    assert set(cached) <= set(installed), f"cache entries {cached}, installed {installed}"
    for version in cached:  # complete entries only: no .part downloads, no temp files
        names = sorted(p.name for p in (layout.cache_dir / version).iterdir())
        assert names == sorted(f.format(v=version) for f in CACHE_FILES), (version, names)
    leftovers = [p.name for p in layout.versions_dir.iterdir() if p.name.startswith(".")]
    leftovers += [p.name for p in layout.lib_dir.iterdir() if p.name.startswith(".")]
    leftovers += [str(p) for p in layout.state_dir.rglob(".*")]  # atomic-write temp files
    assert leftovers == [], f"staging, trash or temp leftovers: {leftovers}"
    assert not (layout.state_dir / "transaction.json").exists()
    return installed


# --------------------------------------------------------------------------- the daemon


class Notifications:
    """The daemon's NOTIFY_SOCKET: a thread hands every datagram to a :class:`Recorder`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recorder = Recorder()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.recorder(self._sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@dataclass
class SoakDaemon:
    proc: subprocess.Popen[bytes]
    notify: Notifications
    log_path: Path
    metrics_url: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        return "\n".join(self.log().splitlines()[-40:])

    def statuses(self, since: float) -> list[str]:
        return self.notify.recorder.since(since, "STATUS=")

    def run_scheduled_job(self, what: str) -> None:
        """Make the planned run due now; return once the daemon has run it and is idle again."""
        t0 = time.monotonic()
        self.proc.send_signal(WARP_SIGNAL)

        def idle_after_update() -> bool:
            seen = self.statuses(t0)
            started = [i for i, s in enumerate(seen) if s.startswith("STATUS=updating")]
            return bool(started) and any(s.startswith("STATUS=idle") for s in seen[started[0] :])

        wait_until(what, idle_after_update, JOB_TIMEOUT_S, self.log_tail)
        assert self.proc.poll() is None, self.log_tail()

    def scrape(self) -> Scrape:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        return Scrape(samples, {}, text)


@pytest.fixture
def soak_daemon(
    tmp_path: Path,
    host: Host,
    server: ReleaseServer,
    channel: ReleaseChannel,
    trusted_root: Path,
    test_ca: TestCA,
) -> Iterator[SoakDaemon]:
    channel.publish(channel.release("1.0.0"))  # the installed version: the first check is clean
    port = free_port()
    host.write_config(
        manifest_base=server.base_url,
        trusted_root=trusted_root,
        ca_file=test_ca.ca_file,
        extra={
            "install": {"keep": KEEP},
            "health": {
                # A healthy release passes in the first round (a few ms); a broken one never
                # passes, so the deadline is what a rollback waits for.
                "deadline": 0.5,
                "probe_timeout": 0.5,
                "command": [
                    {
                        "name": "not-broken",
                        "argv": ["test", "!", "-e", str(host.layout.current_link / MARKER)],
                    }
                ],
                "probation": {"duration": 0},  # see the module docstring
            },
            # Nothing is ever due by itself: every run is one the test makes due.
            "schedule": {"cron": "0 3 * * *", "jitter": 0, "check_interval": "1h"},
            "metrics": {"listen": f"127.0.0.1:{port}"},
        },
    )
    notify = Notifications(tmp_path / "notify.sock")
    log_path = tmp_path / "daemon.log"
    env = {
        **os.environ,
        "NO_COLOR": "1",
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "10000000",  # a ping every 5 s: one more socket per ping to leak
    }
    argv = [sys.executable, "-m", "tests.kit.warp_daemon", "--root", str(host.root), "daemon"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, cwd=PROJECT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    daemon = SoakDaemon(proc, notify, log_path, f"http://127.0.0.1:{port}/metrics")
    try:
        notify.recorder.wait_for("READY=1", timeout=60)
        # Never checked before: the first job is a channel check. Start from idle.
        wait_until(
            "the first check",
            lambda: any(s.startswith("STATUS=idle") for s in daemon.statuses(0)),
            JOB_TIMEOUT_S,
            daemon.log_tail,
        )
        yield daemon
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
        notify.close()
    assert code == 0, daemon.log_tail()
    assert "Traceback" not in daemon.log(), daemon.log()


def check_metrics(daemon: SoakDaemon, cycle: int, downloaded: int) -> tuple[int, int, float]:
    """After ``cycle`` cycles, ``/metrics`` counts exactly what happened. Returns (cycle, bytes of
    the scrape, seconds it took)."""
    t0 = time.monotonic()
    m = daemon.scrape()
    took = time.monotonic() - t0
    assert m("hal0_updater_update_attempts_total", channel="stable", outcome="committed") == cycle
    assert m("hal0_updater_update_attempts_total", channel="stable", outcome="rolled-back") == cycle
    assert m("hal0_updater_rollbacks_total", reason="gate_failed", trigger="auto") == cycle
    assert m("hal0_updater_quarantined_versions") == cycle
    assert m("hal0_updater_installed_version_info", version=good(cycle)) == 1
    assert m("hal0_updater_state", state="idle") == 1
    # Each scheduled run began with a check that found its release; the first check found 1.0.0.
    assert m("hal0_updater_checks_total", result="available") == 2 * cycle
    assert m("hal0_updater_checks_total", result="up-to-date") == 1
    assert m("hal0_updater_checks_total", result="error") == 0
    for job in ("recover", "check", "update", "probation"):
        assert m("hal0_updater_job_errors_total", job=job) == 0, job
    assert m("hal0_updater_bytes_downloaded_total") == downloaded
    return cycle, len(m.text), took


# --------------------------------------------------------------------------- the soak


def test_update_rollback_cycles_grow_neither_the_daemon_nor_the_disk(
    host: Host, channel: ReleaseChannel, soak_daemon: SoakDaemon
) -> None:
    daemon, pid = soak_daemon, soak_daemon.proc.pid
    journal = Journal(host.layout.state_dir, boot_id="soak")

    def install(release: Published, outcome: str, current: str) -> list[str]:
        """Publish ``release``, let the daemon's scheduled run act; returns the installed versions."""
        channel.publish(release)
        daemon.run_scheduled_job(f"the scheduled run for {release.version}")
        last = journal.history()[-1]
        assert (last["to_version"], last["trigger"], last["outcome"]) == (
            release.version,
            "schedule",
            outcome,
        ), last
        assert children(pid) == [], "a job process outlived its job"
        return check_rest_point(host, current)

    started = time.monotonic()
    warm: Footprint | None = None
    trace: list[tuple[int, int, int, int]] = []  # cycle, RSS KiB, fds, threads
    most_dirs, downloaded, scrapes = 0, 0, []
    for cycle in range(1, CYCLES + 1):
        bad = channel.release(
            broken(cycle),
            tarball=simple_release_tarball(broken(cycle), {**PAYLOAD, MARKER: b"crash loop\n"}),
        )
        installed = install(bad, "rolled-back", current=good(cycle - 1))
        most_dirs = max(most_dirs, len(installed))
        ok = channel.release(good(cycle), tarball=simple_release_tarball(good(cycle), PAYLOAD))
        installed = install(ok, "committed", current=good(cycle))
        most_dirs = max(most_dirs, len(installed))
        downloaded += len(bad.tarball) + len(ok.tarball)

        now = measure(pid, host)
        trace.append((cycle, now.rss_kib, len(now.fds), now.threads))
        if cycle == WARMUP:
            warm = now
        elif warm is not None:  # the same after every cycle, not only at the end
            assert now.fds == warm.fds, f"cycle {cycle}: fds {warm.fds} -> {now.fds}"
            assert now.threads == warm.threads, f"cycle {cycle}: {now.threads} threads"
        if cycle % SCRAPE_EVERY == 0 or cycle == CYCLES:
            scrapes.append(check_metrics(daemon, cycle, downloaded))
    wall_s = time.monotonic() - started
    end = measure(pid, host)
    assert warm is not None
    history = journal.history()
    rss_growth = end.rss_kib - warm.rss_kib
    per_cycle = rss_growth / max(1, CYCLES - WARMUP)
    print(f"\ncycle {WARMUP} (warm-up): {warm.line()}")
    print(f"cycle {CYCLES} (end):     {end.line()}")
    print(f"RSS growth after warm-up: {rss_growth} KiB ({per_cycle:.1f} KiB per cycle)")
    print("RSS KiB/fds/threads: " + ", ".join(f"{c}:{r}/{f}/{t}" for c, r, f, t in trace[::10]))
    print(f"{CYCLES} cycles in {wall_s:.1f} s ({wall_s / CYCLES:.2f} s per cycle)")
    print(f"version dirs: at most {most_dirs}, at the end {installed_versions(host.layout)}")
    print("scrapes (cycle:bytes:seconds): " + " ".join(f"{c}:{b}:{s:.3f}" for c, b, s in scrapes))
    print(
        f"history.jsonl: {len(history)} entries, {end.history_bytes} B "
        f"({end.history_bytes / len(history):.0f} B per entry, no cap); quarantine.json: "
        f"{end.quarantine_bytes} B for {CYCLES} versions ({end.quarantine_bytes / CYCLES:.0f} B each)"
    )

    assert rss_growth <= RSS_GROWTH_LIMIT_KIB, f"RSS grew {rss_growth} KiB after warm-up"
    assert (end.fds, end.threads) == (warm.fds, warm.threads)
    assert end.retained_bytes <= warm.retained_bytes + SLACK_BYTES
    assert end.other_state_bytes <= warm.other_state_bytes + SLACK_BYTES
    # history.jsonl and quarantine.json have no bound today (one entry per transaction, one per
    # failed release, never pruned): hold them to exactly that, and nothing else.
    assert len(history) == 2 * CYCLES
    assert len(host.cli_json("quarantine", "list")[1]["quarantine"]) == CYCLES
