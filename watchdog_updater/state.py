"""Durable operator-facing state: quarantine, holds (pause, skip, freeze), channel memory.

Each is one small JSON file in the state dir, rewritten atomically.

- quarantine.json: versions that failed their gate, with the failed probe and the evidence. They are
  never applied automatically again (a newer release, ``--force`` or ``quarantine clear`` moves on).
- holds.json: a pause (optionally expiring), skipped versions, and the freeze set when a rollback's
  own gate failed ("manual attention needed").
- channels/<channel>.json: the newest manifest accepted per channel (freeze/replay defence).
- probation.json: the committed version under watch after its gate, until when.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from watchdog_updater.storage import atomic_write_json, read_json

__all__ = [
    "MAX_QUARANTINE",
    "ChannelMemory",
    "Holds",
    "Probation",
    "QuarantineEntry",
    "StateStore",
]

# Quarantine entries kept: a hundred failed releases is years of nightlies; the oldest goes first.
MAX_QUARANTINE = 100


@dataclass(frozen=True)
class QuarantineEntry:
    version: str
    digest_sha256: str | None
    failed_probe: str | None
    reason: str
    evidence: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ChannelMemory:
    """What we last accepted on a channel."""

    version: str
    manifest_sha256: str
    signed_at: float  # the transparency log's integrated time of the manifest's signature
    accepted_at: float


@dataclass(frozen=True)
class Probation:
    """A committed version still under watch: a sustained failure before ``until`` rolls back."""

    version: str
    from_version: str | None
    previous_before: str | None
    digest_sha256: str | None
    channel: str | None
    until: float


@dataclass(frozen=True)
class Holds:
    paused_until: float | None = None  # None: not paused; float('inf'): until resumed
    pause_reason: str | None = None
    skipped: tuple[str, ...] = ()
    frozen_reason: str | None = None
    frozen_at: float | None = None

    def paused(self, now: float) -> bool:
        return self.paused_until is not None and now < self.paused_until

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["skipped"] = list(self.skipped)
        if self.paused_until == float("inf"):
            doc["paused_until"] = "forever"
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Holds:
        until = doc.get("paused_until")
        return cls(
            paused_until=float("inf") if until == "forever" else until,
            pause_reason=doc.get("pause_reason"),
            skipped=tuple(doc.get("skipped", ())),
            frozen_reason=doc.get("frozen_reason"),
            frozen_at=doc.get("frozen_at"),
        )


@dataclass
class StateStore:
    """Reads and writes the small state files under ``state_dir``."""

    state_dir: Path
    _quarantine_path: Path = field(init=False)
    _holds_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self._quarantine_path = self.state_dir / "quarantine.json"
        self._holds_path = self.state_dir / "holds.json"
        self._probation_path = self.state_dir / "probation.json"

    # quarantine -----------------------------------------------------------------------------
    def quarantine(self) -> dict[str, QuarantineEntry]:
        doc = read_json(self._quarantine_path) or {}
        return {v: QuarantineEntry(**e) for v, e in doc.items()}

    def add_quarantine(self, entry: QuarantineEntry) -> None:
        """Record ``entry``; only the newest :data:`MAX_QUARANTINE` entries (by time) are kept,
        so the file cannot grow without bound on a box that runs for years."""
        entries = self.quarantine()
        entries[entry.version] = entry
        if len(entries) > MAX_QUARANTINE:
            newest = sorted(entries.values(), key=lambda e: e.at, reverse=True)[:MAX_QUARANTINE]
            entries = {e.version: e for e in newest}
        atomic_write_json(self._quarantine_path, {v: e.to_json() for v, e in entries.items()})

    def clear_quarantine(self, version: str | None = None) -> list[str]:
        entries = self.quarantine()
        cleared = list(entries) if version is None else [v for v in entries if v == version]
        for v in cleared:
            del entries[v]
        atomic_write_json(self._quarantine_path, {v: e.to_json() for v, e in entries.items()})
        return cleared

    # holds ----------------------------------------------------------------------------------
    def holds(self) -> Holds:
        doc = read_json(self._holds_path)
        return Holds() if doc is None else Holds.from_json(doc)

    def save_holds(self, holds: Holds) -> None:
        atomic_write_json(self._holds_path, holds.to_json())

    # probation ------------------------------------------------------------------------------
    def probation(self) -> Probation | None:
        doc = read_json(self._probation_path)
        return None if doc is None else Probation(**doc)

    def save_probation(self, probation: Probation) -> None:
        atomic_write_json(self._probation_path, asdict(probation))

    def clear_probation(self) -> None:
        self._probation_path.unlink(missing_ok=True)

    def probation_stamp(self) -> tuple[int, int] | None:
        """Which probation record is on disk (inode, mtime), None when there is none: each save
        is an atomic replace, so a record written by another process shows as a new stamp."""
        try:
            st = self._probation_path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    # channel memory -------------------------------------------------------------------------
    def _channel_path(self, channel: str) -> Path:
        return self.state_dir / "channels" / f"{channel}.json"

    def channel_memory(self, channel: str) -> ChannelMemory | None:
        doc = read_json(self._channel_path(channel))
        return None if doc is None else ChannelMemory(**doc)

    def remember_channel(self, channel: str, memory: ChannelMemory) -> None:
        atomic_write_json(self._channel_path(channel), asdict(memory))
