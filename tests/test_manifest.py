"""hal0.releases.v1 manifests: validation of verified bytes, channel rules, expected identity."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchdog_updater.errors import ManifestError, RemoteDataError
from watchdog_updater.manifest import (
    SCHEMA,
    Manifest,
    channel_accepts,
    expected_identity,
    parse_manifest,
)
from watchdog_updater.versions import ReleaseKind, parse_version

DIGEST = "ab" * 32
WORKFLOW = "https://github.com/Hal0ai/hal0/.github/workflows/release.yml"

VERSION_OF = {
    "stable": "1.4.0",
    "preview": "1.5.0-rc.1",
    "nightly": "1.5.0-nightly.20240601030405",
}


def doc(**overrides: Any) -> dict[str, Any]:
    """A minimal valid stable manifest; an override of None removes the key."""
    base: dict[str, Any] = {
        "_schema": SCHEMA,
        "version": "1.4.0",
        "url": "https://releases.hal0.dev/hal0-1.4.0.tar.gz",
        "bundle_url": "https://releases.hal0.dev/hal0-1.4.0.tar.gz.bundle",
        "digest_sha256": DIGEST,
        "signer_identity": f"{WORKFLOW}@refs/tags/v1.4.0",
    }
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def raw(document: Any) -> bytes:
    return json.dumps(document).encode()


def parse(requested: str | None = "stable", **overrides: Any) -> Manifest:
    """Parse ``doc(**overrides)`` for the ``requested`` channel."""
    return parse_manifest(raw(doc(**overrides)), channel=requested)


# --------------------------------------------------------------------------- the happy path


def test_minimal_document_parses_with_defaults() -> None:
    data = raw(doc())
    m = parse_manifest(data, channel="stable")
    assert m.version == parse_version("1.4.0")
    assert m.channel == "stable"
    assert m.release_kind == "stable"
    assert m.signer_issuer == "https://token.actions.githubusercontent.com"
    assert m.digest_sha256 == DIGEST
    assert m.raw_sha256 == hashlib.sha256(data).hexdigest()
    assert m.rollback_policy == "safe"
    assert m.revoked is False
    assert m.upgrade_from is None
    assert m.released_at is None and m.expires is None and m.size is None


def test_channel_none_takes_the_manifests_own_channel() -> None:
    m = parse(None, channel="nightly", version=VERSION_OF["nightly"])
    assert m.channel == "nightly"


def test_channel_none_defaults_to_stable() -> None:
    assert parse(None).channel == "stable"


def test_optional_fields_are_carried() -> None:
    m = parse(
        "preview",
        channel="preview",
        version="2.0.0-beta.3",
        release_kind="preview",
        prerelease_stage="beta",
        rollback_policy="backup-required",
        min_data_version="7",
        revoked_reason="n/a",
        notes_url="https://hal0.dev/notes",
        manifest_url="https://releases.hal0.dev/preview.json",
        signer_issuer="https://issuer.example",
        size=1234,
    )
    assert m.release_kind == "preview"
    assert m.prerelease_stage == "beta"
    assert m.rollback_policy == "backup-required"
    assert m.min_data_version == "7"
    assert m.notes_url == "https://hal0.dev/notes"
    assert m.manifest_url == "https://releases.hal0.dev/preview.json"
    assert m.signer_issuer == "https://issuer.example"
    assert m.size == 1234


def test_unknown_fields_are_allowed() -> None:
    m = parse(future_field={"nested": [1, 2]}, another="x")
    assert m.version == parse_version("1.4.0")


def test_manifest_error_is_remote_data_error() -> None:
    assert issubclass(ManifestError, RemoteDataError)


# --------------------------------------------------------------------------- required fields


@pytest.mark.parametrize(
    "field", ["version", "url", "bundle_url", "digest_sha256", "signer_identity"]
)
def test_missing_required_field_is_named(field: str) -> None:
    with pytest.raises(ManifestError, match=field):
        parse(**{field: None})


@pytest.mark.parametrize(
    "field", ["version", "url", "bundle_url", "digest_sha256", "signer_identity"]
)
@pytest.mark.parametrize("bad", ["", 42, ["x"], {"a": 1}, True])
def test_required_field_of_wrong_type_is_named(field: str, bad: Any) -> None:
    with pytest.raises(ManifestError, match=field):
        parse(**{field: bad})


def test_missing_schema_is_refused() -> None:
    with pytest.raises(ManifestError, match="_schema"):
        parse(_schema=None)


@pytest.mark.parametrize("schema", ["hal0.releases.v2", "HAL0.RELEASES.V1", 1, ""])
def test_wrong_schema_is_refused(schema: object) -> None:
    with pytest.raises(ManifestError, match="_schema"):
        parse(_schema=schema)


def test_invalid_version_is_refused_naming_the_field() -> None:
    with pytest.raises(ManifestError, match="version"):
        parse(version="v1.4.0")


# --------------------------------------------------------------------------- digest


def test_digest_with_sha256_prefix_is_stripped() -> None:
    assert parse(digest_sha256="sha256:" + DIGEST).digest_sha256 == DIGEST


def test_uppercase_digest_is_normalised_to_lowercase() -> None:
    assert parse(digest_sha256="SHA256:" + DIGEST.upper()).digest_sha256 == DIGEST


@pytest.mark.parametrize(
    "digest",
    [
        "ab" * 31,  # 62 hex
        "ab" * 33,  # 66 hex
        "zz" * 32,  # not hex
        "sha512:" + "ab" * 32,
        "sha256:" + "ab" * 31,
        " " + "ab" * 32,
        "sha256:sha256:" + "ab" * 32,
    ],
)
def test_bad_digest_is_refused(digest: str) -> None:
    with pytest.raises(ManifestError, match="digest_sha256"):
        parse(digest_sha256=digest)


# --------------------------------------------------------------------------- channel rules


def test_nightly_manifest_on_the_stable_channel_is_a_mismatch() -> None:
    with pytest.raises(ManifestError, match="channel mismatch"):
        parse("stable", channel="nightly", version=VERSION_OF["nightly"])


def test_default_channel_manifest_on_the_nightly_channel_is_a_mismatch() -> None:
    with pytest.raises(ManifestError, match="channel mismatch"):
        parse("nightly", version=VERSION_OF["nightly"])


@pytest.mark.parametrize("version", ["1.5.0-alpha.1", "1.5.0-beta.1", "1.5.0-rc.1"])
def test_stable_channel_refuses_a_preview_version(version: str) -> None:
    with pytest.raises(ManifestError, match="channel rule"):
        parse("stable", version=version)


def test_stable_channel_refuses_a_nightly_version() -> None:
    with pytest.raises(ManifestError, match="channel rule"):
        parse("stable", version=VERSION_OF["nightly"])


@pytest.mark.parametrize("version", ["1.4.0", "1.5.0-alpha.0", "1.5.0-rc.3"])
def test_preview_channel_accepts_stable_and_preview(version: str) -> None:
    m = parse("preview", channel="preview", version=version)
    assert str(m.version) == version


def test_preview_channel_refuses_a_nightly() -> None:
    with pytest.raises(ManifestError, match="channel rule"):
        parse("preview", channel="preview", version=VERSION_OF["nightly"])


@pytest.mark.parametrize("version", ["1.5.0-nightly.20240601030405", "1.5.0-nightly.20240601"])
def test_nightly_channel_accepts_nightly(version: str) -> None:
    m = parse("nightly", channel="nightly", version=version)
    assert m.version.kind is ReleaseKind.NIGHTLY


@pytest.mark.parametrize("version", ["1.4.0", "1.5.0-rc.1"])
def test_nightly_channel_refuses_stable_and_preview(version: str) -> None:
    with pytest.raises(ManifestError, match="channel rule"):
        parse("nightly", channel="nightly", version=version)


def test_unknown_channel_accepts_nothing() -> None:
    with pytest.raises(ManifestError):
        parse("beta", channel="beta")


@pytest.mark.parametrize(
    ("channel", "kinds"),
    [
        ("stable", {ReleaseKind.STABLE}),
        ("preview", {ReleaseKind.STABLE, ReleaseKind.PREVIEW}),
        ("nightly", {ReleaseKind.NIGHTLY}),
        ("other", set()),
    ],
)
def test_channel_accepts_table(channel: str, kinds: set[ReleaseKind]) -> None:
    assert {k for k in ReleaseKind if channel_accepts(channel, k)} == kinds


# --------------------------------------------------------------------------- enumerations


def test_bad_prerelease_stage_is_refused() -> None:
    with pytest.raises(ManifestError, match="prerelease_stage"):
        parse(prerelease_stage="gamma")


def test_bad_rollback_policy_is_refused() -> None:
    with pytest.raises(ManifestError, match="rollback_policy"):
        parse(rollback_policy="yolo")


# --------------------------------------------------------------------------- upgrade_from


def test_upgrade_from_admits_matching_installed_versions() -> None:
    m = parse(upgrade_from=">=1.2,<1.4")
    assert m.upgrade_from is not None
    assert m.allows_upgrade_from(parse_version("1.2.0"))
    assert m.allows_upgrade_from(parse_version("1.3.9"))
    assert not m.allows_upgrade_from(parse_version("1.1.9"))
    assert not m.allows_upgrade_from(parse_version("1.4.0"))


def test_upgrade_from_admits_preview_installed_versions() -> None:
    m = parse(upgrade_from=">=1.3.0rc1")
    assert m.allows_upgrade_from(parse_version("1.3.0-rc.2"))
    assert not m.allows_upgrade_from(parse_version("1.3.0-beta.5"))


def test_upgrade_from_absent_or_nothing_installed_allows() -> None:
    assert parse().allows_upgrade_from(parse_version("0.0.1"))
    assert parse(upgrade_from=">=9").allows_upgrade_from(None)


@pytest.mark.parametrize("spec", ["not a spec", ">>1.0", "=1.0", "~=1"])
def test_invalid_upgrade_from_is_refused(spec: str) -> None:
    with pytest.raises(ManifestError, match="upgrade_from"):
        parse(upgrade_from=spec)


# --------------------------------------------------------------------------- revoked, size


@pytest.mark.parametrize("value", [True, False])
def test_revoked_bool_is_carried(value: bool) -> None:
    m = parse(revoked=value, revoked_reason="broken migration")
    assert m.revoked is value
    assert m.revoked_reason == "broken migration"


@pytest.mark.parametrize("value", ["true", 1, 0, "yes", [True]])
def test_revoked_must_be_bool(value: object) -> None:
    with pytest.raises(ManifestError, match="revoked"):
        parse(revoked=value)


@pytest.mark.parametrize("value", [0, -1, 1.5, "10", True])
def test_size_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(ManifestError, match="size"):
        parse(size=value)


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize("field", ["url", "bundle_url"])
@pytest.mark.parametrize(
    "url",
    [
        "http://releases.hal0.dev/x.tar.gz",
        "http://10.0.0.1/x.tar.gz",
        "http://localhost.evil.example/x",
        "http://127.0.0.1.evil.example/x",
        "ftp://releases.hal0.dev/x",
        "file:///etc/passwd",
        "releases.hal0.dev/x",
    ],
)
def test_non_https_url_to_a_non_loopback_host_is_refused(field: str, url: str) -> None:
    with pytest.raises(ManifestError, match=field):
        parse(**{field: url})


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/x.tar.gz",
        "http://127.1.2.3/x.tar.gz",
        "http://localhost:8000/x.tar.gz",
        "http://localhost/x.tar.gz",
        "http://[::1]:8000/x.tar.gz",
    ],
)
def test_http_loopback_url_is_allowed(url: str) -> None:
    assert parse(url=url, bundle_url=url + ".bundle").url == url


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:@evil.example/x.tar.gz", "http://localhost:80@evil.example/x"]
)
def test_http_url_with_loopback_userinfo_but_remote_host_is_refused(url: str) -> None:
    with pytest.raises(ManifestError, match="url"):
        parse(url=url)


# --------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize("field", ["released_at", "expires"])
def test_timestamp_with_z_parses_as_utc(field: str) -> None:
    m = parse(**{field: "2024-06-01T03:04:05Z"})
    assert getattr(m, field) == datetime(2024, 6, 1, 3, 4, 5, tzinfo=UTC)


def test_timestamp_with_offset_is_converted_to_utc() -> None:
    m = parse(released_at="2024-06-01T05:04:05+02:00")
    assert m.released_at == datetime(2024, 6, 1, 3, 4, 5, tzinfo=UTC)
    assert m.released_at is not None and m.released_at.tzinfo is UTC


@pytest.mark.parametrize("field", ["released_at", "expires"])
@pytest.mark.parametrize("value", ["2024-06-01T03:04:05", "2024-06-01", "yesterday", 1717200000])
def test_bad_or_naive_timestamp_is_refused(field: str, value: Any) -> None:
    with pytest.raises(ManifestError, match=field):
        parse(**{field: value})


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_timestamp_out_of_range_after_utc_conversion_is_a_manifest_error(value: str) -> None:
    with pytest.raises(ManifestError, match="released_at"):
        parse(released_at=value)


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    ("version", "identity"),
    [
        ("1.4.0", f"{WORKFLOW}@refs/tags/v1.4.0"),
        ("1.5.0-rc.1", f"{WORKFLOW}@refs/tags/v1.5.0-rc.1"),
        ("1.5.0-alpha.0", f"{WORKFLOW}@refs/tags/v1.5.0-alpha.0"),
        ("1.5.0-nightly.20240601030405", f"{WORKFLOW}@refs/heads/main"),
        ("1.5.0-nightly.20240601", f"{WORKFLOW}@refs/heads/main"),
    ],
)
def test_expected_identity(version: str, identity: str) -> None:
    assert expected_identity(WORKFLOW, parse_version(version)) == identity


# --------------------------------------------------------------------------- not a document


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"{", b"\xff\xfe\x00garbage", b"{'a': 1}", b"\x80\x81"]
)
def test_not_json_is_refused(data: bytes) -> None:
    with pytest.raises(ManifestError, match="JSON"):
        parse_manifest(data, channel="stable")


@pytest.mark.parametrize("document", [[], [doc()], "x", 1, None, True])
def test_non_object_is_refused(document: object) -> None:
    with pytest.raises(ManifestError, match="object"):
        parse_manifest(raw(document), channel="stable")


def test_integer_literal_too_long_is_a_manifest_error() -> None:
    data = b'{"size": ' + b"1" * 5000 + b"}"
    with pytest.raises(ManifestError):
        parse_manifest(data, channel="stable")


def test_deeply_nested_json_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError):
        parse_manifest(b"[" * 100_000, channel="stable")


# --------------------------------------------------------------------------- properties

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=10,
)
KNOWN_FIELDS = [
    "_schema",
    "version",
    "channel",
    "release_kind",
    "url",
    "bundle_url",
    "digest_sha256",
    "signer_identity",
    "signer_issuer",
    "prerelease_stage",
    "rollback_policy",
    "upgrade_from",
    "min_data_version",
    "revoked",
    "revoked_reason",
    "released_at",
    "expires",
    "size",
    "notes_url",
    "manifest_url",
]
# Plausible-but-wrong values for the known fields, to get past the early checks.
field_values = st.one_of(
    json_values,
    st.sampled_from(
        [
            SCHEMA,
            "1.4.0",
            "1.5.0-rc.1",
            "1.5.0-nightly.20240601",
            "stable",
            "preview",
            "nightly",
            "https://x/y",
            "http://127.0.0.1/y",
            DIGEST,
            "sha256:" + DIGEST,
            ">=1.0",
            "2024-06-01T00:00:00Z",
            "alpha",
            "safe",
        ]
    ),
)
mutated_docs = st.builds(
    lambda base, changes, drops: {
        **{k: v for k, v in base.items() if k not in drops},
        **changes,
    },
    st.just(doc()),
    st.dictionaries(st.sampled_from(KNOWN_FIELDS), field_values, max_size=6),
    st.sets(st.sampled_from(KNOWN_FIELDS), max_size=3),
)
channels = st.sampled_from([None, "stable", "preview", "nightly", "weird"])


def _parses_or_manifest_error(data: bytes, channel: str | None) -> None:
    try:
        m = parse_manifest(data, channel=channel)
    except ManifestError as e:
        assert str(e)
        return
    assert isinstance(m, Manifest)
    assert channel is None or m.channel == channel
    assert channel_accepts(m.channel, m.version.kind)
    assert len(m.digest_sha256) == 64


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_docs, channels)
def test_mutated_documents_parse_or_raise_manifest_error(
    document: dict[str, Any], channel: str | None
) -> None:
    _parses_or_manifest_error(raw(document), channel)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8), channels)
def test_arbitrary_dicts_parse_or_raise_manifest_error(
    document: dict[str, Any], channel: str | None
) -> None:
    _parses_or_manifest_error(raw(document), channel)


@settings(max_examples=60, deadline=None)
@given(json_values, channels)
def test_arbitrary_json_values_parse_or_raise_manifest_error(
    document: Any, channel: str | None
) -> None:
    _parses_or_manifest_error(raw(document), channel)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), channels)
def test_arbitrary_bytes_parse_or_raise_manifest_error(data: bytes, channel: str | None) -> None:
    _parses_or_manifest_error(data, channel)
