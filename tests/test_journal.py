"""Durable state: atomic writes, the transaction journal, operator state and the update lock."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from watchdog_updater.errors import BusyError
from watchdog_updater.journal import Journal, Outcome, Step, Transaction
from watchdog_updater.lock import UpdateLock
from watchdog_updater.state import (
    MAX_QUARANTINE,
    ChannelMemory,
    Holds,
    QuarantineEntry,
    StateStore,
)
from watchdog_updater.storage import (
    append_json_line,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
)


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- storage


def test_atomic_write_bytes_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert listing(target.parent) == ["file.bin"]


def test_atomic_write_bytes_applies_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    atomic_write_bytes(target, b"x", mode=0o600)
    assert target.stat().st_mode & 0o777 == 0o600


def test_atomic_write_json_round_trips(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    atomic_write_json(target, {"b": [1, 2], "a": None})
    assert read_json(target) == {"a": None, "b": [1, 2]}
    assert target.read_text().endswith("\n")


def test_read_json_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert read_json(tmp_path / "nope.json") is None


def test_failed_json_write_keeps_old_content_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})
    assert read_json(target) == {"v": 1}
    assert listing(tmp_path) == ["doc.json"]


def test_failed_rename_keeps_old_content_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "doc.json"
    atomic_write_json(target, {"v": 1})

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert read_json(target) == {"v": 1}
    assert listing(tmp_path) == ["doc.json"]


def test_failed_fsync_keeps_old_content_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "doc.bin"
    atomic_write_bytes(target, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError("EIO")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="EIO"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["doc.bin"]


def test_append_json_line_appends_one_line_per_call(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append_json_line(log, {"n": 1})
    append_json_line(log, {"n": 2})
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"n": 1}, {"n": 2}]


def test_append_json_line_after_a_torn_line_starts_fresh(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"n": 1}\n{"n": 2, "tor')
    append_json_line(log, {"n": 3})
    lines = log.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert json.loads(lines[-2]) == {"n": 3}
    assert lines[1] == b'{"n": 2, "tor'


# --------------------------------------------------------------------------- journal


def begin(journal: Journal, step: Step = Step.FETCH) -> Transaction:
    return journal.begin(
        kind="update",
        from_version="1.0.0",
        to_version="1.1.0",
        channel="stable",
        trigger="cli",
        step=step,
        digest_sha256="ab" * 32,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def journal(tmp_path: Path, clock: FakeClock) -> Journal:
    return Journal(tmp_path / "state", boot_id="boot-1", clock=clock)


def test_no_transaction_before_begin(journal: Journal) -> None:
    assert journal.current() is None
    assert journal.history() == []


def test_begin_writes_the_intent_record(journal: Journal, clock: FakeClock) -> None:
    tx = begin(journal)
    on_disk = json.loads(journal.intent_path.read_text())
    assert on_disk["step"] == "fetch"
    assert on_disk["txid"] == tx.txid
    assert on_disk["boot_id"] == "boot-1"
    assert on_disk["pid"] == os.getpid()
    assert on_disk["started_at"] == clock.now
    assert journal.current() == tx
    assert listing(journal.state_dir) == ["transaction.json"]


def test_advance_rewrites_the_intent_before_the_step(journal: Journal, clock: FakeClock) -> None:
    tx = begin(journal)
    clock.tick(5)
    tx = journal.advance(tx, Step.STAGE)
    current = journal.current()
    assert current is not None
    assert current.step is Step.STAGE
    assert current.step_started_at == clock.now
    assert current == tx
    assert listing(journal.state_dir) == ["transaction.json"]


def test_durations_accumulate_per_step(journal: Journal, clock: FakeClock) -> None:
    tx = begin(journal, Step.FETCH)
    clock.tick(2)
    tx = journal.advance(tx, Step.GATE)
    clock.tick(3)
    tx = journal.advance(tx, Step.ROLLBACK_SWAP)
    clock.tick(1)
    tx = journal.advance(tx, Step.GATE)  # re-entered: time adds up under the same step
    clock.tick(4)
    tx = journal.advance(tx, Step.COMMIT)
    assert tx.durations_s == {"fetch": 2.0, "gate": 7.0, "rollback-swap": 1.0}
    clock.tick(0.5)
    entry = journal.finish(tx, Outcome.COMMITTED, "healthy")
    assert entry.durations_s == {"fetch": 2.0, "gate": 7.0, "rollback-swap": 1.0, "commit": 0.5}


def test_advance_keeps_the_reason_unless_given(journal: Journal) -> None:
    tx = begin(journal)
    tx = journal.advance(tx, Step.ROLLBACK_SWAP, reason="gate failed")
    tx = journal.advance(tx, Step.ROLLBACK_RESTART)
    assert tx.reason == "gate failed"
    assert journal.current() == tx


def test_advance_restamps_boot_id_and_pid(tmp_path: Path, clock: FakeClock) -> None:
    first = Journal(tmp_path, boot_id="boot-1", clock=clock)
    tx = begin(first, Step.SWAP)
    after_reboot = Journal(tmp_path, boot_id="boot-2", clock=clock)
    recovered = after_reboot.current()
    assert recovered is not None and recovered.boot_id == "boot-1"
    tx = after_reboot.advance(recovered, Step.ROLLBACK_SWAP)
    assert tx.boot_id == "boot-2"
    assert tx.txid == recovered.txid


def test_finish_appends_history_and_drops_the_intent(journal: Journal, clock: FakeClock) -> None:
    tx = begin(journal)
    clock.tick(10)
    entry = journal.finish(tx, Outcome.FAILED, "download failed", details={"url": "x"})
    assert journal.current() is None
    assert not journal.intent_path.exists()
    history = journal.history()
    assert len(history) == 1
    assert history[0]["txid"] == tx.txid
    assert history[0]["outcome"] == "failed"
    assert history[0]["reason"] == "download failed"
    assert history[0]["finished_at"] == clock.now
    assert history[0]["details"] == {"url": "x"}
    assert entry.outcome is Outcome.FAILED


def test_history_is_oldest_first_and_limited(journal: Journal, clock: FakeClock) -> None:
    txids = []
    for _ in range(4):
        tx = begin(journal)
        txids.append(tx.txid)
        clock.tick(1)
        journal.finish(tx, Outcome.COMMITTED, "ok")
    assert [h["txid"] for h in journal.history()] == txids
    assert [h["txid"] for h in journal.history(limit=2)] == txids[-2:]


def test_torn_last_history_line_is_skipped_and_next_append_is_fresh(journal: Journal) -> None:
    tx = begin(journal)
    journal.finish(tx, Outcome.COMMITTED, "ok")
    with journal.history_path.open("ab") as handle:
        handle.write(b'{"txid": "torn", "outc')  # power cut mid-append
    assert [h["txid"] for h in journal.history()] == [tx.txid]
    tx2 = begin(journal)
    journal.finish(tx2, Outcome.ROLLED_BACK, "gate failed")
    assert [h["txid"] for h in journal.history()] == [tx.txid, tx2.txid]
    assert journal.history()[-1]["outcome"] == "rolled-back"


def test_history_skips_non_object_lines(journal: Journal) -> None:
    journal.history_path.parent.mkdir(parents=True)
    journal.history_path.write_text('[1, 2]\n"x"\n{"txid": "a"}\n\n')
    assert journal.history() == [{"txid": "a"}]


def test_corrupt_intent_record_is_an_error_not_ignored(journal: Journal) -> None:
    journal.intent_path.parent.mkdir(parents=True)
    journal.intent_path.write_text('{"txid": "abc", "st')
    with pytest.raises(ValueError):
        journal.current()


def test_transaction_json_round_trip(journal: Journal) -> None:
    tx = begin(journal, Step.ROLLBACK_GATE)
    assert Transaction.from_json(json.loads(json.dumps(tx.to_json()))) == tx


# --------------------------------------------------------------------------- state


def q(version: str, reason: str = "gate failed") -> QuarantineEntry:
    return QuarantineEntry(
        version=version,
        digest_sha256="cd" * 32,
        failed_probe="hal0-api",
        reason=reason,
        evidence="fail: HTTP 500",
        at=123.0,
    )


def test_quarantine_starts_empty(tmp_path: Path) -> None:
    assert StateStore(tmp_path).quarantine() == {}


def test_quarantine_add_persists_across_stores(tmp_path: Path) -> None:
    StateStore(tmp_path).add_quarantine(q("1.1.0"))
    StateStore(tmp_path).add_quarantine(q("1.2.0"))
    entries = StateStore(tmp_path).quarantine()
    assert entries == {"1.1.0": q("1.1.0"), "1.2.0": q("1.2.0")}


def test_quarantine_add_same_version_replaces(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.add_quarantine(q("1.1.0", "first"))
    store.add_quarantine(q("1.1.0", "second"))
    assert store.quarantine() == {"1.1.0": q("1.1.0", "second")}


def test_quarantine_keeps_only_the_newest_entries(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for i in range(MAX_QUARANTINE + 5):
        store.add_quarantine(dataclasses.replace(q(f"1.{i}.0"), at=1000.0 + i))
    entries = store.quarantine()
    assert len(entries) == MAX_QUARANTINE
    assert "1.0.0" not in entries and "1.4.0" not in entries  # the five oldest went
    assert f"1.{MAX_QUARANTINE + 4}.0" in entries and "1.5.0" in entries


def test_quarantine_clear_one(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.add_quarantine(q("1.1.0"))
    store.add_quarantine(q("1.2.0"))
    assert store.clear_quarantine("1.1.0") == ["1.1.0"]
    assert list(StateStore(tmp_path).quarantine()) == ["1.2.0"]


def test_quarantine_clear_unknown_version_clears_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.add_quarantine(q("1.1.0"))
    assert store.clear_quarantine("9.9.9") == []
    assert list(store.quarantine()) == ["1.1.0"]


def test_quarantine_clear_all(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.add_quarantine(q("1.1.0"))
    store.add_quarantine(q("1.2.0"))
    assert sorted(store.clear_quarantine()) == ["1.1.0", "1.2.0"]
    assert StateStore(tmp_path).quarantine() == {}


def test_holds_default_is_no_hold(tmp_path: Path) -> None:
    holds = StateStore(tmp_path).holds()
    assert holds == Holds()
    assert not holds.paused(0.0)


def test_pause_forever_round_trips(tmp_path: Path) -> None:
    StateStore(tmp_path).save_holds(Holds(paused_until=math.inf, pause_reason="maintenance"))
    assert json.loads((tmp_path / "holds.json").read_text())["paused_until"] == "forever"
    holds = StateStore(tmp_path).holds()
    assert holds.paused_until == math.inf
    assert holds.pause_reason == "maintenance"
    assert holds.paused(1e18)


def test_pause_until_round_trips_and_expires(tmp_path: Path) -> None:
    StateStore(tmp_path).save_holds(Holds(paused_until=5_000.0))
    holds = StateStore(tmp_path).holds()
    assert holds.paused_until == 5_000.0
    assert holds.paused(4_999.9)
    assert not holds.paused(5_000.0)
    assert not holds.paused(6_000.0)


def test_skipped_and_frozen_round_trip(tmp_path: Path) -> None:
    holds = Holds(
        skipped=("1.1.0", "1.2.0-rc.1"), frozen_reason="rollback unhealthy", frozen_at=9.0
    )
    StateStore(tmp_path).save_holds(holds)
    assert StateStore(tmp_path).holds() == holds


def test_channel_memory_round_trip_per_channel(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.channel_memory("stable") is None
    stable = ChannelMemory("1.4.0", "ef" * 32, signed_at=100.0, accepted_at=200.0)
    nightly = ChannelMemory("1.5.0-nightly.20240601", "01" * 32, signed_at=1.0, accepted_at=2.0)
    store.remember_channel("stable", stable)
    store.remember_channel("nightly", nightly)
    fresh = StateStore(tmp_path)
    assert fresh.channel_memory("stable") == stable
    assert fresh.channel_memory("nightly") == nightly
    assert fresh.channel_memory("preview") is None
    newer = ChannelMemory("1.4.1", "ef" * 32, signed_at=300.0, accepted_at=400.0)
    store.remember_channel("stable", newer)
    assert fresh.channel_memory("stable") == newer


def test_state_writes_leave_no_temp_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.add_quarantine(q("1.1.0"))
    store.save_holds(Holds(skipped=("1.1.0",)))
    store.remember_channel("stable", ChannelMemory("1.4.0", "ef" * 32, 1.0, 2.0))
    assert listing(tmp_path) == ["channels", "holds.json", "quarantine.json"]
    assert listing(tmp_path / "channels") == ["stable.json"]


# --------------------------------------------------------------------------- lock

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from watchdog_updater.lock import UpdateLock
    lock = UpdateLock(Path(sys.argv[1]), purpose="update")
    lock.acquire()
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def holder(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Another process that holds the lock until it is killed."""
    path = tmp_path / "state" / "update.lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_second_process_is_refused_naming_the_holder(holder) -> None:  # type: ignore[no-untyped-def]
    proc, path = holder
    lock = UpdateLock(path)
    with pytest.raises(BusyError, match=rf"\(pid {proc.pid}\)") as info:
        lock.acquire()
    assert info.value.hint
    assert proc.poll() is None  # the holder is unaffected


def test_lock_is_free_after_the_holder_is_killed(holder) -> None:  # type: ignore[no-untyped-def]
    proc, path = holder
    with pytest.raises(BusyError):
        UpdateLock(path).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    with UpdateLock(path, purpose="rollback"):
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid()
        assert info["purpose"] == "rollback"


def test_lock_held_here_refuses_another_process(tmp_path: Path) -> None:
    path = tmp_path / "update.lock"
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from watchdog_updater.errors import BusyError
        from watchdog_updater.lock import UpdateLock
        try:
            UpdateLock(Path(sys.argv[1])).acquire()
        except BusyError as e:
            print(e)
            sys.exit(7)
        """
    )
    with UpdateLock(path, purpose="update"):
        busy = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30
        )
    assert busy.returncode == 7, busy.stderr
    assert f"pid {os.getpid()}" in busy.stdout
    free = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30
    )
    assert free.returncode == 0, free.stdout + free.stderr


def test_lock_release_allows_reacquire(tmp_path: Path) -> None:
    path = tmp_path / "update.lock"
    lock = UpdateLock(path)
    lock.acquire()
    lock.release()
    lock.release()  # idempotent
    with UpdateLock(path):
        pass
