"""Signed channel releases end to end: a real HTTPS server, real Sigstore bundles from a private
CA, the real verifier. One short test per attack, named after it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import reconfigure
from tests.kit.channel import ReleaseChannel, identity_for
from tests.kit.host import Host
from tests.kit.release_server import ReleaseServer
from tests.kit.sigstore_kit import PrivateSigstore
from tests.kit.tls import TestCA
from watchdog_updater.app import App
from watchdog_updater.config import load_config
from watchdog_updater.errors import (
    DownloadError,
    FreshnessError,
    ManifestError,
    SizeLimitError,
    VerificationError,
)


def app_for(host: Host) -> App:
    return App.create(host.root, load_config(host.config_path, missing_ok=False))


def check(host: Host):  # type: ignore[no-untyped-def]
    return app_for(host).updater().check()


def test_valid_release_is_offered(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.1.0"))
    offer = check(host)
    assert offer.available, offer.reason
    assert str(offer.candidate.version) == "1.1.0"


def test_same_version_is_up_to_date(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.0.0"))
    offer = check(host)
    assert not offer.available
    assert "up to date" in offer.reason


def test_manifest_signed_by_wrong_identity_refused(host: Host, channel: ReleaseChannel) -> None:
    rel = channel.release("1.1.0")
    channel.publish_manifest(
        "stable",
        rel.manifest,
        sign_as="https://github.com/evil/hal0/.github/workflows/release.yml@refs/tags/v1.1.0",
    )
    with pytest.raises(VerificationError, match="signer identity mismatch"):
        check(host)


def test_manifest_signed_with_wrong_issuer_refused(host: Host, channel: ReleaseChannel) -> None:
    rel = channel.release("1.1.0")
    channel.publish_manifest("stable", rel.manifest, issuer="https://accounts.example.com")
    with pytest.raises(VerificationError, match="issuer"):
        check(host)


def test_manifest_signed_by_another_ca_refused(host: Host, channel: ReleaseChannel) -> None:
    rel = channel.release("1.1.0")
    channel.publish_manifest("stable", rel.manifest, signer=PrivateSigstore(name="rogue"))
    with pytest.raises(VerificationError):
        check(host)


def test_tampered_manifest_refused(
    host: Host, channel: ReleaseChannel, server: ReleaseServer
) -> None:
    rel = channel.release("1.1.0")
    raw = channel.publish(rel)
    server.publish("stable.json", raw.replace(b'"1.1.0"', b'"1.1.1"', 1))
    with pytest.raises(VerificationError, match=r"digest|does not match"):
        check(host)


def test_unsigned_manifest_refused(
    host: Host, channel: ReleaseChannel, server: ReleaseServer
) -> None:
    channel.publish(channel.release("1.1.0"))
    server.unpublish("stable.json.bundle")
    with pytest.raises(DownloadError, match="404"):
        check(host)


def test_garbage_bundle_refused(host: Host, channel: ReleaseChannel, server: ReleaseServer) -> None:
    channel.publish(channel.release("1.1.0"))
    server.publish("stable.json.bundle", b'{"mediaType": "nonsense"}')
    with pytest.raises(VerificationError):
        check(host)


def test_manifest_naming_another_signer_identity_refused(
    host: Host, channel: ReleaseChannel
) -> None:
    # Validly signed by the release workflow, but the manifest claims a tag that is not its version.
    rel = channel.release("1.1.0", signer_identity=identity_for("1.0.9"))
    channel.publish(rel)
    with pytest.raises(VerificationError, match="signer identity mismatch"):
        check(host)


def test_nightly_manifest_on_stable_channel_refused(host: Host, channel: ReleaseChannel) -> None:
    rel = channel.release("1.1.0-nightly.20261124030000", channel="nightly")
    channel.publish_manifest("stable", rel.manifest, sign_as=identity_for("1.1.0"))
    with pytest.raises((ManifestError, VerificationError)):
        check(host)


def test_nightly_signed_manifest_served_as_stable_refused(
    host: Host, channel: ReleaseChannel
) -> None:
    # Signed by main (the nightly identity): the stable channel's identity regex refuses it first.
    rel = channel.release("1.1.0-nightly.20261124030000", channel="stable")
    channel.publish_manifest("stable", rel.manifest)
    with pytest.raises(VerificationError, match="signer identity mismatch"):
        check(host)


def test_replayed_older_manifest_refused(
    host: Host, channel: ReleaseChannel, server: ReleaseServer
) -> None:
    old = channel.publish(channel.release("1.1.0"))
    old_bundle = server.published("stable.json.bundle")  # what a mirror could have kept
    channel.publish(channel.release("1.2.0"))
    assert str(check(host).candidate.version) == "1.2.0"
    server.publish("stable.json", old)
    server.publish("stable.json.bundle", old_bundle)
    with pytest.raises(FreshnessError, match="replayed or stale"):
        check(host)


def test_replayed_same_version_with_older_signature_refused(
    host: Host, channel: ReleaseChannel, server: ReleaseServer
) -> None:
    rel = channel.release("1.1.0")
    first = channel.publish(rel)
    first_bundle = server.published("stable.json.bundle")
    import time

    time.sleep(1.1)  # integrated times have second resolution
    rel.manifest["revoked"] = True
    rel.manifest["revoked_reason"] = "corrupts the registry"
    channel.publish(rel)
    assert "revoked" in check(host).reason
    server.publish("stable.json", first)
    server.publish("stable.json.bundle", first_bundle)
    with pytest.raises(FreshnessError, match="replayed manifest"):
        check(host)


def test_downgrade_not_offered(host: Host, channel: ReleaseChannel) -> None:
    host.install_initial("1.5.0")
    channel.publish(channel.release("1.1.0"))
    offer = check(host)
    assert not offer.available
    assert "older than the installed" in offer.reason


def test_allowed_downgrade_keeps_high_water_mark_but_counts_as_a_check(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    reconfigure(host, server, trusted_root, test_ca, allow_downgrade=True)
    channel.publish(channel.release("1.2.0"))
    check(host)
    store = app_for(host).store
    before = store.channel_memory("stable")
    assert before is not None
    channel.publish(channel.release("1.1.0"))  # freshly signed: the channel stepped back
    check(host)
    after = store.channel_memory("stable")
    assert after is not None
    assert (after.version, after.signed_at) == ("1.2.0", before.signed_at)  # replay guard kept
    assert after.accepted_at > before.accepted_at  # and the check is on record


def test_revoked_release_not_offered(host: Host, channel: ReleaseChannel) -> None:
    channel.publish(channel.release("1.1.0", revoked=True, revoked_reason="data loss"))
    offer = check(host)
    assert not offer.available
    assert "revoked: data loss" in offer.reason


def test_expired_manifest_refused(host: Host, channel: ReleaseChannel) -> None:
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    channel.publish(channel.release("1.1.0", expires=past))
    with pytest.raises(FreshnessError, match="expired"):
        check(host)


def test_oversized_manifest_refused(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, trusted_root: Path, test_ca: TestCA
) -> None:
    reconfigure(host, server, trusted_root, test_ca, download={"max_manifest_bytes": 4096})
    rel = channel.release("1.1.0", padding="x" * 10_000)
    channel.publish(rel)
    with pytest.raises(SizeLimitError):
        check(host)


def test_tampered_tarball_refused(
    host: Host, channel: ReleaseChannel, server: ReleaseServer
) -> None:
    rel = channel.release("1.1.0")
    channel.publish(rel)
    server.publish("releases/hal0-1.1.0.tar.gz", rel.tarball[:-10] + b"0123456789")
    app = app_for(host)
    source = app.source()
    verified = source.fetch_manifest("stable", now=datetime.now(UTC).timestamp())
    with pytest.raises(VerificationError, match="tarball digest mismatch"):
        source.download(verified)
    assert not (source.release_dir("1.1.0") / "hal0-1.1.0.tar.gz").exists()


def test_tarball_bundle_of_another_artifact_refused(
    host: Host, channel: ReleaseChannel, server: ReleaseServer, sigstore: PrivateSigstore
) -> None:
    rel = channel.release("1.1.0")
    channel.publish(rel)
    server.publish(
        "releases/hal0-1.1.0.tar.gz.bundle",
        sigstore.sign(b"another artifact", identity=identity_for("1.1.0")),
    )
    source = app_for(host).source()
    verified = source.fetch_manifest("stable", now=datetime.now(UTC).timestamp())
    with pytest.raises(VerificationError):
        source.download(verified)


def test_tarball_signed_by_other_identity_refused(host: Host, channel: ReleaseChannel) -> None:
    rel = channel.release("1.1.0", sign_tarball_as=identity_for("9.9.9"))
    channel.publish(rel)
    source = app_for(host).source()
    verified = source.fetch_manifest("stable", now=datetime.now(UTC).timestamp())
    with pytest.raises(VerificationError, match="identity"):
        source.download(verified)


def test_verified_download_lands_in_cache_and_reverifies(
    host: Host, channel: ReleaseChannel
) -> None:
    rel = channel.release("1.1.0")
    channel.publish(rel)
    source = app_for(host).source()
    verified = source.fetch_manifest("stable", now=datetime.now(UTC).timestamp())
    cached = source.download(verified)
    assert cached.tarball.read_bytes() == rel.tarball
    again = source.cached("1.1.0")
    assert again is not None and again.digest_sha256 == cached.digest_sha256
    cached.tarball.write_bytes(rel.tarball + b"x")
    with pytest.raises(VerificationError):
        source.cached("1.1.0")


def test_redirect_to_http_refused(
    host: Host, channel: ReleaseChannel, server: ReleaseServer
) -> None:
    channel.publish(channel.release("1.1.0"))
    server.redirect("stable.json", "http://127.0.0.2:9/stable.json")
    with pytest.raises(DownloadError, match="https to http"):
        check(host)


# --------------------------------------------------------------------------- the CLI


def test_cli_check_exit_codes(host: Host, channel: ReleaseChannel, server: ReleaseServer) -> None:
    channel.publish(channel.release("1.0.0"))
    proc = host.cli("update", "--check")
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout

    channel.publish(channel.release("1.1.0"))
    code, doc = host.cli_json("update", "--check")
    assert code == 100
    assert doc["candidate"]["version"] == "1.1.0" and doc["available"] is True
    assert doc["installed"] == "1.0.0"

    server.publish(
        "stable.json", json.dumps({"_schema": "hal0.releases.v1", "version": "6.6.6"}).encode()
    )
    proc = host.cli("update", "--check")
    assert proc.returncode == 3, proc.stderr
    assert "error:" in proc.stderr and "hint:" in proc.stderr


def test_cli_config_error_exit_2(host: Host) -> None:
    host.config_path.write_text("[update]\nchanel = 'stable'\n")
    proc = host.cli("update", "--check")
    assert proc.returncode == 2
    assert "update.chanel (line 2): unknown key; did you mean 'channel'?" in proc.stderr
