"""The verification boundary around sigstore-python: bundle bytes in, a verified signer out.

Everything here is offline: the trusted root comes from a file (or the copy embedded in the
installed sigstore wheel), never from TUF or the network, and verification never contacts Rekor.

Every failure is a :class:`watchdog_updater.errors.VerificationError` naming the artifact, the
check that failed and the evidence; foreign exceptions (sigstore, cryptography, pydantic, json)
are chained as its cause. Nothing passes by default: a signature is accepted only when sigstore's
``verify_artifact`` returns, our signer policy was consulted and accepted the certificate, and the
log entry carries a signed integration time.

sigstore takes ~0.6 s to import, so it is imported lazily inside the functions that need it;
importing this module costs only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from watchdog_updater.errors import ConfigError, VerificationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography.x509 import Certificate
    from sigstore.models import Bundle, TrustedRoot
    from sigstore.verify import Verifier

__all__ = [
    "PUBLIC_GOOD",
    "BundleVerifier",
    "SignerPolicy",
    "VerifiedSignature",
    "load_trusted_root",
]

PUBLIC_GOOD = "public-good"
"""Trusted-root spec naming Sigstore's public-good instance (the root embedded in sigstore)."""

# Where the sigstore wheel ships the public-good trusted root (sigstore/_store/<TUF URL>/).
_PUBLIC_GOOD_STORE = "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"

# Fulcio's OIDC issuer extensions: .1.1 holds the raw string bytes, .1.8 a DER UTF8String.
_OID_ISSUER_V1 = "1.3.6.1.4.1.57264.1.1"
_OID_ISSUER_V2 = "1.3.6.1.4.1.57264.1.8"

# A Sigstore bundle is a few KiB; anything near this is not one.
_MAX_BUNDLE_BYTES = 1024 * 1024
_MAX_EVIDENCE_CHARS = 240

_HINT_SIGNER = (
    "the artifact was signed, but not by the release workflow this channel trusts; "
    "do not install it"
)
_HINT_TAMPERED = "the artifact or its bundle was altered or swapped in transit; do not install it"
_HINT_ROOT = (
    "the bundle was not issued by the Sigstore instance of the configured trusted root "
    "([update.verify] trusted_root)"
)
_HINT_TIME = (
    "the signing certificate was not valid when the log recorded the signature; do not install it"
)
_HINT_NOT_CODE_SIGNING = (
    "the signing certificate is not a Sigstore code-signing certificate; do not install it"
)
_HINT_MALFORMED = "the bundle is not a readable Sigstore bundle; it may be truncated or hostile"
_CHECK_DIGEST = "bundle does not match the artifact (digest mismatch)"
_HINT_LOG = "the bundle's transparency-log proof does not verify; do not install it"


def load_trusted_root(spec: str) -> TrustedRoot:
    """Load a Sigstore trusted root, offline.

    ``spec`` is ``"public-good"`` for the production root embedded in the installed sigstore wheel
    (no TUF refresh, no cache directory, no network), or the path of a ``trusted_root.json``.
    The root is checked to be usable (it names at least one CA valid by now and one log).

    Raises :class:`ConfigError` naming the path when the root cannot be read or used.
    """
    import importlib.resources

    from sigstore.models import TrustedRoot
    from sigstore.verify import Verifier

    if spec == PUBLIC_GOOD:
        ref = importlib.resources.files("sigstore").joinpath(
            "_store", _PUBLIC_GOOD_STORE, "trusted_root.json"
        )
        where = f"public-good trusted root embedded in sigstore ({ref})"
        hint = "the installed sigstore package is damaged; reinstall watchdog-updater"
    else:
        where = f"trusted root {spec}"
        hint = "[update.verify] trusted_root must be 'public-good' or a readable trusted_root.json"
    try:
        if spec == PUBLIC_GOOD:
            with importlib.resources.as_file(ref) as path:
                root = TrustedRoot.from_file(str(path))
        else:
            root = TrustedRoot.from_file(spec)
        Verifier(trusted_root=root)  # refuses a root without a usable CA or log, now
    except Exception as e:
        raise ConfigError(f"cannot load {where}: {_evidence(e)}", hint=hint) from e
    return root


@dataclass(frozen=True)
class VerifiedSignature:
    """Who signed an artifact, as established by a successful verification."""

    identity: str  # the certificate's SAN (URI for GitHub Actions, else an email)
    issuer: str  # the OIDC issuer in the certificate (equal to the pinned one)
    log_index: int  # the entry's index in the transparency log
    integrated_time: datetime  # UTC; when the log integrated the entry, backed by its SET


@dataclass(frozen=True, kw_only=True)
class SignerPolicy:
    """Who may sign: an identity regex and a pinned OIDC issuer.

    ``identity_pattern`` must match the certificate's single SAN (URI or email) ENTIRELY: it is
    applied with :func:`re.fullmatch`, so an unanchored pattern cannot match a prefix or a
    substring of a longer identity, and ``$`` cannot accept a trailing newline. hal0's patterns
    carry ``^`` and ``$`` anchors, which are harmless under fullmatch. Use :meth:`exact` for one
    literal identity.

    The issuer is read from Fulcio's extension 1.3.6.1.4.1.57264.1.1 (raw string) and/or
    1.3.6.1.4.1.57264.1.8 (DER UTF8String); at least one must be present and every one present
    must equal ``issuer``. An empty issuer is refused at construction: an unpinned issuer would let
    any OIDC provider vouch for the identity.

    The object is a sigstore verification policy: ``verify(cert)`` raises
    ``sigstore.errors.VerificationError`` on refusal.
    """

    issuer: str
    identity_pattern: str

    def __post_init__(self) -> None:
        if not self.issuer.strip():
            raise ValueError("SignerPolicy.issuer must be a non-empty OIDC issuer URL")
        if not self.identity_pattern:
            raise ValueError("SignerPolicy.identity_pattern must be a non-empty regex")
        try:
            re.compile(self.identity_pattern)
        except re.error as e:
            raise ValueError(f"SignerPolicy.identity_pattern is not a valid regex: {e}") from e

    @classmethod
    def exact(cls, identity: str, issuer: str) -> SignerPolicy:
        """A policy accepting exactly ``identity`` (no regex metacharacters) from ``issuer``."""
        if not identity:
            raise ValueError("SignerPolicy.exact needs a non-empty identity")
        return cls(issuer=issuer, identity_pattern=re.escape(identity))

    def matches(self, identity: str) -> bool:
        """Whether ``identity`` is accepted by the identity pattern (fullmatch)."""
        return re.fullmatch(self.identity_pattern, identity) is not None

    def verify(self, cert: Certificate) -> None:
        """sigstore's ``VerificationPolicy`` protocol."""
        from sigstore.errors import VerificationError as SigstoreVerificationError

        try:
            self._signer(cert)
        except _SignerRefused as e:
            raise SigstoreVerificationError(str(e)) from e

    def _signer(self, cert: Certificate) -> tuple[str, str]:
        """Check ``cert`` against the policy; return its (identity, issuer).

        Raises ``_SignerRefused`` (internal) with the failed check and the evidence.
        """
        issuers = _cert_issuers(cert)
        if not issuers:
            raise _SignerRefused("certificate carries no OIDC issuer")
        for found in issuers:
            if found != self.issuer:
                raise _SignerRefused(f"signer issuer mismatch: expected {self.issuer}, got {found}")
        identity = _cert_identity(cert)
        if not self.matches(identity):
            raise _SignerRefused(
                f"signer identity mismatch: expected /{self.identity_pattern}/, got {identity}"
            )
        return identity, self.issuer


class BundleVerifier:
    """Verifies Sigstore bundles against one trusted root, offline."""

    def __init__(self, *, trusted_root: TrustedRoot | Callable[[], TrustedRoot]) -> None:
        """``trusted_root`` is a loaded root, or a function that loads it on first use.

        The lazy form keeps sigstore (~0.5 s of imports) out of every command that never gets
        as far as a verification: a check that fails to connect, a dry run that finds nothing.
        """
        self._root = trusted_root
        self._verifier: Verifier | None = None
        if not callable(trusted_root):
            self._sigstore_verifier()

    @classmethod
    def for_spec(cls, spec: str) -> BundleVerifier:
        """A verifier for the root named like ``[update.verify] trusted_root``, loaded on first use."""
        return cls(trusted_root=lambda: load_trusted_root(spec))

    def _sigstore_verifier(self) -> Verifier:
        if self._verifier is None:
            from sigstore.verify import Verifier

            root = self._root() if callable(self._root) else self._root
            try:
                self._verifier = Verifier(trusted_root=root)
            except Exception as e:
                raise ConfigError(f"unusable trusted root: {_evidence(e)}") from e
        return self._verifier

    def verify_bytes(
        self, data: bytes, bundle_json: bytes, policy: SignerPolicy, *, what: str
    ) -> VerifiedSignature:
        """Verify ``bundle_json`` over ``data`` and ``policy``; ``what`` names the bundle."""
        return self._verify(hashlib.sha256(data).digest(), bundle_json, policy, what=what)

    def verify_digest(
        self, sha256_hex: str, bundle_json: bytes, policy: SignerPolicy, *, what: str
    ) -> VerifiedSignature:
        """Like :meth:`verify_bytes` for an artifact known by its SHA-256 (64 hex digits), so a
        large tarball hashed while it was downloaded is never read again."""
        if re.fullmatch(r"[0-9a-fA-F]{64}", sha256_hex) is None:
            raise ValueError(f"not a SHA-256 hex digest: {sha256_hex!r}")
        return self._verify(bytes.fromhex(sha256_hex), bundle_json, policy, what=what)

    def _verify(
        self, digest: bytes, bundle_json: bytes, policy: SignerPolicy, *, what: str
    ) -> VerifiedSignature:
        from sigstore.hashes import Hashed
        from sigstore.models import Bundle
        from sigstore_models.common.v1 import HashAlgorithm

        if len(bundle_json) > _MAX_BUNDLE_BYTES:
            raise VerificationError(
                f"{what}: malformed bundle: {len(bundle_json)} bytes is no Sigstore bundle",
                hint=_HINT_MALFORMED,
            )
        verifier = self._sigstore_verifier()  # a bad root is a ConfigError, not a bad bundle
        recorder = _RecordingPolicy(policy)
        try:
            bundle = Bundle.from_json(bundle_json)
            hashed = Hashed(algorithm=HashAlgorithm.SHA2_256, digest=digest)
            verifier.verify_artifact(hashed, bundle, recorder)
            log_index, integrated_time = _signed_log_time(bundle)
        except _Refused as e:  # our own check: message and hint say it all
            raise VerificationError(f"{what}: {e.check}", hint=e.hint) from None
        except Exception as e:
            check, hint = _explain(e, digest, bundle_json)
            raise VerificationError(f"{what}: {check}", hint=hint) from e
        if recorder.signer is None:  # fail closed should sigstore ever skip the policy
            raise VerificationError(f"{what}: signer policy was not applied", hint=_HINT_SIGNER)
        identity, issuer = recorder.signer
        return VerifiedSignature(
            identity=identity,
            issuer=issuer,
            log_index=log_index,
            integrated_time=integrated_time,
        )


# Internals -----------------------------------------------------------------------------------


class _Refused(Exception):
    """A check of ours failed: the message is the check and its evidence."""

    def __init__(self, check: str, hint: str) -> None:
        super().__init__(check)
        self.check = check
        self.hint = hint


class _SignerRefused(_Refused):
    def __init__(self, check: str) -> None:
        super().__init__(check, _HINT_SIGNER)


class _RecordingPolicy:
    """Applies a :class:`SignerPolicy` for sigstore and keeps the accepted signer.

    Its refusal (``_SignerRefused``) passes through sigstore unchanged, check and evidence intact.
    """

    def __init__(self, policy: SignerPolicy) -> None:
        self._policy = policy
        self.signer: tuple[str, str] | None = None

    def verify(self, cert: Certificate) -> None:
        self.signer = self._policy._signer(cert)


def _cert_identity(cert: Certificate) -> str:
    """The certificate's one identity: its only URI or email SAN."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise _SignerRefused("certificate carries no identity (no subjectAltName)") from e
    names = [
        *san.get_values_for_type(x509.UniformResourceIdentifier),
        *san.get_values_for_type(x509.RFC822Name),
    ]
    if len(names) != 1:
        raise _SignerRefused(f"certificate carries {len(names)} identities, expected one: {names}")
    return names[0]


def _cert_issuers(cert: Certificate) -> list[str]:
    """The OIDC issuer values the certificate carries (v1 and/or v2 extension)."""
    from cryptography import x509

    found: list[str] = []
    for oid in (_OID_ISSUER_V1, _OID_ISSUER_V2):
        try:
            ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
        except x509.ExtensionNotFound:
            continue
        if not isinstance(ext, x509.UnrecognizedExtension):
            raise _SignerRefused(f"certificate's OIDC issuer extension {oid} is unreadable")
        raw = ext.value if oid == _OID_ISSUER_V1 else _der_utf8string(ext.value)
        if raw is None:
            raise _SignerRefused(f"certificate's OIDC issuer extension {oid} is not a UTF8String")
        try:
            found.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _SignerRefused(f"certificate's OIDC issuer extension {oid} is not UTF-8") from e
    return found


def _der_utf8string(der: bytes) -> bytes | None:
    """The content of a DER UTF8String (tag 0x0C) spanning all of ``der``, else None."""
    if len(der) < 2 or der[0] != 0x0C:
        return None
    length, offset = der[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(der) < 2 + count:
            return None
        length = int.from_bytes(der[2 : 2 + count], "big")
        offset = 2 + count
    if len(der) != offset + length:
        return None
    return der[offset:]


def _signed_log_time(bundle: Bundle) -> tuple[int, datetime]:
    """Log index and integration time of a verified bundle's entry; the time must be backed by
    an inclusion promise (SET), which sigstore verified, or it is refused."""
    (entry,) = json.loads(bundle.to_json())["verificationMaterial"]["tlogEntries"]
    integrated = int(entry.get("integratedTime", 0))
    if not entry.get("inclusionPromise") or integrated <= 0:
        raise _Refused(
            "bundle carries no signed integration time (no inclusion promise)", _HINT_LOG
        )
    return int(entry["logIndex"]), datetime.fromtimestamp(integrated, UTC)


# sigstore's failure messages (4.5.x), matched at their start (the tail may carry arbitrary
# base64 or reprs), mapped to the check that failed. First match wins.
# Plain strings: compiled on first use (by re's cache), not at import.
_SIGSTORE_CHECKS: tuple[tuple[str, str, str], ...] = (
    (r"Bundle message digest mismatch", _CHECK_DIGEST, _HINT_TAMPERED),
    (
        r"Signature is invalid for input",
        "signature does not verify over the artifact",
        _HINT_TAMPERED,
    ),
    (
        r"transparency log entry is inconsistent",
        "transparency log entry does not match the bundle",
        _HINT_TAMPERED,
    ),
    (
        r"failed to build timestamp certificate chain: .*not valid at validation time",
        "certificate was not valid at the signing time",
        _HINT_TIME,
    ),
    (
        r"failed to build timestamp certificate chain",
        "certificate does not chain to the trusted root",
        _HINT_ROOT,
    ),
    (
        r"invalid signing cert: expired at time of signing",
        "certificate was not valid at the signing time",
        _HINT_TIME,
    ),
    (r"failed to verify SCT", "certificate transparency check failed (SCT)", _HINT_ROOT),
    (
        r"(Key|Extended) usage",
        "certificate is not a code-signing certificate",
        _HINT_NOT_CODE_SIGNING,
    ),
    (
        r"invalid log entry: inclusion proof",
        "transparency log inclusion proof does not verify",
        _HINT_LOG,
    ),
    (
        r"invalid log entry: (checkpoint|\('Inclusion proof contains invalid root hash "
        r"signature|malformed|note )",
        "transparency log checkpoint does not verify",
        _HINT_LOG,
    ),
    (
        r"invalid log entry: SET",
        "transparency log inclusion promise (SET) does not verify",
        _HINT_LOG,
    ),
    (r"invalid log entry", "transparency log entry does not verify", _HINT_LOG),
    (
        r"not enough sources of verified time",
        "bundle carries no verified signing time",
        _HINT_LOG,
    ),
)


def _explain(e: Exception, digest: bytes, bundle_json: bytes) -> tuple[str, str]:
    """Name the check a foreign exception stands for; return (check with evidence, hint)."""
    from cryptography.x509 import ExtensionNotFound
    from sigstore.models import InvalidBundle

    evidence = _evidence(e)
    if isinstance(e, InvalidBundle):
        if str(e).startswith("bundle must contain an inclusion promise"):
            return f"bundle carries no verified signing time ({evidence})", _HINT_LOG
        return f"malformed bundle ({evidence})", _HINT_MALFORMED
    if isinstance(e, ExtensionNotFound):
        return f"certificate is not a code-signing certificate ({evidence})", _HINT_NOT_CODE_SIGNING
    message = str(e)
    for pattern, check, hint in _SIGSTORE_CHECKS:
        if re.match(pattern, message):
            if check == _CHECK_DIGEST:
                signed = _bundle_digest_hex(bundle_json)
                return (
                    f"{check}: artifact sha256:{digest.hex()}, bundle signs sha256:{signed}",
                    hint,
                )
            return f"{check} ({evidence})", hint
    return f"bundle verification failed ({evidence})", _HINT_TAMPERED


def _bundle_digest_hex(bundle_json: bytes) -> str:
    import base64

    try:
        doc = json.loads(bundle_json)
        b64 = doc["messageSignature"]["messageDigest"]["digest"]
        return base64.b64decode(b64).hex()
    except Exception:  # evidence only; the refusal stands either way
        return "<unreadable>"


def _evidence(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) > _MAX_EVIDENCE_CHARS:
        text = text[: _MAX_EVIDENCE_CHARS - 3] + "..."
    return f"{type(e).__name__}: {text}"
