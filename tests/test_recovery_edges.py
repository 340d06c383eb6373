"""Recovery at the narrow instants the systemd fault campaign hit (tests/test_fault_campaign_systemd.py),
each put in place deterministically: the journal and files exactly as a SIGKILL at that line leaves
them, then ``recover``.
"""

from __future__ import annotations

import json

import pytest

from tests.kit.channel import ReleaseChannel
from tests.kit.host import Host
from watchdog_updater.app import App
from watchdog_updater.config import load_config
from watchdog_updater.errors import ExitCode
from watchdog_updater.journal import Outcome, Step, Transaction
from watchdog_updater.links import TEMP_LINK_PREFIX, move_to_trash
from watchdog_updater.storage import atomic_write_json
from watchdog_updater.updater import Updater


def updater(host: Host) -> Updater:
    return App.create(host.root, load_config(host.config_path, missing_ok=False)).updater()


def open_update(
    up: Updater,
    step: Step,
    from_version: str = "1.0.0",
    to_version: str = "1.1.0",
    *,
    reason: str | None = None,
) -> Transaction:
    """The intent record of an update as a kill at ``step`` leaves it."""
    return up.journal.begin(
        kind="update",
        from_version=from_version,
        to_version=to_version,
        channel="stable",
        trigger="cli",
        step=step,
        reason=reason,
    )


def leftovers(host: Host) -> list[str]:
    layout = host.layout
    places = [layout.versions_dir, layout.lib_dir, layout.cache_dir]
    return sorted(
        p.name for d in places if d.is_dir() for p in d.iterdir() if p.name.startswith(".")
    )


def test_killed_between_recording_the_outcome_and_dropping_the_intent(
    host: Host, channel: ReleaseChannel
) -> None:
    channel.publish(channel.release("1.1.0"))
    up = updater(host)
    assert up.update().outcome is Outcome.COMMITTED
    entry = up.journal.history()[-1]
    # Journal.finish appended the line, then the kill: the intent record is still there.
    tx = open_update(up, Step.COMMIT)
    doc = json.loads(up.journal.intent_path.read_text())
    atomic_write_json(up.journal.intent_path, {**doc, "txid": entry["txid"]})
    assert updater(host).recover() is None
    history = up.journal.history()
    assert [e["txid"] for e in history].count(entry["txid"]) == 1, history  # recorded once
    assert tx.txid not in [e["txid"] for e in history]
    assert up.journal.current() is None and host.current() == "1.1.0"


def test_leftovers_of_an_interrupted_commit_are_removed(
    host: Host, channel: ReleaseChannel
) -> None:
    for version in ("1.1.0", "1.2.0"):
        channel.publish(channel.release(version))
        assert updater(host).update().outcome is Outcome.COMMITTED
    layout = host.layout
    # Killed inside retention at the commit step of a later update: a version dir and its cache
    # entry renamed to trash, and a temporary link from a swap.
    up = updater(host)
    open_update(up, Step.COMMIT, "1.1.0", "1.2.0")
    move_to_trash(layout.version_dir("1.0.0"))
    move_to_trash(layout.cache_dir / "1.1.0")
    (layout.lib_dir / f"{TEMP_LINK_PREFIX}current-0123456789ab").symlink_to("hal0-1.2.0")
    assert leftovers(host) != []
    result = updater(host).recover()
    assert result is not None and result.outcome is Outcome.COMMITTED
    assert leftovers(host) == []
    assert host.current() == "1.2.0"


def test_recover_with_nothing_open_still_cleans_the_cache(host: Host) -> None:
    stray = host.layout.cache_dir / ".hal0-trash-1.0.0-0123456789ab"
    (stray / "hal0-1.0.0.tar.gz").parent.mkdir(parents=True)
    (stray / "hal0-1.0.0.tar.gz").write_bytes(b"a trashed cache entry")
    assert updater(host).recover() is None
    assert not stray.exists()


def test_an_update_interrupted_after_the_swap_is_undone_as_interrupted(
    host: Host, channel: ReleaseChannel
) -> None:
    """Not a verdict on the release: outcome ``interrupted``, exit 0, nothing quarantined."""
    channel.publish(channel.release("1.1.0"))
    assert updater(host).update().outcome is Outcome.COMMITTED  # current -> 1.1.0 on disk
    open_update(updater(host), Step.RESTART)
    result = updater(host).recover()
    assert result is not None
    assert (result.outcome, result.exit_code, result.action) == (
        Outcome.INTERRUPTED,
        ExitCode.OK,
        "update",
    )
    assert result.message.startswith("interrupted by a crash at step restart"), result.message
    assert host.current() == "1.0.0"
    assert updater(host).store.quarantine() == {}
    assert updater(host).journal.history()[-1]["outcome"] == "interrupted"


@pytest.mark.parametrize(
    ("reason", "outcome", "code"),
    [
        # Recovery had begun the undo (its reason recorded), then a second kill: still no verdict.
        ("interrupted by a crash at step restart", Outcome.INTERRUPTED, ExitCode.OK),
        # The gate had failed and the rollback was under way: the verdict stands.
        ("1.1.0 failed its health gate: slot a down", Outcome.ROLLED_BACK, ExitCode.ROLLED_BACK),
    ],
    ids=["undo-of-an-interruption", "rollback-after-a-verdict"],
)
def test_a_rollback_killed_at_its_restart_is_finished_with_its_outcome(
    host: Host, channel: ReleaseChannel, reason: str, outcome: Outcome, code: ExitCode
) -> None:
    channel.publish(channel.release("1.1.0"))
    assert updater(host).update().outcome is Outcome.COMMITTED
    open_update(updater(host), Step.ROLLBACK_RESTART, reason=reason)
    result = updater(host).recover()
    assert result is not None
    assert (result.outcome, result.exit_code) == (outcome, code)
    assert host.current() == "1.0.0"
