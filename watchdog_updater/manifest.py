"""hal0's release manifest (schema ``hal0.releases.v1``) and its channel rules (pure).

:func:`parse_manifest` takes bytes whose Sigstore bundle has ALREADY been verified; nothing calls it
on unverified data (see :mod:`watchdog_updater.releases`). Unknown fields are allowed, as hal0 allows
them; known fields are validated strictly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from watchdog_updater.errors import ManifestError
from watchdog_updater.versions import ReleaseKind, Version, VersionError, parse_version

__all__ = [
    "SCHEMA",
    "Manifest",
    "channel_accepts",
    "expected_identity",
    "parse_manifest",
]

SCHEMA = "hal0.releases.v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_STAGES = ("alpha", "beta", "rc")
_ROLLBACK_POLICIES = ("safe", "backup-required", "blocked")
_CHANNEL_KINDS: Mapping[str, frozenset[ReleaseKind]] = {
    "stable": frozenset({ReleaseKind.STABLE}),
    "preview": frozenset({ReleaseKind.PREVIEW, ReleaseKind.STABLE}),
    "nightly": frozenset({ReleaseKind.NIGHTLY}),
}


@dataclass(frozen=True)
class Manifest:
    """A verified, validated release manifest."""

    version: Version
    channel: str
    release_kind: str
    url: str
    bundle_url: str
    digest_sha256: str  # 64 lowercase hex, prefix stripped
    signer_identity: str
    signer_issuer: str
    raw_sha256: str  # digest of the manifest bytes as served
    prerelease_stage: str | None = None
    rollback_policy: str = "safe"
    upgrade_from: SpecifierSet | None = None
    min_data_version: str | None = None
    revoked: bool = False
    revoked_reason: str | None = None
    released_at: datetime | None = None
    expires: datetime | None = None
    size: int | None = None
    notes_url: str | None = None
    manifest_url: str | None = None

    def allows_upgrade_from(self, installed: Version | None) -> bool:
        """True when ``upgrade_from`` is absent or admits the installed version."""
        if self.upgrade_from is None or installed is None:
            return True
        return self.upgrade_from.contains(installed.to_pep440(), prereleases=True)


def channel_accepts(channel: str, kind: ReleaseKind) -> bool:
    """stable takes stable; preview takes preview or stable; nightly takes nightly."""
    return kind in _CHANNEL_KINDS.get(channel, frozenset())


def expected_identity(workflow: str, version: Version) -> str:
    """The exact signer identity hal0's release workflow carries for ``version``."""
    if version.kind is ReleaseKind.NIGHTLY:
        return f"{workflow}@refs/heads/main"
    return f"{workflow}@refs/tags/v{version}"


def _fail(field: str, reason: str) -> ManifestError:
    return ManifestError(
        f"manifest field {field!r}: {reason}",
        hint="the release server publishes a malformed manifest; report it upstream",
    )


def _text(doc: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise _fail(key, "required field is missing")
        return None
    if not isinstance(value, str) or not value:
        raise _fail(key, f"expected a non-empty string, got {value!r}")
    return value


def _required(doc: Mapping[str, Any], key: str) -> str:
    value = _text(doc, key, required=True)
    if value is None:  # pragma: no cover - _text raises for a missing required field
        raise _fail(key, "required field is missing")
    return value


def _timestamp(doc: Mapping[str, Any], key: str) -> datetime | None:
    value = _text(doc, key)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise _fail(key, f"timestamp lacks a UTC offset: {value!r}")
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError) as e:
        raise _fail(key, f"not a usable RFC 3339 timestamp: {value!r}") from e


def _https_or_loopback(key: str, url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as e:
        raise _fail(key, f"not a URL: {url!r}") from e
    if parts.username is not None or parts.password is not None:
        raise _fail(key, f"URL must not carry credentials: {url!r}")
    loopback = (
        host == "localhost" or host == "::1" or re.fullmatch(r"127(\.\d{1,3}){3}", host, re.ASCII)
    )
    if not host or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
        raise _fail(key, f"URL must be https (or http on loopback): {url!r}")
    return url


def parse_manifest(verified: bytes, *, channel: str | None) -> Manifest:
    """Parse VERIFIED manifest bytes for ``channel`` and apply hal0's channel rules.

    ``channel=None`` takes the manifest's own channel (a cached manifest re-read from disk).
    """
    try:
        doc = json.loads(verified)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int limits
        raise ManifestError(f"manifest is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    schema = doc.get("_schema")
    if schema != SCHEMA:
        raise _fail("_schema", f"expected {SCHEMA!r}, got {schema!r}")

    version_text = _required(doc, "version")
    try:
        version = parse_version(version_text)
    except VersionError as e:
        raise _fail("version", str(e)) from e

    manifest_channel = _text(doc, "channel") or "stable"
    if channel is None:
        channel = manifest_channel
    if manifest_channel != channel:
        raise ManifestError(
            f"channel mismatch: requested {channel!r}, manifest is for {manifest_channel!r}",
            hint="the server published another channel's manifest at this URL",
        )
    if not channel_accepts(channel, version.kind):
        raise ManifestError(
            f"channel rule: a {version.kind.value} release ({version}) is not allowed on the "
            f"{channel} channel"
        )

    release_kind = _text(doc, "release_kind") or "stable"
    stage = _text(doc, "prerelease_stage")
    if stage is not None and stage not in _STAGES:
        raise _fail("prerelease_stage", f"expected one of {', '.join(_STAGES)}, got {stage!r}")
    policy = _text(doc, "rollback_policy") or "safe"
    if policy not in _ROLLBACK_POLICIES:
        raise _fail("rollback_policy", f"expected one of {', '.join(_ROLLBACK_POLICIES)}")

    digest = _required(doc, "digest_sha256").lower()
    digest = digest.removeprefix("sha256:")
    if not _HEX64.fullmatch(digest):
        raise _fail("digest_sha256", "expected 64 hex digits (optionally prefixed 'sha256:')")

    spec_text = _text(doc, "upgrade_from")
    try:
        upgrade_from = SpecifierSet(spec_text) if spec_text else None
    except InvalidSpecifier as e:
        raise _fail("upgrade_from", f"not a PEP 440 specifier: {spec_text!r}") from e

    revoked = doc.get("revoked", False)
    if not isinstance(revoked, bool):
        raise _fail("revoked", "expected true or false")
    size = doc.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise _fail("size", f"expected a positive integer, got {size!r}")

    url = _https_or_loopback("url", _required(doc, "url"))
    bundle_url = _https_or_loopback("bundle_url", _required(doc, "bundle_url"))
    return Manifest(
        version=version,
        channel=manifest_channel,
        release_kind=release_kind,
        url=url,
        bundle_url=bundle_url,
        digest_sha256=digest,
        signer_identity=_required(doc, "signer_identity"),
        signer_issuer=_text(doc, "signer_issuer") or "https://token.actions.githubusercontent.com",
        raw_sha256=hashlib.sha256(verified).hexdigest(),
        prerelease_stage=stage,
        rollback_policy=policy,
        upgrade_from=upgrade_from,
        min_data_version=_text(doc, "min_data_version"),
        revoked=revoked,
        revoked_reason=_text(doc, "revoked_reason"),
        released_at=_timestamp(doc, "released_at"),
        expires=_timestamp(doc, "expires"),
        size=size,
        notes_url=_text(doc, "notes_url"),
        manifest_url=_text(doc, "manifest_url"),
    )
