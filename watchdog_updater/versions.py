"""hal0 version strings: parsing, kinds and ordering (pure).

Formats published by hal0:

- stable  ``X.Y.Z``
- preview ``X.Y.Z-(alpha|beta|rc).N``
- nightly ``X.Y.Z-nightly.YYYYMMDDHHMMSS`` (an older ``YYYYMMDD`` form exists)

Ordering follows semver for pre-releases (``1.2.0-rc.2 < 1.2.0``: the final release sorts after its
release candidates, a bug hal0 itself once had) and orders nightlies by their timestamp; the short date
form sorts as midnight of that day. A nightly is a pre-release of its base version and sorts below
its alphas.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from packaging.version import Version as Pep440Version

__all__ = ["ReleaseKind", "Version", "VersionError", "parse_version"]

_PATTERN = re.compile(
    r"(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?:(?P<stage>alpha|beta|rc)\.(?P<n>0|[1-9]\d*)"
    r"|nightly\.(?P<stamp>\d{14}|\d{8})))?",
    re.ASCII,  # \d must not match other scripts' digits
)
_STAGE_RANK = {"alpha": 1, "beta": 2, "rc": 3}
_FINAL_RANK = 4
_NIGHTLY_RANK = 0
_PEP440_STAGE = {"alpha": "a", "beta": "b", "rc": "rc"}


class VersionError(ValueError):
    """A string is not a hal0 version."""


class ReleaseKind(enum.Enum):
    STABLE = "stable"
    PREVIEW = "preview"
    NIGHTLY = "nightly"


@dataclass(frozen=True, order=False)
class Version:
    """A parsed hal0 version; compares by release order, prints as published."""

    text: str
    major: int
    minor: int
    patch: int
    stage: str | None = None
    stage_number: int = 0
    nightly_stamp: str | None = None
    _key: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.nightly_stamp is not None:
            rank, sub = _NIGHTLY_RANK, int(self.nightly_stamp.ljust(14, "0"))
        elif self.stage is not None:
            rank, sub = _STAGE_RANK[self.stage], self.stage_number
        else:
            rank, sub = _FINAL_RANK, 0
        object.__setattr__(self, "_key", (self.major, self.minor, self.patch, rank, sub))

    @property
    def kind(self) -> ReleaseKind:
        if self.nightly_stamp is not None:
            return ReleaseKind.NIGHTLY
        if self.stage is not None:
            return ReleaseKind.PREVIEW
        return ReleaseKind.STABLE

    @property
    def base(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    def to_pep440(self) -> Pep440Version:
        """The PEP 440 equivalent, for ``upgrade_from`` specifiers (nightly -> ``.devSTAMP``)."""
        if self.nightly_stamp is not None:
            return Pep440Version(f"{self.base}.dev{self.nightly_stamp.ljust(14, '0')}")
        if self.stage is not None:
            return Pep440Version(f"{self.base}{_PEP440_STAGE[self.stage]}{self.stage_number}")
        return Pep440Version(self.base)

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __lt__(self, other: Version) -> bool:
        return self._key < other._key

    def __le__(self, other: Version) -> bool:
        return self._key <= other._key

    def __gt__(self, other: Version) -> bool:
        return self._key > other._key

    def __ge__(self, other: Version) -> bool:
        return self._key >= other._key


def parse_version(text: str) -> Version:
    """Parse a hal0 version; :class:`VersionError` names what is wrong."""
    if not isinstance(text, str):
        raise VersionError(f"version must be a string, got {type(text).__name__}")
    match = _PATTERN.fullmatch(text)
    if match is None:
        raise VersionError(
            f"not a hal0 version: {text!r} (expected X.Y.Z, X.Y.Z-(alpha|beta|rc).N "
            "or X.Y.Z-nightly.YYYYMMDDHHMMSS)"
        )
    return Version(
        text=text,
        major=int(match["major"]),
        minor=int(match["minor"]),
        patch=int(match["patch"]),
        stage=match["stage"],
        stage_number=int(match["n"]) if match["n"] is not None else 0,
        nightly_stamp=match["stamp"],
    )
