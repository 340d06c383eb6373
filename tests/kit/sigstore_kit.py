"""A hermetic private Sigstore for tests: a Fulcio-like CA, a CT log and a Rekor-like log.

``PrivateSigstore()`` mints its keys once (CA root and intermediate, CT log key, Rekor key) and
then signs artifacts into real Sigstore bundles (media type v0.3, hashedrekord 0.0.1 entry, RFC 6962
inclusion proof with a signed checkpoint, SET and integratedTime) that sigstore-python verifies
against :meth:`PrivateSigstore.trusted_root_json`. Nothing touches the network.

Each ``fault`` mints a bundle that breaks exactly one thing a verifier must check (see ``FAULTS``).
The "another CA" attack is a second instance: its bundles are well formed but chain to its own root.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["FAULTS", "GITHUB_ISSUER", "PrivateSigstore", "sha256_hex"]

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"

FAULTS = (
    "no_set",  # no inclusion promise and no RFC 3161 timestamp: no verified signing time
    "tampered_signature",  # signature over another digest (logged consistently)
    "bad_inclusion_proof",  # an audit-path hash is altered
    "bad_checkpoint",  # checkpoint validly signed, but for another tree root
    "bad_sct",  # the CT log's SCT signature does not cover this certificate
    "cert_expired_at_log_time",  # integratedTime lies after the leaf certificate expired
    "no_codesigning_eku",  # leaf has no extended key usage at all
    "untrusted_rekor_key",  # checkpoint and SET signed by a log key the root does not know
)

_OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
_OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
_OID_SCT_LIST = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
_BUNDLE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
_TRUSTED_ROOT = "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
_PREFILLED_LEAVES = 5  # other people's entries, so every inclusion proof has an audit path


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


def _spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    """RFC 6962 key ID: SHA-256 of the DER SubjectPublicKeyInfo."""
    return hashlib.sha256(_spki_der(key)).digest()


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# RFC 6962 Merkle tree -----------------------------------------------------------------------


def _leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _tree_root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node_hash(_tree_root(leaves[:k]), _tree_root(leaves[k:]))


def _audit_path(index: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 PATH(m, D[n]), lowest level first."""
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*_audit_path(index, leaves[:k]), _tree_root(leaves[k:])]
    return [*_audit_path(index - k, leaves[k:]), _tree_root(leaves[:k])]


# The kit ------------------------------------------------------------------------------------


class PrivateSigstore:
    """A private Sigstore instance: CA, CT log and transparency log, all in memory."""

    def __init__(self, *, name: str = "hal0-test") -> None:
        self.name = name
        self.created = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
        self._root_key = ec.generate_private_key(ec.SECP384R1())
        self._intermediate_key = ec.generate_private_key(ec.SECP384R1())
        self._ct_key = ec.generate_private_key(ec.SECP256R1())
        self._rekor_key = ec.generate_private_key(ec.SECP256R1())
        self._rogue_rekor_key = ec.generate_private_key(ec.SECP256R1())
        # Fulcio mints a key per signing; one per instance keeps minting fast.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self.root_cert = self._ca_cert(
            subject=f"{name} root",
            key=self._root_key,
            issuer_cert=None,
            issuer_key=self._root_key,
            path_length=1,
        )
        self.intermediate_cert = self._ca_cert(
            subject=f"{name} intermediate",
            key=self._intermediate_key,
            issuer_cert=self.root_cert,
            issuer_key=self._root_key,
            path_length=0,
        )
        self._leaves: list[bytes] = [os.urandom(32) for _ in range(_PREFILLED_LEAVES)]
        self.log_origin = f"rekor.{name}.invalid - 1234567890"

    # Trusted root ---------------------------------------------------------------------------

    def trusted_root_json(self) -> bytes:
        """The ``trusted_root.json`` a verifier needs to trust this instance."""

        def log(url: str, key: ec.EllipticCurvePrivateKey) -> dict[str, object]:
            return {
                "baseUrl": url,
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": _b64(_spki_der(key.public_key())),
                    "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    "validFor": {"start": _iso(self.created)},
                },
                "logId": {"keyId": _b64(_key_id(key.public_key()))},
            }

        der = serialization.Encoding.DER
        root = {
            "mediaType": _TRUSTED_ROOT,
            "tlogs": [log(f"https://rekor.{self.name}.invalid", self._rekor_key)],
            "certificateAuthorities": [
                {
                    "subject": {"organization": self.name, "commonName": f"{self.name} root"},
                    "uri": f"https://fulcio.{self.name}.invalid",
                    "certChain": {
                        "certificates": [
                            {"rawBytes": _b64(self.intermediate_cert.public_bytes(der))},
                            {"rawBytes": _b64(self.root_cert.public_bytes(der))},
                        ]
                    },
                    "validFor": {"start": _iso(self.created)},
                }
            ],
            "ctlogs": [log(f"https://ctfe.{self.name}.invalid", self._ct_key)],
            "timestampAuthorities": [],
        }
        return json.dumps(root, indent=2).encode()

    def write_trusted_root(self, path: Path) -> Path:
        path.write_bytes(self.trusted_root_json())
        return path

    # Signing --------------------------------------------------------------------------------

    def sign(
        self,
        artifact: bytes,
        *,
        identity: str,
        issuer: str = GITHUB_ISSUER,
        issuer_oid: Literal["v1", "v2", "both"] = "both",
        fault: str | None = None,
    ) -> bytes:
        """A Sigstore bundle (JSON bytes) over ``artifact``, signed as ``identity``."""
        return self.sign_digest(
            hashlib.sha256(artifact).digest(),
            identity=identity,
            issuer=issuer,
            issuer_oid=issuer_oid,
            fault=fault,
        )

    def sign_digest(
        self,
        sha256: bytes,
        *,
        identity: str,
        issuer: str = GITHUB_ISSUER,
        issuer_oid: Literal["v1", "v2", "both"] = "both",
        fault: str | None = None,
    ) -> bytes:
        """Like :meth:`sign`, for an artifact known only by its SHA-256 digest (32 bytes)."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        if len(sha256) != 32:
            raise ValueError("sha256 must be the 32-byte digest")

        integrated_time = int(time.time()) - 5
        issued = datetime.fromtimestamp(integrated_time - 25, UTC)
        if fault == "cert_expired_at_log_time":
            issued -= timedelta(hours=1)
        cert = self._leaf_cert(
            identity=identity,
            issuer=issuer,
            issuer_oid=issuer_oid,
            not_before=issued,
            eku=fault != "no_codesigning_eku",
            bad_sct=fault == "bad_sct",
        )

        signed_digest = sha256
        if fault == "tampered_signature":
            signed_digest = hashlib.sha256(b"something else" + sha256).digest()
        signature = self._leaf_key.sign(signed_digest, ec.ECDSA(Prehashed(hashes.SHA256())))

        body = rfc8785.dumps(
            {
                "apiVersion": "0.0.1",
                "kind": "hashedrekord",
                "spec": {
                    "data": {"hash": {"algorithm": "sha256", "value": sha256.hex()}},
                    "signature": {
                        "content": _b64(signature),
                        "publicKey": {
                            "content": _b64(cert.public_bytes(serialization.Encoding.PEM))
                        },
                    },
                },
            }
        )
        entry = self._log_entry(body, integrated_time, fault)
        bundle = {
            "mediaType": _BUNDLE_V03,
            "verificationMaterial": {
                "certificate": {"rawBytes": _b64(cert.public_bytes(serialization.Encoding.DER))},
                "tlogEntries": [entry],
            },
            "messageSignature": {
                "messageDigest": {"algorithm": "SHA2_256", "digest": _b64(sha256)},
                "signature": _b64(signature),
            },
        }
        return json.dumps(bundle, indent=2).encode()

    # Certificates ---------------------------------------------------------------------------

    def _ca_cert(
        self,
        *,
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer_cert: x509.Certificate | None,
        issuer_key: ec.EllipticCurvePrivateKey,
        path_length: int,
    ) -> x509.Certificate:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.name),
                x509.NameAttribute(NameOID.COMMON_NAME, subject),
            ]
        )
        issuer_name = name if issuer_cert is None else issuer_cert.subject
        issuer_public = issuer_key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.created)
            .not_valid_after(self.created + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        if issuer_cert is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA384())

    def _leaf_cert(
        self,
        *,
        identity: str,
        issuer: str,
        issuer_oid: Literal["v1", "v2", "both"],
        not_before: datetime,
        eku: bool,
        bad_sct: bool,
    ) -> x509.Certificate:
        """A Fulcio-style code-signing leaf with one embedded precertificate SCT."""
        san: x509.GeneralName = (
            x509.UniformResourceIdentifier(identity)
            if "://" in identity
            else x509.RFC822Name(identity)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.intermediate_cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + timedelta(minutes=10))
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key()), False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._intermediate_key.public_key()
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
        )
        if eku:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            )
        if issuer_oid in ("v1", "both"):
            builder = builder.add_extension(
                x509.UnrecognizedExtension(_OID_ISSUER_V1, issuer.encode()), critical=False
            )
        if issuer_oid in ("v2", "both"):
            builder = builder.add_extension(
                x509.UnrecognizedExtension(_OID_ISSUER_V2, _der(0x0C, issuer.encode())),
                critical=False,
            )

        # The SCT signs the precertificate TBS (the certificate without its SCT list), which
        # cryptography only exposes for a certificate that already carries an SCT list: sign once
        # with a placeholder, take the TBS, then sign again with the real list.
        placeholder = self._sct_list_extension(b"\x00" * 8)
        precert = builder.add_extension(placeholder, critical=False).sign(
            self._intermediate_key, hashes.SHA384()
        )
        timestamp_ms = int(not_before.timestamp() * 1000)
        signed_tbs = precert.tbs_precertificate_bytes
        if bad_sct:
            signed_tbs = signed_tbs + b"\x00"
        sct = self._sct(timestamp_ms, signed_tbs)
        return builder.add_extension(self._sct_list_extension(sct), critical=False).sign(
            self._intermediate_key, hashes.SHA384()
        )

    def _sct(self, timestamp_ms: int, tbs: bytes) -> bytes:
        """An RFC 6962 v1 precertificate SCT from this instance's CT log key."""
        issuer_key_hash = _key_id(self._intermediate_key.public_key())
        signed = (
            struct.pack("!BBQH", 0, 0, timestamp_ms, 1)  # v1, certificate_timestamp, precert
            + issuer_key_hash
            + len(tbs).to_bytes(3, "big")
            + tbs
            + struct.pack("!H", 0)  # no extensions
        )
        signature = self._ct_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        return (
            struct.pack("!B", 0)
            + _key_id(self._ct_key.public_key())
            + struct.pack("!QH", timestamp_ms, 0)
            + struct.pack("!BBH", 4, 3, len(signature))  # sha256, ecdsa
            + signature
        )

    @staticmethod
    def _sct_list_extension(sct: bytes) -> x509.UnrecognizedExtension:
        entry = struct.pack("!H", len(sct)) + sct
        tls_list = struct.pack("!H", len(entry)) + entry
        return x509.UnrecognizedExtension(_OID_SCT_LIST, _der(0x04, tls_list))

    # Transparency log -----------------------------------------------------------------------

    def _log_entry(self, body: bytes, integrated_time: int, fault: str | None) -> dict[str, object]:
        log_key = self._rogue_rekor_key if fault == "untrusted_rekor_key" else self._rekor_key
        log_id = _key_id(log_key.public_key())
        self._leaves.append(_leaf_hash(body))
        index, size = len(self._leaves) - 1, len(self._leaves)
        leaves = list(self._leaves)
        path = _audit_path(index, leaves)
        root = _tree_root(leaves)
        if fault == "bad_inclusion_proof":
            path[0] = hashlib.sha256(path[0]).digest()
        checkpoint_root = root
        if fault == "bad_checkpoint":
            checkpoint_root = hashlib.sha256(b"another tree" + root).digest()
        note = f"{self.log_origin}\n{size}\n{_b64(checkpoint_root)}\n"
        note_sig = log_key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        signer = self.log_origin.split(" ")[0]
        checkpoint = f"{note}\n\u2014 {signer} {_b64(log_id[:4] + note_sig)}\n"

        entry: dict[str, object] = {
            "logIndex": str(index),
            "logId": {"keyId": _b64(log_id)},
            "kindVersion": {"kind": "hashedrekord", "version": "0.0.1"},
            "integratedTime": str(integrated_time),
            "inclusionProof": {
                "logIndex": str(index),
                "rootHash": _b64(root),
                "treeSize": str(size),
                "hashes": [_b64(h) for h in path],
                "checkpoint": {"envelope": checkpoint},
            },
            "canonicalizedBody": _b64(body),
        }
        if fault != "no_set":
            payload = rfc8785.dumps(
                {
                    "body": _b64(body),
                    "integratedTime": integrated_time,
                    "logID": log_id.hex(),
                    "logIndex": index,
                }
            )
            set_sig = log_key.sign(payload, ec.ECDSA(hashes.SHA256()))
            entry["inclusionPromise"] = {"signedEntryTimestamp": _b64(set_sig)}
        return entry
