"""hal0 version strings: parsing, kinds, ordering and the PEP 440 bridge."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version as Pep440Version

from watchdog_updater.versions import ReleaseKind, Version, VersionError, parse_version

# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("1.2.3", (1, 2, 3, None, 0, None)),
        ("0.0.0", (0, 0, 0, None, 0, None)),
        ("10.20.30", (10, 20, 30, None, 0, None)),
        ("1.2.3-alpha.0", (1, 2, 3, "alpha", 0, None)),
        ("1.2.3-beta.4", (1, 2, 3, "beta", 4, None)),
        ("1.2.3-rc.12", (1, 2, 3, "rc", 12, None)),
        ("1.2.3-nightly.20240101123456", (1, 2, 3, None, 0, "20240101123456")),
        ("1.2.3-nightly.20240101", (1, 2, 3, None, 0, "20240101")),
    ],
)
def test_each_published_format_parses(text: str, fields: tuple[object, ...]) -> None:
    v = parse_version(text)
    assert (v.major, v.minor, v.patch, v.stage, v.stage_number, v.nightly_stamp) == fields
    assert str(v) == text
    assert v.base == f"{fields[0]}.{fields[1]}.{fields[2]}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "01.2.3",
        "1.02.3",
        "1.2.03",
        "1.2.3-rc.01",
        "v1.2.3",
        "1.2",
        "1",
        "1.2.3.4",
        "1.2.3-rc",
        "1.2.3-rc.",
        "1.2.3-RC.1",
        "1.2.3-gamma.1",
        "1.2.3-nightly.123",
        "1.2.3-nightly.2024010112",  # neither 8 nor 14 digits
        "1.2.3-nightly.202401011234567",  # 15 digits
        "1.2.3-nightly",
        "1.2.3+build.1",
        " 1.2.3",
        "1.2.3 ",
        "1.2.3\n",
        "1.2.3-",
        "-1.2.3",
    ],
)
def test_invalid_strings_are_refused(text: str) -> None:
    with pytest.raises(VersionError):
        parse_version(text)


def test_refusal_message_names_the_string() -> None:
    with pytest.raises(VersionError, match=r"v1\.2\.3"):
        parse_version("v1.2.3")


@pytest.mark.parametrize("value", [None, 123, b"1.2.3", 1.2])
def test_non_string_is_refused_with_version_error(value: object) -> None:
    with pytest.raises(VersionError, match="string"):
        parse_version(value)  # type: ignore[arg-type]


def test_version_error_is_a_value_error() -> None:
    assert issubclass(VersionError, ValueError)


@pytest.mark.parametrize("text", ["1\u0662.0.0", "1.2.3-rc.1\u0661"])
def test_non_ascii_digits_are_refused(text: str) -> None:
    with pytest.raises(VersionError):
        parse_version(text)


def test_nightly_stamp_in_non_ascii_digits_is_refused_at_parse() -> None:
    stamp = "\u0662\u0660\u0662\u0664\u0660\u0661\u0660\u0661"  # 20240101 in Arabic-Indic
    with pytest.raises(VersionError):
        parse_version(f"1.2.3-nightly.{stamp}")


# --------------------------------------------------------------------------- kinds


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("1.2.3", ReleaseKind.STABLE),
        ("1.2.3-alpha.1", ReleaseKind.PREVIEW),
        ("1.2.3-beta.1", ReleaseKind.PREVIEW),
        ("1.2.3-rc.1", ReleaseKind.PREVIEW),
        ("1.2.3-nightly.20240101000000", ReleaseKind.NIGHTLY),
        ("1.2.3-nightly.20240101", ReleaseKind.NIGHTLY),
    ],
)
def test_kind_classification(text: str, kind: ReleaseKind) -> None:
    assert parse_version(text).kind is kind


# --------------------------------------------------------------------------- ordering


def v(text: str) -> Version:
    return parse_version(text)


def test_rc_sorts_before_its_final_release() -> None:
    assert v("1.2.0-rc.2") < v("1.2.0")
    assert v("1.2.0") > v("1.2.0-rc.9")
    assert not v("1.2.0") < v("1.2.0-rc.2")


def test_final_of_previous_minor_sorts_before_next_rc() -> None:
    assert v("1.1.9") < v("1.2.0-rc.1") < v("1.2.0")


def test_alpha_before_beta_before_rc() -> None:
    assert v("2.0.0-alpha.9") < v("2.0.0-beta.0") < v("2.0.0-rc.0") < v("2.0.0")


def test_stage_numbers_compare_numerically() -> None:
    assert v("1.0.0-rc.2") < v("1.0.0-rc.10")


def test_components_compare_numerically() -> None:
    assert v("1.9.0") < v("1.10.0")
    assert v("9.0.0") < v("10.0.0")
    assert v("1.0.9") < v("1.0.10")


def test_nightlies_order_by_timestamp() -> None:
    assert v("1.2.3-nightly.20240101120000") < v("1.2.3-nightly.20240101120001")
    assert v("1.2.3-nightly.20231231235959") < v("1.2.3-nightly.20240101000000")


def test_eight_digit_nightly_sorts_as_midnight() -> None:
    short = v("1.2.3-nightly.20240102")
    assert short == v("1.2.3-nightly.20240102000000")
    assert v("1.2.3-nightly.20240101235959") < short < v("1.2.3-nightly.20240102000001")
    assert hash(short) == hash(v("1.2.3-nightly.20240102000000"))


def test_nightly_sorts_below_alphas_and_final_of_its_base() -> None:
    nightly = v("1.2.3-nightly.20991231235959")
    assert nightly < v("1.2.3-alpha.0") < v("1.2.3")
    assert v("1.2.2") < nightly


def test_equality_and_hash_follow_release_order() -> None:
    assert v("1.2.3") == v("1.2.3")
    assert v("1.2.3") != v("1.2.3-rc.1")
    assert len({v("1.2.3"), v("1.2.3"), v("1.2.4")}) == 2
    assert v("1.2.3") != "1.2.3"


def test_all_comparison_operators() -> None:
    lo, hi = v("1.0.0-beta.1"), v("1.0.0")
    assert lo < hi and lo <= hi and hi > lo and hi >= lo
    assert lo <= v("1.0.0-beta.1") and lo >= v("1.0.0-beta.1")
    assert not (hi < lo or hi <= lo or lo > hi or lo >= hi)


def test_sorted_matches_a_hand_written_release_order() -> None:
    expected = [
        "0.9.9",
        "1.0.0-nightly.20240101",
        "1.0.0-nightly.20240101000001",
        "1.0.0-alpha.0",
        "1.0.0-alpha.1",
        "1.0.0-beta.0",
        "1.0.0-rc.1",
        "1.0.0-rc.2",
        "1.0.0",
        "1.0.1-rc.1",
        "1.0.1",
        "1.1.0",
        "2.0.0",
    ]
    shuffled = list(reversed(expected))
    assert [str(x) for x in sorted(v(t) for t in shuffled)] == expected


# --------------------------------------------------------------------------- PEP 440


@pytest.mark.parametrize(
    ("text", "pep440"),
    [
        ("1.2.3", "1.2.3"),
        ("1.2.3-alpha.1", "1.2.3a1"),
        ("1.2.3-beta.0", "1.2.3b0"),
        ("1.2.3-rc.7", "1.2.3rc7"),
        ("1.2.3-nightly.20240101123456", "1.2.3.dev20240101123456"),
        ("1.2.3-nightly.20240101", "1.2.3.dev20240101000000"),
    ],
)
def test_to_pep440(text: str, pep440: str) -> None:
    converted = v(text).to_pep440()
    assert isinstance(converted, Pep440Version)
    assert converted == Pep440Version(pep440)
    assert str(converted) == pep440


def test_pep440_of_rc_is_a_prerelease_below_final() -> None:
    rc = v("1.2.0-rc.1").to_pep440()
    assert rc.is_prerelease
    assert rc < v("1.2.0").to_pep440()


# --------------------------------------------------------------------------- properties

_numbers = st.integers(min_value=0, max_value=30)
_stamps = st.builds(
    lambda y, mo, d, h, mi, s, short: (
        f"{y:04d}{mo:02d}{d:02d}" if short else f"{y:04d}{mo:02d}{d:02d}{h:02d}{mi:02d}{s:02d}"
    ),
    st.integers(2020, 2030),
    st.integers(1, 12),
    st.integers(1, 28),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
    st.booleans(),
)
_suffix = st.one_of(
    st.just(""),
    st.builds(lambda s, n: f"-{s}.{n}", st.sampled_from(["alpha", "beta", "rc"]), _numbers),
    st.builds(lambda stamp: f"-nightly.{stamp}", _stamps),
)
version_texts = st.builds(
    lambda a, b, c, suffix: f"{a}.{b}.{c}{suffix}",
    st.integers(0, 3),
    st.integers(0, 3),
    st.integers(0, 3),
    _suffix,
)
non_nightly_texts = version_texts.filter(lambda t: "nightly" not in t)


@settings(max_examples=100, deadline=None)
@given(version_texts)
def test_parse_str_round_trips(text: str) -> None:
    parsed = parse_version(text)
    assert str(parsed) == text
    again = parse_version(str(parsed))
    assert again == parsed
    assert again.text == parsed.text


@settings(max_examples=60, deadline=None)
@given(st.lists(version_texts, min_size=1, max_size=12))
def test_ordering_is_a_total_order_consistent_with_sorted(texts: list[str]) -> None:
    versions = [parse_version(t) for t in texts]
    ordered = sorted(versions)
    for a, b in itertools.pairwise(ordered):
        assert a <= b
        assert not b < a
    for a, b in itertools.product(versions, repeat=2):
        # exactly one of <, ==, > (trichotomy), and the operators agree with each other
        assert [a < b, a == b, a > b].count(True) == 1
        assert (a <= b) == (a < b or a == b)
        assert (a >= b) == (a > b or a == b)
        assert (a < b) == (b > a)
    for a, b, c in itertools.product(versions[:6], repeat=3):
        if a <= b and b <= c:
            assert a <= c
    assert sorted(reversed(versions)) == ordered


@settings(max_examples=100, deadline=None)
@given(non_nightly_texts, non_nightly_texts)
def test_pep440_order_agrees_with_version_order(a_text: str, b_text: str) -> None:
    a, b = parse_version(a_text), parse_version(b_text)
    pa, pb = a.to_pep440(), b.to_pep440()
    assert (a < b) == (pa < pb)
    assert (a == b) == (pa == pb)
    assert (a > b) == (pa > pb)


@settings(max_examples=100, deadline=None)
@given(version_texts, version_texts)
def test_pep440_order_agrees_including_nightlies(a_text: str, b_text: str) -> None:
    a, b = parse_version(a_text), parse_version(b_text)
    assert (a < b) == (a.to_pep440() < b.to_pep440())


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="0123456789.-abcdeghilnprtvy", max_size=30))
def test_arbitrary_ascii_text_parses_or_raises_version_error(text: str) -> None:
    try:
        parsed = parse_version(text)
    except VersionError:
        return
    assert str(parsed) == text
    assert parse_version(text) == parsed
    parsed.to_pep440()  # whatever parses converts
