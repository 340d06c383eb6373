"""The shipped systemd units pass `systemd-analyze verify`, and the daemon's sandboxing keeps its
`systemd-analyze security` exposure at or below 2.5."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def staged_units(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at a stub: the package is not installed system-wide."""
    stub = tmp_path / "watchdog-updater"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(
            unit.read_text().replace("/usr/bin/watchdog-updater", str(stub))
        )
    return tmp_path


def test_units_verify(tmp_path: Path) -> None:
    units = staged_units(tmp_path)
    names = sorted(p.name for p in units.iterdir() if p.suffix in (".service", ".timer"))
    assert names == ["hal0-updater-oneshot.service", "hal0-updater.service", "hal0-updater.timer"]
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(units / n) for n in names)],
        capture_output=True,
        text=True,
        env={"SYSTEMD_UNIT_PATH": f"{units}:", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_daemon_unit_exposure_at_most_2_5(tmp_path: Path) -> None:
    units = staged_units(tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(units / "hal0-updater.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for hal0-updater\.service: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.5, proc.stdout
