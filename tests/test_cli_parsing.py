"""Command-line combinations: every option given is honoured or refused, never silently dropped."""

from __future__ import annotations

import json
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
