"""The private Sigstore kit, checked with sigstore-python's own API (not with our trust module),
so that the attack tests in test_trust.py stand on bundles sigstore itself judges."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509
from sigstore.errors import VerificationError as SigstoreVerificationError
from sigstore.models import Bundle, InvalidBundle, TrustedRoot
from sigstore.verify import Verifier
from sigstore.verify.policy import Identity

from tests.kit.sigstore_kit import FAULTS, GITHUB_ISSUER, PrivateSigstore

IDENTITY = "https://github.com/Hal0ai/hal0/.github/workflows/release.yml@refs/tags/v1.2.3"
ARTIFACT = b"hal0 1.2.3 release manifest\n"


@pytest.fixture(scope="module")
def kit() -> PrivateSigstore:
    return PrivateSigstore()


@pytest.fixture(scope="module")
def verifier(kit: PrivateSigstore, tmp_path_factory: pytest.TempPathFactory) -> Verifier:
    path = kit.write_trusted_root(tmp_path_factory.mktemp("root") / "trusted_root.json")
    return Verifier(trusted_root=TrustedRoot.from_file(str(path)))


def _leaf(bundle_json: bytes) -> x509.Certificate:
    return Bundle.from_json(bundle_json).signing_certificate


def test_kit_bundle_verifies_with_sigstore(kit: PrivateSigstore, verifier: Verifier) -> None:
    bundle = Bundle.from_json(kit.sign(ARTIFACT, identity=IDENTITY))
    verifier.verify_artifact(ARTIFACT, bundle, Identity(identity=IDENTITY, issuer=GITHUB_ISSUER))


def test_kit_bundle_is_bound_to_its_artifact(kit: PrivateSigstore, verifier: Verifier) -> None:
    bundle = Bundle.from_json(kit.sign(ARTIFACT, identity=IDENTITY))
    policy = Identity(identity=IDENTITY, issuer=GITHUB_ISSUER)
    with pytest.raises(SigstoreVerificationError, match="digest mismatch"):
        verifier.verify_artifact(ARTIFACT + b"x", bundle, policy)


def test_kit_sign_digest_equals_sign(kit: PrivateSigstore, verifier: Verifier) -> None:
    raw = kit.sign_digest(hashlib.sha256(ARTIFACT).digest(), identity=IDENTITY)
    policy = Identity(identity=IDENTITY, issuer=GITHUB_ISSUER)
    verifier.verify_artifact(ARTIFACT, Bundle.from_json(raw), policy)


def test_kit_bundle_shape(kit: PrivateSigstore) -> None:
    doc = json.loads(kit.sign(ARTIFACT, identity=IDENTITY))
    assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    (entry,) = doc["verificationMaterial"]["tlogEntries"]
    assert entry["kindVersion"] == {"kind": "hashedrekord", "version": "0.0.1"}
    assert entry["inclusionPromise"]["signedEntryTimestamp"]
    assert entry["inclusionProof"]["hashes"], "every proof has an audit path"
    assert isinstance(entry["logIndex"], str)  # 64-bit integers are JSON strings
    body = json.loads(base64.b64decode(entry["canonicalizedBody"]))
    assert body["spec"]["data"]["hash"]["value"] == hashlib.sha256(ARTIFACT).hexdigest()


def test_kit_trusted_root_is_well_formed(kit: PrivateSigstore) -> None:
    root = json.loads(kit.trusted_root_json())
    assert root["mediaType"] == "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
    now = datetime.now(UTC)
    starts = [log["publicKey"]["validFor"]["start"] for log in root["tlogs"] + root["ctlogs"]]
    starts += [ca["validFor"]["start"] for ca in root["certificateAuthorities"]]
    for start in starts:
        assert datetime.fromisoformat(start) < now
    for log in root["tlogs"] + root["ctlogs"]:
        der = base64.b64decode(log["publicKey"]["rawBytes"])
        assert base64.b64decode(log["logId"]["keyId"]) == hashlib.sha256(der).digest()


def _ext_bytes(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except x509.ExtensionNotFound:
        return None
    assert isinstance(ext, x509.UnrecognizedExtension)
    return ext.value


def test_kit_issuer_extensions(kit: PrivateSigstore) -> None:
    issuer = GITHUB_ISSUER.encode()
    v2 = b"\x0c" + bytes([len(issuer)]) + issuer  # DER UTF8String
    expected: list[tuple[Literal["v1", "v2", "both"], bytes | None, bytes | None]] = [
        ("v1", issuer, None),
        ("v2", None, v2),
        ("both", issuer, v2),
    ]
    for issuer_oid, want_v1, want_v2 in expected:
        cert = _leaf(kit.sign(ARTIFACT, identity=IDENTITY, issuer_oid=issuer_oid))
        assert _ext_bytes(cert, "1.3.6.1.4.1.57264.1.1") == want_v1
        assert _ext_bytes(cert, "1.3.6.1.4.1.57264.1.8") == want_v2


def test_kit_leaf_is_fulcio_shaped(kit: PrivateSigstore) -> None:
    cert = _leaf(kit.sign(ARTIFACT, identity=IDENTITY))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [IDENTITY]
    assert (
        len(
            cert.extensions.get_extension_for_class(
                x509.PrecertificateSignedCertificateTimestamps
            ).value
        )
        == 1
    )
    assert cert.subject == x509.Name([])


# What sigstore-python itself says about each fault: the fault breaks exactly the check it names.
_SIGSTORE_SAYS = {
    "no_set": (InvalidBundle, "inclusion promise or signed timestamp"),
    "tampered_signature": (SigstoreVerificationError, "Signature is invalid for input"),
    "bad_inclusion_proof": (SigstoreVerificationError, "inclusion proof contains invalid root"),
    "bad_checkpoint": (SigstoreVerificationError, "invalid root hash signature"),
    "bad_sct": (SigstoreVerificationError, "failed to verify SCT"),
    "cert_expired_at_log_time": (SigstoreVerificationError, "not valid at validation time"),
    "no_codesigning_eku": (x509.ExtensionNotFound, "ExtendedKeyUsage"),
    "untrusted_rekor_key": (SigstoreVerificationError, "checkpoint: invalid signature"),
}


def test_every_fault_is_described() -> None:
    assert set(_SIGSTORE_SAYS) == set(FAULTS)


@pytest.mark.parametrize("fault", FAULTS)
def test_kit_fault_rejected_by_sigstore(
    kit: PrivateSigstore, verifier: Verifier, fault: str
) -> None:
    error, message = _SIGSTORE_SAYS[fault]
    raw = kit.sign(ARTIFACT, identity=IDENTITY, fault=fault)
    with pytest.raises(error, match=message):
        bundle = Bundle.from_json(raw)
        policy = Identity(identity=IDENTITY, issuer=GITHUB_ISSUER)
        verifier.verify_artifact(ARTIFACT, bundle, policy)


def test_kit_another_instance_is_another_ca(verifier: Verifier) -> None:
    other = PrivateSigstore(name="attacker")
    bundle = Bundle.from_json(other.sign(ARTIFACT, identity=IDENTITY))
    policy = Identity(identity=IDENTITY, issuer=GITHUB_ISSUER)
    with pytest.raises(SigstoreVerificationError, match="certificate chain"):
        verifier.verify_artifact(ARTIFACT, bundle, policy)


def test_kit_unknown_fault_rejected(kit: PrivateSigstore) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        kit.sign(ARTIFACT, identity=IDENTITY, fault="no_such_fault")


def test_kit_email_identity(kit: PrivateSigstore, verifier: Verifier) -> None:
    raw = kit.sign(ARTIFACT, identity="release@hal0.dev", issuer="https://accounts.google.com")
    policy = Identity(identity="release@hal0.dev", issuer="https://accounts.google.com")
    verifier.verify_artifact(ARTIFACT, Bundle.from_json(raw), policy)


def test_kit_minting_is_fast(kit: PrivateSigstore, tmp_path: Path) -> None:
    start = time.perf_counter()
    for i in range(10):
        kit.sign(b"%d" % i, identity=IDENTITY)
    PrivateSigstore().write_trusted_root(tmp_path / "root.json")
    assert time.perf_counter() - start < 2.0  # ~0.2 s per bundle budget, in practice ~5 ms
