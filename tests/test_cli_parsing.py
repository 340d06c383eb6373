"""Command-line combinations: every option given is honoured or refused, never silently dropped."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from watchdog_updater import _cli


def run(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    code = _cli.main(["--root", str(root), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args",
    [
        ["quarantine", "--json", "list"],
        ["quarantine", "list", "--json"],
        ["config", "--json", "show"],
        ["config", "show", "--json"],
    ],
)
def test_json_is_honoured_before_or_after_the_action(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str]
) -> None:
    code, out, _ = run(capsys, tmp_path, *args)
    assert code == 0
    assert isinstance(json.loads(out), dict)


def test_an_action_without_json_prints_for_humans(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, tmp_path, "quarantine", "list")
    assert (code, out.strip()) == (0, "no quarantined versions")


@pytest.mark.parametrize(
    ("mode", "named"),
    [(["--rollback"], "--rollback"), (["--check"], "--check"), (["--dry-run"], "--dry-run")],
)
def test_version_with_a_mode_that_ignores_it_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mode: list[str], named: str
) -> None:
    code, _, err = run(capsys, tmp_path, "update", *mode, "--version", "1.2.3")
    assert code == 2
    assert f"error: --version applies to an update, not to {named}" in err


def test_status_of_an_open_ended_pause_says_until_resumed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(capsys, tmp_path, "pause", "--reason", "disk swap")[0] == 0
    code, out, _ = run(capsys, tmp_path, "status")
    assert code == 0
    assert "paused:      until resumed disk swap" in out, out
    doc = json.loads(run(capsys, tmp_path, "status", "--json")[1])
    assert (doc["paused_until"], doc["pause_reason"]) == ("forever", "disk swap")


def test_status_forgets_a_pause_that_has_run_out(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(capsys, tmp_path, "pause", "--until", "1h", "--reason", "short")[0] == 0
    holds = tmp_path / "var/lib/watchdog-updater/holds.json"
    doc = json.loads(holds.read_text())
    holds.write_text(json.dumps({**doc, "paused_until": time.time() - 1}))  # an hour later
    code, out, _ = run(capsys, tmp_path, "status")
    assert code == 0 and "paused:" not in out, out
    doc = json.loads(run(capsys, tmp_path, "status", "--json")[1])
    assert (doc["paused_until"], doc["pause_reason"]) == (None, None)


@pytest.mark.parametrize("until", ["2020-01-01T00:00:00+00:00", "0s"])
def test_a_pause_that_would_be_over_at_once_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, until: str
) -> None:
    code, _, err = run(capsys, tmp_path, "pause", "--until", until)
    assert code == 2 and "that is not in the future" in err, err
