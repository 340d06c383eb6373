"""A signed hal0 release channel on a real loopback server, minted by the private Sigstore.

Publishes exactly what hal0 publishes: ``<channel>.json`` with its ``.bundle``, and per release a
``hal0-<version>.tar.gz`` with its ``.bundle``, signed by the identity hal0's release workflow
carries for that version. Tests then break one thing at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.kit.release_server import ReleaseServer
from tests.kit.sigstore_kit import PrivateSigstore

WORKFLOW = "https://github.com/Hal0ai/hal0/.github/workflows/release.yml"
ISSUER = "https://token.actions.githubusercontent.com"


def identity_for(version: str, workflow: str = WORKFLOW) -> str:
    """The exact signer identity of hal0's release workflow for ``version``."""
    if "-nightly." in version:
        return f"{workflow}@refs/heads/main"
    return f"{workflow}@refs/tags/v{version}"


def simple_release_tarball(version: str, files: dict[str, bytes] | None = None) -> bytes:
    """A minimal well-formed release: ``hal0-<version>/`` with VERSION and release.json."""
    files = {"VERSION": f"{version}\n".encode(), "release.json": b"{}\n", **(files or {})}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        top = tarfile.TarInfo(f"hal0-{version}")
        top.type = tarfile.DIRTYPE
        top.mode = 0o755
        tar.addfile(top)
        for name, data in files.items():
            info = tarfile.TarInfo(f"hal0-{version}/{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class Published:
    version: str
    tarball: bytes
    manifest: dict[str, Any]


class ReleaseChannel:
    """Builds, signs and publishes releases and channel manifests."""

    def __init__(
        self,
        server: ReleaseServer,
        sigstore: PrivateSigstore,
        *,
        workflow: str = WORKFLOW,
        issuer: str = ISSUER,
    ) -> None:
        self.server = server
        self.sigstore = sigstore
        self.workflow = workflow
        self.issuer = issuer

    def url(self, path: str) -> str:
        return f"{self.server.base_url}/{path.lstrip('/')}"

    def release(
        self,
        version: str,
        *,
        channel: str = "stable",
        tarball: bytes | None = None,
        build: Callable[[str], bytes] | None = None,
        sign_tarball_as: str | None = None,
        **fields: Any,
    ) -> Published:
        """Publish a release's tarball and bundle, then return its (unpublished) manifest."""
        data = tarball if tarball is not None else (build or simple_release_tarball)(version)
        name = f"releases/hal0-{version}.tar.gz"
        self.server.publish(name, data)
        identity = sign_tarball_as or identity_for(version, self.workflow)
        self.server.publish(
            name + ".bundle", self.sigstore.sign(data, identity=identity, issuer=self.issuer)
        )
        manifest: dict[str, Any] = {
            "_schema": "hal0.releases.v1",
            "version": version,
            "channel": channel,
            "release_kind": "nightly" if "-nightly." in version else "stable",
            "url": self.url(name),
            "bundle_url": self.url(name + ".bundle"),
            "digest_sha256": hashlib.sha256(data).hexdigest(),
            "signer_identity": identity_for(version, self.workflow),
            "signer_issuer": self.issuer,
            "released_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        manifest.update(fields)
        return Published(version, data, manifest)

    def publish_manifest(
        self,
        channel: str,
        manifest: dict[str, Any] | bytes,
        *,
        sign_as: str | None = None,
        issuer: str | None = None,
        fault: str | None = None,
        signer: PrivateSigstore | None = None,
    ) -> bytes:
        """Sign and publish ``<channel>.json``; returns the exact bytes served."""
        raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest, indent=2).encode()
        version = "" if isinstance(manifest, bytes) else str(manifest.get("version", ""))
        identity = sign_as or identity_for(version, self.workflow)
        bundle = (signer or self.sigstore).sign(
            raw, identity=identity, issuer=issuer or self.issuer, fault=fault
        )
        self.server.publish(f"{channel}.json", raw)
        self.server.publish(f"{channel}.json.bundle", bundle)
        return raw

    def publish(self, published: Published, channel: str | None = None) -> bytes:
        return self.publish_manifest(channel or published.manifest["channel"], published.manifest)


def write_trusted_root(sigstore: PrivateSigstore, directory: Path) -> Path:
    return sigstore.write_trusted_root(directory / "trusted_root.json")
