"""`config edit`: visudo semantics, driven through the real CLI with scripted editors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.kit.host import Host


def editor(tmp_path: Path, name: str, body: str) -> str:
    script = tmp_path / name
    script.write_text("#!/bin/sh\nset -e\n" + body)
    script.chmod(0o755)
    return str(script)


def edit(host: Host, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        host.cli_argv("config", "edit"),
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", **env},
        check=False,
    )


def make_host(tmp_path: Path) -> Host:
    host = Host(tmp_path / "root")
    host.config_path.parent.mkdir(parents=True)
    host.config_path.write_text('[update]\nchannel = "stable"\n')
    host.config_path.chmod(0o640)
    return host


def test_valid_edit_replaces_atomically_and_keeps_mode(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    ed = editor(tmp_path, "ed", "sed -i 's/stable/nightly/' \"$1\"\n")
    proc = edit(host, {"EDITOR": ed, "VISUAL": ""})
    assert proc.returncode == 0, proc.stderr
    assert 'channel = "nightly"' in host.config_path.read_text()
    assert host.config_path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in host.config_path.parent.iterdir()] == ["hal0.toml"]


def test_visual_wins_over_editor(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    visual = editor(tmp_path, "visual", "sed -i 's/stable/preview/' \"$1\"\n")
    other = editor(tmp_path, "other", "exit 9\n")
    assert edit(host, {"VISUAL": visual, "EDITOR": other}).returncode == 0
    assert 'channel = "preview"' in host.config_path.read_text()


def test_invalid_edit_then_abort_leaves_original(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    before = host.config_path.read_bytes()
    ed = editor(tmp_path, "ed", 'echo \'chanel = "x"\' >> "$1"\n')
    proc = edit(host, {"EDITOR": ed, "VISUAL": ""}, stdin="a\n")
    assert proc.returncode == 2
    assert "unknown key; did you mean 'channel'?" in proc.stderr
    assert host.config_path.read_bytes() == before
    assert [p.name for p in host.config_path.parent.iterdir()] == ["hal0.toml"]


def test_invalid_edit_then_edit_again_and_fix(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    counter = tmp_path / "count"
    # First round writes a typo, the second round fixes it.
    ed = editor(
        tmp_path,
        "ed",
        f'if [ -e {counter} ]; then sed -i "s/chanel/channel/" "$1"; '
        f'else touch {counter}; sed -i "s/channel/chanel/" "$1"; fi\n',
    )
    proc = edit(host, {"EDITOR": ed, "VISUAL": ""}, stdin="e\n")
    assert proc.returncode == 0, proc.stderr
    assert "did you mean 'channel'" in proc.stderr
    assert host.config_path.read_text() == '[update]\nchannel = "stable"\n'


def test_no_answer_aborts(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    ed = editor(tmp_path, "ed", "echo '[update' > \"$1\"\n")
    proc = edit(host, {"EDITOR": ed, "VISUAL": ""}, stdin="")
    assert proc.returncode == 2
    assert "not valid TOML" in proc.stderr
    assert host.config_path.read_text() == '[update]\nchannel = "stable"\n'


def test_failing_editor_changes_nothing(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    ed = editor(tmp_path, "ed", 'echo junk > "$1"; exit 3\n')
    proc = edit(host, {"EDITOR": ed, "VISUAL": ""})
    assert proc.returncode == 2 and "exited 3" in proc.stderr
    assert host.config_path.read_text() == '[update]\nchannel = "stable"\n'
