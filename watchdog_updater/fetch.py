"""Bounded HTTP(S) downloads: every byte is capped, timed and accounted for.

The release server is not trusted to behave. Whatever it does, a fetch ends within known bounds:

- **size**: every call names a cap. A ``Content-Length`` above it is refused before the body is
  read; a body that keeps coming is cut off at the cap (:class:`SizeLimitError`, "endless data").
- **time**: connect and read timeouts bound every socket operation, an overall deadline bounds the
  whole fetch (all attempts and back-off sleeps included), and a minimum average throughput over a
  sliding window defeats slow-drip servers ("slow retrieval"). A stalled read can overrun the
  deadline by at most one read timeout.
- **transport**: HTTPS only, except plain HTTP to loopback (tests, a local mirror). Redirects are
  followed by hand, a bounded number of times, every hop re-checked, never from https to http.
- **integrity of the transfer**: ``download()`` streams into ``<dest>.part`` and hashes SHA-256 in
  the same pass (written and hashed a block behind the network: :mod:`.partfile`). A broken
  transfer resumes with an HTTP ``Range`` request (a ``.part`` left by an earlier process too); a
  server that ignores ``Range`` is read again from byte zero. The finished file is fsynced and
  renamed into place, then the directory is fsynced.

Transient failures (transport errors, truncation, HTTP 408/429/5xx) are retried with capped
exponential back-off and jitter; a refusal (size cap, other 4xx, refused redirect, untrusted TLS
certificate, slow retrieval, deadline) is final. Every foreign exception is translated here into
:class:`DownloadError` (transport failed) or :class:`SizeLimitError` (the server sent too much); the
caller never sees an ``httpx`` or ``OSError`` exception. Content is read raw (``Accept-Encoding:
identity``, never decompressed), so what is hashed is exactly what the server sent.

A :class:`Fetcher` holds one connection pool; it is not meant to be shared between threads.
"""

from __future__ import annotations

import ipaddress
import random
import re
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self
from urllib.parse import urljoin, urlsplit

import httpx

from watchdog_updater.errors import ConfigError, DownloadError, SizeLimitError
from watchdog_updater.fetch_settings import BACKOFF_CAP_S as _BACKOFF_CAP_S
from watchdog_updater.fetch_settings import FetchSettings
from watchdog_updater.partfile import PartFile

__all__ = [
    "DownloadResult",
    "FetchSettings",
    "Fetcher",
    "ProgressCallback",
    "require_secure_url",
]

ProgressCallback = Callable[[int, int | None], None]
"""``progress(bytes_so_far, total_or_None)``, called after every chunk written."""

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_4XX = frozenset({408, 429})
_RETRY_AFTER_CAP_S = 60.0  # a server's Retry-After is honoured up to this

_CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d{1,19})")
_DIGITS = re.compile(r"\d{1,19}")

_jitter = random.SystemRandom()


@dataclass(frozen=True)
class DownloadResult:
    """A finished download: the file at ``path`` has ``size`` bytes hashing to ``sha256_hex``."""

    path: Path
    size: int
    sha256_hex: str
    resumed: bool  # True if bytes from an earlier attempt or process were kept (HTTP 206)


def require_secure_url(url: str) -> None:
    """Refuse any URL but ``https://``, or ``http://`` to loopback (127.0.0.0/8, ::1, localhost).

    Raises :class:`ConfigError` naming the URL.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError when out of range
    except ValueError as e:
        raise ConfigError(f"malformed URL {url!r}: {e}", hint=_SCHEME_HINT) from e
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not host:
        raise ConfigError(
            f"refusing URL {url!r}: not an http(s) URL with a host", hint=_SCHEME_HINT
        )
    if scheme == "http" and not _is_loopback(host):
        raise ConfigError(
            f"refusing plain-http URL {url!r}: http is only allowed to loopback", hint=_SCHEME_HINT
        )


_SCHEME_HINT = "use an https:// URL (plain http:// is accepted only for 127.0.0.1, ::1, localhost)"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Fetcher:
    """Downloads with bounded size, time and retries. Use as a context manager, or call close()."""

    def __init__(
        self,
        settings: FetchSettings,
        *,
        ca_file: Path | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``ca_file`` replaces the default trust store (certifi) with the given PEM bundle."""
        self._settings = settings
        self._sleep = sleep
        self._clock = clock
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    f"cannot load the CA file {ca_file}: {e}",
                    hint="point ca_file at a readable PEM bundle of CA certificates",
                ) from e
        self._client = httpx.Client(
            verify=verify,
            follow_redirects=False,  # followed by hand: every hop is checked
            trust_env=False,  # no proxy or CA settings picked up from the environment
            timeout=self._timeout(settings.deadline_s),
            headers={"User-Agent": settings.user_agent, "Accept-Encoding": "identity"},
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def fetch_bytes(self, url: str, *, max_bytes: int, what: str) -> bytes:
        """Return the body at ``url``, at most ``max_bytes`` long. ``what`` names it in errors."""
        cap = _cap(max_bytes, None, what)
        sink = _MemorySink()
        self._retrieve(url, sink, cap=cap, expected_size=None, what=what, progress=None)
        return sink.getvalue()

    def download(
        self,
        url: str,
        dest: Path,
        *,
        max_bytes: int,
        expected_size: int | None = None,
        what: str,
        progress: ProgressCallback | None = None,
    ) -> DownloadResult:
        """Stream ``url`` to ``dest`` (atomically, via ``<dest>.part``), hashing as it goes.

        ``expected_size``, when given, must match exactly. A ``.part`` left by an interrupted
        download is resumed. On a size-cap violation the ``.part`` is deleted; on a transport
        failure it is kept so that the next attempt resumes.
        """
        cap = _cap(max_bytes, expected_size, what)
        require_secure_url(url)
        part = dest.with_name(dest.name + ".part")
        sink = PartFile.open(part, cap=cap, what=what)
        try:
            self._retrieve(
                url, sink, cap=cap, expected_size=expected_size, what=what, progress=progress
            )
            digest = sink.commit(dest)
            return DownloadResult(dest, sink.size, digest, resumed=sink.resumed)
        except SizeLimitError:
            sink.discard()
            raise
        finally:
            sink.close()

    # -- the retry loop ------------------------------------------------------------------------

    def _retrieve(
        self,
        url: str,
        sink: _Sink,
        *,
        cap: int,
        expected_size: int | None,
        what: str,
        progress: ProgressCallback | None,
    ) -> None:
        """Fill ``sink`` from ``url``, retrying transient failures."""
        require_secure_url(url)
        settings = self._settings
        deadline = self._clock() + settings.deadline_s
        failures = 0
        free_restart = True  # one restart from zero (stale partial data) costs no retry
        while True:
            try:
                self._attempt(url, sink, cap, expected_size, what, progress, deadline)
            except _Retry as retry:
                error = retry.error
                if retry.restart and free_restart:
                    free_restart = False
                    continue
                failures += 1
                if failures > settings.retries:
                    raise error from error.__cause__
                delay = self._backoff(failures, retry.retry_after)
                if self._clock() + delay >= deadline:
                    raise DownloadError(
                        f"{error.message} (no time left for a retry within the "
                        f"{settings.deadline_s:g} s deadline)",
                        hint=error.hint,
                    ) from error.__cause__
                self._sleep(delay)
            else:
                return

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        base = min(self._settings.backoff_s * 2 ** (failures - 1), _BACKOFF_CAP_S)
        delay = _jitter.uniform(base / 2, base)
        if retry_after is not None:
            delay = max(delay, min(retry_after, _RETRY_AFTER_CAP_S))
        return delay

    # -- one attempt -----------------------------------------------------------------------------

    def _attempt(
        self,
        url: str,
        sink: _Sink,
        cap: int,
        expected_size: int | None,
        what: str,
        progress: ProgressCallback | None,
        deadline: float,
    ) -> None:
        """One request (redirects included). Raises _Retry for what a new attempt may fix."""
        offset = sink.size
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response, where = self._open(url, headers, what, deadline)
        try:
            total = self._accept(response, where, sink, offset, cap, expected_size, what)
            if total is None or total != sink.size:  # else: a complete leftover .part
                self._stream(
                    response, where, sink, cap, total, expected_size, what, progress, deadline
                )
        except _HTTPX_ERRORS as e:
            raise _translate(e, what, where) from e
        finally:
            response.close()

    def _open(
        self, url: str, headers: dict[str, str], what: str, deadline: float
    ) -> tuple[httpx.Response, str]:
        """Send GET, following at most ``max_redirects`` checked redirects."""
        where = url
        for _hop in range(self._settings.max_redirects + 1):
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise self._deadline_error(what, where, None)
            try:
                request = self._client.build_request(
                    "GET", where, headers=headers, timeout=self._timeout(remaining)
                )
                response = self._client.send(request, stream=True)
            except _HTTPX_ERRORS as e:
                raise _translate(e, what, where) from e
            if response.status_code not in _REDIRECT_STATUSES:
                return response, where
            response.close()
            where = _redirect_target(where, response, what)
        raise DownloadError(
            f"too many redirects: {what} still redirected after "
            f"{self._settings.max_redirects} hops from {url} (last to {where})",
            hint="the release server's redirects loop or are misconfigured",
        )

    def _accept(
        self,
        response: httpx.Response,
        where: str,
        sink: _Sink,
        offset: int,
        cap: int,
        expected_size: int | None,
        what: str,
    ) -> int | None:
        """Check the status and the announced size; return the total length if known."""
        status = response.status_code
        if status == 200:
            if offset:
                sink.restart()  # the server ignored Range: start over from byte zero
            total = _parse_int(response.headers.get("content-length"))
        elif status == 206 and offset:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
            if match is None or int(match[1]) != offset:
                sink.restart()
                raise _Retry(
                    DownloadError(
                        f"{what}: the server answered a resume from byte {offset} with "
                        f"Content-Range {response.headers.get('content-range')!r} ({where})",
                        hint="the download restarts from zero",
                    ),
                    restart=True,
                )
            total = None if match[3] == "*" else int(match[3])
            sink.resumed = True
        elif status == 416 and offset:
            # Our .part is at least as long as the file: complete, or stale and longer.
            match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("content-range", "").strip())
            if match is not None and int(match[1]) == offset:
                _check_announced(offset, cap, expected_size, what, where)
                sink.resumed = True
                return offset
            sink.restart()
            raise _Retry(
                DownloadError(
                    f"{what}: data kept from an earlier attempt does not fit the file at {where}",
                    hint="the download restarts from zero",
                ),
                restart=True,
            )
        else:
            raise _status_error(response, where, what)
        _check_announced(total, cap, expected_size, what, where)
        return total

    def _stream(
        self,
        response: httpx.Response,
        where: str,
        sink: _Sink,
        cap: int,
        total: int | None,
        expected_size: int | None,
        what: str,
        progress: ProgressCallback | None,
        deadline: float,
    ) -> None:
        """Copy the body into ``sink``, enforcing the cap, the deadline and the minimum speed."""
        meter = _SpeedMeter(
            self._clock(), self._settings.min_speed_bytes_per_s, self._settings.speed_window_s
        )
        announced = total if total is not None else expected_size
        # chunk_size=None: take each read as it arrives (up to 64 KiB), so that the size, speed
        # and deadline checks run per read, not after a slow server has filled a larger buffer.
        for chunk in response.iter_raw():
            size = sink.size + len(chunk)
            if size > cap:
                raise SizeLimitError(
                    f"endless data: {what} exceeded {cap} bytes ({where})",
                    hint="the server sent more than this file may be; refusing it",
                )
            sink.write(chunk)
            now = self._clock()
            if now > deadline:
                raise self._deadline_error(what, where, size)
            slow = meter.update(now, len(chunk))
            if slow is not None:
                raise DownloadError(
                    f"slow retrieval: {what} arrived at {slow:.0f} B/s, below the minimum of "
                    f"{self._settings.min_speed_bytes_per_s} B/s over "
                    f"{self._settings.speed_window_s:g} s ({where})",
                    hint="the server or the network is too slow; the download resumes next run",
                )
            if progress is not None:
                progress(size, announced)
        if announced is not None and sink.size < announced:
            raise _Retry(
                DownloadError(
                    f"truncated: {what} ended after {sink.size} of {announced} bytes ({where})",
                    hint="the connection broke off; a retry resumes where it stopped",
                )
            )

    def _timeout(self, remaining_s: float) -> httpx.Timeout:
        s = self._settings
        connect = min(s.connect_timeout_s, remaining_s)
        read = min(s.read_timeout_s, remaining_s)
        return httpx.Timeout(connect=connect, read=read, write=read, pool=connect)

    def _deadline_error(self, what: str, where: str, size: int | None) -> DownloadError:
        got = "" if size is None else f" after {size} bytes"
        return DownloadError(
            f"deadline exceeded: {what} took longer than {self._settings.deadline_s:g} s{got} "
            f"({where})",
            hint="the server or the network is too slow; the download resumes next run",
        )


# -- helpers -----------------------------------------------------------------------------------


class _Retry(Exception):
    """A failure a new attempt may fix (control flow, never leaves this module).

    ``error`` is raised if no attempt is left; ``restart`` says partial data was dropped.
    """

    def __init__(
        self, error: DownloadError, *, retry_after: float | None = None, restart: bool = False
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after
        self.restart = restart


def _cap(max_bytes: int, expected_size: int | None, what: str) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    if expected_size is None:
        return max_bytes
    if isinstance(expected_size, bool) or not isinstance(expected_size, int) or expected_size < 0:
        raise ValueError(f"expected_size must be an integer >= 0, got {expected_size!r}")
    if expected_size > max_bytes:
        raise SizeLimitError(
            f"{what} is announced as {expected_size} bytes, above the limit of {max_bytes} bytes",
            hint="raise the size limit if this release really is that large",
        )
    return expected_size


def _check_announced(
    total: int | None, cap: int, expected_size: int | None, what: str, where: str
) -> None:
    """Refuse, before reading the body, a length the server announces and we cannot accept."""
    if total is None:
        return
    if total > cap:
        limit = "the expected" if expected_size is not None else "the limit of"
        raise SizeLimitError(
            f"{what} is {total} bytes, above {limit} {cap} bytes ({where})",
            hint="the server offers more than this file may be; refusing it",
        )
    if expected_size is not None and total < expected_size:
        raise _Retry(
            DownloadError(
                f"{what} is {total} bytes, short of the expected {expected_size} bytes ({where})",
                hint="the server offers an incomplete or different file",
            )
        )


def _redirect_target(where: str, response: httpx.Response, what: str) -> str:
    location = response.headers.get("location")
    if not location:
        raise DownloadError(
            f"{what}: HTTP {response.status_code} redirect without a Location from {where}",
            hint="the release server is misconfigured",
        )
    target: str = urljoin(where, str(location))
    if urlsplit(where).scheme.lower() == "https" and urlsplit(target).scheme.lower() == "http":
        raise DownloadError(
            f"refusing redirect from https to http: {target} (fetching {what} from {where})",
            hint="a redirect may never downgrade to plain http; the server or a proxy is wrong",
        )
    try:
        require_secure_url(target)
    except ConfigError as e:
        raise DownloadError(
            f"refusing redirect to {target} (fetching {what} from {where}): {e.message}",
            hint=e.hint,
        ) from e
    return target


def _status_error(response: httpx.Response, where: str, what: str) -> DownloadError | _Retry:
    status = response.status_code
    error = DownloadError(
        f"HTTP {status} {response.reason_phrase} fetching {what} from {where}",
        hint=_status_hint(status),
    )
    if status in _RETRYABLE_4XX or 500 <= status <= 599:
        retry_after = _parse_int(response.headers.get("retry-after"))
        return _Retry(error, retry_after=None if retry_after is None else float(retry_after))
    return error


def _status_hint(status: int) -> str:
    if status in (404, 410):
        return "the file is not (or no longer) published at this URL; check the channel and URL"
    if status in (401, 403):
        return "the release server refuses access; check the URL"
    if status in _RETRYABLE_4XX or status >= 500:
        return "the release server is failing or overloaded; try again later"
    return "the release server refused the request"


_HTTPX_ERRORS = (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError)


def _translate(e: Exception, what: str, where: str) -> DownloadError | _Retry:
    """An httpx exception as a final DownloadError, or a _Retry when a new attempt may help."""
    error = _transport_error(e, what, where)
    if isinstance(e, httpx.TransportError) and not _is_cert_failure(e):
        return _Retry(error)
    return error  # includes an untrusted certificate: it stays untrusted


def _transport_error(e: Exception, what: str, where: str) -> DownloadError:
    """Translate an httpx exception into a DownloadError naming ``what`` and the URL."""
    if _is_cert_failure(e):
        reason = "the server's TLS certificate is not trusted"
        hint = "check ca_file and the server certificate; an interceptor may be in the way"
    elif isinstance(e, httpx.ConnectTimeout):
        reason = "timed out connecting"
        hint = "check network connectivity and that the release server is reachable"
    elif isinstance(e, httpx.TimeoutException):
        reason = "timed out waiting for data"
        hint = "the server stopped answering; a retry resumes where it stopped"
    elif isinstance(e, httpx.ConnectError):
        reason = "could not connect"
        hint = "check network connectivity, DNS and that the release server is reachable"
    elif isinstance(e, httpx.RemoteProtocolError | httpx.ReadError):
        reason = "the connection broke off"
        hint = "a retry resumes where it stopped"
    else:
        reason = "the request failed"
        hint = "check the URL and the network"
    detail = str(e) or type(e).__name__
    error = DownloadError(f"downloading {what} from {where} failed: {reason}: {detail}", hint=hint)
    error.__cause__ = e
    return error


def _is_cert_failure(e: BaseException) -> bool:
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if _DIGITS.fullmatch(value) else None


class _SpeedMeter:
    """Average throughput over a sliding window; reports a rate below the minimum, else None."""

    def __init__(self, start: float, min_bytes_per_s: int, window_s: float) -> None:
        self._min = min_bytes_per_s
        self._window = window_s
        self._step = window_s / 16  # sample spacing: bounded memory, ~6% resolution
        self._total = 0
        self._samples: deque[tuple[float, int]] = deque([(start, 0)])

    def update(self, now: float, received: int) -> float | None:
        self._total += received
        if self._min <= 0:
            return None
        samples = self._samples
        if now - samples[-1][0] >= self._step:
            samples.append((now, self._total))
        horizon = now - self._window
        while len(samples) > 1 and samples[1][0] <= horizon:
            samples.popleft()
        then, total_then = samples[0]
        if then > horizon:
            return None  # less than one full window observed
        rate = (self._total - total_then) / (now - then)
        return rate if rate < self._min else None


class _Sink(Protocol):
    """Where the body goes: in memory (fetch_bytes) or a .part file (download).

    ``resumed`` is set when bytes from an earlier attempt or process are kept (HTTP 206), and
    cleared by ``restart()``.
    """

    resumed: bool

    @property
    def size(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def restart(self) -> None: ...


class _MemorySink:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self.resumed = False

    @property
    def size(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes) -> None:
        self._buffer += data

    def restart(self) -> None:
        self._buffer.clear()
        self.resumed = False

    def getvalue(self) -> bytes:
        return bytes(self._buffer)
