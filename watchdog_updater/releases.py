"""Signed channel releases: "what may I install?" and "give me that tarball, verified".

Order of operations (never parse or act on bytes before their signature is verified):

1. fetch ``<channel>.json`` and ``<channel>.json.bundle`` (both size-capped);
2. verify the bundle over the exact manifest bytes against the channel's identity regex and the pinned
   issuer; only then parse the JSON (:func:`watchdog_updater.manifest.parse_manifest`);
3. the manifest's ``signer_identity`` must equal the identity derived from its version, its
   ``signer_issuer`` the pinned issuer; freshness against the remembered manifest, expiry;
4. download the tarball into the per-version cache while hashing it, compare ``digest_sha256``, then
   verify the tarball's bundle over that digest (no second read) against the exact identity.

The pure decisions (:func:`check_freshness`, :func:`evaluate_offer`) take everything as arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from watchdog_updater.errors import FreshnessError, VerificationError
from watchdog_updater.manifest import Manifest, expected_identity, parse_manifest
from watchdog_updater.state import ChannelMemory, Holds, QuarantineEntry, StateStore
from watchdog_updater.storage import atomic_write_bytes
from watchdog_updater.versions import Version, parse_version

if TYPE_CHECKING:
    from watchdog_updater.config import Config
    from watchdog_updater.fetch import Fetcher
    from watchdog_updater.trust import BundleVerifier, VerifiedSignature

__all__ = [
    "CachedRelease",
    "Offer",
    "ReleaseSource",
    "VerifiedManifest",
    "check_freshness",
    "evaluate_offer",
]

ProgressFn = Callable[[int, int | None], None]


@dataclass(frozen=True)
class VerifiedManifest:
    manifest: Manifest
    raw: bytes
    bundle: bytes
    signed_at: float  # integrated time of the manifest's signature (transparency log)


@dataclass(frozen=True)
class Offer:
    """The answer to "is there something I should install now?"."""

    installed: str | None
    channel: str
    candidate: Manifest | None
    available: bool
    reason: str

    def to_json(self) -> dict[str, object]:
        c = self.candidate
        return {
            "installed": self.installed,
            "channel": self.channel,
            "available": self.available,
            "reason": self.reason,
            "candidate": None
            if c is None
            else {
                "version": str(c.version),
                "channel": c.channel,
                "released_at": c.released_at.isoformat() if c.released_at else None,
                "digest_sha256": c.digest_sha256,
                "revoked": c.revoked,
                "notes_url": c.notes_url,
            },
        }


@dataclass(frozen=True)
class CachedRelease:
    version: str
    tarball: Path
    digest_sha256: str
    size: int
    resumed: bool


def check_freshness(
    manifest: Manifest,
    *,
    signed_at: float,
    remembered: ChannelMemory | None,
    allow_downgrade: bool,
    now: float,
) -> None:
    """Refuse an expired manifest, or one older than the newest already accepted (replay/freeze)."""
    if manifest.expires is not None and manifest.expires.timestamp() < now:
        raise FreshnessError(
            f"manifest expired at {manifest.expires.isoformat()} (version {manifest.version})",
            hint="the release server serves stale data; try again later or report it",
        )
    if remembered is None or allow_downgrade:
        return
    seen = parse_version(remembered.version)
    if manifest.version < seen:
        raise FreshnessError(
            f"replayed or stale manifest: offers {manifest.version}, but {seen} was already "
            "accepted on this channel",
            hint="a mirror may be serving old data; set allow_downgrade only if this is intended",
        )
    if manifest.version == seen and signed_at < remembered.signed_at:
        raise FreshnessError(
            f"replayed manifest: {manifest.version} signed at {signed_at:.0f}, older than the "
            f"accepted signature of {remembered.signed_at:.0f}",
            hint="a mirror may be serving an old copy of the manifest",
        )


def evaluate_offer(
    manifest: Manifest,
    *,
    installed: Version | None,
    channel: str,
    quarantine: Mapping[str, QuarantineEntry],
    holds: Holds,
    min_release_age_s: float,
    allow_downgrade: bool,
    now: float,
    force: bool = False,
) -> Offer:
    """Decide whether ``manifest`` should be installed now, and say why (or why not).

    ``force`` (an operator's ``--force``) ignores quarantine, skip, pause, freeze and cooldown; it
    never ignores revocation, ``upgrade_from`` or a signature check.
    """
    version = manifest.version
    inst = str(installed) if installed else None

    def offer(available: bool, reason: str) -> Offer:
        return Offer(inst, channel, manifest, available, reason)

    if installed is not None and version == installed:
        return offer(False, f"up to date: {version} is installed")
    if manifest.revoked:
        return offer(False, f"{version} is revoked: {manifest.revoked_reason or 'no reason given'}")
    if installed is not None and version < installed and not allow_downgrade:
        return offer(False, f"{version} is older than the installed {installed} (no downgrade)")
    if not manifest.allows_upgrade_from(installed):
        return offer(
            False,
            f"{version} cannot upgrade from {installed} (upgrade_from {manifest.upgrade_from})",
        )
    if not force:
        if holds.frozen_reason:
            return offer(False, f"updates are frozen: {holds.frozen_reason}")
        if holds.paused(now):
            until = "until resumed" if holds.paused_until == float("inf") else "until a set time"
            return offer(
                False, f"updates are paused {until}: {holds.pause_reason or ''}".rstrip(": ")
            )
        if str(version) in holds.skipped:
            return offer(False, f"{version} is skipped by the operator")
        if str(version) in quarantine:
            q = quarantine[str(version)]
            return offer(False, f"{version} is quarantined: {q.reason}")
        if min_release_age_s > 0 and manifest.released_at is not None:
            age = now - manifest.released_at.timestamp()
            if age < min_release_age_s:
                return offer(
                    False,
                    f"{version} is too young: released {age:.0f} s ago, minimum age "
                    f"{min_release_age_s:.0f} s",
                )
    return offer(True, f"{version} is available (installed: {installed or 'none'})")


def _same_identity(actual: str, expected: str) -> bool:
    """GitHub owner and repo names are case-insensitive; the ref after '@' is not."""
    a_repo, _, a_ref = actual.partition("@")
    e_repo, _, e_ref = expected.partition("@")
    return a_repo.lower() == e_repo.lower() and a_ref == e_ref


class ReleaseSource:
    """Fetches and verifies a channel's release. Owns no state but the cache and channel memory."""

    def __init__(
        self,
        config: Config,
        *,
        fetcher: Fetcher,
        verifier: BundleVerifier,
        store: StateStore,
        cache_dir: Path,
    ) -> None:
        self.config = config
        self.fetcher = fetcher
        self.verifier = verifier
        self.store = store
        self.cache_dir = cache_dir

    def _verify_any_channel(self, raw: bytes, bundle: bytes, *, what: str) -> VerifiedSignature:
        """Verify against any configured channel identity (a cached manifest's channel is unknown
        until it is parsed, and it is parsed only once verified)."""
        from watchdog_updater.trust import SignerPolicy

        errors: list[str] = []
        for pattern in dict.fromkeys(self.config.verify.signer_identity.values()):
            policy = SignerPolicy(issuer=self.config.verify.signer_issuer, identity_pattern=pattern)
            try:
                return self.verifier.verify_bytes(raw, bundle, policy, what=what)
            except VerificationError as e:
                errors.append(str(e))
        raise VerificationError(f"{what}: no channel identity verifies it: {'; '.join(errors)}")

    def fetch_manifest(self, channel: str, *, now: float) -> VerifiedManifest:
        """Fetch, verify, then parse the channel's manifest; check identity and freshness."""
        from watchdog_updater.trust import SignerPolicy

        cfg = self.config
        url = cfg.manifest_url_for(channel)
        name = posixpath.basename(urlsplit(url).path) or f"{channel}.json"
        raw = self.fetcher.fetch_bytes(
            url, max_bytes=cfg.download.max_manifest_bytes, what=f"manifest {name}"
        )
        bundle = self.fetcher.fetch_bytes(
            url + ".bundle", max_bytes=cfg.download.max_bundle_bytes, what=f"bundle {name}.bundle"
        )
        pattern = cfg.verify.signer_identity[channel]
        signature: VerifiedSignature = self.verifier.verify_bytes(
            raw,
            bundle,
            SignerPolicy(issuer=cfg.verify.signer_issuer, identity_pattern=pattern),
            what=f"{name}.bundle",
        )
        manifest = parse_manifest(raw, channel=channel)  # only now: the bytes are verified
        expected = expected_identity(cfg.verify.workflow, manifest.version)
        if not _same_identity(manifest.signer_identity, expected):
            raise VerificationError(
                f"signer identity mismatch: manifest names {manifest.signer_identity!r}, "
                f"version {manifest.version} must be signed by {expected!r}",
                hint="the manifest does not belong to this release workflow",
            )
        if manifest.signer_issuer != cfg.verify.signer_issuer:
            raise VerificationError(
                f"signer issuer mismatch: manifest names {manifest.signer_issuer!r}, pinned "
                f"issuer is {cfg.verify.signer_issuer!r}"
            )
        signed_at = signature.integrated_time.timestamp()
        check_freshness(
            manifest,
            signed_at=signed_at,
            remembered=self.store.channel_memory(channel),
            allow_downgrade=cfg.allow_downgrade,
            now=now,
        )
        return VerifiedManifest(manifest=manifest, raw=raw, bundle=bundle, signed_at=signed_at)

    def remember(self, channel: str, verified: VerifiedManifest, *, now: float) -> None:
        """Record the manifest as the newest accepted on ``channel`` (after all checks passed)."""
        memory = self.store.channel_memory(channel)
        if memory is not None and parse_version(memory.version) > verified.manifest.version:
            # An explicit downgrade never lowers the remembered high-water mark, but the check
            # did succeed: last_check_timestamp_seconds must move, or alerts call it dead.
            self.store.remember_channel(channel, dataclasses.replace(memory, accepted_at=now))
            return
        self.store.remember_channel(
            channel,
            ChannelMemory(
                version=str(verified.manifest.version),
                manifest_sha256=verified.manifest.raw_sha256,
                signed_at=verified.signed_at,
                accepted_at=now,
            ),
        )

    def release_dir(self, version: str) -> Path:
        return self.cache_dir / version

    def download(
        self, verified: VerifiedManifest, *, progress: ProgressFn | None = None
    ) -> CachedRelease:
        """Download (or reuse from cache) the tarball and verify digest and bundle."""
        from watchdog_updater.trust import SignerPolicy

        manifest = verified.manifest
        version = str(manifest.version)
        directory = self.release_dir(version)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / "manifest.json", verified.raw)
        atomic_write_bytes(directory / "manifest.json.bundle", verified.bundle)
        tarball = directory / f"hal0-{version}.tar.gz"
        bundle_path = directory / f"hal0-{version}.tar.gz.bundle"
        cfg = self.config.download
        bundle = self.fetcher.fetch_bytes(
            manifest.bundle_url, max_bytes=cfg.max_bundle_bytes, what=f"bundle of {tarball.name}"
        )
        resumed = False
        if tarball.exists():
            digest, size = _hash_file(tarball)
        else:
            result = self.fetcher.download(
                manifest.url,
                tarball,
                max_bytes=cfg.max_tarball_bytes,
                expected_size=manifest.size,
                what=f"tarball {tarball.name}",
                progress=progress,
            )
            digest, size, resumed = result.sha256_hex, result.size, result.resumed
        try:
            if digest != manifest.digest_sha256:
                raise VerificationError(
                    f"tarball digest mismatch: manifest says sha256:{manifest.digest_sha256}, "
                    f"downloaded sha256:{digest}",
                    hint="the tarball was tampered with or corrupted in transit; it was deleted",
                )
            self.verifier.verify_digest(
                digest,
                bundle,
                SignerPolicy.exact(manifest.signer_identity, self.config.verify.signer_issuer),
                what=bundle_path.name,
            )
        except VerificationError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tarball)
            raise
        atomic_write_bytes(bundle_path, bundle)
        return CachedRelease(version, tarball, digest, size, resumed)

    def cached(self, version: str) -> CachedRelease | None:
        """A previously verified tarball in the cache, re-verified from disk (rollback path)."""
        from watchdog_updater.trust import SignerPolicy

        directory = self.release_dir(version)
        tarball = directory / f"hal0-{version}.tar.gz"
        try:
            raw = (directory / "manifest.json").read_bytes()
            manifest_bundle = (directory / "manifest.json.bundle").read_bytes()
            bundle = (directory / f"hal0-{version}.tar.gz.bundle").read_bytes()
        except FileNotFoundError:
            return None
        if not tarball.exists():
            return None
        # The cached manifest is re-verified before it is parsed, like a fresh one.
        signature = self._verify_any_channel(raw, manifest_bundle, what="cached manifest.json")
        manifest = parse_manifest(raw, channel=None)
        pattern = self.config.verify.signer_identity.get(manifest.channel)
        issuer = self.config.verify.signer_issuer
        if pattern is None or not SignerPolicy(issuer=issuer, identity_pattern=pattern).matches(
            signature.identity
        ):
            raise VerificationError(
                f"signer identity mismatch: cached {manifest.channel} manifest of {version} is "
                f"signed by {signature.identity!r}, expected /{pattern}/"
            )
        digest, size = _hash_file(tarball)
        if digest != manifest.digest_sha256:
            raise VerificationError(f"cached tarball of {version} no longer matches its digest")
        self.verifier.verify_digest(
            digest,
            bundle,
            SignerPolicy.exact(manifest.signer_identity, self.config.verify.signer_issuer),
            what=f"cached hal0-{version}.tar.gz.bundle",
        )
        return CachedRelease(version, tarball, digest, size, False)


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
