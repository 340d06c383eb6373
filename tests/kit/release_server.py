"""A real release server on loopback, with fault injection, for tests and benchmarks.

    with ReleaseServer() as server:                    # plain HTTP on 127.0.0.1, a free port
        url = server.publish("/stable.json", b"{...}")  # -> "http://127.0.0.1:PORT/stable.json"
        server.truncate_after("/stable.json", 100)      # next GET: full headers, 100 bytes, close
        ...
        assert server.requests_for("/stable.json")[-1].range == "bytes=100-"

    with TestCA() as ca, ReleaseServer(tls=ca) as server:   # HTTPS, trusted via ca.ca_file
        ...

It is a stdlib ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive) running in daemon threads. Published
files are served from memory with single-range ``Range`` support (206 + ``Content-Range``, 416).
Every request is logged (method, path, headers): :attr:`ReleaseServer.requests`,
:meth:`ReleaseServer.requests_for`. Faults are set per path and combine:

- ``status(path, code, times=1)``: answer ``code`` (e.g. 503) ``times`` times, then normally
- ``reset(path, times=1)``: abort the connection (TCP RST) without answering
- ``truncate_after(path, n, times=1)``: full headers and Content-Length, ``n`` body bytes, close
- ``redirect(path, to_url)``: answer 302 with ``Location: to_url``
- ``hang(path)``: read the request, never answer (until the client or the server goes away)
- ``slow(path, bytes_per_s)``: send the body at this rate
- ``endless(path)``: 200 without a Content-Length, and a body that never ends
- ``ignore_range(path)``: answer a ``Range`` request with the whole file (200)
- ``clear_faults(path=None)``: forget the faults of one path, or of every path

``times=None`` makes a counted fault permanent. Precedence per request: hang, reset, status,
redirect, then the body (endless, or the file with range, slow and truncate applied).
:meth:`ReleaseServer.stop` is prompt (it wakes every waiting or blocked handler) and returns only
once every server thread has ended.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from tests.kit.tls import TestCA

__all__ = ["RecordedRequest", "ReleaseServer"]

_SEND_BLOCK = 1024 * 1024  # bytes per write for an unthrottled body
_STOP_JOIN_S = 5.0  # stop() waits this long for every thread, then fails loudly
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")
_UNSATISFIABLE = (-1, -1)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received: ``headers`` has lower-case names."""

    method: str
    path: str
    headers: Mapping[str, str]

    @property
    def range(self) -> str | None:
        """The ``Range`` header, if any (e.g. ``"bytes=100-"``)."""
        return self.headers.get("range")


class ReleaseServer:
    """A loopback HTTP(S) server for release files, with per-path fault injection."""

    def __init__(self, *, tls: TestCA | None = None, host: str = "127.0.0.1") -> None:
        """Serve HTTPS with a certificate from ``tls`` if given, else plain HTTP, on ``host``."""
        self._tls = tls.server_context() if tls is not None else None
        self._host = host
        self._lock = threading.Lock()
        self._files: dict[str, bytes] = {}
        self._faults: dict[str, _Faults] = {}
        self._log: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._handlers: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self.errors: list[str] = []
        """Handler errors (TLS handshakes refused by clients, etc.), for debugging tests."""

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free port and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("ReleaseServer already started")
        self._stopping.clear()
        self._httpd = _HTTPServer(self, (self._host, 0))
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"release-server-{self.port}",
            daemon=True,
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake and end every handler; raise if a thread does not end in 5 s."""
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            sockets = list(self._sockets)
            threads = [*self._handlers, self._serve_thread]
        for sock in sockets:
            _shutdown(sock)
        end = time.monotonic() + _STOP_JOIN_S
        stuck = []
        for thread in threads:
            if thread is not None:
                thread.join(max(0.0, end - time.monotonic()))
                if thread.is_alive():
                    stuck.append(thread.name)
        self._httpd = None
        if stuck:
            raise RuntimeError(f"ReleaseServer threads did not stop: {stuck}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("ReleaseServer not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http(s)://127.0.0.1:PORT``, without a trailing slash."""
        scheme = "https" if self._tls is not None else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}"

    def url(self, path: str) -> str:
        """The full URL of ``path``."""
        return self.base_url + _norm(path)

    # -- content ---------------------------------------------------------------------------------

    def publish(self, path: str, data: bytes) -> str:
        """Serve ``data`` at ``path`` (replacing any previous content); return its URL."""
        with self._lock:
            self._files[_norm(path)] = bytes(data)
        return self.url(path)

    def published(self, path: str) -> bytes:
        """The bytes served at ``path`` (KeyError if nothing is)."""
        with self._lock:
            return self._files[_norm(path)]

    def unpublish(self, path: str) -> None:
        """Stop serving ``path`` (404 from now on)."""
        with self._lock:
            self._files.pop(_norm(path), None)

    # -- request log -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first."""
        with self._lock:
            return list(self._log)

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """The requests for one path, oldest first."""
        path = _norm(path)
        return [r for r in self.requests if r.path == path]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # -- faults ----------------------------------------------------------------------------------

    def status(self, path: str, code: int, *, times: int | None = 1) -> None:
        """Answer ``code`` (with a short body) to the next ``times`` requests."""
        with self._lock:
            faults = self._faults_for(path)
            faults.status_code, faults.status_times = code, times

    def reset(self, path: str, *, times: int | None = 1) -> None:
        """Abort the connection (TCP RST) on the next ``times`` requests, answering nothing."""
        with self._lock:
            self._faults_for(path).reset_times = times

    def truncate_after(self, path: str, n: int, *, times: int | None = 1) -> None:
        """On the next ``times`` bodies: full headers, then only ``n`` body bytes, then close."""
        with self._lock:
            faults = self._faults_for(path)
            faults.truncate_at, faults.truncate_times = n, times

    def redirect(self, path: str, to_url: str) -> None:
        """Answer every request for ``path`` with 302 to ``to_url``."""
        with self._lock:
            self._faults_for(path).redirect_to = to_url

    def hang(self, path: str) -> None:
        """Accept and read requests for ``path`` but never answer."""
        with self._lock:
            self._faults_for(path).hang = True

    def slow(self, path: str, bytes_per_s: int) -> None:
        """Send bodies of ``path`` at ``bytes_per_s``."""
        if bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")
        with self._lock:
            self._faults_for(path).slow_bps = bytes_per_s

    def endless(self, path: str) -> None:
        """Answer 200 without a Content-Length and send bytes until the client goes away."""
        with self._lock:
            self._faults_for(path).endless = True

    def ignore_range(self, path: str) -> None:
        """Ignore ``Range`` headers for ``path``: always answer 200 with the whole file."""
        with self._lock:
            self._faults_for(path).ignore_range = True

    def clear_faults(self, path: str | None = None) -> None:
        """Forget the faults of ``path``, or of every path."""
        with self._lock:
            if path is None:
                self._faults.clear()
            else:
                self._faults.pop(_norm(path), None)

    # -- internals used by the handler -------------------------------------------------------------

    def _faults_for(self, path: str) -> _Faults:
        return self._faults.setdefault(_norm(path), _Faults())

    def _plan(self, method: str, path: str, headers: Mapping[str, str]) -> _Plan:
        """Log the request and decide, atomically, how to answer it."""
        with self._lock:
            self._log.append(RecordedRequest(method, path, dict(headers)))
            faults = self._faults.get(path, _Faults())
            plan = _Plan(data=self._files.get(path))
            if faults.hang:
                plan.action = "hang"
            elif _take(faults, "reset_times"):
                plan.action = "reset"
            elif faults.status_code is not None and _take(faults, "status_times"):
                plan.action, plan.status = "status", faults.status_code
            elif faults.redirect_to is not None:
                plan.action, plan.location = "redirect", faults.redirect_to
            elif faults.endless:
                plan.action = "endless"
            elif plan.data is None:
                plan.action = "status"
                plan.status = 404
            else:
                plan.action = "file"
                if faults.truncate_at is not None and _take(faults, "truncate_times"):
                    plan.truncate_at = faults.truncate_at
            plan.slow_bps = faults.slow_bps
            plan.ignore_range = faults.ignore_range
            return plan


@dataclass
class _Faults:
    status_code: int | None = None
    status_times: int | None = 0
    reset_times: int | None = 0
    truncate_at: int | None = None
    truncate_times: int | None = 0
    redirect_to: str | None = None
    hang: bool = False
    slow_bps: int | None = None
    endless: bool = False
    ignore_range: bool = False


def _take(faults: _Faults, counter: str) -> bool:
    """Consume one use of a counted fault: None is forever, 0 is spent."""
    remaining: int | None = getattr(faults, counter)
    if remaining is None:
        return True
    if remaining <= 0:
        return False
    setattr(faults, counter, remaining - 1)
    return True


@dataclass
class _Plan:
    data: bytes | None
    action: str = "file"
    status: int = 200
    location: str = ""
    truncate_at: int | None = None
    slow_bps: int | None = None
    ignore_range: bool = False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # ReleaseServer.stop() joins the handlers itself, with a timeout

    def __init__(self, owner: ReleaseServer, address: tuple[str, int]) -> None:
        self.owner = owner
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() does a reverse DNS lookup (getfqdn); not needed on loopback.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        owner = self.owner
        thread = threading.Thread(
            target=self._run_handler,
            args=(request, client_address),
            name=f"release-server-{self.server_port}-handler",
            daemon=True,
        )
        with owner._lock:
            owner._handlers.add(thread)
        thread.start()

    def _run_handler(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.owner._lock:
                self.owner._handlers.discard(threading.current_thread())

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        exc = sys.exc_info()[1]
        self.owner.errors.append(f"{type(exc).__name__}: {exc}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection is dropped after this many seconds
    server: _HTTPServer
    connection: socket.socket

    def setup(self) -> None:
        owner = self.server.owner
        sock: socket.socket = self.request
        sock.settimeout(self.timeout)
        ctx = owner._tls
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self.request = sock
        with owner._lock:
            owner._sockets.add(sock)
        if owner._stopping.is_set():
            _shutdown(sock)
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()  # here, in the handler thread, not in the accept loop
            super().setup()
        except BaseException:
            self._release_socket()  # finish() is not called when setup() fails
            raise

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._release_socket()

    def _release_socket(self) -> None:
        with self.server.owner._lock:
            self.server.owner._sockets.discard(self.request)
        _shutdown(self.request)
        self.request.close()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output quiet

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, *, head: bool) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        headers = {k.lower(): v for k, v in self.headers.items()}
        plan = owner._plan(self.command, path, headers)
        try:
            if plan.action == "hang":
                self._hang()
            elif plan.action == "reset":
                self._reset()
            elif plan.action == "status":
                body = f"{plan.status} (release server)\n".encode()
                self._head(plan.status, {"Content-Length": str(len(body))})
                self._body(body, plan, head=head)
            elif plan.action == "redirect":
                self._head(302, {"Location": plan.location, "Content-Length": "0"})
            elif plan.action == "endless":
                self.close_connection = True
                self._head(200, {"Content-Type": "application/octet-stream", "Connection": "close"})
                if not head:
                    self._endless(plan)
            else:
                assert plan.data is not None
                self._file(plan.data, headers.get("range"), plan, head=head)
        except OSError:
            self.close_connection = True  # the client went away (reset, broken pipe...)

    def _file(self, data: bytes, range_header: str | None, plan: _Plan, *, head: bool) -> None:
        size = len(data)
        start, end = 0, size - 1
        status = 200
        extra = {"Accept-Ranges": "bytes"}
        if range_header is not None and not plan.ignore_range:
            wanted = _parse_range(range_header, size)
            if wanted == _UNSATISFIABLE:
                self._head(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
                return
            if wanted is not None:
                start, end = wanted
                status = 206
                extra["Content-Range"] = f"bytes {start}-{end}/{size}"
        if plan.ignore_range:
            extra.pop("Accept-Ranges")
        extra["Content-Type"] = "application/octet-stream"
        extra["Content-Length"] = str(end - start + 1)
        self._head(status, extra)
        self._body(memoryview(data)[start : end + 1], plan, head=head)

    def _head(self, status: int, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _body(self, body: bytes | memoryview, plan: _Plan, *, head: bool) -> None:
        if head:
            return
        view = memoryview(body)
        truncated = plan.truncate_at is not None and plan.truncate_at < len(view)
        if plan.truncate_at is not None:
            view = view[: plan.truncate_at]
        if plan.slow_bps is not None:
            self._throttled(view, plan.slow_bps)
        else:
            for i in range(0, len(view), _SEND_BLOCK):
                self.wfile.write(view[i : i + _SEND_BLOCK])
        if truncated:
            self.close_connection = True
            _shutdown(self.connection)

    def _throttled(self, view: memoryview, bytes_per_s: int) -> None:
        """Send ``view`` at ``bytes_per_s``, in pieces of about 1/20 s each."""
        piece = max(1, bytes_per_s // 20)
        start = time.monotonic()
        sent = 0
        stopping = self.server.owner._stopping
        while sent < len(view):
            self.wfile.write(view[sent : sent + piece])
            sent += min(piece, len(view) - sent)
            delay = start + sent / bytes_per_s - time.monotonic()
            if delay > 0 and stopping.wait(delay):
                raise ConnectionAbortedError("server stopping")

    def _endless(self, plan: _Plan) -> None:
        block = bytes(range(256)) * 256  # 64 KiB
        stopping = self.server.owner._stopping
        while not stopping.is_set():
            if plan.slow_bps is not None:
                self._throttled(memoryview(block), plan.slow_bps)
            else:
                self.wfile.write(block)

    def _hang(self) -> None:
        """Never answer; return when the client closes or the server stops."""
        self.close_connection = True
        stopping = self.server.owner._stopping
        sock = self.connection
        while not stopping.is_set():
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                try:
                    if not socket.socket.recv(sock, 1, socket.MSG_PEEK):
                        return  # the client closed
                except OSError:
                    return
                stopping.wait(0.05)

    def _reset(self) -> None:
        """Abort with a TCP RST: SO_LINGER 0, then close."""
        self.close_connection = True
        sock = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        socket.socket.close(sock)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as (first, last), _UNSATISFIABLE, or None to send the whole file."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or (not match[1] and not match[2]):
        return None
    if not match[1]:  # suffix: the last N bytes
        n = int(match[2])
        if n == 0:
            return _UNSATISFIABLE
        return max(0, size - n), size - 1
    first = int(match[1])
    if first >= size:
        return _UNSATISFIABLE
    last = int(match[2]) if match[2] else size - 1
    if last < first:
        return None  # invalid: ignore the header
    return first, min(last, size - 1)


def _norm(path: str) -> str:
    path = urlsplit(path).path or "/"
    return path if path.startswith("/") else "/" + path


def _shutdown(sock: socket.socket) -> None:
    """Shut the raw socket down (wakes a thread blocked on it), ignoring a closed one."""
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
