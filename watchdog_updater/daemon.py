"""``watchdog-updater daemon``: unattended updates on a schedule, watched by systemd.

Start-up: recovery of an interrupted transaction runs FIRST (the unit stays "activating" meanwhile),
then the metrics endpoint starts, then ``READY=1``. The main loop then sleeps until the next thing it
has to do (a watchdog ping, the next channel check, the next scheduled run, a job's output) and
runs one job at a time: the scheduled update (a check only with ``auto = false``), a channel check
every ``check_interval``, and probation watching after a commit.

Where the work runs, and why the watchdog stays honest
------------------------------------------------------
Jobs run in a short-lived child process (``python -c ... _job_main``), never in the daemon's own
interpreter, and never in a thread that could keep pinging on its own:

- ``WATCHDOG=1`` is sent by the main loop only. While a job runs, the main loop pings only while the
  job holds a *lease*: the child reports every updater event (step, probe result, download progress)
  over a pipe, and each report extends the lease - to the step's own configured deadline for a step
  (download: the fetch deadline; restart: the restart timeout per unit; gate: the gate deadline;
  hooks: the hook timeout), or by a quiet allowance for other events. A job that hangs past its
  lease stops the pings: systemd's watchdog kills the unit and restarts it, and the journal's
  recovery finishes or undoes the transaction. A wedged main loop stops the pings by itself.
  Without a watchdog (run by hand), the daemon kills such a child itself.
- Verifying a release imports sigstore, cryptography and httpx (over 50 MiB of RSS together). In a
  child they are freed when the job ends, so the idle daemon stays small (the goal is 45 MiB).
- ``NotifyAccess=main`` holds: only the daemon's own process talks to systemd.
- A stop (SIGTERM/SIGINT) sends ``STOPPING=1``: a check is abandoned at once, probation is told to
  stop (it stays recorded and resumes at the next start), an update gets ``stop_grace_s`` to finish
  and is then killed - it is journaled, so the next start recovers it.

Scheduled runs are at-most-once: the next run is planned (and persisted in ``schedule.json`` in the
state dir) before a run starts, so a crash during a run is never retried in a loop; missed runs
(the host was off, the daemon stopped) are coalesced into one catch-up run (:mod:`.schedule`).
A run that finds the lock taken (a CLI update) is retried at the next check.

The CLI reads the environment (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``) and passes it in; nothing here
reads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from watchdog_updater.schedule import Misfire, Planned, Schedule, in_window

if TYPE_CHECKING:
    from watchdog_updater.app import App
    from watchdog_updater.config import Config, ScheduleConfig
    from watchdog_updater.releases import Offer
    from watchdog_updater.updater import Event

__all__ = [
    "SCHEDULE_STATE_FILE",
    "Daemon",
    "parse_watchdog_usec",
    "read_schedule_state",
    "run_job",
    "sd_notify",
    "write_schedule_state",
]

log = logging.getLogger(__name__)

SCHEDULE_STATE_FILE = "schedule.json"
HEARTBEAT_S = 60.0  # the longest the main loop sleeps: the heartbeat metric stays fresh
STARTUP_PASS_S = 5.0  # during start-up (recovery), extend systemd's start timeout this often
STOP_GRACE_S = 20.0  # an update in flight gets this long after SIGTERM (unit: TimeoutStopSec=30)
QUIET_S = 120.0  # a job may stay silent this long between events outside a timed step
SLACK_S = 60.0  # added to every step deadline (process start-up, journal writes, fsyncs)
STAGE_S = 1800.0  # unpacking a release (up to max_unpacked_bytes) emits no events
SHORT_STEP_S = 60.0  # renames, link swaps, commit bookkeeping
_PROGRESS_EVERY_S = 0.5  # download progress reports, at most this often
_STATUS_MAX = 240

Notify = Callable[[str], None]


def _error(message: str, *args: object) -> None:
    """Log an expected failure (the daemon carries on): the message says it all, no traceback."""
    log.error(message, *args)


# --------------------------------------------------------------------------- systemd


def sd_notify(message: str, socket_path: str | None) -> None:
    """Send ``message`` to systemd's notification socket; a no-op without one.

    ``socket_path`` is ``$NOTIFY_SOCKET`` as read by the CLI: a file system path, or ``@name`` for an
    abstract socket. Failures are logged, never raised: a lost notification must not kill the
    daemon (a lost WATCHDOG=1 is exactly what the watchdog is for).
    """
    if not socket_path:
        return
    if socket_path.startswith("@"):
        address = "\0" + socket_path[1:]
    elif socket_path.startswith("/"):
        address = socket_path
    else:
        log.debug("unsupported NOTIFY_SOCKET %r: notification dropped", socket_path)
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8", "replace"), address)
    except OSError as e:
        log.debug("sd_notify(%r) failed: %s", message, e)


def parse_watchdog_usec(usec: str | None, pid: str | None, own_pid: int) -> int | None:
    """The watchdog interval in microseconds from ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``.

    None when unset, malformed, zero, or meant for another process (``WATCHDOG_PID``).
    """
    if not usec:
        return None
    if pid and pid.strip() != str(own_pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None


# --------------------------------------------------------------------------- schedule state


def _settings_key(schedule: ScheduleConfig) -> dict[str, Any]:
    return {
        "cron": schedule.cron,
        "jitter_s": float(schedule.jitter_s),
        "window": list(schedule.window) if schedule.window else None,
    }


def write_schedule_state(
    state_dir: Path,
    schedule: ScheduleConfig,
    planned: Planned | None,
    last_check_at: float | None,
) -> None:
    """Persist the planned run and the last check (``schedule.json``), for the next start."""
    from watchdog_updater.storage import atomic_write_json

    document = {
        **_settings_key(schedule),
        "planned": planned.to_json() if planned is not None else None,
        "last_check_at": last_check_at,
    }
    atomic_write_json(state_dir / SCHEDULE_STATE_FILE, document)


def read_schedule_state(
    state_dir: Path, schedule: ScheduleConfig, tz: tzinfo
) -> tuple[Planned | None, float | None]:
    """The persisted plan (None if missing, unreadable or planned for other settings) and the
    time of the last check."""
    path = state_dir / SCHEDULE_STATE_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None, None
    if not isinstance(doc, dict):
        return None, None
    last_check = doc.get("last_check_at")
    if isinstance(last_check, bool) or not isinstance(last_check, int | float):
        last_check = None
    same = all(doc.get(k) == v for k, v in _settings_key(schedule).items())
    planned = None
    if same and isinstance(doc.get("planned"), dict):
        try:
            planned = Planned.from_json(doc["planned"], tz)
        except (KeyError, TypeError, ValueError, OverflowError, OSError) as e:
            log.warning("ignoring the persisted plan in %s: %s", path, e)
    return planned, None if last_check is None else float(last_check)


# --------------------------------------------------------------------------- jobs

Emit = Callable[[dict[str, Any]], None]


def _check_result(offer: Offer) -> str:
    """One of metrics.CHECK_RESULTS for an offer."""
    if offer.available:
        return "available"
    candidate = offer.candidate
    if candidate is None or (
        offer.installed is not None and str(candidate.version) == offer.installed
    ):
        return "up-to-date"
    return "held"


def _progress_reporter(emit: Emit) -> tuple[Callable[[int, int | None], None], Callable[[], None]]:
    """A download progress callback that reports at most every 0.5 s, and its final flush."""
    state: dict[str, Any] = {"at": 0.0, "done": 0, "sent": 0, "total": None}

    def send() -> None:
        if state["done"] != state["sent"]:
            emit({"type": "progress", "done": state["done"], "total": state["total"]})
            state["sent"] = state["done"]

    def progress(done: int, total: int | None) -> None:
        state["done"], state["total"] = done, total
        now = time.monotonic()
        if now - state["at"] >= _PROGRESS_EVERY_S or (total is not None and done >= total):
            state["at"] = now
            send()

    return progress, send


def run_job(
    app: App,
    kind: str,
    emit: Emit,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Run one job and return its summary; every updater event goes to ``emit`` as it happens.

    Kinds: ``recover``; ``check`` (the channel, no lock: as ``update --check``); ``update`` (lock,
    recover, check, then update with trigger "schedule" if something is offered); ``probation``
    (lock, recover, watch). Never raises an :class:`~watchdog_updater.errors.Error`: the summary's
    ``status`` is "ok", "busy" (the lock is held elsewhere) or "error".
    """
    from watchdog_updater.errors import BusyError, Error

    def report(event: Event) -> None:
        emit({"type": "event", "kind": event.kind, "message": event.message, "data": event.data})

    updater = app.updater(report)
    checking = False

    def check() -> Offer:
        nonlocal checking
        checking = True
        offer = updater.check()
        checking = False
        emit({"type": "check", "result": _check_result(offer), "message": offer.reason})
        return offer

    progress, flush = _progress_reporter(emit)
    try:
        if kind == "recover":
            with app.lock("recovery"):
                recovered = updater.recover()
            if recovered is None:
                return {"status": "ok", "message": "nothing to recover"}
            return _result_summary(recovered)
        if kind == "check":
            offer = check()
            return {"status": "ok", "message": offer.reason, "available": offer.available}
        if kind == "update":
            with app.lock("update"):
                updater.recover()
                offer = check()
                if not offer.available:
                    return {"status": "ok", "message": offer.reason}
                result = updater.update(trigger="schedule", progress=progress)
            return _result_summary(result)
        if kind == "probation":
            with app.lock("probation"):
                updater.recover()
                watched = updater.watch_probation(should_stop=should_stop)
            if watched is None:
                stopped = should_stop()
                message = "probation interrupted" if stopped else "probation over"
                return {"status": "ok", "message": message}
            return _result_summary(watched)
        raise ValueError(f"unknown job kind {kind!r}")
    except BusyError as e:
        return {"status": "busy", "message": e.message}
    except Error as e:
        if checking:
            emit({"type": "check", "result": "error", "message": e.message})
        return {
            "status": "error",
            "message": e.message,
            "hint": e.hint,
            "error": type(e).__name__,
            "exit_code": int(e.exit_code),
        }
    finally:
        flush()


def _result_summary(result: Any) -> dict[str, Any]:
    return {
        "status": "ok",
        "message": result.message,
        "action": result.action,
        "outcome": result.outcome.value if result.outcome is not None else None,
        "from": result.from_version,
        "to": result.to_version,
        "exit_code": int(result.exit_code),
    }


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _job_main() -> int:
    """Entry point of a job's child process: (kind, root, config) pickled on stdin, events out as
    JSON lines on stdout. Output of anything else goes to stderr (the journal)."""
    out = os.dup(1)
    os.dup2(2, 1)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()  # probation stops at its next round; an update runs on (the parent decides)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The payload comes from our own parent over a private pipe.
    kind, root, config = pickle.loads(sys.stdin.buffer.read())  # noqa: S301

    def emit(doc: dict[str, Any]) -> None:
        line = json.dumps(doc, default=str, separators=(",", ":")) + "\n"
        _write_all(out, line.encode("utf-8", "replace"))

    from watchdog_updater.app import App

    try:
        summary = run_job(App.create(root, config), kind, emit, should_stop=stop.is_set)
    except Exception as e:
        import traceback

        traceback.print_exc()
        summary = {"status": "error", "message": f"{kind} job crashed: {type(e).__name__}: {e}"}
    emit({"type": "done", **summary})
    return 0


# --------------------------------------------------------------------------- metrics


class _Metrics(Protocol):
    def heartbeat(self) -> None: ...
    def add_downloaded(self, nbytes: int) -> None: ...
    def record_check(self, result: str) -> None: ...
    def record_job_error(self, kind: str) -> None: ...
    def set_next_run(self, timestamp: float | None) -> None: ...
    def set_auto_updates(self, enabled: bool) -> None: ...


class _NoMetrics:
    """Stands in for DaemonMetrics when ``[update.metrics] listen`` is empty."""

    def heartbeat(self) -> None:
        return None

    def add_downloaded(self, nbytes: int) -> None:
        return None

    def record_check(self, result: str) -> None:
        return None

    def record_job_error(self, kind: str) -> None:
        return None

    def set_next_run(self, timestamp: float | None) -> None:
        return None

    def set_auto_updates(self, enabled: bool) -> None:
        return None


# --------------------------------------------------------------------------- the daemon


@dataclass
class _Job:
    """A job's child process, as the main loop sees it."""

    kind: str
    proc: subprocess.Popen[bytes]
    fd: int
    started: float  # monotonic
    lease_until: float  # monotonic: past this without news, the job counts as hung
    step: str = ""
    doing: str = ""  # the current step's message, for STATUS
    buffer: bytes = b""
    summary: dict[str, Any] | None = None
    checked: bool = False
    check_message: str | None = None  # logged when the job reported its check
    downloaded: int = 0
    stuck_logged: bool = False
    stop_deadline: float | None = None


@dataclass
class DaemonStats:
    """Counters for tests and the bench."""

    passes: int = 0
    pings: int = 0
    jobs: dict[str, int] = field(default_factory=dict)


class Daemon:
    """The scheduler service. ``run(stop)`` until ``stop`` is set; ``run_once()`` for the timer."""

    def __init__(
        self,
        app: App,
        *,
        notify: Notify,
        watchdog_usec: int | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        tz: tzinfo | None = None,
        misfire: Misfire | None = None,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.app = app
        self.config: Config = app.config
        self.notify = notify
        self.watchdog_s = watchdog_usec / 1e6 if watchdog_usec else None
        self.clock = clock
        self.monotonic = monotonic
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        if tz is None:
            from watchdog_updater.schedule import local_zone

            tz = local_zone()
        self.tz = tz
        self.stop_grace_s = stop_grace_s
        sched = self.config.schedule
        try:
            self.schedule = Schedule(
                sched.cron, sched.jitter_s, sched.window, rng=self.rng, misfire=misfire
            )
        except ValueError as e:
            from watchdog_updater.errors import ConfigError

            raise ConfigError(
                f"update.schedule: {e}", hint="cron is 'minute hour day month weekday'"
            ) from e
        self.stats = DaemonStats()
        self.metrics: _Metrics = _NoMetrics()
        self._wake_r, self._wake_w = -1, -1
        self._job: _Job | None = None
        self._stop: threading.Event | None = None
        self._next_ping = 0.0
        self._next_check_at = 0.0
        self._last_check_at: float | None = None
        self._retry: set[str] = set()  # job kinds to retry at the next check (lock was busy)
        self._probation_pending = False
        self._probation_stamp: tuple[int, int] | None = None  # the record last watched
        self._last = ""  # the last job's result, for STATUS
        self._status_sent = ""
        self._saved: dict[str, Any] | None = None

    # ----------------------------------------------------------------------- helpers
    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), self.tz)

    def _fmt(self, moment: datetime) -> str:
        return moment.astimezone(self.tz).strftime("%Y-%m-%d %H:%M:%S %Z")

    def _status(self, text: str) -> None:
        text = " ".join(text.split())[:_STATUS_MAX]
        if text != self._status_sent:
            self._status_sent = text
            self.notify(f"STATUS={text}")

    def wakeup(self) -> None:
        """Wake the main loop (from a signal handler, or another thread after setting stop)."""
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):  # a full pipe wakes the loop just the same
                os.write(self._wake_w, b"\0")

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        self.wakeup()

    # ----------------------------------------------------------------------- run
    def run(self, stop: threading.Event) -> int:
        """Recover, start metrics, READY, then loop until ``stop`` is set. Returns the exit code."""
        self._stop = stop
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        stop_metrics: Callable[[], None] | None = None
        try:
            self._status("starting: recovering any interrupted transaction")
            log.info("watchdog-updater daemon starting (pid %d)", os.getpid())
            self._start_job("recover")
            ready = False
            while True:
                self.stats.passes += 1
                mono = self.monotonic()
                self._collect(mono)
                if stop.is_set() and self._stopping(mono):
                    break
                if not ready and self._job is None and not stop.is_set():
                    stop_metrics = self._start_metrics()
                    self._start_schedule()
                    ready = True
                    self.notify("READY=1")
                    log.info("ready: %s", self._idle_status())
                if ready and self._job is None and not stop.is_set():
                    self._maybe_start_job()
                self._watchdog(mono, ready)
                self.metrics.heartbeat()
                self._status(self._current_status(ready))
                self._wait(self._timeout(self.monotonic(), ready))
        finally:
            if self._job is not None:
                self._kill(self._job, "the daemon is exiting")
                self._finish(self._job)
            if stop_metrics is not None:
                stop_metrics()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        log.info("watchdog-updater daemon stopped")
        return 0

    def _stopping(self, mono: float) -> bool:
        """Handle a stop request; True once the loop may end."""
        job = self._job
        if job is None:
            self._announce_stop()
            return True
        if job.stop_deadline is None:
            self._announce_stop()
            if job.kind == "check":
                job.stop_deadline = mono
                self._kill(job, "stopping: check abandoned")
                return False
            grace = self.stop_grace_s
            log.info("stopping: waiting up to %.0f s for the %s job", grace, job.kind)
            job.stop_deadline = mono + grace
            self._signal(job, signal.SIGTERM)
        elif mono >= job.stop_deadline:
            self._kill(job, f"stopping: {job.kind} abandoned (journaled; recovered at next start)")
        return False

    def _announce_stop(self) -> None:
        if not self._status_sent.startswith("stopping"):
            self.notify("STOPPING=1")
            self._status("stopping")

    # ----------------------------------------------------------------------- start-up
    def _start_metrics(self) -> Callable[[], None] | None:
        listen = self.config.metrics.listen
        if not listen:
            return None
        from watchdog_updater.errors import Error
        from watchdog_updater.metrics import build_registry, serve

        registry, metrics = build_registry(self.app.layout, self.config.channel, clock=self.clock)
        self.metrics = metrics
        metrics.set_auto_updates(self.config.auto)
        try:
            server = serve(registry, listen)
        except Error as e:
            _error("metrics disabled: %s", e.message)
            return None
        log.info("metrics on %s", getattr(server, "url", listen))
        return server.stop

    def _start_schedule(self) -> None:
        now = self._now()
        saved, last_check = read_schedule_state(
            self.app.layout.state_dir, self.config.schedule, self.tz
        )
        planned = self.schedule.start(now, saved)
        if saved is not None and planned.at <= now:
            log.info(
                "the run planned for %s is due (it was missed while stopped)", self._fmt(planned.at)
            )
        self._last_check_at = last_check
        interval = self.config.schedule.check_interval_s
        self._next_check_at = now.timestamp() if last_check is None else last_check + interval
        self._probation_pending = True
        self._save_schedule()

    def _save_schedule(self) -> None:
        planned = self.schedule.planned
        doc = {"planned": planned.to_json(), "last_check_at": self._last_check_at}
        self.metrics.set_next_run(planned.at.timestamp())
        if doc == self._saved:
            return
        try:
            write_schedule_state(
                self.app.layout.state_dir, self.config.schedule, planned, self._last_check_at
            )
            self._saved = doc
        except OSError as e:
            _error("cannot persist the schedule: %s", e)

    # ----------------------------------------------------------------------- choosing work
    def _maybe_start_job(self) -> None:
        now = self._now()
        if self._probation_pending or self._new_probation_record():
            self._probation_pending = False
            if self._start_probation():
                return
        run = self.schedule.poll(now)
        self._save_schedule()
        if run is not None:
            caught_up = f" (catching up {run.missed} missed runs)" if run.missed > 1 else ""
            what = "update" if self.config.auto else "check-only run (auto = false)"
            log.info("scheduled %s for slot %s%s", what, self._fmt(run.slot), caught_up)
            self._retry.discard("update")
            self._start_job("update" if self.config.auto else "check")
            return
        if now.timestamp() >= self._next_check_at:
            if "probation" in self._retry:
                self._retry.discard("probation")
                if self._start_probation():
                    return
            if "update" in self._retry:
                self._retry.discard("update")
                if self.config.auto and in_window(self.config.schedule.window, now):
                    log.info("retrying the scheduled update that found the lock busy")
                    self._start_job("update")
                    return
                log.info("the busy scheduled update is not retried: outside the window")
            self._start_job("check")

    def _new_probation_record(self) -> bool:
        """A probation record the daemon has not watched yet: a commit by ``watchdog-updater
        update`` from the command line (checked at each pass of the main loop, by one stat)."""
        try:
            stamp = self.app.store.probation_stamp()
        except OSError:
            return False  # _start_probation reports an unreadable record when it next looks
        return stamp is not None and stamp != self._probation_stamp

    def _start_probation(self) -> bool:
        """Watch a recorded probation window (after a commit, or left by a stopped daemon)."""
        try:
            self._probation_stamp = self.app.store.probation_stamp()
            probation = self.app.store.probation()
        except (OSError, ValueError, TypeError) as e:
            _error("cannot read the probation record: %s", e)
            return False
        if probation is None:
            return False
        until = self._fmt(datetime.fromtimestamp(probation.until, self.tz))
        self._start_job("probation", doing=f"{probation.version} until {until}")
        return True

    # ----------------------------------------------------------------------- jobs
    def _initial_lease(self, kind: str) -> float:
        c = self.config
        if kind in ("check", "update"):
            return SLACK_S + c.download.fetch.deadline_s  # the manifest fetch comes first
        if kind == "probation" and c.health.probation is not None:
            p = c.health.probation
            return SLACK_S + p.interval_s + p.probe_timeout_s
        return SLACK_S + QUIET_S

    def _quiet_allowance(self, kind: str) -> float:
        """How long a job may stay silent after any report before it counts as hung."""
        probation = self.config.health.probation
        if kind == "probation" and probation is not None:
            return max(QUIET_S, SLACK_S + probation.interval_s + probation.probe_timeout_s)
        return QUIET_S

    def _step_budget(self, step: str) -> float:
        c = self.config
        gate = c.health.gate.deadline_s + c.health.gate.probe_timeout_s
        restart = c.services.restart_timeout_s * max(1, len(c.services.restart))
        budgets = {
            "fetch": c.download.fetch.deadline_s * 2,  # the bundle, then the tarball
            "stage": STAGE_S,
            "hooks": c.install.hook_timeout_s * max(1, len(c.install.post_swap)),
            "restart": restart,
            "rollback-restart": restart,
            "gate": gate,
            "rollback-gate": gate,
        }
        return SLACK_S + budgets.get(step, SHORT_STEP_S)

    def _start_job(self, kind: str, *, doing: str = "") -> None:
        package_parent = str(Path(__file__).resolve().parents[1])
        code = (
            f"import sys; sys.path.insert(0, {package_parent!r}); "
            "from watchdog_updater.daemon import _job_main; raise SystemExit(_job_main())"
        )
        payload = pickle.dumps((kind, self.app.layout.root, self.config))
        self.stats.jobs[kind] = self.stats.jobs.get(kind, 0) + 1
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as e:
            _error("cannot start the %s job: %s", kind, e)
            self._last = f"{kind} failed to start: {e}"
            self._after_job(kind, {"status": "error", "message": str(e)}, checked=False)
            return
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except OSError as e:
            _error("cannot hand the %s job its settings: %s", kind, e)
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        mono = self.monotonic()
        self._job = _Job(
            kind=kind,
            proc=proc,
            fd=fd,
            started=mono,
            lease_until=mono + self._initial_lease(kind),
            doing=doing,
        )
        log.info("%s job started (pid %d)", kind, proc.pid)

    def _collect(self, mono: float) -> None:
        """Read what the job reported; finish it when its pipe closes; kill it if hung (no watchdog)."""
        job = self._job
        if job is None:
            return
        while True:
            try:
                data = os.read(job.fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                _error("reading the %s job's reports failed: %s", job.kind, e)
                data = b""
            if not data:
                self._finish(job)
                return
            job.buffer += data
            *lines, job.buffer = job.buffer.split(b"\n")
            for line in lines:
                self._handle(job, line, mono)
        if mono > job.lease_until:
            self._hung(job, mono)

    def _handle(self, job: _Job, line: bytes, mono: float) -> None:
        try:
            doc = json.loads(line)
        except ValueError:
            log.warning("%s job: unreadable report %r", job.kind, line[:200])
            return
        if not isinstance(doc, dict):
            return
        kind = doc.get("type")
        job.lease_until = max(job.lease_until, mono + self._quiet_allowance(job.kind))
        if kind == "event":
            self._event(job, doc, mono)
        elif kind == "progress":
            done = doc.get("done")
            if isinstance(done, int) and not isinstance(done, bool):
                delta = done - job.downloaded if done >= job.downloaded else done
                job.downloaded = done
                if delta > 0:
                    self.metrics.add_downloaded(delta)
        elif kind == "check":
            job.checked = True
            result = str(doc.get("result"))
            try:
                self.metrics.record_check(result)
            except ValueError:
                log.warning("unknown check result %r", result)
            job.check_message = str(doc.get("message"))
            log.info("check: %s", job.check_message)
        elif kind == "done":
            job.summary = doc

    def _event(self, job: _Job, doc: Mapping[str, Any], mono: float) -> None:
        kind, message = doc.get("kind"), str(doc.get("message", ""))
        raw = doc.get("data")
        data: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        if kind == "step":
            job.step = str(data.get("step", ""))
            job.doing = message
            job.lease_until = mono + self._step_budget(job.step)
            log.info("%s: %s", job.kind, message)
        elif kind == "probe":
            log.debug("%s: probe %s", job.kind, message)
        else:
            log.info("%s: %s", job.kind, message)

    def _hung(self, job: _Job, mono: float) -> None:
        over = mono - job.lease_until
        if not job.stuck_logged:
            job.stuck_logged = True
            where = f"step {job.step}" if job.step else "start"
            log.error(
                "the %s job is stuck (%s, no progress within its deadline)%s",
                job.kind,
                where,
                ": no more watchdog pings, systemd will restart the daemon"
                if self.watchdog_s
                else "",
            )
        # Without a watchdog nobody else will act; with one, act only if systemd did not.
        if self.watchdog_s is None or over > 3 * self.watchdog_s:
            self._kill(job, f"{job.kind} job killed: stuck in {job.step or 'start-up'}")

    def _signal(self, job: _Job, signum: int) -> None:
        if job.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                job.proc.send_signal(signum)

    def _kill(self, job: _Job, why: str) -> None:
        log.error("%s", why)
        self._last = why
        if job.summary is None:
            job.summary = {"status": "error", "message": why}
        self._signal(job, signal.SIGKILL)

    def _finish(self, job: _Job) -> None:
        """The job's pipe closed: reap the child and act on its summary."""
        try:
            code = job.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._signal(job, signal.SIGKILL)
            code = job.proc.wait()
        if job.proc.stdout is not None:
            job.proc.stdout.close()
        self._job = None
        summary = job.summary or {
            "status": "error",
            "message": f"{job.kind} job died ({_exit_text(code)}) before reporting a result",
        }
        self._after_job(job.kind, summary, checked=job.checked, logged=job.check_message)

    def _after_job(
        self,
        kind: str,
        summary: Mapping[str, Any],
        *,
        checked: bool,
        logged: str | None = None,
    ) -> None:
        """Act on a job's end; ``logged`` is its check's message, already in the log."""
        status, message = summary.get("status"), str(summary.get("message", ""))
        now = self.clock()
        stopping = self._stop is not None and self._stop.is_set()
        if kind in ("check", "update"):
            self._last_check_at = now
            self._next_check_at = now + self.config.schedule.check_interval_s
            if not checked and status != "busy" and not stopping:
                self.metrics.record_check("error")  # died before its check said anything
            self._save_schedule()
        if status == "busy":
            if kind in ("update", "probation"):
                self._retry.add(kind)
                log.warning("%s skipped: %s (retried at the next check)", kind, message)
            else:  # the holder recovers itself, and every locked job starts with recovery
                log.warning("%s skipped: %s", kind, message)
            self._last = f"{kind} skipped, lock busy: {message}"
            return
        if status != "ok":
            hint = summary.get("hint")
            level = logging.INFO if stopping else logging.ERROR
            log.log(level, "%s failed: %s%s", kind, message, f" (hint: {hint})" if hint else "")
            if not stopping:  # a job cut short by our own stop is no error of the job
                self.metrics.record_job_error(kind)
            self._last = f"{kind} failed: {message}"
            return
        if message != logged:  # a check, or an update with nothing offered, said it already
            log.info("%s: %s", kind, message)
        self._last = message if kind != "recover" or message != "nothing to recover" else ""
        if kind in ("recover", "update") or summary.get("outcome") == "committed":
            self._probation_pending = True

    # ----------------------------------------------------------------------- watchdog and sleep
    def _honest(self, mono: float) -> bool:
        return self._job is None or mono <= self._job.lease_until

    def _watchdog(self, mono: float, ready: bool) -> None:
        if not ready and self._honest(mono):
            # Recovery may legitimately take a gate's time: keep the start timeout ahead of it.
            usec = int(max(3 * STARTUP_PASS_S, 2 * (self.watchdog_s or 0)) * 1e6)
            self.notify(f"EXTEND_TIMEOUT_USEC={usec}")
        if self.watchdog_s is None or mono < self._next_ping:
            return
        if self._honest(mono):
            self.notify("WATCHDOG=1")
            self.stats.pings += 1
            self._next_ping = mono + self.watchdog_s / 2

    def _timeout(self, mono: float, ready: bool) -> float:
        candidates = [HEARTBEAT_S]
        if self.watchdog_s is not None and self._honest(mono):
            candidates.append(self._next_ping - mono)
        if not ready:
            candidates.append(STARTUP_PASS_S)
        job = self._job
        if job is not None:
            if mono <= job.lease_until:
                candidates.append(job.lease_until - mono + 0.01)
            else:
                candidates.append(1.0)  # hung: look again soon (kill it without a watchdog)
            if job.stop_deadline is not None:
                candidates.append(job.stop_deadline - mono + 0.01)
        elif ready and (self._stop is None or not self._stop.is_set()):
            now = self.clock()
            candidates.append(self.schedule.planned.at.timestamp() - now + 0.01)
            candidates.append(self._next_check_at - now + 0.01)
        return max(0.0, min(candidates))

    def _wait(self, timeout: float) -> None:
        fds = [self._wake_r]
        if self._job is not None:
            fds.append(self._job.fd)
        if self._stop is not None and self._stop.is_set() and self._job is None:
            return
        readable, _, _ = select.select(fds, [], [], timeout)
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    # ----------------------------------------------------------------------- status
    def _holds_text(self) -> str:
        try:
            holds = self.app.store.holds()
        except (OSError, ValueError, TypeError, KeyError) as e:
            return f"holds unreadable: {e}"
        if holds.frozen_reason:
            return f"updates FROZEN (manual attention needed): {holds.frozen_reason}"
        if holds.paused(self.clock()):
            if holds.paused_until == float("inf"):
                until = "until resumed"
            else:
                until = "until " + self._fmt(
                    datetime.fromtimestamp(holds.paused_until or 0, self.tz)
                )
            reason = f" ({holds.pause_reason})" if holds.pause_reason else ""
            return f"updates paused {until}{reason}"
        return ""

    def _idle_status(self) -> str:
        planned = self.schedule.planned
        what = "update" if self.config.auto else "check (auto = false)"
        parts = [self._holds_text() or "idle", f"next {what} {self._fmt(planned.at)}"]
        if self._last:
            parts.append(f"last: {self._last}")
        return "; ".join(parts)

    def _current_status(self, ready: bool) -> str:
        job = self._job
        if self._stop is not None and self._stop.is_set():
            return "stopping" + (f": waiting for the {job.kind} job" if job else "")
        if job is not None:
            verb = {
                "recover": "recovering",
                "check": f"checking the {self.config.channel} channel",
                "update": "updating",
                "probation": "watching probation",
            }[job.kind]
            if not self._honest(self.monotonic()):
                return f"STUCK: {verb}: {job.doing or 'no progress'}"
            return f"{verb}: {job.doing}" if job.doing else verb
        if not ready:
            return "starting"
        return self._idle_status()

    # ----------------------------------------------------------------------- once
    def run_once(self) -> int:
        """One scheduled cycle in this process (for a timer unit): recover, then update (or only
        check, with ``auto = false`` or outside the window), and exit with the CLI's exit codes."""
        from watchdog_updater.errors import ExitCode

        checked: list[str] = []

        def emit(doc: dict[str, Any]) -> None:
            if doc.get("type") == "event" and doc.get("kind") != "probe":
                log.info("%s", doc.get("message"))
            elif doc.get("type") == "check":
                checked.append(str(doc.get("message")))
                log.info("check: %s", checked[-1])

        recovered = run_job(self.app, "recover", emit)
        if recovered["status"] != "ok":
            log.warning("recovery: %s", recovered["message"])
        elif recovered["message"] != "nothing to recover":
            log.info("recovered: %s", recovered["message"])
        window = self.config.schedule.window
        kind = "update"
        if not self.config.auto:
            log.info("auto = false: checking only")
            kind = "check"
        elif window is not None and not in_window(window, self._now()):
            log.info("outside the maintenance window %s-%s: checking only", window[0], window[1])
            kind = "check"
        summary = run_job(self.app, kind, emit)
        self._write_textfile()
        status = summary["status"]
        if status != "ok" or summary["message"] not in checked[-1:]:  # else the check said it
            log.info("%s: %s", kind, summary["message"])
        if status == "busy":
            return int(ExitCode.BUSY)
        if status != "ok":
            return int(summary.get("exit_code", ExitCode.FAILED))
        return int(summary.get("exit_code", ExitCode.OK))

    def _write_textfile(self) -> None:
        path = self.config.metrics.textfile
        if path is None:
            return
        try:
            from watchdog_updater.metrics import build_registry, write_textfile

            registry, _ = build_registry(self.app.layout, self.config.channel, clock=self.clock)
            write_textfile(path, registry)
        except (OSError, ValueError) as e:
            _error("cannot write the metrics textfile %s: %s", path, e)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
