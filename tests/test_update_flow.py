"""The install transaction end to end through the real CLI (a subprocess), against a real HTTPS
release server and real bundles. The gate here is a command probe; the systemd scenarios with real
units are in test_systemd_gate.py."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import reconfigure
from tests.kit.channel import ReleaseChannel, simple_release_tarball
from tests.kit.host import Host
from tests.kit.release_server import ReleaseServer
from tests.kit.tls import TestCA


def broken_release(version: str) -> bytes:
    """A release whose tree carries BROKEN: the test gate fails on it."""
    return simple_release_tarball(version, {"BROKEN": b"yes\n"})


def gate_on_broken(
    host: Host, server: ReleaseServer, trusted_root: Path, ca: TestCA, **extra: object
) -> None:
    """The gate fails while `current` holds a BROKEN marker, or while ROOT/unhealthy exists."""
    current = host.layout.current_link
    script = f"test ! -e {current}/BROKEN && test ! -e {host.root}/unhealthy"
    reconfigure(
        host,
        server,
        trusted_root,
        ca,
        health={"command": [{"name": "tree-ok", "argv": ["sh", "-c", script]}], "consecutive": 2},
        **extra,
    )


def history(host: Host) -> list[dict[str, object]]:
    code, doc = host.cli_json("history")
    assert code == 0
    return doc["history"]


def test_good_update_commits(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.1.0"))
    code, doc = host.cli_json("update")
    assert code == 0, doc
    assert doc["outcome"] == "committed" and doc["to"] == "1.1.0"
    assert host.current() == "1.1.0"
    code, status = host.cli_json("status")
    assert status["installed"] == "1.1.0" and status["previous"] == "1.0.0"
    assert history(host)[-1]["outcome"] == "committed"
    # Config and data are never touched.
    assert host.sentinel.read_text() == "operator config\n"
    assert host.data_sentinel.read_bytes() == b"model weights"
    # No staging leftovers, no intent record.
    assert not list(host.layout.versions_dir.glob(".hal0-*"))
    assert not (host.layout.state_dir / "transaction.json").exists()


def test_second_run_is_a_noop(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.1.0"))
    assert host.cli("update").returncode == 0
    proc = host.cli("update")
    assert proc.returncode == 0
    assert "up to date" in proc.stdout


def test_failed_gate_rolls_back_and_quarantines(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    gate_on_broken(host, server, trusted_root, test_ca)
    channel.publish(channel.release("1.1.0", tarball=broken_release("1.1.0")))
    code, doc = host.cli_json("update")
    assert code == 4, doc
    assert doc["outcome"] == "rolled-back"
    assert doc["gate"]["verdict"] == "unhealthy" and doc["rollback_gate"]["verdict"] == "healthy"
    assert host.current() == "1.0.0"
    code, q = host.cli_json("quarantine", "list")
    assert "1.1.0" in q["quarantine"] and q["quarantine"]["1.1.0"]["failed_probe"] == "tree-ok"
    # Never applied automatically again.
    proc = host.cli("update")
    assert proc.returncode == 0 and "quarantined" in proc.stdout
    assert host.current() == "1.0.0"


def test_quarantine_clear_allows_retry(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    gate_on_broken(host, server, trusted_root, test_ca)
    channel.publish(channel.release("1.1.0", tarball=broken_release("1.1.0")))
    assert host.cli("update").returncode == 4
    assert host.cli("quarantine", "clear", "1.1.0").returncode == 0
    assert host.cli("update", "--check").returncode == 100


def test_rollback_target_unhealthy_freezes_updates(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    gate_on_broken(host, server, trusted_root, test_ca)
    (host.root / "unhealthy").write_text("everything is down\n")
    channel.publish(channel.release("1.1.0"))
    code, doc = host.cli_json("update")
    assert code == 5, doc
    assert doc["outcome"] == "rollback-unhealthy"
    assert "manual attention needed" in doc["message"]
    code, status = host.cli_json("status")
    assert status["frozen"] and "manual attention" in status["frozen"]
    (host.root / "unhealthy").unlink()
    channel.publish(channel.release("1.2.0"))
    proc = host.cli("update")
    assert proc.returncode == 0 and "frozen" in proc.stdout
    assert host.cli("resume").returncode == 0
    assert host.cli("update").returncode == 0
    assert host.current() == "1.2.0"


def test_failing_hook_swaps_back(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    reconfigure(
        host,
        server,
        trusted_root,
        test_ca,
        install={"post_swap": [["sh", "-c", "echo venv broken >&2; exit 7"]]},
    )
    channel.publish(channel.release("1.1.0"))
    proc = host.cli("update")
    assert proc.returncode == 1, proc.stderr
    assert "activation hook" in proc.stderr and "exited 7" in proc.stderr
    assert host.current() == "1.0.0"
    assert history(host)[-1]["outcome"] == "failed"


def test_hook_runs_against_new_tree(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    marker = host.root / "hook-ran"
    reconfigure(
        host,
        server,
        trusted_root,
        test_ca,
        install={
            "post_swap": [["sh", "-c", f"cat VERSION > {marker}; echo $HAL0_VERSION >> {marker}"]]
        },
    )
    channel.publish(channel.release("1.1.0"))
    assert host.cli("update").returncode == 0
    assert marker.read_text() == "1.1.0\n1.1.0\n"


def test_manual_rollback_and_rollback_to(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.1.0"))
    assert host.cli("update").returncode == 0
    channel.publish(channel.release("1.2.0"))
    assert host.cli("update").returncode == 0
    assert host.current() == "1.2.0"
    code, doc = host.cli_json("update", "--rollback")
    assert code == 0, doc
    assert host.current() == "1.1.0"
    code, doc = host.cli_json("update", "--rollback", "--to", "1.0.0")
    assert code == 0, doc
    assert host.current() == "1.0.0"
    proc = host.cli("update", "--rollback", "--to", "0.9.0")
    assert proc.returncode == 1 and "not installed here" in proc.stderr
    kinds = [e["kind"] for e in history(host)]
    assert kinds == ["update", "update", "rollback", "rollback"]


def test_dry_run_changes_nothing(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.1.0"))
    code, doc = host.cli_json("update", "--dry-run")
    assert code == 0
    assert any("swap current 1.0.0 -> 1.1.0" in s for s in doc["steps"])
    assert host.current() == "1.0.0"
    assert not host.layout.version_dir("1.1.0").exists()


def test_no_gate_needs_yes(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.1.0"))
    proc = host.cli("update", "--no-gate")
    assert proc.returncode == 2 and "--yes" in proc.stderr
    assert host.cli("update", "--no-gate", "--yes").returncode == 0
    last = history(host)[-1]
    assert last["gate"] is False and "WITHOUT a health gate" in last["reason"]


def test_hostile_tarball_refused_and_current_untouched(host: Host, channel: ReleaseChannel) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("hal0-1.1.0/../../../etc/hal0/sentinel.txt")
        data = b"pwned"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    channel.publish(channel.release("1.1.0", tarball=buffer.getvalue()))
    proc = host.cli("update")
    assert proc.returncode == 3, proc.stderr
    assert host.current() == "1.0.0"
    assert host.sentinel.read_text() == "operator config\n"
    assert not list(host.layout.versions_dir.glob(".hal0-staging-*"))
    assert history(host)[-1]["outcome"] == "failed"


def test_concurrent_invocations_exactly_one_proceeds(
    host: Host, channel: ReleaseChannel, server: ReleaseServer
) -> None:
    import os as _os

    payload = {"blob.bin": _os.urandom(300_000)}  # incompressible: ~300 KB on the wire
    channel.publish(channel.release("1.1.0", tarball=simple_release_tarball("1.1.0", payload)))
    server.slow("releases/hal0-1.1.0.tar.gz", 100_000)  # the first update downloads for ~3 s
    first = subprocess.Popen(
        host.cli_argv("update"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        import time

        deadline = time.monotonic() + 30
        while not (host.layout.state_dir / "transaction.json").exists():
            assert time.monotonic() < deadline, "first update never started"
            time.sleep(0.05)
        second = host.cli("update")
        assert second.returncode == 6, second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        server.clear_faults()
        first.wait(timeout=120)
    assert first.returncode == 0, first.stderr
    assert host.current() == "1.1.0"


def test_pause_skip_and_explain(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.1.0"))
    assert host.cli("pause", "--until", "2h", "--reason", "family movie night").returncode == 0
    _code, doc = host.cli_json("explain")
    assert any("paused" in r and "family movie night" in r for r in doc["reasons"])
    proc = host.cli("update")
    assert proc.returncode == 0 and "paused" in proc.stdout
    assert host.current() == "1.0.0"
    # --force ignores the pause, never the signatures.
    assert host.cli("update", "--force").returncode == 0
    assert host.current() == "1.1.0"
    assert host.cli("resume").returncode == 0
    channel.publish(channel.release("1.2.0"))
    assert host.cli("skip", "1.2.0").returncode == 0
    proc = host.cli("update", "--check")
    assert proc.returncode == 0 and "skipped" in proc.stdout


def test_status_json_schema(host: Host) -> None:
    code, doc = host.cli_json("status")
    assert code == 0
    assert set(doc) >= {
        "installed",
        "previous",
        "retained",
        "channel",
        "available",
        "frozen",
        "quarantine",
        "transaction",
        "last",
    }
    assert doc["installed"] == "1.0.0" and doc["retained"] == ["1.0.0"]


@pytest.mark.parametrize(
    ("probation_s", "retained"),
    [
        (0, ["1.2.0", "1.3.0"]),
        # The default 10 min probation window is still open: its rollback would restore 1.2.0
        # as current and 1.1.0 as previous, so 1.1.0 stays too until the window closes.
        (600, ["1.1.0", "1.2.0", "1.3.0"]),
    ],
    ids=["no-probation", "probation-open"],
)
def test_retention_keeps_current_previous_and_newest(
    host: Host,
    channel: ReleaseChannel,
    server: ReleaseServer,
    trusted_root: Path,
    test_ca: TestCA,
    probation_s: int,
    retained: list[str],
) -> None:
    reconfigure(
        host,
        server,
        trusted_root,
        test_ca,
        install={"keep": 2},
        health={"probation": {"duration": probation_s}},
    )
    for version in ("1.1.0", "1.2.0", "1.3.0"):
        channel.publish(channel.release(version))
        assert host.cli("update").returncode == 0
    _code, doc = host.cli_json("status")
    assert doc["installed"] == "1.3.0" and doc["previous"] == "1.2.0"
    assert sorted(doc["retained"]) == retained
    assert not (host.layout.cache_dir / "1.0.0").exists()
    assert (host.layout.cache_dir / "1.3.0" / "hal0-1.3.0.tar.gz").exists()


def test_non_root_refused_without_writable_root(tmp_path: Path) -> None:
    # Run as nobody: a mutating command against / must refuse clearly (exit 2), not half-run.
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            *Host(tmp_path).cli_argv("pause")[:1],
            "-m",
            "watchdog_updater",
            "--root",
            "/",
            "pause",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs root" in proc.stderr


def test_json_error_document(host: Host) -> None:
    code, doc = host.cli_json("update", "--rollback", "--to", "7.7.7")
    assert code == 1
    assert doc["kind"] == "InstallError" and "7.7.7" in doc["error"] and doc["exit_code"] == 1
    json.dumps(doc)
