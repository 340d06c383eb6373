"""Heavy libraries are imported only by the work that needs them (the cold-start goal of issue 5).

Each case runs the real CLI in a fresh interpreter and reports which of the heavy modules ended up
in ``sys.modules``: sigstore (~0.5 s of imports) only once a verification actually runs; rich
(~4 MiB) only for human output.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.kit.channel import ReleaseChannel
from tests.kit.host import Host
from tests.kit.tls import TestCA

HEAVY = ("sigstore.models", "sigstore.verify", "pystemd", "prometheus_client", "rich.console")

_PROBE = """
import json, sys
from watchdog_updater._cli import main
code = main(sys.argv[1:])
heavy = json.loads({heavy!r})
print(json.dumps({{"code": code, "loaded": [m for m in heavy if m in sys.modules]}}))
"""


def _run_cli(root: Path, *args: str) -> tuple[int, set[str]]:
    probe = _PROBE.format(heavy=json.dumps(HEAVY))
    proc = subprocess.run(
        [sys.executable, "-c", probe, "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(report["code"]), set(report["loaded"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_imports_none_of_the_heavy_libraries(host: Host) -> None:
    code, loaded = _run_cli(host.root, "status", "--json")
    assert code == 0
    assert loaded == set()


def test_a_check_that_cannot_connect_never_imports_sigstore(
    host: Host, trusted_root: Path, test_ca: TestCA
) -> None:
    host.write_config(
        manifest_base=f"https://127.0.0.1:{_closed_port()}",
        trusted_root=trusted_root,
        ca_file=test_ca.ca_file,
        extra={"download": {"retries": 0}},
    )
    code, loaded = _run_cli(host.root, "update", "--check", "--json")
    assert code != 0  # the channel is unreachable, and says so
    assert "sigstore.models" not in loaded
    assert "sigstore.verify" not in loaded


def test_a_check_that_verifies_imports_sigstore(host: Host, channel: ReleaseChannel) -> None:
    # The other side of the coin: laziness must not skip the verification.
    channel.publish(channel.release("1.1.0"))
    code, loaded = _run_cli(host.root, "update", "--check", "--json")
    assert code == 100  # UPDATE_AVAILABLE: 1.1.0 verified and offered
    assert {"sigstore.models", "sigstore.verify"} <= loaded
    assert "rich.console" not in loaded  # --json: nothing is rendered


def test_human_output_loads_rich(host: Host) -> None:
    code, loaded = _run_cli(host.root, "status")
    assert code == 0
    assert loaded == {"rich.console"}
