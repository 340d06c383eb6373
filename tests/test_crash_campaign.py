"""SIGKILL the updater at every step boundary and at random instants, then recover.

After each kill and `recover`, whatever the instant: `current` resolves to a complete version dir,
no staging or trash leftovers, the lock is free, the journal is consistent, config and data are
untouched, and an interruption never quarantines a release. Real processes, real signals, real
files; the gate here is a command probe (the systemd variant is in test_systemd_gate.py).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.kit.channel import ReleaseChannel, simple_release_tarball
from tests.kit.host import Host
from tests.kit.recovery import check_invariants
from tests.kit.release_server import ReleaseServer
from tests.kit.tls import TestCA

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

FILES = {f"src/hal0/mod{i:04d}.py": f"# module {i}\n".encode() * 20 for i in range(400)}
EXPECTED_FILES = len(FILES) + 2  # + VERSION, release.json
STEPS = ("fetch", "stage", "promote", "swap", "hooks", "restart", "gate", "commit")
ITERATIONS = int(os.environ.get("WATCHDOG_CRASH_ITERATIONS", "100"))


def make_host(
    base: Path, n: int, server: ReleaseServer, trusted_root: Path, ca: TestCA, initial: bytes
) -> Host:
    host = Host(base / f"host{n}")
    host.prepare()
    host.write_config(
        manifest_base=server.base_url,
        trusted_root=trusted_root,
        ca_file=ca.ca_file,
        # A hook and a gate that take a little time, so that every step can be hit.
        extra={
            "install": {"post_swap": [["sleep", "0.15"]]},
            "health": {"consecutive": 3, "interval": 0.05, "probation": {"duration": 0}},
        },
    )
    host.install_initial("1.0.0", initial)
    return host


def kill_at(proc: subprocess.Popen[bytes], intent: Path, step: str | None, delay: float) -> str:
    """Kill at the first sight of `step` in the intent record, or after `delay` seconds."""
    started = time.monotonic()
    while proc.poll() is None:
        if step is not None:
            try:
                if f'"step": "{step}"' in intent.read_text():
                    os.killpg(proc.pid, signal.SIGKILL)
                    return step
            except FileNotFoundError:
                pass
            if time.monotonic() - started > 30:
                break
        elif time.monotonic() - started >= delay:
            os.killpg(proc.pid, signal.SIGKILL)
            return "random"
        time.sleep(0.002)
    return "finished"


def test_sigkill_anywhere_then_recover(
    tmp_path: Path,
    server: ReleaseServer,
    channel: ReleaseChannel,
    trusted_root: Path,
    test_ca: TestCA,
) -> None:
    channel.publish(channel.release("1.1.0", tarball=simple_release_tarball("1.1.0", FILES)))
    initial = simple_release_tarball("1.0.0", FILES)
    rng = random.Random(20261125)
    # Random instants are drawn inside the measured length of an uninterrupted run of each kind.
    probe = make_host(tmp_path, -1, server, trusted_root, test_ca, initial)
    started = time.monotonic()
    assert probe.cli("update").returncode == 0
    update_s = time.monotonic() - started
    started = time.monotonic()
    assert probe.cli("update", "--rollback").returncode == 0
    rollback_s = time.monotonic() - started
    hits: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for n in range(ITERATIONS):
        host = make_host(tmp_path, n, server, trusted_root, test_ca, initial)
        rollback = n % 4 == 3
        if rollback:  # a manual rollback cycle: 1.1.0 current, 1.0.0 previous
            assert host.cli("update").returncode == 0
            argv = host.cli_argv("update", "--rollback")
        else:
            argv = host.cli_argv("update")
        # Alternate between step boundaries and random instants.
        step = STEPS[(n // 2) % len(STEPS)] if n % 2 == 0 else None
        delay = rng.uniform(0.1, 0.9) * (rollback_s if rollback else update_s)
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        intent = host.layout.state_dir / "transaction.json"
        how = kill_at(proc, intent, step, delay)
        proc.wait(timeout=60)
        hits[how] += 1
        recover = host.cli("recover", "--json")
        assert recover.returncode in (0, 4), recover.stderr
        last = check_invariants(host, {"1.0.0", "1.1.0"}, expected_files=EXPECTED_FILES)
        outcomes[str(last.get("outcome"))] += 1
        # The host goes on working: a normal update after recovery lands on 1.1.0 (or is a no-op).
        if not rollback and n % 4 == 0:
            after = host.cli("update")
            assert after.returncode == 0, after.stderr
            assert host.current() == "1.1.0"
        for p in host.root.iterdir():  # keep the disk small
            subprocess.run(["rm", "-rf", str(p)], check=True)
    print(f"kills: {dict(hits)}; outcomes after recovery: {dict(outcomes)}")
    assert ITERATIONS < 20 or sum(hits[s] for s in STEPS) >= len(STEPS), hits
    assert hits["random"] + sum(hits[s] for s in STEPS) >= ITERATIONS * 0.7, hits
