"""A whole sandboxed hal0 appliance: a private systemd running fake hal0 units from ``current``,
a signed release channel over HTTPS on loopback, and the updater configured for both.

Shared by the systemd tests and ``make demo``, so the demo shows exactly what the tests prove.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kit.channel import Published, ReleaseChannel
from tests.kit.fake_hal0 import (
    build_release_tarball,
    free_port,
    hal0_units,
    install_release,
    wait_for_http,
)
from tests.kit.host import Host
from tests.kit.release_server import ReleaseServer
from tests.kit.sigstore_kit import PrivateSigstore
from tests.kit.systemd_sandbox import SystemdSandbox
from tests.kit.tls import TestCA


@dataclass
class Ports:
    api: int
    openwebui: int
    slots: dict[str, int]


def gate_settings(ports: Ports, **overrides: Any) -> dict[str, Any]:
    """The updater's ``[update.health]`` and ``[update.services]`` for the fake appliance."""
    health: dict[str, Any] = {
        "units": ["hal0-api.service"],
        "slots": True,
        "slot_ports": dict(ports.slots),
        "http": [
            {
                "name": "hal0-api",
                "url": f"http://127.0.0.1:{ports.api}/api/health",
                "json": {"status": "ok"},
            },
            {"name": "openwebui", "url": f"http://127.0.0.1:{ports.openwebui}/health"},
        ],
        "command": [],
        "interval": 0.5,
        "consecutive": 3,
        "deadline": 20,
        "probe_timeout": 2,
        "probation": {"duration": 0},
    }
    health.update(overrides)
    return {
        "services": {"restart": ["hal0-api.service", "hal0-openwebui.service"], "manager": "auto"},
        "health": health,
    }


@dataclass
class Appliance:
    host: Host
    sandbox: SystemdSandbox
    server: ReleaseServer
    channel: ReleaseChannel
    ports: Ports
    trusted_root: Path
    ca: TestCA
    builds: Path
    settings: dict[str, Any] = field(default_factory=dict)

    def configure(self, **extra: Any) -> None:
        """Rewrite hal0.toml: the appliance's gate plus ``extra`` sections merged over it."""
        from tests.kit.host import merge

        self.settings = merge(gate_settings(self.ports), extra)
        self.host.write_config(
            manifest_base=self.server.base_url,
            trusted_root=self.trusted_root,
            ca_file=self.ca.ca_file,
            extra=self.settings,
        )

    def publish(self, version: str, behavior: str = "healthy", **fields: Any) -> Published:
        """Build a fake hal0 release that behaves as told, sign it, publish it on stable."""
        tarball = build_release_tarball(version, behavior, self.builds).read_bytes()
        published = self.channel.release(version, tarball=tarball, **fields)
        self.channel.publish(published)
        return published

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run the updater CLI inside the sandbox's namespaces (where its systemd is)."""
        return self.host.cli(*args, prefix=self.sandbox.nsenter_prefix(), timeout=timeout)

    def cli_json(self, *args: str, timeout: float = 180) -> tuple[int, Any]:
        return self.host.cli_json(*args, prefix=self.sandbox.nsenter_prefix(), timeout=timeout)

    def cli_argv(self, *args: str) -> list[str]:
        return [*self.sandbox.nsenter_prefix(), *self.host.cli_argv(*args)]

    def unit(self, unit: str) -> Mapping[str, str]:
        return self.sandbox.show(unit, "ActiveState", "SubState", "NRestarts", "InvocationID")


@contextmanager
def appliance(
    workdir: Path | None = None,
    *,
    sigstore: PrivateSigstore | None = None,
    initial: str = "1.0.0",
    slots: tuple[str, ...] = ("a", "b"),
    api_restart_sec: float = 1,
    start_rate_limit: bool = True,
) -> Iterator[Appliance]:
    """Bring up the whole appliance with ``initial`` installed, current and running.

    ``start_rate_limit=False`` lifts systemd's start limit from the units (see
    :func:`tests.kit.fake_hal0.hal0_units`), for campaigns that restart far more often than a host.
    """
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="hal0-appliance-"))
            )
        sigstore = sigstore or PrivateSigstore()
        ca = TestCA()
        stack.callback(ca.close)
        server = stack.enter_context(ReleaseServer(tls=ca))
        trusted_root = sigstore.write_trusted_root(workdir / "trusted_root.json")
        ports = Ports(free_port(), free_port(), {token: free_port() for token in slots})
        host = Host(workdir / "root", style="hal0")
        host.prepare()
        install_release(host.root, initial, "healthy")
        units = hal0_units(
            root=host.root,
            api_port=ports.api,
            openwebui_port=ports.openwebui,
            slots=ports.slots,
            python=sys.executable,
            api_restart_sec=api_restart_sec,
            start_rate_limit=start_rate_limit,
        )
        sandbox = stack.enter_context(SystemdSandbox(workdir / "units", units))
        sandbox.systemctl("start", "hal0.target")
        for unit in (
            "hal0-api.service",
            "hal0-openwebui.service",
            *(f"hal0-slot@{t}.service" for t in slots),
        ):
            sandbox.wait_for(unit, "active", timeout=20)
        # Active is not listening yet: wait until every service answers.
        wait_for_http(f"http://127.0.0.1:{ports.api}/api/health", timeout=20)
        wait_for_http(f"http://127.0.0.1:{ports.openwebui}/health", timeout=20)
        for port in ports.slots.values():
            wait_for_http(f"http://127.0.0.1:{port}/health", timeout=20)
        builds = workdir / "builds"
        builds.mkdir()
        app = Appliance(
            host=host,
            sandbox=sandbox,
            server=server,
            channel=ReleaseChannel(server, sigstore),
            ports=ports,
            trusted_root=trusted_root,
            ca=ca,
            builds=builds,
        )
        app.configure()
        yield app
