"""Prometheus metrics: state read at scrape time, plus a few live figures of the daemon.

Two sources, one registry (injected, never the global one):

- :class:`UpdaterCollector` reads the state dir *when scraped*: history, intent record, quarantine,
  holds, channel memory and the ``current``/``previous`` links. Nothing is cached across state
  changes, so the figures are right after a daemon restart and include one-shot CLI runs. A missing
  or corrupt file never fails a scrape: what can be read is emitted, and
  ``hal0_updater_state_read_errors{file}`` says what could not.
- :class:`DaemonMetrics` holds what only the running daemon knows (start time, heartbeat, bytes
  downloaded, checks, next run).

One-shot CLI runs write a node_exporter textfile with :func:`write_textfile`; the daemon serves
HTTP with :func:`serve`. Every metric is documented in docs/metrics.md. This is the only module that
imports ``prometheus_client``; import it lazily so ``update --check`` stays fast.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import os
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import IO, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client import write_to_textfile as _write_to_textfile
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from watchdog_updater.errors import ConfigError
from watchdog_updater.journal import Outcome, Step
from watchdog_updater.layout import Layout
from watchdog_updater.state import StateStore

__all__ = [
    "CHECK_RESULTS",
    "GATE_DURATION_BUCKETS_S",
    "JOB_KINDS",
    "PREFIX",
    "ROLLBACK_REASONS",
    "STATES",
    "UPDATE_DURATION_BUCKETS_S",
    "DaemonMetrics",
    "MetricsServer",
    "UpdaterCollector",
    "build_registry",
    "parse_listen",
    "serve",
    "write_textfile",
]

PREFIX = "hal0_updater_"

# Histogram bounds, seconds (docs/metrics.md). Gate: the default deadline is 120 s, the maximum
# 3600 s. Update: end to end, from the first download byte to commit or finished rollback.
GATE_DURATION_BUCKETS_S: tuple[float, ...] = (
    1,
    2.5,
    5,
    10,
    20,
    30,
    60,
    90,
    120,
    180,
    300,
    600,
    1800,
    3600,
)
UPDATE_DURATION_BUCKETS_S: tuple[float, ...] = (5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)

# ``hal0_updater_state{state}``: idle, every journal step, or unknown (an unreadable intent record).
STATES: tuple[str, ...] = ("idle", *(s.value for s in Step), "unknown")

# ``hal0_updater_rollbacks_total{reason,trigger}``: the combinations that exist, all pre-initialised
# to 0 so that ``increase()`` sees the very first rollback.
ROLLBACK_REASONS: tuple[tuple[str, str], ...] = (
    ("gate_failed", "auto"),  # the new version failed its health gate
    ("restart_failed", "auto"),  # restarting the services on the new version failed
    ("hook_failed", "auto"),  # an activation hook failed; the swap was undone
    ("interrupted", "auto"),  # a crash or power cut after the swap, undone by recovery
    ("other", "auto"),  # an automatic rollback with none of the reasons above
    ("manual", "manual"),  # `update --rollback` by an operator
)
_ROLLBACK_SET = frozenset(ROLLBACK_REASONS)

# ``hal0_updater_checks_total{result}``, set by the daemon after each channel check.
CHECK_RESULTS: tuple[str, ...] = ("available", "up-to-date", "held", "error")

_HEAD_BYTES = 4096  # of history.jsonl, compared between reads to notice a rewrite

# The daemon's kinds of job (each runs in its own child process).
JOB_KINDS: tuple[str, ...] = ("recover", "check", "update", "probation")

# Outcomes that mean an attempted update went wrong (Hal0UpdaterFailingRepeatedly counts them).
_ROLLED_BACK = frozenset({Outcome.ROLLED_BACK, Outcome.ROLLBACK_UNHEALTHY})
# Outcomes of updates that went through swap and gate: their duration is an update's duration.
_TIMED_OUTCOMES = frozenset({Outcome.COMMITTED, Outcome.ROLLED_BACK, Outcome.ROLLBACK_UNHEALTHY})

# Families only a running daemon has; a one-shot textfile leaves them out.
_DAEMON_FAMILIES = frozenset(
    PREFIX + name
    for name in (
        "daemon_start_timestamp_seconds",
        "daemon_heartbeat_timestamp_seconds",
        "bytes_downloaded",
        "checks",
        "job_errors",
        "next_run_timestamp_seconds",
        "auto_updates_enabled",
    )
)

# Everything a malformed state file can raise while being decoded or shaped.
_DECODE_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError)


# --------------------------------------------------------------------------- history summary


def _number(value: object) -> float:
    """A JSON number as float; anything else (bool, str, null, NaN) is malformed."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError("expected a number, got NaN")
    return float(value)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class _Entry:
    """The fields of one history line the metrics use, validated."""

    kind: str
    channel: str
    trigger: str
    outcome: Outcome
    reason: str
    started_at: float
    finished_at: float
    durations_s: Mapping[str, float]
    gate: bool
    details: Mapping[str, Any]

    @classmethod
    def parse(cls, line: bytes) -> _Entry:
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise TypeError("a history line must be a JSON object")
        durations = doc.get("durations_s", {})
        details = doc.get("details", {})
        if not isinstance(durations, dict) or not isinstance(details, dict):
            raise TypeError("durations_s and details must be objects")
        channel = doc.get("channel")
        return cls(
            kind=_text(doc["kind"]),
            channel="unknown" if channel is None else _text(channel),
            trigger=_text(doc["trigger"]),
            outcome=Outcome(doc["outcome"]),
            reason=_text(doc.get("reason", "")),
            started_at=_number(doc["started_at"]),
            finished_at=_number(doc["finished_at"]),
            durations_s={_text(k): _number(v) for k, v in durations.items()},
            gate=bool(doc.get("gate", True)),
            details=details,
        )

    def gates(self) -> list[Mapping[str, Any]]:
        """The gate decisions of this transaction, in the order they ran."""
        return [
            g
            for g in (self.details.get("gate"), self.details.get("rollback_gate"))
            if isinstance(g, dict)
        ]

    def rollbacks(self) -> list[tuple[str, str]]:
        """The (reason, trigger) of each rollback this transaction performed."""
        events: list[tuple[str, str]] = []
        if self.kind == "rollback" and self.outcome is not Outcome.ABORTED:
            events.append(("manual", "manual"))
        if self.outcome in _ROLLED_BACK or self.outcome is Outcome.INTERRUPTED:
            events.append((self._auto_reason(), "auto"))
        elif self.outcome is Outcome.FAILED and "hooks" in self.durations_s:
            events.append(("hook_failed", "auto"))
        return events

    def _auto_reason(self) -> str:
        explicit = self.details.get("rollback_reason")
        if isinstance(explicit, str) and (explicit, "auto") in _ROLLBACK_SET:
            return explicit
        if self.outcome is Outcome.INTERRUPTED or "interrupted by" in self.reason:
            return "interrupted"
        gate = self.details.get("gate")
        if isinstance(gate, dict):
            if gate.get("failed_probe") == "restart":
                return "restart_failed"
            if gate.get("verdict") == "unhealthy":
                return "gate_failed"
        if "failed its health gate" in self.reason:
            return "gate_failed"
        return "other"


@dataclass
class _Histogram:
    """Cumulative bucket counts and the sum of observed values: constant memory however many."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (le, count) buckets, the last one +Inf, and the sum."""
        buckets = [
            (repr(float(b)), float(c)) for b, c in zip(self.bounds, self.counts, strict=True)
        ]
        buckets.append(("+Inf", float(self.n)))
        return buckets, self.total


@dataclass
class _HistorySummary:
    attempts: Tally[tuple[str, str]] = field(default_factory=Tally)
    rollbacks: Tally[tuple[str, str]] = field(default_factory=Tally)
    update_durations: _Histogram = field(
        default_factory=lambda: _Histogram(UPDATE_DURATION_BUCKETS_S)
    )
    gate_durations: _Histogram = field(default_factory=lambda: _Histogram(GATE_DURATION_BUCKETS_S))
    last_success: float | None = None
    last_rollback: float | None = None
    last_gate_at: float | None = None
    last_gate_probes: dict[str, bool] = field(default_factory=dict)
    parse_errors: int = 0

    def add(self, entry: _Entry) -> None:
        if entry.kind == "update":
            self.attempts[(entry.channel, entry.outcome.value)] += 1
            if entry.outcome in _TIMED_OUTCOMES:
                self.update_durations.observe(max(0.0, entry.finished_at - entry.started_at))
            if entry.outcome is Outcome.COMMITTED:
                self.last_success = _latest(self.last_success, entry.finished_at)
        if entry.gate and "gate" in entry.durations_s:
            self.gate_durations.observe(max(0.0, entry.durations_s["gate"]))
        rollbacks = entry.rollbacks()
        for event in rollbacks:
            self.rollbacks[event] += 1
        if rollbacks:
            self.last_rollback = _latest(self.last_rollback, entry.finished_at)
        gates = entry.gates()
        if gates and (self.last_gate_at is None or entry.finished_at >= self.last_gate_at):
            self.last_gate_at = entry.finished_at
            self.last_gate_probes = _probe_results(gates[-1])

    @classmethod
    def parse(cls, raw: bytes) -> _HistorySummary:
        summary = cls()
        summary.feed(io.BytesIO(raw))
        return summary

    def feed(self, stream: IO[bytes]) -> int:
        """Add the complete lines of ``stream``, one at a time; returns the bytes consumed.

        A last line without its newline is being written or was torn by a power cut: not yet an
        error, and not consumed (the next append starts a fresh line, and then it is counted).
        """
        consumed = 0
        for line in stream:
            if not line.endswith(b"\n"):
                break
            consumed += len(line)
            if not line.strip():
                continue
            try:
                entry = _Entry.parse(line)
            except _DECODE_ERRORS:
                self.parse_errors += 1
                continue
            self.add(entry)
        return consumed


def _latest(current: float | None, candidate: float) -> float:
    return candidate if current is None else max(current, candidate)


def _probe_results(gate: Mapping[str, Any]) -> dict[str, bool]:
    """Probe name -> passed, from a gate record: ``GateDecision.to_json()`` keeps the outcome in
    ``probes[].last.outcome``, ``gateplan.decision_to_json()`` also in ``probes[].outcome``."""
    results: dict[str, bool] = {}
    probes = gate.get("probes")
    if not isinstance(probes, list):
        return results
    for probe in probes:
        if not isinstance(probe, dict) or not isinstance(probe.get("probe"), str):
            continue
        last = probe.get("last")
        outcome = probe.get("outcome", last.get("outcome") if isinstance(last, dict) else None)
        results[probe["probe"]] = outcome == "pass"
    return results


# --------------------------------------------------------------------------- the collector


class _Scrape:
    """The families of one scrape, and the per-file read errors met while filling them."""

    def __init__(self) -> None:
        self.families: list[Metric] = []
        self.errors: dict[str, int] = {}

    def gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
        self.families.append(family)
        return family

    def read(self, file: str, reader: Callable[[], Any]) -> Any:
        """``reader()``, or None with an error counted against ``file`` if it fails."""
        self.errors.setdefault(file, 0)
        try:
            return reader()
        except _DECODE_ERRORS:
            self.errors[file] += 1
            return None


class UpdaterCollector(Collector):
    """Reads the updater's state dir at scrape time and yields ``hal0_updater_*`` families.

    ``channel`` is the configured channel: its version and last check are reported, and its update
    counters are pre-initialised. ``clock`` decides whether a pause has expired.
    """

    def __init__(
        self, layout: Layout, channel: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.layout = layout
        self.channel = channel
        self.clock = clock
        self._store = StateStore(layout.state_dir)
        self._lock = threading.Lock()
        # history.jsonl is append-only: read on when its identity, size or mtime changes.
        self._history_key: tuple[int, int, int, int] | None = None
        self._history: _HistorySummary = _HistorySummary()
        self._history_offset = 0  # bytes of history.jsonl already in self._history
        self._history_head = b""  # its first bytes then: an edit in place shows there

    def describe(self) -> Iterable[Metric]:
        """The family names, without reading anything (lets the registry refuse duplicates)."""
        scrape = _Scrape()
        self._emit_all(scrape, read=False)
        return scrape.families

    def collect(self) -> Iterable[Metric]:
        scrape = _Scrape()
        self._emit_all(scrape, read=True)
        return scrape.families

    # ----------------------------------------------------------------------- sections
    def _emit_all(self, scrape: _Scrape, *, read: bool) -> None:
        self._emit_history(scrape, read=read)
        self._emit_transaction(scrape, read=read)
        self._emit_versions(scrape, read=read)
        self._emit_quarantine(scrape, read=read)
        self._emit_holds(scrape, read=read)
        errors = scrape.gauge(
            "state_read_errors",
            "State files that could not be read or decoded in this scrape (0 = fine).",
            ["file"],
        )
        for file, count in sorted(scrape.errors.items()):
            errors.add_metric([file], count)

    def _emit_history(self, scrape: _Scrape, *, read: bool) -> None:
        summary = scrape.read("history.jsonl", self._read_history) if read else None
        attempts = CounterMetricFamily(
            PREFIX + "update_attempts",
            "Finished update transactions by channel and outcome (from history.jsonl).",
            labels=["channel", "outcome"],
        )
        rollbacks = CounterMetricFamily(
            PREFIX + "rollbacks",
            "Rollbacks by reason and trigger (auto or manual), from history.jsonl.",
            labels=["reason", "trigger"],
        )
        update_hist = HistogramMetricFamily(
            PREFIX + "update_duration_seconds",
            "End-to-end duration of updates that reached the gate (committed or rolled back).",
        )
        gate_hist = HistogramMetricFamily(
            PREFIX + "gate_duration_seconds",
            "Duration of the health gate on a newly activated version.",
        )
        parse_errors = CounterMetricFamily(
            PREFIX + "history_parse_errors",
            "Complete lines of history.jsonl that are not a valid history entry.",
        )
        scrape.families += [attempts, rollbacks, update_hist, gate_hist, parse_errors]
        probes = scrape.gauge(
            "probe_last_success",
            "1 if the probe passed in the most recent health gate, else 0.",
            ["probe"],
        )
        last_gate = scrape.gauge("last_gate_timestamp_seconds", "When the last health gate ended.")
        last_success = scrape.gauge(
            "last_success_timestamp_seconds", "When the last update was committed."
        )
        last_rollback = scrape.gauge(
            "last_rollback_timestamp_seconds", "When the last rollback finished."
        )
        if summary is None:
            # Unreadable (or describe()): no samples. Zeros would look like a counter reset, and
            # the next good scrape like a burst of rollbacks.
            return

        tally = Tally({(self.channel, o.value): 0 for o in Outcome})
        tally.update(summary.attempts)
        for (channel, outcome), count in sorted(tally.items()):
            attempts.add_metric([channel, outcome], count)
        tally = Tally(dict.fromkeys(ROLLBACK_REASONS, 0))
        tally.update(summary.rollbacks)
        for (reason, trigger), count in sorted(tally.items()):
            rollbacks.add_metric([reason, trigger], count)
        update_hist.add_metric([], *summary.update_durations.buckets())
        gate_hist.add_metric([], *summary.gate_durations.buckets())
        parse_errors.add_metric([], summary.parse_errors)

        for probe, ok in sorted(summary.last_gate_probes.items()):
            probes.add_metric([probe], 1.0 if ok else 0.0)
        for family, value in (
            (last_gate, summary.last_gate_at),
            (last_success, summary.last_success),
            (last_rollback, summary.last_rollback),
        ):
            if value is not None:
                family.add_metric([], value)

    def _read_history(self) -> _HistorySummary:
        path = self._store.state_dir / "history.jsonl"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return _HistorySummary()
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key == self._history_key:
                return self._history
            known, offset = self._history_key, self._history_offset
            with path.open("rb") as f:
                head = f.read(_HEAD_BYTES)
                rewritten = head[: len(self._history_head)] != self._history_head
                if known is None or known[:2] != key[:2] or stat.st_size < offset or rewritten:
                    # First read, or another file (replaced, truncated, edited): start over.
                    summary, offset = _HistorySummary(), 0
                else:  # a copy: a scrape still emitting the old summary must see it whole
                    summary = copy.deepcopy(self._history)
                # history.jsonl is append-only: read only what was added since the last read,
                # line by line, so neither time nor memory grows with the file.
                f.seek(offset)
                offset += summary.feed(f)
            self._history, self._history_offset, self._history_key = summary, offset, key
            self._history_head = head[:offset]
            return summary

    def _emit_transaction(self, scrape: _Scrape, *, read: bool) -> None:
        in_flight = scrape.gauge(
            "transaction_in_flight", "1 while an intent record (transaction.json) exists."
        )
        state = scrape.gauge("state", "The updater's current step, one-hot.", ["state"])
        step_started = scrape.gauge(
            "transaction_step_started_timestamp_seconds",
            "When the in-flight transaction entered its current step.",
        )
        if not read:
            return
        path = self._store.state_dir / "transaction.json"
        doc = scrape.read("transaction.json", lambda: _read_transaction(path))
        current = "unknown" if doc is None else doc[0]
        in_flight.add_metric([], 0.0 if current == "idle" else 1.0)
        for name in STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        if doc is not None and doc[1] is not None:
            step_started.add_metric([], doc[1])

    def _emit_versions(self, scrape: _Scrape, *, read: bool) -> None:
        layout = self.layout
        for name, link in (("installed", layout.current_link), ("previous", layout.previous_link)):
            family = scrape.gauge(
                f"{name}_version_info",
                f"The version the `{link.name}` link points at (value always 1).",
                ["version"],
            )
            if not read:
                continue
            version = scrape.read(link.name, functools.partial(_link_version, layout, link))
            if version is not None:
                family.add_metric([version], 1.0)

        available = scrape.gauge(
            "available_version_info",
            "The newest verified release on the channel (value always 1).",
            ["version", "channel"],
        )
        release = scrape.gauge(
            "available_release_timestamp_seconds",
            "When the newest release on the channel was signed.",
            ["channel"],
        )
        check = scrape.gauge(
            "last_check_timestamp_seconds",
            "When the channel was last checked successfully.",
            ["channel"],
        )
        if not read:
            return
        memory = scrape.read(f"channels/{self.channel}.json", self._read_channel)
        if memory is not None:
            version, signed_at, accepted_at = memory
            available.add_metric([version, self.channel], 1.0)
            release.add_metric([self.channel], signed_at)
            check.add_metric([self.channel], accepted_at)

    def _read_channel(self) -> tuple[str, float, float] | None:
        memory = self._store.channel_memory(self.channel)
        if memory is None:
            return None
        return _text(memory.version), _number(memory.signed_at), _number(memory.accepted_at)

    def _emit_quarantine(self, scrape: _Scrape, *, read: bool) -> None:
        count = scrape.gauge("quarantined_versions", "How many versions are quarantined.")
        info = scrape.gauge(
            "quarantined_version_info",
            "A quarantined version and the probe that failed (value always 1).",
            ["version", "probe"],
        )
        if not read:
            return
        entries = scrape.read("quarantine.json", self._read_quarantine)
        if entries is None:
            return
        count.add_metric([], len(entries))
        for version, probe in sorted(entries):
            info.add_metric([version, probe], 1.0)

    def _read_quarantine(self) -> list[tuple[str, str]]:
        return [
            (_text(version), _text(entry.failed_probe or "none"))
            for version, entry in self._store.quarantine().items()
        ]

    def _emit_holds(self, scrape: _Scrape, *, read: bool) -> None:
        paused = scrape.gauge("paused", "1 while updates are paused (an expired pause is 0).")
        frozen = scrape.gauge(
            "frozen", "1 while updates are frozen after an unhealthy rollback (manual attention)."
        )
        skipped = scrape.gauge(
            "skipped_version_info",
            "A version an operator chose to skip (value always 1).",
            ["version"],
        )
        if not read:
            return
        holds = scrape.read("holds.json", self._read_holds)
        if holds is None:
            return
        is_paused, is_frozen, skipped_versions = holds
        paused.add_metric([], 1.0 if is_paused else 0.0)
        frozen.add_metric([], 1.0 if is_frozen else 0.0)
        for version in sorted(set(skipped_versions)):
            skipped.add_metric([version], 1.0)

    def _read_holds(self) -> tuple[bool, bool, list[str]]:
        holds = self._store.holds()
        if holds.paused_until is not None:
            _number(holds.paused_until)
        is_frozen = holds.frozen_reason is not None or holds.frozen_at is not None
        return holds.paused(self.clock()), is_frozen, [_text(v) for v in holds.skipped]


def _read_transaction(path: Path) -> tuple[str, float | None]:
    """("idle", None) without an intent record, else (step, step_started_at)."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return "idle", None
    if not isinstance(doc, dict):
        raise TypeError("transaction.json must be a JSON object")
    step = Step(doc["step"]).value
    started = doc.get("step_started_at")
    return step, None if started is None else _number(started)


def _link_version(layout: Layout, link: Path) -> str | None:
    """The version a link points at; None when the link does not exist."""
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    version = layout.version_of_dir(layout.resolve_link_target(target))
    if version is None:
        raise ValueError(f"{link} points outside the version dirs: {target}")
    return version


# --------------------------------------------------------------------------- daemon metrics


class DaemonMetrics:
    """Live figures of the running daemon, registered on ``registry``."""

    def __init__(
        self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self.start_timestamp = Gauge(
            PREFIX + "daemon_start_timestamp_seconds",
            "When the daemon started.",
            registry=registry,
        )
        self.heartbeat_timestamp = Gauge(
            PREFIX + "daemon_heartbeat_timestamp_seconds",
            "Last pass of the daemon's main loop (stale = wedged daemon).",
            registry=registry,
        )
        self.bytes_downloaded = Counter(
            PREFIX + "bytes_downloaded",
            "Release bytes downloaded by this daemon process.",
            registry=registry,
        )
        self.checks = Counter(
            PREFIX + "checks",
            "Channel checks by this daemon process, by result.",
            ["result"],
            registry=registry,
        )
        self.job_errors = Counter(
            PREFIX + "job_errors",
            "Jobs of this daemon process that ended in an error (not a busy lock), by job.",
            ["job"],
            registry=registry,
        )
        self.next_run_timestamp = Gauge(
            PREFIX + "next_run_timestamp_seconds",
            "When the next scheduled update run starts (0: none scheduled).",
            registry=registry,
        )
        self.auto_updates_enabled = Gauge(
            PREFIX + "auto_updates_enabled",
            "1 if scheduled runs install updates, 0 if they only check.",
            registry=registry,
        )
        for result in CHECK_RESULTS:
            self.checks.labels(result=result)
        for kind in JOB_KINDS:  # zeros from the start: rate() and increase() need them
            self.job_errors.labels(job=kind)
        self.start_timestamp.set(clock())

    def heartbeat(self) -> None:
        """Call from every pass of the main loop."""
        self.heartbeat_timestamp.set(self._clock())

    def add_downloaded(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError("downloaded byte counts only grow")
        self.bytes_downloaded.inc(nbytes)

    def record_check(self, result: str) -> None:
        """Count one channel check; ``result`` is one of :data:`CHECK_RESULTS`."""
        if result not in CHECK_RESULTS:
            raise ValueError(f"unknown check result {result!r} (expected one of {CHECK_RESULTS})")
        self.checks.labels(result=result).inc()

    def record_job_error(self, kind: str) -> None:
        """Count a job that ended in an error; ``kind`` is one of :data:`JOB_KINDS`."""
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job {kind!r} (expected one of {JOB_KINDS})")
        self.job_errors.labels(job=kind).inc()

    def set_next_run(self, timestamp: float | None) -> None:
        self.next_run_timestamp.set(0.0 if timestamp is None else timestamp)

    def set_auto_updates(self, enabled: bool) -> None:
        self.auto_updates_enabled.set(1.0 if enabled else 0.0)


# --------------------------------------------------------------------------- wiring


def build_registry(
    layout: Layout, channel: str, clock: Callable[[], float] = time.time
) -> tuple[CollectorRegistry, DaemonMetrics]:
    """A fresh registry with the state collector and the daemon's live metrics."""
    registry = CollectorRegistry()
    registry.register(UpdaterCollector(layout, channel, clock=clock))
    return registry, DaemonMetrics(registry, clock=clock)


class _WithoutDaemonFamilies(Collector):
    def __init__(self, registry: Collector) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.name not in _DAEMON_FAMILIES:
                yield family


def write_textfile(path: Path | str, registry: Collector) -> None:
    """Write a node_exporter textfile (name it ``*.prom``) atomically: temp file, then rename.

    The daemon-only families (heartbeat, start time, downloads, checks, next run) are left out: a
    one-shot run has none of them, and zeros would read as a dead daemon.
    """
    _write_to_textfile(os.fspath(path), _WithoutDaemonFamilies(registry))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not news: no line on stderr per request."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper never holds the daemon's exit


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """A running metrics HTTP server; call it (or :meth:`stop`) to stop it.

    The serving thread blocks in poll(2) with no timeout, so an idle daemon has no periodic
    wake-ups (prometheus_client's own server polls twice a second). :meth:`stop` wakes it by
    shutting the listening socket down.
    """

    def __init__(self, registry: Collector, host: str, port: int) -> None:
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        self._server = make_server(
            host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": None},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()
        self._stopped = False
        address = self._server.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        # shutdown() asks the loop to end and waits for it; the loop only looks once poll(2)
        # returns, which a shut-down listening socket makes it do at once.
        stopper = threading.Thread(target=self._server.shutdown, daemon=True)
        stopper.start()
        deadline = time.monotonic() + timeout_s
        while stopper.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self._server.socket.shutdown(socket.SHUT_RDWR)
            stopper.join(0.05)
        self._server.server_close()
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def __call__(self) -> None:
        self.stop()


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9877"``, ``"[::1]:9877"`` or ``":9877"`` (all addresses) -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"metrics listen address {listen!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"metrics listen address {listen!r}: write IPv6 hosts as [addr]:port")
    return host or "0.0.0.0", int(port_text)  # noqa: S104 - ":port" asks for all addresses


def serve(registry: Collector, listen: str) -> MetricsServer:
    """Serve ``registry`` on ``listen`` ("host:port"; port 0 picks a free one) in a thread."""
    host, port = parse_listen(listen)
    try:
        return MetricsServer(registry, host, port)
    except OSError as e:
        raise ConfigError(
            f"cannot serve metrics on {listen}: {e.strerror or e}",
            hint="pick another [update.metrics] listen address, or stop what holds the port",
        ) from e
