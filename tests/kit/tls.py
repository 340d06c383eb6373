"""A throwaway certificate authority for HTTPS tests on loopback (trustme).

    ca = TestCA()
    server_ctx = ca.server_context()  # certificate for 127.0.0.1, ::1 and localhost
    Fetcher(settings, ca_file=ca.ca_file)  # a client that trusts this CA, and only it
    ca.close()  # removes the CA file (also done at garbage collection / interpreter exit)

Nothing here touches the system trust store.
"""

from __future__ import annotations

import shutil
import ssl
import tempfile
import weakref
from pathlib import Path
from types import TracebackType
from typing import Self

import trustme

__all__ = ["TestCA"]

LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


class TestCA:
    """A fresh CA with one server certificate for ``hostnames`` (loopback by default)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, hostnames: tuple[str, ...] = LOOPBACK_NAMES) -> None:
        self._ca = trustme.CA()
        self._server_cert = self._ca.issue_cert(*hostnames)
        self._dir = Path(tempfile.mkdtemp(prefix="watchdog-test-ca-"))
        self._ca_file = self._dir / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self._ca_file))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)

    @property
    def ca_file(self) -> Path:
        """PEM file holding the CA certificate, for a client's ``ca_file``."""
        return self._ca_file

    def server_context(self) -> ssl.SSLContext:
        """A server-side SSLContext presenting the loopback certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_cert.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client-side SSLContext trusting only this CA."""
        ctx = ssl.create_default_context()
        self._ca.configure_trust(ctx)
        return ctx

    def close(self) -> None:
        """Delete the CA file."""
        self._cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
