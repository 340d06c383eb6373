"""The verification boundary: one short test per attack, named after it.

Bundles come from a hermetic private Sigstore (tests/kit/sigstore_kit.py) and one real production
bundle (tests/fixtures/public-good/). Nothing here touches the network: sockets are disabled.
"""

from __future__ import annotations

import json
import re
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sigstore.errors import VerificationError as SigstoreVerificationError

from tests.kit.sigstore_kit import GITHUB_ISSUER, PrivateSigstore, sha256_hex
from watchdog_updater import _cli
from watchdog_updater.errors import ConfigError, ExitCode, VerificationError
from watchdog_updater.trust import (
    BundleVerifier,
    SignerPolicy,
    VerifiedSignature,
    load_trusted_root,
)

FIXTURES = Path(__file__).parent / "fixtures" / "public-good"
PREFIX = r"^https://github\.com/(Hal0ai|hal0ai)/hal0/\.github/workflows/release\.yml@"
HAL0 = {
    "stable": PREFIX + r"refs/tags/v\d+\.\d+\.\d+$",
    "preview": PREFIX + r"refs/tags/v\d+\.\d+\.\d+(-(alpha|beta|rc)\.(0|[1-9]\d*))?$",
    "nightly": PREFIX + r"refs/heads/main$",
}
WORKFLOW = "https://github.com/Hal0ai/hal0/.github/workflows/release.yml@"
IDENTITY = WORKFLOW + "refs/tags/v1.2.3"
MANIFEST = b'{"_schema": "hal0.releases.v1", "version": "1.2.3"}'
STABLE = SignerPolicy(issuer=GITHUB_ISSUER, identity_pattern=HAL0["stable"])
WHAT = "stable.json.bundle"

RFC8785_IDENTITY = (
    "https://github.com/trailofbits/rfc8785.py/.github/workflows/release.yml@refs/tags/v0.1.2"
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def kit() -> PrivateSigstore:
    return PrivateSigstore()


@pytest.fixture(scope="module")
def verifier(kit: PrivateSigstore, tmp_path_factory: pytest.TempPathFactory) -> BundleVerifier:
    path = kit.write_trusted_root(tmp_path_factory.mktemp("root") / "trusted_root.json")
    return BundleVerifier(trusted_root=load_trusted_root(str(path)))


def _refused(
    verifier: BundleVerifier,
    bundle: bytes,
    *,
    data: bytes = MANIFEST,
    policy: SignerPolicy = STABLE,
) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        verifier.verify_bytes(data, bundle, policy, what=WHAT)
    error = info.value
    assert error.message.startswith(f"{WHAT}: ")
    assert error.hint
    assert error.exit_code == ExitCode.REFUSED
    return error


# Valid bundles ------------------------------------------------------------------------------


def test_valid_bundle_verifies(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    signature = verifier.verify_bytes(
        MANIFEST, kit.sign(MANIFEST, identity=IDENTITY), STABLE, what=WHAT
    )
    assert signature.identity == IDENTITY
    assert signature.issuer == GITHUB_ISSUER
    assert signature.log_index >= 0
    assert abs(datetime.now(UTC) - signature.integrated_time) < timedelta(minutes=1)


def test_valid_bundle_verifies_by_digest(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    tarball = b"hal0-1.2.3.tar.gz" * 1000
    signature = verifier.verify_digest(
        sha256_hex(tarball),
        kit.sign(tarball, identity=IDENTITY),
        SignerPolicy.exact(IDENTITY, GITHUB_ISSUER),
        what="hal0-1.2.3.tar.gz.bundle",
    )
    assert signature.identity == IDENTITY


def test_issuer_in_v2_extension_accepted(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY, issuer_oid="v2")
    assert verifier.verify_bytes(MANIFEST, bundle, STABLE, what=WHAT).issuer == GITHUB_ISSUER


def test_issuer_in_v1_only_accepted(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY, issuer_oid="v1")
    assert verifier.verify_bytes(MANIFEST, bundle, STABLE, what=WHAT).issuer == GITHUB_ISSUER


# Attacks ------------------------------------------------------------------------------------


def test_wrong_identity_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    fork = "https://github.com/attacker/hal0/.github/workflows/release.yml@refs/tags/v1.2.3"
    error = _refused(verifier, kit.sign(MANIFEST, identity=fork))
    assert error.message == (
        f"{WHAT}: signer identity mismatch: expected /{HAL0['stable']}/, got {fork}"
    )


def test_wrong_issuer_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY, issuer="https://accounts.google.com")
    error = _refused(verifier, bundle)
    assert error.message == (
        f"{WHAT}: signer issuer mismatch: expected {GITHUB_ISSUER}, got https://accounts.google.com"
    )


def test_tampered_artifact_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY)
    tampered = MANIFEST.replace(b"1.2.3", b"9.9.9")
    error = _refused(verifier, bundle, data=tampered)
    assert "bundle does not match the artifact (digest mismatch)" in error.message
    assert f"artifact sha256:{sha256_hex(tampered)}" in error.message
    assert f"bundle signs sha256:{sha256_hex(MANIFEST)}" in error.message


def test_bundle_of_another_artifact_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    other_release = kit.sign(b"hal0 1.2.2 manifest", identity=IDENTITY)  # genuine, but not ours
    error = _refused(verifier, other_release)
    assert "digest mismatch" in error.message


def test_tarball_digest_of_another_artifact_refused(
    kit: PrivateSigstore, verifier: BundleVerifier
) -> None:
    bundle = kit.sign(b"tarball A", identity=IDENTITY)
    with pytest.raises(VerificationError, match="digest mismatch"):
        verifier.verify_digest(sha256_hex(b"tarball B"), bundle, STABLE, what="t.bundle")


def test_certificate_from_another_ca_refused(verifier: BundleVerifier) -> None:
    attacker = PrivateSigstore(name="attacker")
    error = _refused(verifier, attacker.sign(MANIFEST, identity=IDENTITY))
    assert "certificate does not chain to the trusted root" in error.message


@pytest.mark.parametrize(
    "bundle",
    [b"", b"garbage", b"{}", b"null", b"[]", b"\xff\xfe", b'{"mediaType": "text/plain"}'],
    ids=["empty", "garbage", "empty-object", "null", "list", "binary", "wrong-media-type"],
)
def test_unsigned_refused(verifier: BundleVerifier, bundle: bytes) -> None:
    error = _refused(verifier, bundle)
    assert "malformed bundle" in error.message


def test_bundle_without_log_entry_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    doc = json.loads(kit.sign(MANIFEST, identity=IDENTITY))
    doc["verificationMaterial"]["tlogEntries"] = []
    error = _refused(verifier, json.dumps(doc).encode())
    assert "malformed bundle" in error.message


def test_oversized_bundle_refused(verifier: BundleVerifier) -> None:
    error = _refused(verifier, b" " * (2 * 1024 * 1024))
    assert "malformed bundle" in error.message


def test_no_set_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    error = _refused(verifier, kit.sign(MANIFEST, identity=IDENTITY, fault="no_set"))
    assert "bundle carries no verified signing time" in error.message


def test_tampered_signature_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY, fault="tampered_signature")
    assert "signature does not verify over the artifact" in _refused(verifier, bundle).message


def test_bad_inclusion_proof_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY, fault="bad_inclusion_proof")
    error = _refused(verifier, bundle)
    assert "transparency log inclusion proof does not verify" in error.message


def test_bad_checkpoint_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY, fault="bad_checkpoint")
    assert "transparency log checkpoint does not verify" in _refused(verifier, bundle).message


def test_bad_sct_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY, fault="bad_sct")
    assert "certificate transparency check failed (SCT)" in _refused(verifier, bundle).message


def test_cert_expired_at_log_time_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY, fault="cert_expired_at_log_time")
    assert "certificate was not valid at the signing time" in _refused(verifier, bundle).message


def test_no_codesigning_eku_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY, fault="no_codesigning_eku")
    assert "not a code-signing certificate" in _refused(verifier, bundle).message


def test_untrusted_rekor_key_refused(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY, fault="untrusted_rekor_key")
    assert "transparency log checkpoint does not verify" in _refused(verifier, bundle).message


def test_error_names_check_evidence_and_cause(
    kit: PrivateSigstore, verifier: BundleVerifier
) -> None:
    error = _refused(verifier, kit.sign(MANIFEST, identity=IDENTITY, fault="bad_sct"))
    text = error.diagnostics()
    assert text.splitlines()[0].startswith(f"{WHAT}: certificate transparency check failed")
    assert "keyring: invalid signature" in text  # sigstore's evidence
    assert "hint: " in text
    assert "caused by: VerificationError" in text  # the foreign exception, chained
    assert error.__cause__ is not None


# The production instance, offline ------------------------------------------------------------


def _public_good(policy: SignerPolicy) -> VerifiedSignature:
    verifier = BundleVerifier(trusted_root=load_trusted_root("public-good"))
    digest = (FIXTURES / "bundle_v3_github.whl.sha256").read_text().strip()
    bundle = (FIXTURES / "bundle_v3_github.whl.sigstore").read_bytes()
    return verifier.verify_digest(digest, bundle, policy, what="rfc8785 wheel bundle")


def test_public_good_bundle_verifies_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    signature = _public_good(SignerPolicy.exact(RFC8785_IDENTITY, GITHUB_ISSUER))
    assert signature.identity == RFC8785_IDENTITY
    assert signature.log_index == 79605083
    assert signature.integrated_time == datetime(2024, 3, 19, 22, 41, 16, tzinfo=UTC)
    assert list(tmp_path.iterdir()) == []  # no TUF cache written


def test_public_good_bundle_refused_for_another_identity() -> None:
    with pytest.raises(VerificationError, match="signer identity mismatch"):
        _public_good(STABLE)


def test_public_good_bundle_refused_for_another_issuer() -> None:
    policy = SignerPolicy.exact(RFC8785_IDENTITY, "https://accounts.google.com")
    with pytest.raises(VerificationError, match="signer issuer mismatch"):
        _public_good(policy)


def test_private_bundle_refused_by_public_good_root(kit: PrivateSigstore) -> None:
    verifier = BundleVerifier(trusted_root=load_trusted_root("public-good"))
    with pytest.raises(VerificationError, match="does not chain to the trusted root"):
        verifier.verify_bytes(MANIFEST, kit.sign(MANIFEST, identity=IDENTITY), STABLE, what=WHAT)


# Trusted roots -------------------------------------------------------------------------------


def test_missing_trusted_root_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_trusted_root(str(path))


def test_garbage_trusted_root_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "trusted_root.json"
    path.write_text("not json")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_trusted_root(str(path))


def test_trusted_root_valid_only_in_future_is_config_error(
    kit: PrivateSigstore, tmp_path: Path
) -> None:
    root = json.loads(kit.trusted_root_json())
    for ca in root["certificateAuthorities"]:
        ca["validFor"]["start"] = "2999-01-01T00:00:00Z"  # sigstore drops it silently
    path = tmp_path / "trusted_root.json"
    path.write_text(json.dumps(root))
    with pytest.raises(ConfigError, match="Fulcio certificates not found"):
        load_trusted_root(str(path))


def test_deferred_root_is_loaded_at_first_verification(
    kit: PrivateSigstore, tmp_path: Path
) -> None:
    path = tmp_path / "trusted_root.json"
    verifier = BundleVerifier.for_spec(str(path))  # nothing read yet: the file may come later
    kit.write_trusted_root(path)
    signature = verifier.verify_bytes(
        MANIFEST, kit.sign(MANIFEST, identity=IDENTITY), STABLE, what=WHAT
    )
    assert signature.identity == IDENTITY


def test_deferred_root_that_cannot_load_is_a_config_error_not_a_bad_bundle(
    kit: PrivateSigstore, tmp_path: Path
) -> None:
    path = tmp_path / "nowhere.json"
    verifier = BundleVerifier.for_spec(str(path))
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        verifier.verify_bytes(MANIFEST, kit.sign(MANIFEST, identity=IDENTITY), STABLE, what=WHAT)


def test_config_validate_loads_the_trusted_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "hal0.toml"
    config.write_text(f"[update.verify]\ntrusted_root = '{tmp_path / 'nowhere.json'}'\n")
    argv = ["--root", str(tmp_path), "--config", str(config), "config", "validate", "--json"]
    assert _cli.main(argv) == ExitCode.USAGE
    assert "nowhere.json" in json.loads(capsys.readouterr().out)["error"]


# Signer policies -----------------------------------------------------------------------------


@pytest.mark.parametrize("issuer", ["", "   "])
def test_signer_policy_with_empty_issuer_refused(issuer: str) -> None:
    with pytest.raises(ValueError, match="issuer"):
        SignerPolicy(issuer=issuer, identity_pattern=HAL0["stable"])
    with pytest.raises(ValueError, match="issuer"):
        SignerPolicy.exact(IDENTITY, issuer)


def test_signer_policy_with_bad_regex_refused() -> None:
    with pytest.raises(ValueError, match="regex"):
        SignerPolicy(issuer=GITHUB_ISSUER, identity_pattern="(unclosed")
    with pytest.raises(ValueError, match="regex"):
        SignerPolicy(issuer=GITHUB_ISSUER, identity_pattern="")


@pytest.mark.parametrize(
    ("channel", "ref", "accepted"),
    [
        ("stable", "refs/tags/v1.2.3", True),
        ("stable", "refs/tags/v10.20.30", True),
        ("stable", "refs/tags/v1.2.3-rc.1", False),
        ("stable", "refs/tags/v1.2", False),
        ("stable", "refs/heads/main", False),
        ("stable", "refs/tags/v1.2.3\n", False),  # `$` would accept this under re.search
        ("stable", "refs/tags/v1.2.3/evil", False),
        ("preview", "refs/tags/v1.2.3-rc.1", True),
        ("preview", "refs/tags/v1.2.3-alpha.0", True),
        ("preview", "refs/tags/v1.2.3", True),
        ("preview", "refs/tags/v1.2.3-rc.01", False),
        ("preview", "refs/tags/v1.2.3-gamma.1", False),
        ("nightly", "refs/heads/main", True),
        ("nightly", "refs/heads/main-evil", False),
        ("nightly", "refs/heads/feature", False),
    ],
)
def test_hal0_identity_patterns(channel: str, ref: str, accepted: bool) -> None:
    policy = SignerPolicy(issuer=GITHUB_ISSUER, identity_pattern=HAL0[channel])
    assert policy.matches(WORKFLOW + ref) is accepted


@pytest.mark.parametrize(
    ("identity", "accepted"),
    [
        ("https://github.com/hal0ai/hal0/.github/workflows/release.yml@refs/tags/v1.2.3", True),
        ("https://github.com/HAL0AI/hal0/.github/workflows/release.yml@refs/tags/v1.2.3", False),
        (
            "https://github.com/Hal0ai/hal0-fork/.github/workflows/release.yml@refs/tags/v1.2.3",
            False,
        ),
        ("https://github.com/Hal0ai/hal0/.github/workflows/other.yml@refs/tags/v1.2.3", False),
        (
            "https://github.com.evil/Hal0ai/hal0/.github/workflows/release.yml@refs/tags/v1.2.3",
            False,
        ),
        ("https://githubXcom/Hal0ai/hal0/.github/workflows/release.yml@refs/tags/v1.2.3", False),
        ("http://github.com/Hal0ai/hal0/.github/workflows/release.yml@refs/tags/v1.2.3", False),
    ],
)
def test_hal0_identity_pattern_owner_and_workflow(identity: str, accepted: bool) -> None:
    assert STABLE.matches(identity) is accepted


def test_hal0_preview_release_refused_on_stable_channel(
    kit: PrivateSigstore, verifier: BundleVerifier
) -> None:
    bundle = kit.sign(MANIFEST, identity=WORKFLOW + "refs/tags/v1.3.0-rc.1")
    preview = SignerPolicy(issuer=GITHUB_ISSUER, identity_pattern=HAL0["preview"])
    assert verifier.verify_bytes(MANIFEST, bundle, preview, what=WHAT).identity.endswith("rc.1")
    assert "signer identity mismatch" in _refused(verifier, bundle).message


def test_unanchored_pattern_must_match_whole_identity() -> None:
    policy = SignerPolicy(issuer=GITHUB_ISSUER, identity_pattern=r"https://github\.com/Hal0ai/")
    assert not policy.matches(IDENTITY)


def test_exact_policy_escapes_regex_metacharacters() -> None:
    policy = SignerPolicy.exact(IDENTITY, GITHUB_ISSUER)
    assert policy.matches(IDENTITY)
    assert not policy.matches(IDENTITY.replace("release.yml", "releaseXyml"))
    assert not policy.matches(IDENTITY + "4")


def _cert(
    *, san: str | None = IDENTITY, v1: str | None = None, v2: str | None = None
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "test")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(minutes=10))
    )
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=True
        )
    if v1 is not None:
        oid = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, v1.encode()), False)
    if v2 is not None:
        oid = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
        der = b"\x0c" + bytes([len(v2)]) + v2.encode()
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, der), False)
    return builder.sign(key, hashes.SHA256())


def test_policy_is_a_sigstore_policy() -> None:
    good = _cert(v1=GITHUB_ISSUER, v2=GITHUB_ISSUER)
    STABLE.verify(good)
    bad = _cert(san=IDENTITY + "x", v2=GITHUB_ISSUER)
    with pytest.raises(SigstoreVerificationError, match="signer identity mismatch"):
        STABLE.verify(bad)


def test_issuer_extensions_that_disagree_refused() -> None:
    cert = _cert(v1=GITHUB_ISSUER, v2="https://evil.example")
    with pytest.raises(SigstoreVerificationError, match=re.escape("got https://evil.example")):
        STABLE.verify(cert)
    cert = _cert(v1="https://evil.example", v2=GITHUB_ISSUER)
    with pytest.raises(SigstoreVerificationError, match=re.escape("got https://evil.example")):
        STABLE.verify(cert)


def test_certificate_without_issuer_refused() -> None:
    cert = _cert()
    with pytest.raises(SigstoreVerificationError, match="certificate carries no OIDC issuer"):
        STABLE.verify(cert)


def test_certificate_without_identity_refused() -> None:
    cert = _cert(san=None, v1=GITHUB_ISSUER)
    with pytest.raises(SigstoreVerificationError, match="no identity"):
        STABLE.verify(cert)


def test_malformed_digest_is_a_caller_bug(kit: PrivateSigstore, verifier: BundleVerifier) -> None:
    bundle = kit.sign(MANIFEST, identity=IDENTITY)
    with pytest.raises(ValueError, match="SHA-256"):
        verifier.verify_digest("sha256:" + sha256_hex(MANIFEST), bundle, STABLE, what=WHAT)
