"""Shared fixtures: a private Sigstore, an HTTPS release server with a test CA, a signed channel
and a hal0 host under a temporary root."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.channel import ReleaseChannel
from tests.kit.host import Host
from tests.kit.release_server import ReleaseServer
from tests.kit.sigstore_kit import PrivateSigstore
from tests.kit.tls import TestCA


@pytest.fixture(scope="session")
def sigstore() -> PrivateSigstore:
    return PrivateSigstore()


@pytest.fixture(scope="session")
def test_ca() -> Iterator[TestCA]:
    ca = TestCA()
    yield ca
    ca.close()


@pytest.fixture
def server(test_ca: TestCA) -> Iterator[ReleaseServer]:
    with ReleaseServer(tls=test_ca) as srv:
        yield srv


@pytest.fixture
def channel(server: ReleaseServer, sigstore: PrivateSigstore) -> ReleaseChannel:
    return ReleaseChannel(server, sigstore)


@pytest.fixture
def trusted_root(sigstore: PrivateSigstore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sigstore.write_trusted_root(tmp_path_factory.mktemp("trust") / "trusted_root.json")


@pytest.fixture
def host(tmp_path: Path, server: ReleaseServer, trusted_root: Path, test_ca: TestCA) -> Host:
    """A host with 1.0.0 installed and current, configured for the test channel."""
    h = Host(tmp_path / "root")
    h.prepare()
    h.write_config(
        manifest_base=server.base_url, trusted_root=trusted_root, ca_file=test_ca.ca_file
    )
    h.install_initial("1.0.0")
    return h


def reconfigure(
    host: Host, server: ReleaseServer, trusted_root: Path, ca: TestCA, **extra: Any
) -> None:
    host.write_config(
        manifest_base=server.base_url, trusted_root=trusted_root, ca_file=ca.ca_file, extra=extra
    )


@pytest.fixture
def mount_tmpfs() -> Iterator[Callable[[Path, str], None]]:
    """Mount a tmpfs with the given options (``size=2m``: a small disk); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, options: str) -> None:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)
