"""The project's error tree.

Two families, as in python-tuf: :class:`RemoteDataError` (the remote side sent something we refuse:
bad signature, stale manifest, hostile tarball, endless body) and :class:`DownloadError` (transport
failed: timeouts, resets, 5xx). Every error carries a one-line summary (``str(e)``), an optional hint
saying what to do next, and the process exit code the CLI uses for it. Foreign exceptions are
translated at the boundary with ``raise ... from e``.
"""

from __future__ import annotations

import enum

__all__ = [
    "BusyError",
    "ConfigError",
    "DiskSpaceError",
    "DownloadError",
    "Error",
    "ExitCode",
    "FreshnessError",
    "HookError",
    "InstallError",
    "ManifestError",
    "PermissionRefused",
    "RemoteDataError",
    "ServiceError",
    "SizeLimitError",
    "UnsafeArchiveError",
    "VerificationError",
]


class ExitCode(enum.IntEnum):
    """Documented process exit codes (docs/cli.md)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    REFUSED = 3
    ROLLED_BACK = 4
    ROLLBACK_UNHEALTHY = 5
    BUSY = 6
    UPDATE_AVAILABLE = 100


class Error(Exception):
    """Base of every error the updater raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILED
    default_hint: str | None = None  # what to do, when the raiser has nothing more specific

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def diagnostics(self) -> str:
        """A human explanation: what failed, then what to do next."""
        lines = [self.message]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        cause = self.__cause__
        if cause is not None and not isinstance(cause, Error):
            lines.append(f"caused by: {type(cause).__name__}: {cause}")
        return "\n".join(lines)


class ConfigError(Error):
    """Invalid configuration or command-line usage."""

    exit_code = ExitCode.USAGE


class PermissionRefused(ConfigError):
    """A command that changes the system was run without the rights it needs."""


class RemoteDataError(Error):
    """The remote side served data we refuse to use."""

    exit_code = ExitCode.REFUSED


class VerificationError(RemoteDataError):
    """A signature, identity, issuer or digest check failed."""


class ManifestError(RemoteDataError):
    """A verified manifest is malformed or breaks the channel rules."""


class FreshnessError(RemoteDataError):
    """A verified manifest is older than one already accepted, or expired (a replay or a freeze)."""


class SizeLimitError(RemoteDataError):
    """A download exceeded its size cap (endless-data defence)."""


class UnsafeArchiveError(RemoteDataError):
    """A release tarball contains something we refuse to unpack."""

    default_hint = (
        "nothing was unpacked and the running version is untouched; the tarball passed its "
        "signature check, so report it to the release's publisher (`skip VERSION` holds it back)"
    )


class DownloadError(Error):
    """Transport failed: timeout, reset, slow retrieval, HTTP error status."""


class InstallError(Error):
    """Putting a verified release on disk failed; the running version is untouched."""


class DiskSpaceError(InstallError):
    """Not enough free space, checked before unpacking or hit while unpacking (ENOSPC)."""


class HookError(InstallError):
    """An activation hook failed; the swap was undone."""


class ServiceError(Error):
    """Talking to the service manager failed."""


class BusyError(Error):
    """Another update holds the lock."""

    exit_code = ExitCode.BUSY
