"""On a terminal the CLI draws a live gate table (and a download progress bar); off a terminal it
prints plain lines. Driven through a real pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time

from tests.kit.channel import ReleaseChannel
from tests.kit.host import Host


def run_on_pty(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "LINES": "40", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=10), b"".join(chunks).decode(errors="replace")


def test_live_gate_table_on_a_terminal(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.1.0"))
    code, screen = run_on_pty(host.cli_argv("update"))
    assert code == 0, screen
    assert "health gate" in screen
    table_rows = [line for line in screen.splitlines() if "│" in line and " ok " in line]
    assert table_rows, screen  # the probe "ok" appears as a table row
    assert "pass" in table_rows[-1]
    assert "1.1.0 passed its health gate" in screen


def test_plain_lines_off_a_terminal(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.1.0"))
    proc = host.cli("update")
    assert proc.returncode == 0
    assert "│" not in proc.stderr
    assert "ok: pass" in proc.stderr
    assert "\x1b[" not in proc.stdout + proc.stderr  # no escape codes for a pipe
