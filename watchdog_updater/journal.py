"""The transaction journal: an intent record before every step, a history of finished ones.

``transaction.json`` holds the one transaction in flight. It is rewritten atomically BEFORE each step
acts, so after a crash or power cut the next start knows exactly how far it got and recovers
deterministically (see :mod:`watchdog_updater.updater`). The boot id tells a power cut or reboot from
a crash of the updater alone. ``history.jsonl`` gets one line per finished transaction.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from watchdog_updater.storage import append_json_line, atomic_write_json, fsync_dir, read_json

__all__ = ["HistoryEntry", "Journal", "Outcome", "Step", "Transaction", "read_boot_id"]


class Step(enum.StrEnum):
    FETCH = "fetch"  # download and verify (nothing on disk outside the cache)
    STAGE = "stage"  # unpack into a hidden staging dir
    PROMOTE = "promote"  # rename staging to its version dir
    SWAP = "swap"  # `current` -> new version (from here on, `current` may be the new version)
    HOOKS = "hooks"  # activation hooks against the new tree
    RESTART = "restart"  # restart hal0-api and companions
    GATE = "gate"  # health gate on the new version
    COMMIT = "commit"  # verdict healthy: record and clean up
    ROLLBACK_SWAP = "rollback-swap"
    ROLLBACK_RESTART = "rollback-restart"
    ROLLBACK_GATE = "rollback-gate"


# Steps during which `current` may already point at the transaction's target.
SWAPPED_STEPS = frozenset({Step.SWAP, Step.HOOKS, Step.RESTART, Step.GATE})
ROLLBACK_STEPS = frozenset({Step.ROLLBACK_SWAP, Step.ROLLBACK_RESTART, Step.ROLLBACK_GATE})
_RECENT = 5  # history lines searched for the outcome of an interrupted transaction


class Outcome(enum.StrEnum):
    COMMITTED = "committed"  # the new version passed its gate
    ROLLED_BACK = "rolled-back"  # the new version failed; the old one is healthy again
    ROLLBACK_UNHEALTHY = "rollback-unhealthy"  # the old version is unhealthy too: updates frozen
    FAILED = "failed"  # an error before the swap; nothing changed
    ABORTED = "aborted"  # interrupted before the swap and cleaned up
    INTERRUPTED = "interrupted"  # a crash or power cut after the swap, recovered (not blamed)


def read_boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class Transaction:
    txid: str
    kind: str  # "update" or "rollback" (manual)
    from_version: str | None
    to_version: str
    channel: str | None
    trigger: str  # "cli", "schedule", "recovery", "probation"
    step: Step
    boot_id: str
    pid: int
    started_at: float
    step_started_at: float
    durations_s: dict[str, float] = field(default_factory=dict)
    digest_sha256: str | None = None
    gate: bool = True  # False with --no-gate
    reason: str | None = None  # why a rollback started
    previous_before: str | None = None  # `previous` before the swap, restored on rollback

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Transaction:
        return cls(**{**doc, "step": Step(doc["step"])})


@dataclass(frozen=True)
class HistoryEntry:
    txid: str
    kind: str
    from_version: str | None
    to_version: str
    channel: str | None
    trigger: str
    outcome: Outcome
    reason: str
    started_at: float
    finished_at: float
    durations_s: dict[str, float]
    gate: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Journal:
    """Intent record and history in the state dir."""

    def __init__(
        self, state_dir: Path, *, boot_id: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.state_dir = state_dir
        self.intent_path = state_dir / "transaction.json"
        self.history_path = state_dir / "history.jsonl"
        self.boot_id = boot_id
        self.clock = clock

    def current(self) -> Transaction | None:
        """The unfinished transaction, if any. A corrupt record is an error, never ignored."""
        doc = read_json(self.intent_path)
        return None if doc is None else Transaction.from_json(doc)

    def begin(
        self,
        *,
        kind: str,
        from_version: str | None,
        to_version: str,
        channel: str | None,
        trigger: str,
        step: Step,
        digest_sha256: str | None = None,
        gate: bool = True,
        reason: str | None = None,
        previous_before: str | None = None,
    ) -> Transaction:
        now = self.clock()
        tx = Transaction(
            txid=uuid.uuid4().hex[:12],
            kind=kind,
            from_version=from_version,
            to_version=to_version,
            channel=channel,
            trigger=trigger,
            step=step,
            boot_id=self.boot_id,
            pid=os.getpid(),
            started_at=now,
            step_started_at=now,
            digest_sha256=digest_sha256,
            gate=gate,
            reason=reason,
            previous_before=previous_before,
        )
        atomic_write_json(self.intent_path, tx.to_json())
        return tx

    def advance(self, tx: Transaction, step: Step, *, reason: str | None = None) -> Transaction:
        """Record the intent to run ``step`` (and how long the previous step took)."""
        now = self.clock()
        durations = dict(tx.durations_s)
        durations[tx.step.value] = durations.get(tx.step.value, 0.0) + (now - tx.step_started_at)
        tx = replace(
            tx,
            step=step,
            step_started_at=now,
            durations_s=durations,
            boot_id=self.boot_id,
            pid=os.getpid(),
            reason=reason if reason is not None else tx.reason,
        )
        atomic_write_json(self.intent_path, tx.to_json())
        return tx

    def finish(
        self,
        tx: Transaction,
        outcome: Outcome,
        reason: str,
        details: dict[str, Any] | None = None,
    ) -> HistoryEntry:
        """Append the outcome to the history, then drop the intent record."""
        now = self.clock()
        durations = dict(tx.durations_s)
        durations[tx.step.value] = durations.get(tx.step.value, 0.0) + (now - tx.step_started_at)
        entry = HistoryEntry(
            txid=tx.txid,
            kind=tx.kind,
            from_version=tx.from_version,
            to_version=tx.to_version,
            channel=tx.channel,
            trigger=tx.trigger,
            outcome=outcome,
            reason=reason,
            started_at=tx.started_at,
            finished_at=now,
            durations_s=durations,
            gate=tx.gate,
            details=details or {},
        )
        append_json_line(self.history_path, entry.to_json())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.intent_path)
        fsync_dir(self.state_dir)
        return entry

    def finished_entry(self, txid: str) -> dict[str, Any] | None:
        """The history entry of ``txid``, if :meth:`finish` recorded it (the newest few only:
        a transaction is only ever looked up right after it was interrupted)."""
        recent: list[dict[str, Any]] = self.history(limit=_RECENT)
        return next((doc for doc in reversed(recent) if doc.get("txid") == txid), None)

    def drop_intent(self) -> None:
        """Remove the intent record of a transaction whose outcome is already in the history."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.intent_path)
        fsync_dir(self.state_dir)

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Finished transactions, oldest first; a torn line from a power cut is skipped."""
        try:
            raw = self.history_path.read_bytes()
        except FileNotFoundError:
            return []
        entries: list[dict[str, Any]] = []
        for line in raw.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                entries.append(doc)
        return entries[-limit:] if limit else entries
