"""Health probes: the I/O edge of the gate.

A probe answers one question once: :meth:`Probe.check` takes an absolute deadline on
``time.monotonic()`` (the runner passes ``now + probe_timeout_s``) and returns a
:class:`~watchdog_updater.health.policy.ProbeResult`. Every blocking step inside a probe is bounded
by what is left of that deadline, and every probe built here turns *any* exception into a FAIL
whose detail is the exception: a probe never raises and never passes by default.
:func:`run_probe` gives the same guarantee for probes written elsewhere.

Probes:

- :class:`UnitProbe` - a systemd unit is active/running and has not restarted since our restart.
- :class:`SlotProbe` - a model slot is ready (hal0's own rule: unit active, ``/health`` 200 with
  ``model_loaded`` true when present, else ``/v1/models`` 200); :func:`discover_slots` finds them.
- :class:`HttpProbe` - an HTTP endpoint answers an expected status and JSON fields.
- :class:`CommandProbe` - a command exits 0 in time; its whole process group is killed afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import re
import signal
import ssl
import subprocess
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Protocol, runtime_checkable

import httpx

from watchdog_updater.errors import ConfigError
from watchdog_updater.health.policy import ProbeOutcome, ProbeResult

__all__ = [
    "DEFAULT_SLOT_PATTERN",
    "HAL0_API_HEALTH_URL",
    "CommandProbe",
    "HttpProbe",
    "Probe",
    "ServiceManagerLike",
    "SlotProbe",
    "UnitProbe",
    "UnitStatusLike",
    "discover_slots",
    "run_probe",
    "slot_token",
]

HAL0_API_HEALTH_URL = "http://127.0.0.1:8080/api/health"
DEFAULT_SLOT_PATTERN = "hal0-slot@*.service"
DEFAULT_TIMEOUT_S = 5.0
MAX_BODY_BYTES = 64 * 1024  # a health answer is small; more is refused, never buffered
MAX_EVIDENCE_CHARS = 300  # bodies and output quoted in evidence
MAX_OUTPUT_TAIL_BYTES = 8 * 1024  # command output kept (the tail) while it runs
OUTPUT_TAIL_LINES = 5
MAX_PORT_FILE_BYTES = 64 * 1024


# ---------------------------------------------------------------------------------------------
# What the probes need from the service manager (typed structurally, so the real
# watchdog_updater.services.ServiceManager and its UnitStatus satisfy it as they are).
# ---------------------------------------------------------------------------------------------


class UnitStatusLike(Protocol):
    """The fields of a unit's status the probes read (``services.UnitStatus`` has them)."""

    @property
    def name(self) -> str: ...
    @property
    def active_state(self) -> str: ...
    @property
    def sub_state(self) -> str: ...
    @property
    def n_restarts(self) -> int: ...
    @property
    def invocation_id(self) -> str: ...
    @property
    def exec_main_status(self) -> int: ...
    @property
    def exec_main_pid(self) -> int: ...


class ServiceManagerLike(Protocol):
    """The read side of ``services.ServiceManager`` that the probes use."""

    def status(self, unit: str) -> UnitStatusLike: ...
    def list_units(self, pattern: str) -> list[str]: ...


if TYPE_CHECKING:  # mypy proves the real service manager fits; no import at run time
    from watchdog_updater.services import ServiceManager

    def _fits(manager: ServiceManager) -> ServiceManagerLike:
        return manager


# ---------------------------------------------------------------------------------------------
# The probe protocol and the never-raise guarantee
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class Probe(Protocol):
    """One health check. ``check`` must return by ``deadline_s`` (``time.monotonic()`` seconds)."""

    @property
    def name(self) -> str: ...

    def check(self, deadline_s: float) -> ProbeResult: ...


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _clip(text: str, limit: int = MAX_EVIDENCE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_probe(probe: Probe, deadline_s: float) -> ProbeResult:
    """Call ``probe.check`` so that nothing escapes and nothing passes by accident.

    Any exception becomes a FAIL with the exception as evidence; an answer that is not a
    :class:`ProbeResult` for this probe is a FAIL too. ``at_s``/``duration_s`` are measured here on
    ``time.monotonic()``.
    """
    began = time.monotonic()
    name = "<unnamed probe>"
    try:
        name = probe.name
        result = probe.check(deadline_s)
        if not isinstance(result, ProbeResult):
            outcome, detail = ProbeOutcome.FAIL, f"probe returned {type(result).__name__}"
        elif result.probe != name:
            outcome, detail = ProbeOutcome.FAIL, f"probe answered as {result.probe!r}"
        elif not isinstance(result.outcome, ProbeOutcome):
            outcome, detail = ProbeOutcome.FAIL, f"probe outcome {result.outcome!r} is not valid"
        else:
            outcome, detail = result.outcome, result.detail
    except Exception as e:
        outcome, detail = ProbeOutcome.FAIL, f"probe raised {_describe(e)}"
    ended = time.monotonic()
    return ProbeResult(name, outcome, detail, at_s=ended, duration_s=ended - began)


class _BaseProbe:
    """Shared shape: subclasses implement :meth:`_check`; :meth:`check` never raises."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"probe name {name!r} must be a non-empty string")
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def check(self, deadline_s: float) -> ProbeResult:
        began = time.monotonic()
        try:
            outcome, detail = self._check(deadline_s)
        except Exception as e:
            outcome, detail = ProbeOutcome.FAIL, f"probe raised {_describe(e)}"
        ended = time.monotonic()
        return ProbeResult(self._name, outcome, detail, at_s=ended, duration_s=ended - began)

    def _check(self, deadline_s: float) -> tuple[ProbeOutcome, str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r})"


def _remaining(deadline_s: float, cap_s: float) -> float:
    """Seconds left before ``deadline_s``, at most ``cap_s``; raises TimeoutError when none."""
    left = min(cap_s, deadline_s - time.monotonic())
    if left <= 0:
        raise TimeoutError("probe deadline reached before the step could start")
    return left


# ---------------------------------------------------------------------------------------------
# (a) systemd units
# ---------------------------------------------------------------------------------------------


def _unit_evidence(st: UnitStatusLike) -> str:
    return (
        f"{st.name}: {st.active_state}/{st.sub_state}, NRestarts={st.n_restarts}, "
        f"InvocationID={st.invocation_id or '-'}, main pid {st.exec_main_pid} "
        f"status {st.exec_main_status}"
    )


class UnitProbe(_BaseProbe):
    """A restarted unit is up and has stayed up since ``baseline`` (its status after our restart).

    - PASS: ``active``/``running``, NRestarts equal to the baseline's, same InvocationID.
    - FATAL (crash loop, fail fast): ActiveState ``failed``; SubState ``auto-restart`` (the main
      process died and systemd is about to restart it); NRestarts above the baseline; a different
      InvocationID (the unit was started again). An empty baseline InvocationID skips that check.
    - FAIL otherwise (``activating``, ``reloading``, ``inactive``...), with the states as evidence.
    """

    def __init__(
        self,
        manager: ServiceManagerLike,
        unit: str,
        baseline: UnitStatusLike,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(name or f"unit:{unit}")
        self._manager = manager
        self._unit = unit
        self._baseline = baseline

    @property
    def unit(self) -> str:
        return self._unit

    def _check(self, deadline_s: float) -> tuple[ProbeOutcome, str]:
        st = self._manager.status(self._unit)
        base = self._baseline
        evidence = _unit_evidence(st)
        if st.active_state == "failed":
            return ProbeOutcome.FATAL, f"unit failed: {evidence}"
        if st.n_restarts > base.n_restarts:
            return ProbeOutcome.FATAL, (
                f"restart counter grew from {base.n_restarts} (crash loop): {evidence}"
            )
        if base.invocation_id and st.invocation_id and st.invocation_id != base.invocation_id:
            return ProbeOutcome.FATAL, (
                f"unit was started again (invocation {base.invocation_id} -> "
                f"{st.invocation_id}): {evidence}"
            )
        if st.sub_state == "auto-restart":
            return ProbeOutcome.FATAL, f"main process exited, systemd restarts it: {evidence}"
        if st.n_restarts < base.n_restarts:
            return ProbeOutcome.FAIL, (
                f"restart counter went back from {base.n_restarts} (reset?): {evidence}"
            )
        if st.active_state == "active" and st.sub_state == "running":
            return ProbeOutcome.PASS, evidence
        return ProbeOutcome.FAIL, f"not running: {evidence}"


# ---------------------------------------------------------------------------------------------
# HTTP plumbing shared by slot and HTTP probes
# ---------------------------------------------------------------------------------------------


def _is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_probe_url(url: str) -> str:
    """Only https, or plain http to a loopback address; no credentials in the URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"probe URL {url!r} must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise ConfigError(f"probe URL {url!r} must not carry credentials")
    if parts.scheme == "http" and not _is_loopback_host(parts.hostname):
        raise ConfigError(
            f"probe URL {url!r} is plain http to a non-loopback host",
            hint="use https, or a loopback address such as 127.0.0.1",
        )
    try:
        _ = parts.port  # raises on a malformed port
    except ValueError as e:
        raise ConfigError(f"probe URL {url!r} has a bad port") from e
    return url


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    too_large: bool

    def quoted(self) -> str:
        text = self.body.decode("utf-8", "replace")
        return _clip(text) if text.strip() else "(empty body)"

    def json_object(self) -> dict[str, object] | None:
        if self.too_large:
            return None
        try:
            value = json.loads(self.body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


def _verifying_context() -> ssl.SSLContext:
    """httpx's default verification (certifi, no environment), a new context for each call.

    Never shared between probe threads: httpcore sets the ALPN protocols on the context before
    every TLS connection, and CPython frees the old list while another thread's handshake may be
    copying it (a reviewer's stress test saw a garbage ALPN extension once in ~226k handshakes).
    """
    return httpx.create_ssl_context(trust_env=False)


@functools.cache
def _trust_nothing_context() -> ssl.SSLContext:
    """A client context with no trust anchors: every certificate fails its verification.

    httpx builds its transport's context up front, even for an ``http://`` URL. An ``http://``
    probe gets this one instead of a verifying one (certifi's bundle is ~1.9 MiB of RSS per copy,
    and the hal0 probes are plain HTTP on loopback). It is shared, and safe to share: httpcore
    only touches a context for a TLS connection, which an ``http://`` probe never makes
    (redirects are not followed); if it ever did, it would fail closed.
    """
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _context_for(url: str) -> ssl.SSLContext:
    https = urllib.parse.urlsplit(url).scheme.lower() == "https"
    return _verifying_context() if https else _trust_nothing_context()


def _http_get(url: str, deadline_s: float, cap_s: float) -> _Answer:
    """GET ``url``; every phase (connect, write, each read, pool) is bounded by the time left.

    The body is streamed, capped at :data:`MAX_BODY_BYTES`, and the deadline is checked between
    chunks, so a server that trickles bytes cannot hold the probe much past its deadline. (A server
    trickling its *headers* is bounded per read by httpx; the runner abandons the probe if it still
    overruns.) Environment proxies are ignored: a loopback probe must not go through a proxy.
    """
    timeout = httpx.Timeout(_remaining(deadline_s, cap_s))
    body = bytearray()
    too_large = False
    with (
        httpx.Client(
            timeout=timeout, verify=_context_for(url), trust_env=False, follow_redirects=False
        ) as client,
        client.stream("GET", url, headers={"Accept": "application/json"}) as response,
    ):
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                too_large = True
                del body[MAX_BODY_BYTES:]
                break
            if time.monotonic() >= deadline_s:
                raise TimeoutError("body still arriving at the probe deadline")
        return _Answer(response.status_code, bytes(body), too_large)


def _http_failure(url: str, exc: Exception, cap_s: float) -> str:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return f"no answer from {url} within {cap_s:g}s ({_describe(exc)})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {url}: {_describe(exc)}"
    return f"GET {url} failed: {_describe(exc)}"


def _json_equal(actual: object, expected: object) -> bool:
    """Equality that does not let ``True == 1`` or ``1 == "1"`` slip through."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    return actual == expected


# ---------------------------------------------------------------------------------------------
# (b) model slots
# ---------------------------------------------------------------------------------------------


_SLOT_UNIT = re.compile(r"^[^@/]+@(?P<token>[^/]+)\.service$")


def slot_token(unit: str) -> str:
    """``hal0-slot@brain.service`` -> ``brain`` (the instance name, as systemd spells it)."""
    match = _SLOT_UNIT.match(unit)
    if match is None:
        raise ConfigError(
            f"{unit!r} is not a template instance unit such as hal0-slot@NAME.service"
        )
    return match.group("token")


def _check_port(port: object, where: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: port {port!r} is not a TCP port (1..65535)")
    return port


class SlotProbe(_BaseProbe):
    """A model slot is ready, by hal0's rule.

    PASS when the unit is ``active`` and ``GET http://host:port/health`` answers 200 with
    ``model_loaded`` true if the body has that key; when ``/health`` answers anything but 200, a
    ``GET /v1/models`` answering 200 also passes (hal0's fallback for servers without ``/health``).
    A 200 with ``model_loaded`` false is a FAIL (no fallback: the server said it is not ready).
    FAIL with the evidence otherwise. The host must be a loopback address.
    """

    def __init__(
        self,
        manager: ServiceManagerLike,
        unit: str,
        port: int,
        host: str = "127.0.0.1",
        *,
        name: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        token = _SLOT_UNIT.match(unit)
        super().__init__(name or f"slot:{token.group('token') if token else unit}")
        self._port = _check_port(port, unit)
        if not _is_loopback_host(host):
            raise ConfigError(f"slot {unit}: host {host!r} is not a loopback address")
        if not timeout_s > 0:
            raise ConfigError(f"slot {unit}: timeout_s must be positive")
        self._manager = manager
        self._unit = unit
        bracketed = f"[{host}]" if ":" in host else host
        self._base = f"http://{bracketed}:{self._port}"
        self._timeout_s = timeout_s

    @property
    def unit(self) -> str:
        return self._unit

    @property
    def port(self) -> int:
        return self._port

    def _check(self, deadline_s: float) -> tuple[ProbeOutcome, str]:
        st = self._manager.status(self._unit)
        if st.active_state != "active":
            return ProbeOutcome.FAIL, f"unit not active: {_unit_evidence(st)}"
        health_url = f"{self._base}/health"
        try:
            health = _http_get(health_url, deadline_s, self._timeout_s)
        except Exception as e:
            return ProbeOutcome.FAIL, _http_failure(health_url, e, self._timeout_s)
        if health.status == 200:
            body = health.json_object()
            if body is not None and "model_loaded" in body:
                if body["model_loaded"] is True:
                    return ProbeOutcome.PASS, f"{health_url}: 200, model_loaded true"
                return ProbeOutcome.FAIL, (
                    f"{health_url}: 200 but model_loaded is {body['model_loaded']!r}"
                )
            return ProbeOutcome.PASS, f"{health_url}: 200"
        models_url = f"{self._base}/v1/models"
        try:
            models = _http_get(models_url, deadline_s, self._timeout_s)
        except Exception as e:
            return ProbeOutcome.FAIL, (
                f"{health_url}: {health.status}; " + _http_failure(models_url, e, self._timeout_s)
            )
        if models.status == 200:
            return ProbeOutcome.PASS, f"{health_url}: {health.status}; {models_url}: 200"
        return ProbeOutcome.FAIL, (
            f"{health_url}: {health.status} {health.quoted()}; "
            f"{models_url}: {models.status} {models.quoted()}"
        )


def _read_small(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(MAX_PORT_FILE_BYTES + 1)
    if len(data) > MAX_PORT_FILE_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_PORT_FILE_BYTES} bytes")
    return data


def _port_from_toml(path: Path) -> int | None:
    try:
        config = tomllib.loads(_read_small(path).decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    server = config.get("server")
    for value in (config.get("port"), server.get("port") if isinstance(server, dict) else None):
        if value is not None:
            return _check_port(value, str(path))
    return None


def _port_from_slots_dir(slots_dir: Path, token: str) -> int | None:
    """``<token>.port`` (one decimal number), else ``<token>.toml`` (``port = N`` or
    ``[server] port = N``), else any ``*.toml`` whose top-level ``name`` is the token."""
    if token.startswith(".") or "/" in token or "\0" in token:
        raise ConfigError(f"slot token {token!r} cannot name a file")
    port_file = slots_dir / f"{token}.port"
    if port_file.is_file():
        text = _read_small(port_file).decode("ascii", "replace").strip()
        if not text.isascii() or not text.isdigit():
            raise ConfigError(f"{port_file} must hold one port number, found {_clip(text, 40)!r}")
        return _check_port(int(text), str(port_file))
    toml_file = slots_dir / f"{token}.toml"
    if toml_file.is_file():
        return _port_from_toml(toml_file)
    for candidate in sorted(slots_dir.glob("*.toml")):
        if candidate.name.startswith("."):
            continue  # editors' and atomic writers' temporaries
        with contextlib.suppress(ConfigError, OSError):
            named = tomllib.loads(_read_small(candidate).decode("utf-8", "replace"))
            if named.get("name") == token:
                return _port_from_toml(candidate)
    return None


def discover_slots(
    manager: ServiceManagerLike,
    pattern: str = DEFAULT_SLOT_PATTERN,
    ports: Mapping[str, int] | None = None,
    slots_dir: Path | None = None,
    *,
    host: str = "127.0.0.1",
    only_active: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[SlotProbe]:
    """One :class:`SlotProbe` per slot unit matching ``pattern``, sorted by unit name.

    A slot's port comes from ``ports`` (instance token -> port, e.g. ``{"brain": 8081}``) first,
    else from ``slots_dir`` (hal0 keeps ``/etc/hal0/slots/<name>.toml``): ``<token>.port`` holding
    the number, else ``<token>.toml`` with a top-level ``port = N`` or ``[server] port = N``, else
    any ``*.toml`` there whose ``name`` is the token. A slot whose port cannot be found is a
    :class:`ConfigError` (a slot that is silently not probed would pass by default).

    With ``only_active`` (the default) slots whose unit is not ``active`` *now* are left out: call
    this before the swap, so a slot an operator stopped does not fail the update's gate.
    """
    probes: list[SlotProbe] = []
    missing: list[str] = []
    for unit in sorted(set(manager.list_units(pattern))):
        token = slot_token(unit)
        if only_active and manager.status(unit).active_state != "active":
            continue
        port: int | None = None
        if ports is not None and token in ports:
            port = _check_port(ports[token], f"ports[{token!r}]")
        elif slots_dir is not None:
            try:
                port = _port_from_slots_dir(slots_dir, token)
            except OSError as e:
                raise ConfigError(f"cannot read the port of slot {token} in {slots_dir}") from e
        if port is None:
            missing.append(unit)
            continue
        probes.append(SlotProbe(manager, unit, port, host, timeout_s=timeout_s))
    if missing:
        raise ConfigError(
            f"no port known for slot units: {', '.join(missing)}",
            hint="set them in [update.health] slot ports or provide a slots directory",
        )
    return probes


# ---------------------------------------------------------------------------------------------
# (c) HTTP endpoints
# ---------------------------------------------------------------------------------------------


class HttpProbe(_BaseProbe):
    """``GET url`` answers ``expect_status`` and a JSON object holding every ``expect_json`` field.

    Fields compare by top-level key with JSON equality (``true`` is not ``1``). Only https URLs, or
    plain http to loopback, are accepted. Connect, write, every read and pool waits are bounded by
    ``min(timeout_s, time left before the deadline)``; a server that accepts and never answers is a
    FAIL after that, never a stall. Redirects are not followed; proxies from the environment are
    ignored.
    """

    def __init__(
        self,
        name: str,
        url: str,
        expect_status: int = 200,
        expect_json: Mapping[str, object] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(name)
        self._url = _check_probe_url(url)
        if isinstance(expect_status, bool) or not 100 <= expect_status <= 599:
            raise ConfigError(f"probe {name}: expect_status {expect_status!r} is not HTTP status")
        if not timeout_s > 0 or timeout_s > 300:
            raise ConfigError(f"probe {name}: timeout_s must be in (0, 300]")
        self._expect_status = expect_status
        self._expect_json: Mapping[str, object] = MappingProxyType(dict(expect_json or {}))
        self._timeout_s = float(timeout_s)

    @classmethod
    def hal0_api(
        cls, url: str = HAL0_API_HEALTH_URL, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> HttpProbe:
        """hal0-api's health endpoint: 200 with ``{"status": "ok"}``."""
        return cls("hal0-api", url, 200, {"status": "ok"}, timeout_s)

    @property
    def url(self) -> str:
        return self._url

    def _check(self, deadline_s: float) -> tuple[ProbeOutcome, str]:
        try:
            answer = _http_get(self._url, deadline_s, self._timeout_s)
        except Exception as e:
            return ProbeOutcome.FAIL, _http_failure(self._url, e, self._timeout_s)
        if answer.status != self._expect_status:
            return ProbeOutcome.FAIL, (
                f"{self._url}: status {answer.status}, expected {self._expect_status}: "
                f"{answer.quoted()}"
            )
        if not self._expect_json:
            return ProbeOutcome.PASS, f"{self._url}: {answer.status}"
        body = answer.json_object()
        if body is None:
            why = "too large" if answer.too_large else "not a JSON object"
            return ProbeOutcome.FAIL, f"{self._url}: body {why}: {answer.quoted()}"
        wrong = [
            f"{key}={body.get(key, '<missing>')!r} (want {want!r})"
            for key, want in self._expect_json.items()
            if key not in body or not _json_equal(body[key], want)
        ]
        if wrong:
            return ProbeOutcome.FAIL, f"{self._url}: {answer.status} but " + ", ".join(wrong)
        return ProbeOutcome.PASS, f"{self._url}: {answer.status}, fields match"


# ---------------------------------------------------------------------------------------------
# (d) commands
# ---------------------------------------------------------------------------------------------


class _Tail:
    """Drains a pipe in a thread, keeping only the last bytes (bounded memory)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe
        self._data = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name="command-probe-tail", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        # The pipe is closed here, never by the caller: closing a buffered file while this thread
        # blocks in read1 would wait for this thread (a grandchild may hold the write end open).
        try:
            with contextlib.suppress(OSError, ValueError):
                while chunk := os.read(self._pipe.fileno(), 4096):
                    with self._lock:
                        self._data += chunk
                        del self._data[:-MAX_OUTPUT_TAIL_BYTES]
        finally:
            with contextlib.suppress(OSError):
                self._pipe.close()

    def finish(self, wait_s: float) -> str:
        """The last lines seen, waiting up to ``wait_s`` for the writer side to close."""
        self._thread.join(wait_s)
        with self._lock:
            text = bytes(self._data).decode("utf-8", "replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return _clip(" | ".join(lines[-OUTPUT_TAIL_LINES:]))


def _exited_unreaped(pid: int) -> bool:
    """True once ``pid`` has exited, *without reaping it*: while the zombie exists its process
    group id cannot be reused, so killing the group afterwards cannot hit a stranger."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError as e:
        # Someone else reaped it (SIGCHLD ignored?): its exit status is lost, so it cannot pass.
        raise RuntimeError("the command's exit status cannot be observed") from e


class CommandProbe(_BaseProbe):
    """A command exits 0 within ``timeout_s`` (and the probe's deadline).

    The command runs in a new session (its own process group) with stdin from /dev/null and
    stdout+stderr captured; only the last lines are kept as evidence. When it runs out of time the
    whole process group gets SIGKILL and the result is FAIL "timed out after Ns". When it exits,
    whatever it left running in its group is killed too: a health check leaves nothing behind.
    """

    POLL_MAX_S = 0.02

    def __init__(
        self, name: str, argv: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        super().__init__(name)
        if (
            isinstance(argv, str)
            or not argv
            or not all(isinstance(a, str) for a in argv)
            or not argv[0]
        ):
            raise ConfigError(f"probe {name}: argv must be a non-empty list of strings")
        if not timeout_s > 0 or timeout_s > 300:
            raise ConfigError(f"probe {name}: timeout_s must be in (0, 300]")
        self._argv = tuple(argv)
        self._timeout_s = float(timeout_s)

    @property
    def argv(self) -> tuple[str, ...]:
        return self._argv

    def _check(self, deadline_s: float) -> tuple[ProbeOutcome, str]:
        budget = _remaining(deadline_s, self._timeout_s)
        until = time.monotonic() + budget
        proc = subprocess.Popen(
            self._argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if proc.stdout is None:  # pragma: no cover - stdout=PIPE guarantees it
            raise RuntimeError("no pipe for the command's output")
        tail = _Tail(proc.stdout)
        try:
            exited = self._wait(proc.pid, until)
        finally:
            # The leader is a zombie (or still running): its pgid is still ours to kill.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        output = tail.finish(wait_s=0.5)
        said = f"; output: {output}" if output else ""
        if not exited:
            return ProbeOutcome.FAIL, f"timed out after {budget:.3g}s, process group killed{said}"
        code = proc.returncode
        if code == 0:
            return ProbeOutcome.PASS, f"exit status 0{said}"
        if code is not None and code < 0:
            try:
                killer = signal.Signals(-code).name
            except ValueError:
                killer = f"signal {-code}"
            return ProbeOutcome.FAIL, f"killed by {killer}{said}"
        return ProbeOutcome.FAIL, f"exit status {code}{said}"

    def _wait(self, pid: int, until: float) -> bool:
        pause = 0.001
        while not _exited_unreaped(pid):
            left = until - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, self.POLL_MAX_S)
        return True
