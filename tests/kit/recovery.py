"""What must hold on a host after the updater was killed at any instant and `recover` ran.

Shared by the crash campaigns (``tests/test_crash_campaign.py`` without systemd,
``tests/test_fault_campaign_systemd.py`` on the systemd sandbox).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from tests.kit.host import Host
from watchdog_updater.errors import BusyError
from watchdog_updater.journal import HistoryEntry, Outcome
from watchdog_updater.lock import UpdateLock

__all__ = ["check_invariants", "history_entries", "tree_fingerprint"]

_HISTORY_FIELDS = frozenset(f.name for f in dataclasses.fields(HistoryEntry))
_OUTCOMES = frozenset(o.value for o in Outcome)


def tree_fingerprint(tree: Path) -> dict[str, str]:
    """``{relative path: sha256 of its bytes}`` for every file below ``tree``; ``+x`` marks
    executables (a release whose entry point lost its mode is not complete)."""
    out: dict[str, str] = {}
    for path in sorted(tree.rglob("*")):
        if path.is_file() and not path.is_symlink():
            mark = "+x" if os.access(path, os.X_OK) else ""
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[path.relative_to(tree).as_posix()] = digest + mark
    return out


def history_entries(host: Host) -> list[dict[str, Any]]:
    """Every line of ``history.jsonl``, each checked to be a well-formed finished transaction."""
    history = host.layout.state_dir / "history.jsonl"  # absent before the first transaction
    lines = history.read_text().splitlines() if history.exists() else []
    entries = [json.loads(line) for line in lines if line.strip()]
    for entry in entries:
        assert isinstance(entry, dict) and set(entry) == _HISTORY_FIELDS, entry
        assert entry["outcome"] in _OUTCOMES, entry
        assert entry["started_at"] <= entry["finished_at"], entry
    return entries


def check_invariants(
    host: Host,
    versions: Collection[str],
    *,
    expected_files: int | Mapping[str, Mapping[str, str]],
    quarantined: Collection[str] = (),
) -> dict[str, Any]:
    """Assert the post-recovery invariants; return the last history entry ({} when none).

    ``expected_files``: how many files a release has, or each version's :func:`tree_fingerprint`
    (then `current` must match its own exactly). ``quarantined``: the versions a gate verdict
    quarantined; anything more means an interruption was blamed on a release.
    """
    layout = host.layout
    current = host.current()
    assert current is not None and current in versions, current
    tree = layout.version_dir(current)
    assert (tree / "VERSION").read_text() == f"{current}\n"
    if isinstance(expected_files, int):
        assert sum(1 for p in tree.rglob("*") if p.is_file()) == expected_files
    else:
        assert tree_fingerprint(tree) == expected_files[current], f"{tree} is incomplete"
    leftovers = {p.name for p in layout.versions_dir.iterdir() if p.name.startswith(".hal0-")}
    leftovers |= {p.name for p in layout.lib_dir.iterdir() if p.name.startswith(".")}
    assert not leftovers, sorted(leftovers)  # staging or trash dirs, temporary links
    assert not (layout.state_dir / "transaction.json").exists()
    lock = UpdateLock(layout.lock_path)
    try:
        lock.acquire()
    except BusyError as e:  # pragma: no cover - the assertion below reports it
        raise AssertionError(f"lock still held after recovery: {e}") from e
    lock.release()
    entries = history_entries(host)
    quarantine_path = layout.state_dir / "quarantine.json"
    quarantine = json.loads(quarantine_path.read_text()) if quarantine_path.exists() else {}
    assert set(quarantine) == set(quarantined), (
        f"quarantined {sorted(quarantine)}, expected {sorted(quarantined)}: "
        "an interruption must never quarantine a release"
    )
    assert host.sentinel.read_text() == "operator config\n"
    assert host.data_sentinel.read_bytes() == b"model weights"
    return entries[-1] if entries else {}
