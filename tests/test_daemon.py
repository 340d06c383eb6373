"""The daemon (watchdog_updater/daemon.py): on a real systemd (READY after recovery, STATUS, the
watchdog restarting a wedged daemon), on the sandboxed appliance (scheduled runs that update, only
check, or respect a pause), and in-process (idle wake-ups, honest pings while a job hangs, a busy
lock). Scheduled runs are made due "now" through the plan the daemon persists between starts, so
nothing waits for 03:00."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.kit.appliance import appliance
from tests.kit.fake_hal0 import free_port
from tests.kit.host import Host, merge
from tests.kit.sigstore_kit import PrivateSigstore
from tests.kit.systemd_sandbox import SystemdSandbox, require_systemd_sandbox
from watchdog_updater.app import App
from watchdog_updater.config import ScheduleConfig, load_config
from watchdog_updater.daemon import (
    SCHEDULE_STATE_FILE,
    Daemon,
    parse_watchdog_usec,
    read_schedule_state,
    sd_notify,
    write_schedule_state,
)
from watchdog_updater.journal import Journal, Step
from watchdog_updater.schedule import Planned
from watchdog_updater.state import Probation, StateStore

SCHEDULE = {"cron": "0 3 * * *", "jitter": 0, "check_interval": "1h"}
SCHEDULE_CONFIG = ScheduleConfig(cron="0 3 * * *", jitter_s=0.0, window=None)
UNIT = "wdu-daemon.service"


def plant_plan(state_dir: Path, *, due_in_s: float, checked_ago_s: float | None = 0.0) -> None:
    """Persist the daemon's plan as a previous daemon would have left it: the next run in
    ``due_in_s`` (negative: overdue), the last channel check ``checked_ago_s`` ago (None: never)."""
    now = time.time()
    at = datetime.fromtimestamp(now + due_in_s, UTC)
    last_check = None if checked_ago_s is None else now - checked_ago_s
    write_schedule_state(state_dir, SCHEDULE_CONFIG, Planned(slot=at, at=at), last_check)


def daemon_unit(
    argv: list[str], *, watchdog_s: float | None = None, log: Path | None = None
) -> str:
    lines = [
        "[Unit]",
        "Description=watchdog-updater daemon under test",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=" + " ".join(argv),
        "Restart=on-failure",
        "RestartSec=1",
        "TimeoutStartSec=60",
        "TimeoutStopSec=30",
        "TimeoutAbortSec=5",
        "LimitCORE=0",
        "Environment=PYTHONUNBUFFERED=1 NO_COLOR=1",
    ]
    if watchdog_s is not None:
        lines.append(f"WatchdogSec={watchdog_s:g}")
    if log is not None:  # the sandbox has no journal: the daemon's log goes to a file
        lines += [f"StandardOutput=append:{log}", f"StandardError=append:{log}"]
    return "\n".join(lines) + "\n"


def wait_until(
    what: str, predicate: Callable[[], Any], timeout: float, log: Callable[[], str]
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log()}")
        time.sleep(0.1)


def systemd_time(text: str) -> float:
    """``Wed 2026-11-25 22:21:50.500625 UTC`` (``--timestamp=us+utc``) -> epoch seconds."""
    parsed = datetime.strptime(text.strip(), "%a %Y-%m-%d %H:%M:%S.%f UTC")
    return parsed.replace(tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------- sd_notify


def test_sd_notify_path_and_abstract_sockets(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    abstract = f"@wdu-test-{os.getpid()}"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_path,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_name,
    ):
        by_path.bind(str(path))
        by_name.bind("\0" + abstract[1:])
        sd_notify("READY=1\nSTATUS=hello", str(path))
        sd_notify("WATCHDOG=1", abstract)
        assert by_path.recv(100) == b"READY=1\nSTATUS=hello"
        assert by_name.recv(100) == b"WATCHDOG=1"
    sd_notify("READY=1", None)  # no socket: a no-op
    sd_notify("READY=1", str(tmp_path / "gone.sock"))  # a vanished socket never raises


def test_parse_watchdog_usec() -> None:
    assert parse_watchdog_usec("2000000", None, 42) == 2_000_000
    assert parse_watchdog_usec("2000000", "42", 42) == 2_000_000
    assert parse_watchdog_usec("2000000", "41", 42) is None  # meant for another process
    assert parse_watchdog_usec(None, None, 42) is None
    assert parse_watchdog_usec("0", None, 42) is None
    assert parse_watchdog_usec("soon", None, 42) is None


def test_schedule_state_round_trip_and_settings_change(tmp_path: Path) -> None:
    plant_plan(tmp_path, due_in_s=3600, checked_ago_s=10)
    planned, last_check = read_schedule_state(tmp_path, SCHEDULE_CONFIG, UTC)
    assert planned is not None and last_check is not None
    assert abs(planned.at.timestamp() - (time.time() + 3600)) < 5
    # Another cron: the old plan is dropped (the last check is kept).
    other = ScheduleConfig(cron="0 4 * * *", jitter_s=0.0)
    assert read_schedule_state(tmp_path, other, UTC)[0] is None
    (tmp_path / SCHEDULE_STATE_FILE).write_text("{torn")
    assert read_schedule_state(tmp_path, SCHEDULE_CONFIG, UTC) == (None, None)


# --------------------------------------------------------------------------- in-process daemon


class Recorder:
    """A fake sd_notify: keeps every message with its monotonic time."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, message: str) -> None:
        with self.lock:
            self.messages.append((time.monotonic(), message))

    def since(self, t0: float, prefix: str = "") -> list[str]:
        with self.lock:
            return [m for t, m in self.messages if t >= t0 and m.startswith(prefix)]

    def status(self) -> str:
        statuses = self.since(0, "STATUS=")
        return statuses[-1] if statuses else ""

    def wait_for(self, prefix: str, timeout: float = 20) -> None:
        wait_until(prefix, lambda: self.since(0, prefix), timeout, lambda: str(self.messages))


def configure_offline(host: Host, port: int | None = None, **extra: Any) -> None:
    """A channel on ``port`` of loopback (default: a closed port) and sigstore's embedded trusted
    root: checks fail fast, nothing can be installed."""
    settings = {
        "verify": {"trusted_root": "public-good"},
        "download": {"retries": 0},
        "schedule": SCHEDULE,
        "metrics": {"listen": ""},
    }
    host.write_config(
        manifest_base=f"http://127.0.0.1:{port or free_port()}",
        trusted_root=Path("unused"),
        extra=merge(settings, extra),
    )


@pytest.fixture
def offline_host(tmp_path: Path) -> Host:
    host = Host(tmp_path / "root")
    host.prepare()
    host.install_initial("1.0.0")
    configure_offline(host)
    return host


class Running:
    """An in-process daemon in a thread."""

    def __init__(self, daemon: Daemon, notify: Recorder) -> None:
        self.daemon = daemon
        self.notify = notify
        self.stop = threading.Event()
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, name="daemon-under-test")

    def _run(self) -> None:
        self.code = self.daemon.run(self.stop)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.daemon.wakeup()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the daemon did not stop"


def in_process(host: Host, *, watchdog_usec: int | None) -> tuple[Daemon, Recorder]:
    app = App.create(host.root, load_config(host.config_path))
    notify = Recorder()
    return Daemon(app, notify=notify, watchdog_usec=watchdog_usec, tz=UTC), notify


def test_idle_daemon_wakes_only_for_the_watchdog(offline_host: Host) -> None:
    plant_plan(offline_host.layout.state_dir, due_in_s=6 * 3600)  # nothing due, checked just now
    daemon, notify = in_process(offline_host, watchdog_usec=1_000_000)
    with Running(daemon, notify):
        notify.wait_for("READY=1")
        time.sleep(0.2)
        t0, passes0 = time.monotonic(), daemon.stats.passes
        time.sleep(3.0)
        pings, passes = len(notify.since(t0, "WATCHDOG=1")), daemon.stats.passes - passes0
        assert "next update" in notify.status()
    # WatchdogSec=1 s: one ping per half interval, and the loop wakes for nothing else.
    assert 5 <= pings <= 7, notify.messages
    assert passes <= pings + 1, (passes, pings)
    assert daemon.stats.jobs == {"recover": 1}  # no check (done just now), no run due
    assert notify.since(0, "STOPPING=1")


def test_idle_daemon_without_watchdog_sleeps(offline_host: Host) -> None:
    plant_plan(offline_host.layout.state_dir, due_in_s=6 * 3600)
    daemon, notify = in_process(offline_host, watchdog_usec=None)
    with Running(daemon, notify):
        notify.wait_for("READY=1")
        time.sleep(0.2)
        passes0 = daemon.stats.passes
        time.sleep(2.0)
        passes = daemon.stats.passes - passes0
    assert passes == 0  # asleep until the heartbeat (60 s) or the next check
    assert not [m for _, m in notify.messages if m.startswith("WATCHDOG")]


def test_a_failed_check_is_counted_as_a_job_error_and_a_check_error(offline_host: Host) -> None:
    port = free_port()
    configure_offline(offline_host, metrics={"listen": f"127.0.0.1:{port}"})
    plant_plan(offline_host.layout.state_dir, due_in_s=6 * 3600, checked_ago_s=None)
    daemon, notify = in_process(offline_host, watchdog_usec=None)
    with Running(daemon, notify):
        wait_until(
            "the first check to fail",
            lambda: "last: check failed" in notify.status(),
            30,
            notify.status,
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
    assert 'hal0_updater_job_errors_total{job="check"} 1.0' in metrics
    assert 'hal0_updater_job_errors_total{job="recover"} 0.0' in metrics  # recovery was fine
    assert 'hal0_updater_checks_total{result="error"} 1.0' in metrics


def test_a_hung_job_stops_the_pings(
    offline_host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check whose server accepts and never answers: past the job's lease the main loop stops
    pinging (systemd would restart the daemon); with no reaction, the daemon kills the job."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    configure_offline(offline_host, port)
    plant_plan(offline_host.layout.state_dir, due_in_s=6 * 3600, checked_ago_s=None)  # check now
    monkeypatch.setattr(Daemon, "_initial_lease", lambda self, kind: 1.5)
    daemon, notify = in_process(offline_host, watchdog_usec=500_000)
    try:
        with Running(daemon, notify):
            notify.wait_for("STATUS=checking")
            t_check = notify.since(0, "STATUS=checking")
            wait_until(
                "a STUCK status",
                lambda: "STUCK" in notify.status(),
                10,
                lambda: str(notify.messages),
            )
            t_stuck = time.monotonic()
            time.sleep(0.6)
            # No ping while the job is past its lease.
            assert not notify.since(t_stuck + 0.05, "WATCHDOG=1"), notify.messages
            # Lease 1.5 s + 3 watchdog intervals: the daemon kills the job and pings again.
            wait_until(
                "the job killed",
                lambda: "killed" in notify.status(),
                10,
                lambda: str(notify.messages),
            )
            t_killed = time.monotonic()
            wait_until(
                "pings again",
                lambda: notify.since(t_killed, "WATCHDOG=1"),
                5,
                lambda: str(notify.messages),
            )
            assert t_check
    finally:
        silent.close()


def test_busy_lock_skips_the_run_and_retries_at_the_next_check(offline_host: Host) -> None:
    configure_offline(offline_host, schedule={"check_interval": 1})
    plant_plan(offline_host.layout.state_dir, due_in_s=-1)  # due now, checked just now
    daemon, notify = in_process(offline_host, watchdog_usec=None)
    app = App.create(offline_host.root, load_config(offline_host.config_path))
    recovered = threading.Event()
    with app.lock("cli update"):
        original = daemon._after_job

        def after_job(kind: str, summary: Any, *, checked: bool, logged: str | None = None) -> None:
            original(kind, summary, checked=checked, logged=logged)
            if kind == "recover":
                recovered.set()

        daemon._after_job = after_job  # type: ignore[method-assign]
        with Running(daemon, notify) as running:
            # The STATUS line follows the job's end by one pass of the main loop: wait for both.
            wait_until(
                "two busy update attempts, reported as such",
                lambda: daemon.stats.jobs.get("update", 0) >= 2 and "lock busy" in notify.status(),
                30,
                lambda: str(notify.messages),
            )
            assert running.thread.is_alive() and running.code is None  # not crashed
    # The lock was busy during start-up too: recovery was skipped, not fatal.
    assert recovered.is_set()


def record_probation(store: StateStore) -> float:
    """Record a 120 s probation window of the installed 1.0.0; return its end."""
    until = time.time() + 120
    store.save_probation(
        Probation(
            version="1.0.0",
            from_version=None,
            previous_before=None,
            digest_sha256=None,
            channel="stable",
            until=until,
        )
    )
    return until


def test_stop_interrupts_probation_which_resumes_later(offline_host: Host) -> None:
    """A committed version under probation: the daemon watches it; a stop interrupts the watch
    promptly (should_stop) and the record stays for the next start."""
    configure_offline(offline_host, health={"probation": {"duration": 120, "interval": 0.2}})
    plant_plan(offline_host.layout.state_dir, due_in_s=6 * 3600)
    store = StateStore(offline_host.layout.state_dir)
    until = record_probation(store)
    daemon, notify = in_process(offline_host, watchdog_usec=None)
    with Running(daemon, notify) as running:
        wait_until(
            "probation being watched",
            lambda: "watching probation: 1.0.0 until" in notify.status(),
            20,
            lambda: str(notify.messages),
        )
        time.sleep(0.5)  # a few probe rounds
        stop_at = time.monotonic()
        running.stop.set()
        daemon.wakeup()
        running.thread.join(timeout=10)
        assert time.monotonic() - stop_at < 5
    assert running.code == 0
    assert notify.since(0, "STOPPING=1")
    record = store.probation()
    assert record is not None and record.until == until  # resumed at the next start


def test_a_probation_recorded_by_the_command_line_is_watched(offline_host: Host) -> None:
    """`watchdog-updater update` (without --probation) commits and records the window; the
    running daemon notices the new record at its next pass (here: a 1 s watchdog) and watches."""
    configure_offline(offline_host, health={"probation": {"duration": 120, "interval": 0.2}})
    plant_plan(offline_host.layout.state_dir, due_in_s=6 * 3600)
    daemon, notify = in_process(offline_host, watchdog_usec=1_000_000)
    with Running(daemon, notify):
        notify.wait_for("READY=1")
        time.sleep(0.7)  # idle a pass or two: nothing to watch yet
        assert daemon.stats.jobs == {"recover": 1}
        record_probation(StateStore(offline_host.layout.state_dir))  # as the CLI's commit does
        wait_until(
            "the command line's probation being watched",
            lambda: "watching probation: 1.0.0 until" in notify.status(),
            5,
            lambda: str(notify.messages),
        )


# --------------------------------------------------------------------------- real systemd


@pytest.fixture
def sandbox_host(tmp_path: Path) -> Iterator[tuple[Host, SystemdSandbox]]:
    require_systemd_sandbox()
    host = Host(tmp_path / "root")
    host.prepare()
    host.install_initial("1.0.0")
    configure_offline(host)
    with SystemdSandbox(tmp_path / "units") as sandbox:
        yield host, sandbox


@pytest.mark.systemd
def test_ready_after_recovery_status_and_watchdog_restart(
    sandbox_host: tuple[Host, SystemdSandbox],
) -> None:
    host, sandbox = sandbox_host
    state = host.layout.state_dir
    # An update interrupted while unpacking, by a power cut (another boot id).
    tx = Journal(state, boot_id="a-previous-boot").begin(
        kind="update",
        from_version="1.0.0",
        to_version="1.1.0",
        channel="stable",
        trigger="schedule",
        step=Step.STAGE,
    )
    staging = host.layout.staging_dir(tx.txid)
    staging.mkdir(parents=True)
    (staging / "half-unpacked").write_text("x")
    plant_plan(state, due_in_s=6 * 3600)  # nothing due; checked just now

    sandbox.write_unit(UNIT, daemon_unit(host.cli_argv("daemon"), watchdog_s=2))
    sandbox.systemctl("start", UNIT)  # Type=notify: returns once READY=1 arrived
    props = sandbox.show(UNIT, "ActiveState", "StatusText", "ExecMainPID", "NRestarts")
    assert props["ActiveState"] == "active"
    active_at = sandbox.systemctl(
        "show", "--timestamp=us+utc", "-p", "ActiveEnterTimestamp", "--value", UNIT
    ).stdout

    # Recovery ran first, and finished before the unit became active.
    entry = Journal(state, boot_id="x").history()[-1]
    assert entry["txid"] == tx.txid and entry["outcome"] == "aborted", entry
    assert "power cut" in entry["reason"]
    assert entry["finished_at"] < systemd_time(active_at)
    assert not staging.exists() and not (state / "transaction.json").exists()
    assert "next update" in props["StatusText"], props

    # Wedge the daemon: SIGSTOP its main process. The watchdog (2 s) kills and restarts it.
    old_pid = props["ExecMainPID"]
    sandbox.run(["kill", "-STOP", old_pid], check=True)
    sandbox.wait_for(
        UNIT,
        ["activating", "deactivating", "failed", "inactive", "active"],
        timeout=20,
        until=lambda p: p.get("Result") == "watchdog",
    )
    restarted = sandbox.wait_for(
        UNIT,
        "active",
        timeout=30,
        until=lambda p: int(p["NRestarts"]) >= 1 and p["ExecMainPID"] != old_pid,
    )
    assert int(restarted["NRestarts"]) >= 1
    assert "Watchdog timeout" in sandbox.log_path.read_text()
    assert "next update" in sandbox.show(UNIT, "StatusText")["StatusText"]

    sandbox.systemctl("stop", UNIT)
    stopped = sandbox.show(UNIT, "ActiveState", "Result")
    assert stopped == {"ActiveState": "inactive", "Result": "success"}, stopped


@pytest.mark.systemd
def test_scheduled_runs_on_the_appliance(tmp_path: Path, sigstore: PrivateSigstore) -> None:
    require_systemd_sandbox()
    with appliance(tmp_path, sigstore=sigstore) as hal0:
        host, sandbox = hal0.host, hal0.sandbox
        state = host.layout.state_dir
        hal0.publish("1.1.0", "healthy")
        daemon_log = tmp_path / "daemon.log"
        sandbox.write_unit(UNIT, daemon_unit(host.cli_argv("daemon"), log=daemon_log))

        def status() -> str:
            return sandbox.show(UNIT, "StatusText")["StatusText"]

        def run_daemon(until: Callable[[str], bool], what: str) -> str:
            """Start the daemon with its nightly run due; stop it once ``until(STATUS)``; return
            that STATUS."""
            plant_plan(state, due_in_s=-5)  # the nightly run is due: run it at once
            sandbox.systemctl("start", UNIT)

            def matching_status() -> str:
                text = status()
                return text if until(text) else ""

            try:
                seen: str = wait_until(
                    what, matching_status, 90, lambda: f"status: {status()}\n{sandbox.log_tail(60)}"
                )
            finally:
                sandbox.systemctl("stop", UNIT)
            return seen

        # 1. Paused: the scheduled run installs nothing, and STATUS says why.
        assert hal0.cli("pause", "--reason", "maintenance").returncode == 0
        hal0.configure(schedule=SCHEDULE, metrics={"listen": ""})
        seen = run_daemon(lambda text: "last: updates are paused" in text, "a paused run")
        assert seen.startswith("updates paused until resumed (maintenance); next update"), seen
        assert host.current() == "1.0.0"
        assert hal0.cli("resume").returncode == 0

        # 2. auto = false: the scheduled run only checks; metrics show what is available.
        port = free_port()
        hal0.configure(auto=False, schedule=SCHEDULE, metrics={"listen": f"127.0.0.1:{port}"})
        scraped: dict[str, str] = {}

        def checked(text: str) -> bool:
            memory = state / "channels" / "stable.json"
            if not memory.exists() or "last:" not in text:
                return False
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                scraped["text"] = r.read().decode()
            return True

        seen = run_daemon(checked, "a check-only run")
        assert json.loads((state / "channels" / "stable.json").read_text())["version"] == "1.1.0"
        metrics = scraped["text"]
        assert (
            'hal0_updater_available_version_info{channel="stable",version="1.1.0"} 1.0' in metrics
        )
        assert "hal0_updater_auto_updates_enabled 0.0" in metrics
        assert 'hal0_updater_checks_total{result="available"} 1.0' in metrics
        assert host.current() == "1.0.0"
        assert "next check (auto = false)" in seen and "1.1.0 is available" in seen, seen
        log = daemon_log.read_text()
        said = [line for line in log.splitlines() if "1.1.0 is available" in line]
        assert len(said) == 1, log  # the check job's outcome is logged once, not twice

        # 3. auto = true: the daemon updates 1.0.0 -> 1.1.0 by itself, gate and all.
        hal0.configure(schedule=SCHEDULE, metrics={"listen": ""})

        def updated(_text: str) -> bool:
            history = Journal(state, boot_id="x").history()
            return bool(history) and history[-1]["outcome"] == "committed"

        run_daemon(updated, "a scheduled update")
        last = Journal(state, boot_id="x").history()[-1]
        assert (last["from_version"], last["to_version"], last["trigger"]) == (
            "1.0.0",
            "1.1.0",
            "schedule",
        )
        assert host.current() == "1.1.0"
        # The next run was planned (and persisted) before this one started: tomorrow, 03:00.
        planned, _ = read_schedule_state(state, SCHEDULE_CONFIG, UTC)
        assert planned is not None and planned.at.timestamp() > time.time()


def test_cli_daemon_once_outside_any_network(offline_host: Host) -> None:
    """`daemon --once` (the timer's cycle): recovery, then the update fails on the unreachable
    channel with the CLI's exit code, and never hangs."""
    proc = offline_host.cli("daemon", "--once", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "update: downloading manifest stable.json" in proc.stderr, proc.stderr
    assert "Connection refused" in proc.stderr


def test_bad_cron_is_a_config_error(offline_host: Host) -> None:
    configure_offline(offline_host, schedule={"cron": "0 3 * * 9"})
    proc = offline_host.cli("daemon", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "update.schedule" in proc.stderr
