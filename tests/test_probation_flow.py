"""Probation end to end without systemd: a real signed channel, real installs, command probes.

Regressions found by the soak (tests/test_soak.py): a failed probation whose `previous` to restore
was gone (deleted by retention) wedged every later update; a window resumed with less time left
than a probe takes rolled a healthy version back; quarantined versions took retention slots from
good ones.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from tests.conftest import reconfigure
from tests.kit.channel import ReleaseChannel, simple_release_tarball
from tests.kit.host import Host
from tests.kit.release_server import ReleaseServer
from tests.kit.tls import TestCA
from watchdog_updater.app import App
from watchdog_updater.config import load_config
from watchdog_updater.journal import Outcome
from watchdog_updater.links import installed_versions, read_link_version
from watchdog_updater.updater import Updater


class Site:
    """A host on the test channel whose probe fails while the current version holds ``BROKEN``."""

    def __init__(
        self, host: Host, server: ReleaseServer, trusted_root: Path, ca: TestCA, **extra: Any
    ) -> None:
        self.host = host
        self.slow = host.root / "probe-is-slow"
        broken = host.layout.current_link / "BROKEN"
        probe = f"test ! -e {broken} && {{ test ! -e {self.slow} || sleep 0.5; }}"
        settings: dict[str, Any] = {
            "health": {
                "command": [{"name": "app", "argv": ["sh", "-c", probe]}],
                "probe_timeout": 2,
                "probation": {"duration": 600, "interval": 0.05, "consecutive_failures": 2},
            },
        }
        for key, value in extra.items():
            settings.setdefault(key, {}).update(value)
        reconfigure(host, server, trusted_root, ca, **settings)

    def updater(self) -> Updater:
        app = App.create(self.host.root, load_config(self.host.config_path, missing_ok=False))
        return app.updater()

    def link(self, name: str) -> str | None:
        layout = self.host.layout
        return read_link_version(layout, layout.lib_dir / name)

    def break_version(self, version: str) -> None:
        (self.host.layout.version_dir(version) / "BROKEN").touch()


def test_retention_keeps_what_an_open_probation_would_restore(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    site = Site(host, server, trusted_root, test_ca, install={"keep": 2})
    for version in ("1.1.0", "1.2.0"):
        channel.publish(channel.release(version))
        assert site.updater().update().outcome is Outcome.COMMITTED
    # keep = 2, yet 1.0.0 stays: 1.2.0's probation rollback makes it `previous` again.
    assert set(installed_versions(host.layout)) == {"1.0.0", "1.1.0", "1.2.0"}
    site.break_version("1.2.0")
    result = site.updater().watch_probation()
    assert result is not None and result.outcome is Outcome.ROLLED_BACK, result
    assert (site.link("current"), site.link("previous")) == ("1.1.0", "1.0.0")
    channel.publish(channel.release("1.3.0"))
    assert site.updater().update().outcome is Outcome.COMMITTED
    store = site.updater().store
    record = store.probation()
    assert record is not None and record.previous_before == "1.0.0"
    store.save_probation(dataclasses.replace(record, until=time.time() + 0.02))  # window ends
    assert site.updater().watch_probation() is None  # 1.3.0 is healthy: its probation passes
    channel.publish(channel.release("1.4.0"))
    assert site.updater().update().outcome is Outcome.COMMITTED
    # No probation holds 1.0.0 any more: keep = 2 is back (quarantined 1.2.0 goes first).
    assert set(installed_versions(host.layout)) == {"1.1.0", "1.3.0", "1.4.0"}


def test_failed_probation_whose_previous_was_deleted_by_hand_still_finishes(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    site = Site(host, server, trusted_root, test_ca)
    for version in ("1.1.0", "1.2.0"):
        channel.publish(channel.release(version))
        assert site.updater().update().outcome is Outcome.COMMITTED
    shutil.rmtree(host.layout.version_dir("1.0.0"))  # an operator freeing disk space
    site.break_version("1.2.0")
    result = site.updater().watch_probation()
    assert result is not None and result.outcome is Outcome.ROLLED_BACK, result
    assert site.link("current") == "1.1.0"
    assert not (host.layout.lib_dir / "previous").is_symlink()  # no target rather than a wedge
    assert site.updater().journal.current() is None
    assert site.updater().recover() is None  # nothing left to recover


def test_probation_resumed_with_less_time_than_a_probe_takes_waits_for_the_probe(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    site = Site(host, server, trusted_root, test_ca)
    channel.publish(channel.release("1.1.0"))
    assert site.updater().update().outcome is Outcome.COMMITTED
    store = site.updater().store
    record = store.probation()
    assert record is not None
    # The daemon restarted 20 ms before the end of the window; the probe takes 500 ms.
    store.save_probation(dataclasses.replace(record, until=time.time() + 0.02))
    site.slow.touch()
    assert site.updater().watch_probation() is None  # passed: healthy, just slow
    assert site.link("current") == "1.1.0"
    assert store.probation() is None and "1.1.0" not in store.quarantine()


def test_quarantined_versions_do_not_push_good_ones_out(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    site = Site(host, server, trusted_root, test_ca, install={"keep": 2})
    channel.publish(channel.release("1.1.0", build=broken_build))
    assert site.updater().update().outcome is Outcome.ROLLED_BACK  # quarantined, still on disk
    assert "1.1.0" in site.updater().store.quarantine()
    assert "1.1.0" in installed_versions(host.layout)
    channel.publish(channel.release("1.2.0"))
    assert site.updater().update().outcome is Outcome.COMMITTED
    # keep = 2 and three versions besides current: the known-bad one goes, the good 1.0.0 stays.
    assert set(installed_versions(host.layout)) == {"1.0.0", "1.2.0"}


def broken_build(version: str) -> bytes:
    return simple_release_tarball(version, {"BROKEN": b"fails its probe\n"})
