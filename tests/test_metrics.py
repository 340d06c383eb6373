"""Metrics read from the state dir at scrape time, the daemon's live metrics, textfile and HTTP."""

from __future__ import annotations

import itertools
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from watchdog_updater.errors import ConfigError
from watchdog_updater.health.policy import (
    GateDecision,
    ProbeOutcome,
    ProbeResult,
    ProbeSummary,
    Verdict,
)
from watchdog_updater.journal import HistoryEntry, Journal, Outcome, Step
from watchdog_updater.layout import Layout
from watchdog_updater.metrics import (
    GATE_DURATION_BUCKETS_S,
    ROLLBACK_REASONS,
    STATES,
    UPDATE_DURATION_BUCKETS_S,
    DaemonMetrics,
    UpdaterCollector,
    build_registry,
    parse_listen,
    serve,
    write_textfile,
)
from watchdog_updater.state import ChannelMemory, Holds, QuarantineEntry, StateStore
from watchdog_updater.storage import atomic_write_json

NOW = 1_700_000_000.0
DAY = 86_400.0
DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


# --------------------------------------------------------------------------- building a state dir


def gate(
    verdict: Verdict, probes: Mapping[str, bool], *, failed: str | None = None
) -> GateDecision:
    """A real gate decision: each probe's last result passed or failed."""
    summaries = tuple(
        ProbeSummary(
            probe=name,
            passes=1 if ok else 0,
            failures=0 if ok else 1,
            last=ProbeResult(
                probe=name,
                outcome=ProbeOutcome.PASS if ok else ProbeOutcome.FAIL,
                detail="ok" if ok else "HTTP 503",
                at_s=1.0,
                duration_s=0.1,
            ),
        )
        for name, ok in probes.items()
    )
    return GateDecision(verdict, f"{verdict.value}", failed, summaries, 5.0)


def flat_json(decision: GateDecision) -> dict[str, Any]:
    """The older record shape, with each probe's outcome also at the top of its summary."""
    doc = decision.to_json()
    for probe in doc["probes"]:
        probe["outcome"] = probe["last"]["outcome"] if probe["last"] else "none"
        del probe["last"]
    return doc


def restart_failure(evidence: str) -> GateDecision:
    result = ProbeResult("restart", ProbeOutcome.FATAL, evidence, at_s=0.0, duration_s=0.0)
    return GateDecision.immediate_failure(result)


HEALTHY = gate(Verdict.HEALTHY, {"hal0-api": True, "hal0-api.service": True})
UNHEALTHY = gate(
    Verdict.UNHEALTHY, {"hal0-api": False, "hal0-api.service": True}, failed="hal0-api"
)


def entry(
    *,
    kind: str = "update",
    outcome: Outcome,
    finished_at: float,
    took_s: float = 60.0,
    from_version: str | None = "1.0.0",
    to_version: str = "1.1.0",
    channel: str | None = "stable",
    trigger: str = "schedule",
    reason: str = "",
    durations_s: Mapping[str, float] | None = None,
    details: Mapping[str, Any] | None = None,
) -> HistoryEntry:
    return HistoryEntry(
        txid=f"tx{finished_at:.0f}",
        kind=kind,
        from_version=from_version,
        to_version=to_version,
        channel=channel if kind == "update" else None,
        trigger=trigger,
        outcome=outcome,
        reason=reason or outcome.value,
        started_at=finished_at - took_s,
        finished_at=finished_at,
        durations_s=dict(durations_s or {}),
        details=dict(details or {}),
    )


def history_line(item: HistoryEntry | str) -> str:
    """One line as Journal.finish writes it (append_json_line), or raw text."""
    if isinstance(item, str):
        return item + "\n"
    return json.dumps(item.to_json(), sort_keys=True, separators=(",", ":")) + "\n"


def write_history(layout: Layout, items: Iterable[HistoryEntry | str], tail: str = "") -> None:
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(history_line(i) for i in items) + tail
    (layout.state_dir / "history.jsonl").write_text(text)


def point(layout: Layout, link: Path, version: str) -> None:
    layout.version_dir(version).mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(layout.link_target_for(version))


# The populated scenario, oldest first. Comments give what each entry adds to the metrics.
E1_COMMIT = entry(  # committed: update 200 s, gate 42 s
    outcome=Outcome.COMMITTED,
    finished_at=NOW - 5 * DAY,
    took_s=200.0,
    durations_s={"fetch": 20, "stage": 5, "swap": 0.1, "restart": 3, "gate": 42, "commit": 0.5},
    details={"gate": HEALTHY.to_json()},
)
E2_GATE_FAILED = entry(  # rolled back (gate_failed, auto): update 400 s, gate 120 s
    outcome=Outcome.ROLLED_BACK,
    finished_at=NOW - 3 * DAY,
    took_s=400.0,
    from_version="1.1.0",
    to_version="1.2.0",
    reason="1.2.0 failed its health gate: hal0-api failed",
    durations_s={"fetch": 30, "swap": 0.1, "restart": 3, "gate": 120, "rollback-gate": 20},
    details={"gate": flat_json(UNHEALTHY), "rollback_gate": flat_json(HEALTHY)},
)
E3_FETCH_FAILED = entry(  # failed before the swap: not timed, not a rollback
    outcome=Outcome.FAILED,
    finished_at=NOW - 2 * DAY,
    took_s=3.0,
    from_version="1.1.0",
    to_version="1.2.1",
    trigger="cli",
    reason="download failed: connection reset",
    durations_s={"fetch": 3},
)
E4_HOOK_FAILED = entry(  # failed in the hooks: a rollback (hook_failed, auto)
    outcome=Outcome.FAILED,
    finished_at=NOW - 1 * DAY,
    from_version="1.1.0",
    to_version="1.2.1",
    reason="hook migrate exited 1",
    durations_s={"fetch": 30, "stage": 5, "promote": 0.1, "swap": 0.1, "hooks": 2},
)
E5_MANUAL = entry(  # manual rollback (manual, manual), gate 8 s; the most recent gate
    kind="rollback",
    outcome=Outcome.COMMITTED,
    finished_at=NOW - DAY / 2,
    from_version="1.1.0",
    to_version="1.0.0",
    trigger="cli",
    durations_s={"swap": 0.1, "restart": 2, "gate": 8, "commit": 0.1},
    details={"gate": HEALTHY.to_json()},
)


def populate_state(layout: Layout, now: float = NOW) -> None:
    """A state dir with something in every metric (shared with the real-Prometheus test)."""
    shift = now - NOW
    items: list[HistoryEntry | str] = [
        E1_COMMIT,
        E2_GATE_FAILED,
        "not json at all",
        E3_FETCH_FAILED,
    ]
    items += ['{"kind": "update", "outcome": "exploded"}', E4_HOOK_FAILED, E5_MANUAL]
    if shift:
        items = [_shifted(i, shift) for i in items]
    write_history(layout, items, tail='{"kind": "upd')  # a torn last line (power cut)

    store = StateStore(layout.state_dir)
    store.add_quarantine(
        QuarantineEntry(
            "1.2.0", "ab" * 32, "hal0-api", "hal0-api failed", "fail: 503", now - 3 * DAY
        )
    )
    store.save_holds(
        Holds(paused_until=now + 3600, pause_reason="change freeze", skipped=("1.1.5",))
    )
    store.remember_channel(
        "stable", ChannelMemory("1.2.1", "cd" * 32, signed_at=now - 4 * DAY, accepted_at=now - 600)
    )
    atomic_write_json(
        layout.state_dir / "transaction.json",
        {"txid": "tx-live", "kind": "update", "step": "gate", "step_started_at": now - 30},
    )
    point(layout, layout.current_link, "1.1.0")
    point(layout, layout.previous_link, "1.0.0")


def _shifted(item: HistoryEntry | str, shift: float) -> HistoryEntry | str:
    if isinstance(item, str):
        return item
    doc = item.to_json()
    doc["started_at"] += shift
    doc["finished_at"] += shift
    return HistoryEntry(**doc)


# --------------------------------------------------------------------------- scraping


@dataclass
class Scrape:
    """Samples of one scrape, parsed back from the exposition text like Prometheus would."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]
    text: str

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def __call__(self, name: str, **labels: str) -> float:
        value = self.get(name, **labels)
        assert value is not None, f"no sample {name}{labels}"
        return value

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for labels in self.series(name)}


def scrape(registry: CollectorRegistry) -> Scrape:
    text = generate_latest(registry).decode()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return Scrape(samples, types, text)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "root")


def collector_registry(
    layout: Layout, clock: Callable[[], float] = lambda: NOW
) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(UpdaterCollector(layout, "stable", clock=clock))
    return registry


# --------------------------------------------------------------------------- the collector


def test_populated_state_dir_reads_into_every_metric(layout: Layout) -> None:
    populate_state(layout)
    m = scrape(collector_registry(layout))

    attempts = "hal0_updater_update_attempts_total"
    assert m(attempts, channel="stable", outcome="committed") == 1
    assert m(attempts, channel="stable", outcome="rolled-back") == 1
    assert m(attempts, channel="stable", outcome="failed") == 2
    for outcome in ("rollback-unhealthy", "aborted", "interrupted"):
        assert m(attempts, channel="stable", outcome=outcome) == 0
    assert m.types["hal0_updater_update_attempts"] == "counter"

    rollbacks = "hal0_updater_rollbacks_total"
    assert m(rollbacks, reason="gate_failed", trigger="auto") == 1
    assert m(rollbacks, reason="hook_failed", trigger="auto") == 1
    assert m(rollbacks, reason="manual", trigger="manual") == 1
    assert sum(m.series(rollbacks).values()) == 3
    assert len(m.series(rollbacks)) == len(ROLLBACK_REASONS)

    # Update durations: E1 200 s and E2 400 s (E3, E4 never reached the gate).
    assert m("hal0_updater_update_duration_seconds_count") == 2
    assert m("hal0_updater_update_duration_seconds_sum") == 600
    assert m("hal0_updater_update_duration_seconds_bucket", le="120.0") == 0
    assert m("hal0_updater_update_duration_seconds_bucket", le="300.0") == 1
    assert m("hal0_updater_update_duration_seconds_bucket", le="600.0") == 2
    assert m("hal0_updater_update_duration_seconds_bucket", le="+Inf") == 2
    # Gate durations: 42 s, 120 s and 8 s (the manual rollback's gate).
    assert m("hal0_updater_gate_duration_seconds_count") == 3
    assert m("hal0_updater_gate_duration_seconds_sum") == 170
    assert m("hal0_updater_gate_duration_seconds_bucket", le="5.0") == 0
    assert m("hal0_updater_gate_duration_seconds_bucket", le="10.0") == 1
    assert m("hal0_updater_gate_duration_seconds_bucket", le="60.0") == 2
    assert m("hal0_updater_gate_duration_seconds_bucket", le="120.0") == 3
    assert m.types["hal0_updater_gate_duration_seconds"] == "histogram"

    assert m("hal0_updater_probe_last_success", probe="hal0-api") == 1
    assert m("hal0_updater_probe_last_success", probe="hal0-api.service") == 1
    assert m("hal0_updater_last_gate_timestamp_seconds") == E5_MANUAL.finished_at
    assert m("hal0_updater_last_success_timestamp_seconds") == E1_COMMIT.finished_at
    assert m("hal0_updater_last_rollback_timestamp_seconds") == E5_MANUAL.finished_at
    # Two bad complete lines; the torn last line is not (yet) counted.
    assert m("hal0_updater_history_parse_errors_total") == 2

    assert m.series("hal0_updater_installed_version_info") == {frozenset({("version", "1.1.0")}): 1}
    assert m.series("hal0_updater_previous_version_info") == {frozenset({("version", "1.0.0")}): 1}
    assert m("hal0_updater_available_version_info", version="1.2.1", channel="stable") == 1
    assert m("hal0_updater_available_release_timestamp_seconds", channel="stable") == NOW - 4 * DAY
    assert m("hal0_updater_last_check_timestamp_seconds", channel="stable") == NOW - 600

    assert m("hal0_updater_quarantined_versions") == 1
    assert m("hal0_updater_quarantined_version_info", version="1.2.0", probe="hal0-api") == 1
    assert m("hal0_updater_paused") == 1
    assert m("hal0_updater_frozen") == 0
    assert m("hal0_updater_skipped_version_info", version="1.1.5") == 1

    assert m("hal0_updater_transaction_in_flight") == 1
    assert m("hal0_updater_transaction_step_started_timestamp_seconds") == NOW - 30
    assert {dict(k)["state"]: v for k, v in m.series("hal0_updater_state").items()} == {
        s: (1.0 if s == "gate" else 0.0) for s in STATES
    }
    errors = m.series("hal0_updater_state_read_errors")
    assert set(m.label_values("hal0_updater_state_read_errors", "file")) == {
        "history.jsonl",
        "transaction.json",
        "current",
        "previous",
        "channels/stable.json",
        "quarantine.json",
        "holds.json",
    }
    assert set(errors.values()) == {0}


def test_empty_state_dir_scrapes_idle_with_pre_initialised_counters(layout: Layout) -> None:
    m = scrape(collector_registry(layout))  # nothing exists, not even the root

    assert m("hal0_updater_state", state="idle") == 1
    assert sum(m.series("hal0_updater_state").values()) == 1
    assert m("hal0_updater_transaction_in_flight") == 0
    # Counters exist at 0 from the first scrape, so increase() sees the very first event.
    assert len(m.series("hal0_updater_update_attempts_total")) == len(Outcome)
    assert set(m.series("hal0_updater_update_attempts_total").values()) == {0}
    assert set(m.series("hal0_updater_rollbacks_total").values()) == {0}
    assert m("hal0_updater_gate_duration_seconds_count") == 0
    assert m("hal0_updater_history_parse_errors_total") == 0
    assert m("hal0_updater_quarantined_versions") == 0
    assert m("hal0_updater_paused") == 0
    assert m("hal0_updater_frozen") == 0
    assert set(m.series("hal0_updater_state_read_errors").values()) == {0}
    for absent in (
        "hal0_updater_installed_version_info",
        "hal0_updater_available_version_info",
        "hal0_updater_last_check_timestamp_seconds",
        "hal0_updater_last_success_timestamp_seconds",
        "hal0_updater_last_rollback_timestamp_seconds",
        "hal0_updater_probe_last_success",
    ):
        assert not m.series(absent), absent


def _corrupt_history(layout: Layout) -> None:
    path = layout.state_dir / "history.jsonl"
    path.unlink()
    path.mkdir()  # reading it fails with EISDIR


CORRUPTIONS: dict[str, Callable[[Layout], None]] = {
    "history.jsonl": _corrupt_history,
    "transaction.json": lambda lay: (lay.state_dir / "transaction.json").write_text('{"step": '),
    "quarantine.json": lambda lay: (lay.state_dir / "quarantine.json").write_text("[1, 2]"),
    "holds.json": lambda lay: (lay.state_dir / "holds.json").write_text('{"paused_until": "soon"}'),
    "channels/stable.json": lambda lay: (lay.state_dir / "channels/stable.json").write_text(
        '{"version": "1.2.1", "manifest_sha256": "x", "signed_at": "yesterday", "accepted_at": 1}'
    ),
    "current": lambda lay: (lay.current_link.unlink(), lay.current_link.write_text("x")),
    "previous": lambda lay: (
        lay.previous_link.unlink(),
        lay.previous_link.symlink_to("/somewhere/else"),
    ),
}

# The families each file feeds (by name prefix): gone when that file cannot be read.
CONTRIBUTES: dict[str, tuple[str, ...]] = {
    "history.jsonl": (
        "hal0_updater_update_attempts",
        "hal0_updater_rollbacks",
        "hal0_updater_update_duration_seconds",
        "hal0_updater_gate_duration_seconds",
        "hal0_updater_history_parse_errors",
        "hal0_updater_probe_last_success",
        "hal0_updater_last_gate_timestamp_seconds",
        "hal0_updater_last_success_timestamp_seconds",
        "hal0_updater_last_rollback_timestamp_seconds",
    ),
    "transaction.json": ("hal0_updater_transaction_step_started_timestamp_seconds",),
    "quarantine.json": ("hal0_updater_quarantined_version",),
    "holds.json": ("hal0_updater_paused", "hal0_updater_frozen", "hal0_updater_skipped_version"),
    "channels/stable.json": (
        "hal0_updater_available_",
        "hal0_updater_last_check_timestamp_seconds",
    ),
    "current": ("hal0_updater_installed_version_info",),
    "previous": ("hal0_updater_previous_version_info",),
}


@pytest.mark.parametrize("broken", sorted(CORRUPTIONS))
def test_a_corrupt_file_is_reported_and_everything_else_still_scraped(
    layout: Layout, broken: str
) -> None:
    populate_state(layout)
    healthy = scrape(collector_registry(layout))
    CORRUPTIONS[broken](layout)

    m = scrape(collector_registry(layout))

    for file, value in m.series("hal0_updater_state_read_errors").items():
        assert value == (1 if dict(file)["file"] == broken else 0), dict(file)
    gone = CONTRIBUTES[broken]
    assert not [name for (name, _) in m.samples if name.startswith(gone)]
    assert [name for (name, _) in healthy.samples if name.startswith(gone)]
    for (name, labels), value in healthy.samples.items():
        if name.startswith(gone) or name == "hal0_updater_state_read_errors":
            continue
        if broken == "transaction.json" and name in (
            "hal0_updater_state",
            "hal0_updater_transaction_in_flight",
        ):
            continue
        assert m.get(name, **dict(labels)) == value, (name, dict(labels))
    if broken == "transaction.json":
        assert m("hal0_updater_state", state="unknown") == 1
        assert sum(m.series("hal0_updater_state").values()) == 1
        assert m("hal0_updater_transaction_in_flight") == 1


def test_every_file_corrupt_at_once_still_scrapes(layout: Layout) -> None:
    populate_state(layout)
    for corrupt in CORRUPTIONS.values():
        corrupt(layout)
    m = scrape(collector_registry(layout))
    assert set(m.series("hal0_updater_state_read_errors").values()) == {1}
    assert m("hal0_updater_state", state="unknown") == 1


def test_malformed_history_lines_are_counted_not_fatal(layout: Layout) -> None:
    good = history_line(E1_COMMIT).strip()
    write_history(
        layout,
        [
            good,
            "[]",
            "{}",
            '{"kind": "update", "trigger": "cli", "outcome": "committed"}',  # no timestamps
            good.replace('"finished_at":', '"finished_at":"soon","x":'),
            good.replace('"durations_s":{', '"durations_s":{"hooks":"slow",'),
            good.replace('"started_at":', '"started_at":NaN,"x":'),
            "\xff\xfe not utf-8",
            "",
            good,
        ],
    )
    m = scrape(collector_registry(layout))
    assert m("hal0_updater_history_parse_errors_total") == 7
    assert m("hal0_updater_update_attempts_total", channel="stable", outcome="committed") == 2


def test_pause_expiry_is_respected_at_scrape_time(layout: Layout) -> None:
    store = StateStore(layout.state_dir)
    clock = [NOW]
    registry = collector_registry(layout, clock=lambda: clock[0])

    store.save_holds(Holds(paused_until=NOW + 60))
    assert scrape(registry)("hal0_updater_paused") == 1
    clock[0] = NOW + 61
    assert scrape(registry)("hal0_updater_paused") == 0
    store.save_holds(Holds(paused_until=float("inf")))
    assert scrape(registry)("hal0_updater_paused") == 1


def test_rollback_unhealthy_freezes_and_shows_the_failing_probe(layout: Layout) -> None:
    old_unhealthy = gate(
        Verdict.UNHEALTHY, {"hal0-api": False, "hal0-api.service": True}, failed="hal0-api"
    )
    write_history(
        layout,
        [
            entry(
                outcome=Outcome.ROLLBACK_UNHEALTHY,
                finished_at=NOW - 60,
                reason="manual attention needed: 1.1.0 failed its health gate: hal0-api; ...",
                durations_s={"gate": 30, "rollback-gate": 30},
                details={"gate": UNHEALTHY.to_json(), "rollback_gate": old_unhealthy.to_json()},
            )
        ],
    )
    StateStore(layout.state_dir).save_holds(Holds(frozen_reason="manual attention", frozen_at=NOW))

    m = scrape(collector_registry(layout))
    assert m("hal0_updater_frozen") == 1
    assert m("hal0_updater_paused") == 0
    assert (
        m("hal0_updater_update_attempts_total", channel="stable", outcome="rollback-unhealthy") == 1
    )
    assert m("hal0_updater_rollbacks_total", reason="gate_failed", trigger="auto") == 1
    assert m("hal0_updater_probe_last_success", probe="hal0-api") == 0
    assert m("hal0_updater_probe_last_success", probe="hal0-api.service") == 1
    assert m("hal0_updater_last_rollback_timestamp_seconds") == NOW - 60
    assert m.get("hal0_updater_last_success_timestamp_seconds") is None


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        pytest.param(
            entry(
                outcome=Outcome.ROLLED_BACK,
                finished_at=NOW,
                reason="interrupted by a power cut or reboot at step restart",
                details={"gate": None, "rollback_gate": HEALTHY.to_json()},
            ),
            {("interrupted", "auto"): 1},
            id="power-cut-after-swap",
        ),
        pytest.param(
            entry(outcome=Outcome.INTERRUPTED, finished_at=NOW),
            {("interrupted", "auto"): 1},
            id="interrupted-outcome",
        ),
        pytest.param(
            entry(
                outcome=Outcome.ROLLED_BACK,
                finished_at=NOW,
                reason="1.1.0 failed its health gate: restart failed",
                details={"gate": restart_failure("exit 1").to_json()},
            ),
            {("restart_failed", "auto"): 1},
            id="restart-failed",
        ),
        pytest.param(
            entry(
                kind="rollback",
                outcome=Outcome.ROLLED_BACK,
                finished_at=NOW,
                reason="1.0.0 failed its health gate: hal0-api",
                details={"gate": UNHEALTHY.to_json(), "rollback_gate": HEALTHY.to_json()},
            ),
            {("manual", "manual"): 1, ("gate_failed", "auto"): 1},
            id="manual-rollback-that-failed-its-gate",
        ),
        pytest.param(
            entry(
                outcome=Outcome.ROLLED_BACK,
                finished_at=NOW,
                reason="something new",
                details={"rollback_reason": "hook_failed"},
            ),
            {("hook_failed", "auto"): 1},
            id="explicit-reason-wins",
        ),
        pytest.param(
            entry(outcome=Outcome.ROLLED_BACK, finished_at=NOW, reason="something new"),
            {("other", "auto"): 1},
            id="unknown-reason",
        ),
        pytest.param(
            entry(outcome=Outcome.ABORTED, finished_at=NOW, durations_s={"fetch": 1, "stage": 2}),
            {},
            id="aborted-before-swap-is-no-rollback",
        ),
    ],
)
def test_rollback_reasons(
    layout: Layout, history: HistoryEntry, expected: dict[tuple[str, str], int]
) -> None:
    write_history(layout, [history])
    m = scrape(collector_registry(layout))
    got = {
        (dict(k)["reason"], dict(k)["trigger"]): v
        for k, v in m.series("hal0_updater_rollbacks_total").items()
        if v
    }
    assert got == expected


def test_history_written_by_the_real_journal_is_counted(layout: Layout) -> None:
    clock = [NOW]
    journal = Journal(layout.state_dir, boot_id="boot-1", clock=lambda: clock[0])
    registry = collector_registry(layout)

    tx = journal.begin(
        kind="update",
        from_version="1.0.0",
        to_version="1.1.0",
        channel="stable",
        trigger="schedule",
        step=Step.FETCH,
    )
    m = scrape(registry)
    assert m("hal0_updater_state", state="fetch") == 1
    assert m("hal0_updater_transaction_in_flight") == 1
    for step, seconds in ((Step.SWAP, 30.0), (Step.RESTART, 1.0), (Step.GATE, 2.0)):
        clock[0] += seconds
        tx = journal.advance(tx, step)
    clock[0] += 45.0
    assert scrape(registry)("hal0_updater_state", state="gate") == 1
    tx = journal.advance(tx, Step.COMMIT)
    journal.finish(tx, Outcome.COMMITTED, "1.1.0 passed", {"gate": HEALTHY.to_json()})

    m = scrape(registry)
    assert m("hal0_updater_state", state="idle") == 1
    assert m("hal0_updater_transaction_in_flight") == 0
    assert m("hal0_updater_update_attempts_total", channel="stable", outcome="committed") == 1
    assert m("hal0_updater_gate_duration_seconds_sum") == 45
    assert m("hal0_updater_update_duration_seconds_sum") == 78
    assert m("hal0_updater_last_success_timestamp_seconds") == clock[0]


def test_every_scrape_reads_current_state(layout: Layout) -> None:
    """No staleness: appends, link swaps and new quarantine entries show on the next scrape."""
    registry = collector_registry(layout)
    write_history(layout, [E1_COMMIT])
    point(layout, layout.current_link, "1.0.0")
    m = scrape(registry)
    assert m("hal0_updater_update_attempts_total", channel="stable", outcome="committed") == 1
    assert m.label_values("hal0_updater_installed_version_info", "version") == {"1.0.0"}

    with (layout.state_dir / "history.jsonl").open("a") as f:
        f.write(history_line(E2_GATE_FAILED))
    point(layout, layout.current_link, "1.1.0")
    StateStore(layout.state_dir).add_quarantine(
        QuarantineEntry("1.2.0", None, None, "restart failed", "exit 1", NOW)
    )
    m = scrape(registry)
    assert m("hal0_updater_update_attempts_total", channel="stable", outcome="rolled-back") == 1
    assert m.label_values("hal0_updater_installed_version_info", "version") == {"1.1.0"}
    assert m("hal0_updater_quarantined_version_info", version="1.2.0", probe="none") == 1

    # A history rewritten in place (say, trimmed by an operator) is re-read too.
    write_history(layout, [E1_COMMIT])
    m = scrape(registry)
    assert m("hal0_updater_update_attempts_total", channel="stable", outcome="rolled-back") == 0


def test_history_read_piece_by_piece_matches_a_full_read(layout: Layout) -> None:
    """Appends are read incrementally (only the new bytes, line by line): whatever the pieces,
    including a line torn mid-write and completed later, a long-lived collector reports exactly
    what a fresh one reading the whole file does."""
    registry = collector_registry(layout)
    history = layout.state_dir / "history.jsonl"
    write_history(layout, [])
    text = "".join(history_line(e) for e in (E1_COMMIT, E2_GATE_FAILED, E3_FETCH_FAILED))
    text += "not json\n" + "".join(history_line(e) for e in (E4_HOOK_FAILED, E5_MANUAL))
    cuts = sorted({0, 10, 400, 401, len(history_line(E1_COMMIT)), len(text) - 7, len(text)})

    def families(m: Scrape) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        wanted = ("update_attempts", "rollbacks", "duration_seconds", "history_parse_errors")
        return {k: v for k, v in m.samples.items() if any(w in k[0] for w in wanted)}

    for start, end in itertools.pairwise(cuts):
        with history.open("a") as f:
            f.write(text[start:end])
        assert families(scrape(registry)) == families(scrape(collector_registry(layout)))
    m = scrape(registry)
    assert m("hal0_updater_history_parse_errors_total") == 1
    assert m("hal0_updater_update_attempts_total", channel="stable", outcome="committed") == 1
    assert m("hal0_updater_rollbacks_total", reason="manual", trigger="manual") == 1
    # An edit in place that keeps the size (an operator fixing a line) is noticed too.
    edited = text.replace('"stable"', '"beta!!"', 1)
    assert len(edited) == len(text)
    history.write_text(edited)
    assert families(scrape(registry)) == families(scrape(collector_registry(layout)))
    after = scrape(registry)
    assert after("hal0_updater_update_attempts_total", channel="beta!!", outcome="committed") == 1


def test_histogram_buckets_are_the_documented_fixed_ones(layout: Layout) -> None:
    m = scrape(collector_registry(layout))
    for name, bounds in (
        ("hal0_updater_gate_duration_seconds_bucket", GATE_DURATION_BUCKETS_S),
        ("hal0_updater_update_duration_seconds_bucket", UPDATE_DURATION_BUCKETS_S),
    ):
        les = m.label_values(name, "le")
        assert les == {*(repr(float(b)) for b in bounds), "+Inf"}
    docs = DOCS.read_text()
    for bounds in (GATE_DURATION_BUCKETS_S, UPDATE_DURATION_BUCKETS_S):
        assert ", ".join(f"{b:g}" for b in bounds) in docs


# --------------------------------------------------------------------------- registry and daemon


def test_build_registry_serves_both_sources_without_reading_state_at_registration(
    tmp_path: Path,
) -> None:
    clock = [NOW]
    registry, daemon = build_registry(
        Layout(tmp_path / "nothing"), "stable", clock=lambda: clock[0]
    )
    assert not (tmp_path / "nothing").exists()

    m = scrape(registry)
    assert m("hal0_updater_daemon_start_timestamp_seconds") == NOW
    assert m("hal0_updater_daemon_heartbeat_timestamp_seconds") == 0
    assert m("hal0_updater_state", state="idle") == 1
    for result in ("available", "up-to-date", "held", "error"):
        assert m("hal0_updater_checks_total", result=result) == 0
    for job in ("recover", "check", "update", "probation"):
        assert m("hal0_updater_job_errors_total", job=job) == 0

    clock[0] = NOW + 5
    daemon.heartbeat()
    daemon.add_downloaded(1024)
    daemon.add_downloaded(512)
    daemon.record_check("available")
    daemon.record_check("error")
    daemon.record_check("error")
    daemon.record_job_error("update")
    with pytest.raises(ValueError, match="unknown job"):
        daemon.record_job_error("nightly")
    daemon.set_next_run(NOW + 3600)
    daemon.set_auto_updates(True)
    m = scrape(registry)
    assert m("hal0_updater_daemon_heartbeat_timestamp_seconds") == NOW + 5
    assert m("hal0_updater_bytes_downloaded_total") == 1536
    assert m("hal0_updater_checks_total", result="available") == 1
    assert m("hal0_updater_checks_total", result="error") == 2
    assert m("hal0_updater_job_errors_total", job="update") == 1
    assert m("hal0_updater_next_run_timestamp_seconds") == NOW + 3600
    assert m("hal0_updater_auto_updates_enabled") == 1
    daemon.set_next_run(None)
    daemon.set_auto_updates(False)
    m = scrape(registry)
    assert m("hal0_updater_next_run_timestamp_seconds") == 0
    assert m("hal0_updater_auto_updates_enabled") == 0

    with pytest.raises(ValueError, match="unknown check result"):
        daemon.record_check("exploded")
    with pytest.raises(ValueError):
        daemon.add_downloaded(-1)


def test_registering_the_collector_twice_is_refused(layout: Layout) -> None:
    registry, _ = build_registry(layout, "stable")
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(UpdaterCollector(layout, "stable"))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        DaemonMetrics(registry)


def test_metric_names_follow_conventions_and_are_documented(layout: Layout) -> None:
    populate_state(layout)
    registry, _ = build_registry(layout, "stable")
    docs = DOCS.read_text()
    families = list(registry.collect())
    exposed_names = set()
    for family in families:
        assert family.name.startswith("hal0_updater_"), family.name
        exposed = family.name + ("_total" if family.type == "counter" else "")
        exposed_names.add(exposed)
        if "timestamp" in family.name or "duration" in family.name:
            assert family.name.endswith("_seconds"), family.name
        assert family.documentation, family.name
    documented = set(re.findall(r"^\| `(hal0_updater_\w+)` \|", docs, re.MULTILINE))
    assert exposed_names == documented


# --------------------------------------------------------------------------- textfile and HTTP


def test_textfile_is_written_atomically_without_daemon_metrics(
    layout: Layout, tmp_path: Path
) -> None:
    populate_state(layout)
    registry, daemon = build_registry(layout, "stable", clock=lambda: NOW)
    daemon.heartbeat()
    out = tmp_path / "textfile"
    out.mkdir()
    path = out / "hal0-updater.prom"

    path.write_text("old content\n")
    write_textfile(path, registry)

    assert sorted(p.name for p in out.iterdir()) == ["hal0-updater.prom"]  # no temp files left
    text = path.read_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert 'hal0_updater_installed_version_info{version="1.1.0"} 1.0' in text
    assert 'hal0_updater_rollbacks_total{reason="manual",trigger="manual"} 1.0' in text
    daemon_only_names = ("daemon_start", "daemon_heartbeat", "bytes_downloaded", "checks_total")
    for daemon_only in (*daemon_only_names, "job_errors_total"):
        assert f"hal0_updater_{daemon_only}" not in text
    # The same as a scrape, minus the daemon's families.
    scraped = scrape(registry)
    daemon_names = (
        "daemon_",
        "bytes_downloaded",
        "checks",
        "job_errors",
        "next_run",
        "auto_updates",
    )
    expected = {
        k: v
        for k, v in scraped.samples.items()
        if not any(k[0].startswith(f"hal0_updater_{d}") for d in daemon_names)
    }
    written = {
        (s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples
    }
    assert written == expected


def test_serve_answers_on_loopback_and_stops(layout: Layout) -> None:
    populate_state(layout)
    registry, _ = build_registry(layout, "stable")
    server = serve(registry, "127.0.0.1:0")
    try:
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=5) as response:
            body = response.read().decode()
        assert response.status == 200
        assert 'hal0_updater_installed_version_info{version="1.1.0"} 1.0' in body
        assert "hal0_updater_daemon_heartbeat_timestamp_seconds" in body
    finally:
        server()
    server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


def _thread_switches(name: str) -> int:
    """Context switches so far of this process's Python thread called ``name``."""
    (thread,) = [t for t in threading.enumerate() if t.name == name]
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


def test_idle_metrics_server_never_wakes_and_stops_at_once(layout: Layout) -> None:
    registry, _ = build_registry(layout, "stable")
    server = serve(registry, "127.0.0.1:0")
    try:
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.status == 200
        time.sleep(0.2)  # the request's thread is gone, the server is back in poll(2)
        before = _thread_switches("metrics-http")
        time.sleep(1.2)  # prometheus_client's own server would have woken twice here
        assert _thread_switches("metrics-http") == before
    finally:
        server.stop()
    assert not any(t.name == "metrics-http" for t in threading.enumerate())


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this kernel")
def test_serve_on_ipv6_loopback(layout: Layout) -> None:
    registry, _ = build_registry(layout, "stable")
    try:
        server = serve(registry, "[::1]:0")
    except ConfigError as e:  # IPv6 compiled in but ::1 not configured in this namespace
        pytest.skip(str(e))
    try:
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.status == 200
        assert server.url.startswith("http://[::1]:")
    finally:
        server()


def test_serve_reports_a_busy_port_as_a_config_error(layout: Layout) -> None:
    registry, _ = build_registry(layout, "stable")
    first = serve(registry, "127.0.0.1:0")
    try:
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            serve(registry, f"127.0.0.1:{first.port}")
    finally:
        first()


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9877", ("127.0.0.1", 9877)),
        ("[::1]:9877", ("::1", 9877)),
        (":9877", ("0.0.0.0", 9877)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9877", "host:", "host:port", "::1:9877", "h:70000", ""])
def test_parse_listen_refuses_nonsense(listen: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(listen)
