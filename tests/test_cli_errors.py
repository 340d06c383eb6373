"""Operating-system errors reach the operator as one clear error with a hint, never a traceback.

The permission cases are real: a child process running as the unprivileged user ``nobody``
against a state directory as the shipped unit leaves it (0750, root), and root refused by an
immutable directory (file modes never stop root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534


# setpriv (util-linux) switches user at its exec: the interpreter may live where nobody cannot
# look (here under /root), which a plain setuid() before exec would trip over.
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
needs_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a command as nobody",
)


def cli(root: Path, *args: str, nobody: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(AS_NOBODY if nobody else []),
            sys.executable,
            "-m",
            "watchdog_updater",
            "--root",
            str(root),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def root() -> Iterator[Path]:
    """A sandbox root that ``nobody`` may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="wdu-cli-errors-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def assert_one_clear_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


@needs_nobody
@pytest.mark.parametrize("command", [["status"], ["history"], ["quarantine", "list"], ["explain"]])
def test_a_read_without_access_to_the_state_is_refused_clearly(
    root: Path, command: list[str]
) -> None:
    assert cli(root, "pause").returncode == 0  # as root: the state dir and a holds file exist
    state = root / "var/lib/watchdog-updater"
    state.chmod(0o750)  # StateDirectoryMode=0750 in hal0-updater.service
    proc = cli(root, *command, nobody=True)
    assert proc.returncode == 2, proc.stderr
    assert_one_clear_error(proc, f"permission denied: {state}/", "run it with sudo")


@needs_nobody
def test_the_json_error_document_says_the_same(root: Path) -> None:
    assert cli(root, "pause").returncode == 0
    (root / "var/lib/watchdog-updater").chmod(0o750)
    proc = cli(root, "status", "--json", nobody=True)
    doc = json.loads(proc.stdout)
    assert (proc.returncode, doc["kind"], doc["exit_code"]) == (2, "PermissionRefused", 2)
    assert doc["error"].startswith("permission denied: ") and "sudo" in doc["hint"]


def test_another_os_error_is_one_error_with_its_cause_under_verbose(root: Path) -> None:
    (root / "var/lib").mkdir(parents=True)
    (root / "var/lib/watchdog-updater").write_text("a file where the state dir belongs\n")
    proc = cli(root, "pause")
    assert proc.returncode == 1, proc.stderr
    assert_one_clear_error(proc, "Not a directory: ", "holds.json")
    verbose = cli(root, "status", "-v")
    assert verbose.returncode == 1
    assert "caused by: NotADirectoryError" in verbose.stderr, verbose.stderr


def test_root_refused_is_told_why_root_can_be_refused(root: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    state = root / "var/lib/watchdog-updater"
    state.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(state)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        proc = cli(root, "pause")
    finally:
        subprocess.run(["chattr", "-i", str(state)], check=True)
    assert proc.returncode == 2, proc.stderr
    assert_one_clear_error(proc, "permission denied: ", "immutable file")
    assert "sudo" not in proc.stderr
