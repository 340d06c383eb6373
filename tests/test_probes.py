"""Probes against real loopback HTTP servers and real processes; the runner with a fake clock.

UnitProbe and SlotProbe read unit states through a small in-test ServiceManager double that stands
in for systemd here (the real backends are tested against a real systemd in the sandbox tests).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.kit.tls import TestCA
from watchdog_updater.errors import ConfigError, ServiceError
from watchdog_updater.health import (
    CommandProbe,
    GatePolicy,
    HttpProbe,
    ProbationPolicy,
    Probe,
    ProbeOutcome,
    ProbeResult,
    SlotProbe,
    UnitProbe,
    Verdict,
    discover_slots,
    probes,
    run_gate,
    run_probation,
    run_probe,
)

PASS, FAIL, FATAL = ProbeOutcome.PASS, ProbeOutcome.FAIL, ProbeOutcome.FATAL
SLACK_S = 0.5  # what "within the timeout" may overrun by on a loaded test machine


def soon(seconds: float = 2.0) -> float:
    return time.monotonic() + seconds


# --------------------------------------------------------------------------- loopback servers

Route = tuple[int, bytes] | Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Server:
    base: str
    routes: dict[str, Route]
    release: threading.Event
    hits: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        spec = self.server.spec
        spec.hits.append(self.path)
        route = spec.routes.get(self.path, (404, b'{"error": "not found"}'))
        if callable(route):
            route(self)
            return
        status, body = route
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    spec: Server


@pytest.fixture
def http() -> Iterator[Server]:
    yield from _serve(None)


@pytest.fixture
def https(test_ca: TestCA) -> Iterator[Server]:
    """Served over TLS with a certificate from the test CA, which certifi (and so an
    ``https://`` probe) does not trust."""
    yield from _serve(test_ca.server_context())


def _serve(tls: ssl.SSLContext | None) -> Iterator[Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    port = httpd.server_address[1]
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    scheme = "http" if tls is None else "https"
    httpd.spec = Server(f"{scheme}://127.0.0.1:{port}", {}, threading.Event())
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd.spec
    finally:
        httpd.spec.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def ok(doc: object, status: int = 200) -> tuple[int, bytes]:
    return status, json.dumps(doc).encode()


def hang(release: threading.Event) -> Callable[[BaseHTTPRequestHandler], None]:
    """Accept the request, read it, never answer (until the test ends)."""

    def handler(_: BaseHTTPRequestHandler) -> None:
        release.wait(30)

    return handler


def trickle(handler: BaseHTTPRequestHandler) -> None:
    """Headers at once, then one body byte every 50 ms, forever (until the client gives up)."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000000")
    handler.end_headers()
    try:
        for _ in range(2000):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.05)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- HttpProbe


def test_http_probe_200_ok_passes(http: Server) -> None:
    http.routes["/api/health"] = ok({"status": "ok", "name": "hal0", "version": "1.2.3"})
    probe = HttpProbe.hal0_api(f"{http.base}/api/health")
    result = probe.check(soon())
    assert result.outcome is PASS, result.detail
    assert result.probe == "hal0-api"


def test_http_probe_wrong_json_field_fails(http: Server) -> None:
    http.routes["/api/health"] = ok({"status": "degraded"})
    result = HttpProbe.hal0_api(f"{http.base}/api/health").check(soon())
    assert result.outcome is FAIL
    assert "status='degraded'" in result.detail


def test_http_probe_missing_json_field_fails(http: Server) -> None:
    http.routes["/api/health"] = ok({"name": "hal0"})
    result = HttpProbe.hal0_api(f"{http.base}/api/health").check(soon())
    assert result.outcome is FAIL
    assert "<missing>" in result.detail


def test_http_probe_true_is_not_one(http: Server) -> None:
    http.routes["/x"] = ok({"ready": 1})
    result = HttpProbe("x", f"{http.base}/x", expect_json={"ready": True}).check(soon())
    assert result.outcome is FAIL


def test_http_probe_non_json_body_fails_when_fields_expected(http: Server) -> None:
    http.routes["/x"] = (200, b"<html>ok</html>")
    result = HttpProbe("x", f"{http.base}/x", expect_json={"status": "ok"}).check(soon())
    assert result.outcome is FAIL
    assert "not a JSON object" in result.detail


def test_http_probe_503_fails(http: Server) -> None:
    http.routes["/api/health"] = ok({"status": "starting"}, 503)
    result = HttpProbe.hal0_api(f"{http.base}/api/health").check(soon())
    assert result.outcome is FAIL
    assert "status 503, expected 200" in result.detail
    assert "starting" in result.detail


def test_http_probe_expected_status_other_than_200(http: Server) -> None:
    http.routes["/teapot"] = (418, b"")
    assert HttpProbe("t", f"{http.base}/teapot", 418).check(soon()).outcome is PASS


def test_http_probe_hanging_server_fails_within_timeout(http: Server) -> None:
    http.routes["/api/health"] = hang(http.release)
    probe = HttpProbe.hal0_api(f"{http.base}/api/health", timeout_s=0.3)
    began = time.monotonic()
    result = probe.check(soon(10))
    took = time.monotonic() - began
    assert result.outcome is FAIL
    assert "no answer" in result.detail
    assert 0.25 <= took < 0.3 + SLACK_S


def test_http_probe_listen_only_socket_fails_within_timeout() -> None:
    # The kernel completes the handshake; nobody ever accepts or reads.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api/health"
        began = time.monotonic()
        result = HttpProbe.hal0_api(url, timeout_s=0.3).check(soon(10))
        assert result.outcome is FAIL
        assert time.monotonic() - began < 0.3 + SLACK_S


def test_http_probe_trickling_body_is_cut_at_the_deadline(http: Server) -> None:
    http.routes["/slow"] = trickle
    began = time.monotonic()
    result = HttpProbe("slow", f"{http.base}/slow").check(time.monotonic() + 0.3)
    assert result.outcome is FAIL
    assert time.monotonic() - began < 0.3 + SLACK_S


def test_http_probe_connection_refused_fails() -> None:
    url = f"http://127.0.0.1:{free_port()}/api/health"
    result = HttpProbe.hal0_api(url).check(soon())
    assert result.outcome is FAIL
    assert "cannot connect" in result.detail


def test_http_probe_expired_deadline_fails_at_once(http: Server) -> None:
    http.routes["/api/health"] = ok({"status": "ok"})
    result = HttpProbe.hal0_api(f"{http.base}/api/health").check(time.monotonic() - 1)
    assert result.outcome is FAIL
    assert http.hits == []


def test_http_probe_refuses_an_endless_body(http: Server) -> None:
    http.routes["/big"] = (200, b'{"status": "ok", "pad": "' + b"x" * 200_000 + b'"}')
    result = HttpProbe("big", f"{http.base}/big", expect_json={"status": "ok"}).check(soon())
    assert result.outcome is FAIL
    assert "too large" in result.detail


def test_http_probe_ignores_proxy_environment(
    http: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    http.routes["/api/health"] = ok({"status": "ok"})
    assert HttpProbe.hal0_api(f"{http.base}/api/health").check(soon()).outcome is PASS


def test_http_probe_does_not_follow_redirects(http: Server) -> None:
    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", "/api/health")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    http.routes["/moved"] = redirect
    http.routes["/api/health"] = ok({"status": "ok"})
    result = HttpProbe("moved", f"{http.base}/moved").check(soon())
    assert result.outcome is FAIL
    assert "status 302" in result.detail


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/health",
        "http://10.0.0.1:8080/api/health",
        "ftp://127.0.0.1/health",
        "https://user:pw@example.com/health",
        "http://127.0.0.1:99999/health",
        "not a url",
    ],
)
def test_http_probe_refuses_urls_that_are_not_loopback_or_https(url: str) -> None:
    with pytest.raises(ConfigError):
        HttpProbe("x", url)


@pytest.mark.parametrize(
    "url", ["https://example.com/health", "http://localhost:8080/x", "http://[::1]:8080/x"]
)
def test_http_probe_accepts_https_and_loopback(url: str) -> None:
    assert HttpProbe("x", url).url == url


def test_https_probe_verifies_the_certificate(https: Server) -> None:
    https.routes["/x"] = ok({"status": "ok"})
    result = HttpProbe("x", f"{https.base}/x").check(soon())
    assert result.outcome is FAIL
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail


def test_http_probe_never_loads_the_ca_bundle(
    http: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """certifi's bundle costs ~1.9 MiB of RSS; a plain-HTTP probe has no use for it."""

    def refuse() -> ssl.SSLContext:
        raise AssertionError("an http:// probe built a verifying TLS context")

    monkeypatch.setattr(probes, "_verifying_context", refuse)
    http.routes["/x"] = ok({"status": "ok"})
    assert HttpProbe("x", f"{http.base}/x").check(soon()).outcome is PASS


def test_https_probes_never_share_a_tls_context() -> None:
    """httpcore mutates a context (its ALPN list) at each TLS connection: concurrent probes
    sharing one race in C (a reviewer saw a garbage ClientHello)."""
    url = "https://example.com/health"
    assert probes._context_for(url) is not probes._context_for(url)


def test_the_http_probes_context_trusts_no_certificate(https: Server) -> None:
    """Should a plain-HTTP probe's context ever carry a TLS connection, it fails closed."""
    host, port = https.base.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        probes._trust_nothing_context().wrap_socket(raw, server_hostname=host)


def test_http_probe_default_is_hal0_api() -> None:
    probe = HttpProbe.hal0_api()
    assert probe.url == "http://127.0.0.1:8080/api/health"
    assert probe.name == "hal0-api"


# --------------------------------------------------------------------------- service manager double


@dataclass(frozen=True)
class Status:
    name: str
    active_state: str = "active"
    sub_state: str = "running"
    n_restarts: int = 0
    invocation_id: str = "a" * 32
    exec_main_status: int = 0
    exec_main_pid: int = 4242


class FakeSystemd:
    """Stands in for systemd: unit states set by the test, read by the probes."""

    def __init__(self, **units: Status) -> None:
        self.units: dict[str, Status] = {}
        for status in units.values():
            self.units[status.name] = status
        self.broken = False

    def set(self, status: Status) -> None:
        self.units[status.name] = status

    def status(self, unit: str) -> Status:
        if self.broken:
            raise ServiceError("systemctl show timed out")
        return self.units.get(unit, Status(unit, "inactive", "dead", invocation_id=""))

    def list_units(self, pattern: str) -> list[str]:
        prefix = pattern.split("*", 1)[0]
        return sorted(u for u in self.units if u.startswith(prefix))

    def restart(self, unit: str, *, timeout_s: float) -> None:  # pragma: no cover - unused
        raise AssertionError("probes never restart units")


API = "hal0-api.service"


def unit_probe(now: Status, baseline: Status | None = None) -> ProbeResult:
    systemd = FakeSystemd(u=now)
    return UnitProbe(systemd, now.name, baseline or Status(now.name)).check(soon())


def test_unit_probe_active_running_unchanged_passes() -> None:
    result = unit_probe(Status(API))
    assert result.outcome is PASS
    assert result.probe == f"unit:{API}"
    assert "active/running" in result.detail


def test_unit_probe_activating_fails_with_states() -> None:
    result = unit_probe(Status(API, "activating", "start"))
    assert result.outcome is FAIL
    assert "activating/start" in result.detail


def test_unit_probe_failed_unit_is_fatal() -> None:
    result = unit_probe(Status(API, "failed", "failed", exec_main_status=1))
    assert result.outcome is FATAL
    assert "unit failed" in result.detail


def test_unit_probe_restart_counter_grew_is_fatal() -> None:
    result = unit_probe(Status(API, n_restarts=3), baseline=Status(API, n_restarts=2))
    assert result.outcome is FATAL
    assert "crash loop" in result.detail


def test_unit_probe_new_invocation_is_fatal() -> None:
    result = unit_probe(Status(API, invocation_id="b" * 32))
    assert result.outcome is FATAL
    assert "started again" in result.detail


def test_unit_probe_auto_restart_is_fatal() -> None:
    result = unit_probe(Status(API, "activating", "auto-restart", exec_main_status=1))
    assert result.outcome is FATAL


def test_unit_probe_without_baseline_invocation_skips_that_check() -> None:
    result = unit_probe(Status(API, invocation_id="c" * 32), baseline=Status(API, invocation_id=""))
    assert result.outcome is PASS


def test_unit_probe_service_manager_error_is_a_fail_not_an_exception() -> None:
    systemd = FakeSystemd(u=Status(API))
    systemd.broken = True
    result = UnitProbe(systemd, API, Status(API)).check(soon())
    assert result.outcome is FAIL
    assert "ServiceError" in result.detail


# --------------------------------------------------------------------------- SlotProbe

SLOT = "hal0-slot@brain.service"


def slot_probe(http: Server, systemd: FakeSystemd | None = None) -> SlotProbe:
    port = int(http.base.rsplit(":", 1)[1])
    return SlotProbe(systemd or FakeSystemd(s=Status(SLOT)), SLOT, port)


def test_slot_health_model_loaded_true_passes(http: Server) -> None:
    http.routes["/health"] = ok({"status": "ok", "model_loaded": True})
    result = slot_probe(http).check(soon())
    assert result.outcome is PASS, result.detail
    assert result.probe == "slot:brain"


def test_slot_health_model_loaded_false_fails(http: Server) -> None:
    http.routes["/health"] = ok({"status": "ok", "model_loaded": False})
    http.routes["/v1/models"] = ok({"data": []})
    result = slot_probe(http).check(soon())
    assert result.outcome is FAIL
    assert "model_loaded is False" in result.detail
    assert "/v1/models" not in http.hits  # not a non-200: no fallback


def test_slot_health_404_falls_back_to_models_200(http: Server) -> None:
    http.routes["/v1/models"] = ok({"data": [{"id": "qwen"}]})
    result = slot_probe(http).check(soon())
    assert result.outcome is PASS, result.detail
    assert http.hits == ["/health", "/v1/models"]


def test_slot_health_200_without_model_loaded_passes(http: Server) -> None:
    http.routes["/health"] = (200, b"OK")
    assert slot_probe(http).check(soon()).outcome is PASS


def test_slot_health_and_models_failing_fails_with_both(http: Server) -> None:
    http.routes["/health"] = ok({"error": "loading"}, 503)
    http.routes["/v1/models"] = ok({"error": "loading"}, 503)
    result = slot_probe(http).check(soon())
    assert result.outcome is FAIL
    assert "/health: 503" in result.detail
    assert "/v1/models: 503" in result.detail


def test_slot_unit_not_active_fails_without_asking_http(http: Server) -> None:
    http.routes["/health"] = ok({"model_loaded": True})
    systemd = FakeSystemd(s=Status(SLOT, "activating", "start"))
    result = slot_probe(http, systemd).check(soon())
    assert result.outcome is FAIL
    assert "not active" in result.detail
    assert http.hits == []


def test_slot_hanging_health_fails_within_timeout(http: Server) -> None:
    http.routes["/health"] = hang(http.release)
    port = int(http.base.rsplit(":", 1)[1])
    probe = SlotProbe(FakeSystemd(s=Status(SLOT)), SLOT, port, timeout_s=0.3)
    began = time.monotonic()
    assert probe.check(soon(10)).outcome is FAIL
    assert time.monotonic() - began < 0.3 + SLACK_S


def test_slot_probe_refuses_remote_hosts_and_bad_ports() -> None:
    with pytest.raises(ConfigError):
        SlotProbe(FakeSystemd(), SLOT, 8081, host="192.0.2.1")
    with pytest.raises(ConfigError):
        SlotProbe(FakeSystemd(), SLOT, 0)


# --------------------------------------------------------------------------- discover_slots


def slots_systemd(*tokens: str, inactive: tuple[str, ...] = ()) -> FakeSystemd:
    systemd = FakeSystemd(api=Status(API))
    for token in tokens:
        state = ("inactive", "dead") if token in inactive else ("active", "running")
        systemd.set(Status(f"hal0-slot@{token}.service", *state))
    return systemd


def test_discover_slots_from_ports_mapping() -> None:
    probes = discover_slots(slots_systemd("brain", "chat"), ports={"brain": 8081, "chat": 8082})
    assert [(p.name, p.port) for p in probes] == [("slot:brain", 8081), ("slot:chat", 8082)]


def test_discover_slots_from_slots_dir(tmp_path: Path) -> None:
    (tmp_path / "a.port").write_text("8081\n")
    (tmp_path / "b.toml").write_text('name = "b"\nport = 8082\n')
    (tmp_path / "c.toml").write_text('name = "c"\n[server]\nport = 8083\n')
    (tmp_path / "17.toml").write_text('name = "d"\nport = 8084\n')  # hal0's id-keyed files
    (tmp_path / ".d.toml.tmp.toml").write_text('name = "d"\nport = 9999\n')
    probes = discover_slots(slots_systemd("a", "b", "c", "d"), slots_dir=tmp_path)
    assert [(p.name, p.port) for p in probes] == [
        ("slot:a", 8081),
        ("slot:b", 8082),
        ("slot:c", 8083),
        ("slot:d", 8084),
    ]


def test_discover_slots_mapping_wins_over_dir(tmp_path: Path) -> None:
    (tmp_path / "a.port").write_text("8081")
    probes = discover_slots(slots_systemd("a"), ports={"a": 8090}, slots_dir=tmp_path)
    assert probes[0].port == 8090


def test_discover_slots_skips_slots_that_are_not_running() -> None:
    systemd = slots_systemd("a", "b", inactive=("b",))
    assert [p.name for p in discover_slots(systemd, ports={"a": 8081})] == ["slot:a"]


def test_discover_slots_without_a_port_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"hal0-slot@b\.service"):
        discover_slots(slots_systemd("a", "b"), ports={"a": 8081}, slots_dir=tmp_path)


@pytest.mark.parametrize(
    ("name", "text"),
    [("a.port", "eighty"), ("a.port", "70000"), ("a.toml", "port = 'x'"), ("a.toml", "port =")],
)
def test_discover_slots_bad_port_files_are_config_errors(
    tmp_path: Path, name: str, text: str
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError):
        discover_slots(slots_systemd("a"), slots_dir=tmp_path)


def test_discover_slots_with_no_slots_is_empty() -> None:
    assert discover_slots(FakeSystemd(api=Status(API)), ports={}) == []


# --------------------------------------------------------------------------- CommandProbe


def group_alive(pgid: int) -> bool:
    """Any process of this group still running (zombies waiting for a reaper do not count)?"""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_group_gone(pgid: int, within_s: float = 2.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if not group_alive(pgid):
            return True
        time.sleep(0.02)
    return False


def test_command_probe_exit_0_passes() -> None:
    result = CommandProbe("cmd", ["sh", "-c", "echo all good"]).check(soon())
    assert result.outcome is PASS
    assert "all good" in result.detail


def test_command_probe_exit_1_fails_with_last_lines() -> None:
    script = "for i in 1 2 3 4 5 6 7 8; do echo line$i; done; echo broken >&2; exit 1"
    result = CommandProbe("cmd", ["sh", "-c", script]).check(soon())
    assert result.outcome is FAIL
    assert "exit status 1" in result.detail
    assert "broken" in result.detail
    assert "line8" in result.detail
    assert "line1 " not in result.detail  # only the last lines are kept


def test_command_probe_hang_is_killed_at_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; sleep 30 & sleep 30; wait"
    began = time.monotonic()
    result = CommandProbe("cmd", ["sh", "-c", script], timeout_s=0.3).check(soon(10))
    took = time.monotonic() - began
    assert result.outcome is FAIL
    assert "timed out after 0.3s" in result.detail
    assert took < 0.3 + SLACK_S
    assert wait_group_gone(int(pidfile.read_text()))


def test_command_probe_leftovers_are_killed_after_success(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; sleep 30 > /dev/null 2>&1 & exit 0"
    result = CommandProbe("cmd", ["sh", "-c", script]).check(soon())
    assert result.outcome is PASS
    assert wait_group_gone(int(pidfile.read_text()))


def test_command_probe_output_is_bounded() -> None:
    script = "i=0; while [ $i -lt 2000 ]; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done"
    result = CommandProbe("cmd", ["sh", "-c", script]).check(soon(5))
    assert result.outcome is PASS
    assert len(result.detail) < 400


def test_command_probe_missing_program_fails() -> None:
    result = CommandProbe("cmd", ["/nonexistent/health-check"]).check(soon())
    assert result.outcome is FAIL
    assert "FileNotFoundError" in result.detail


def test_command_probe_killed_by_signal_fails() -> None:
    result = CommandProbe("cmd", ["sh", "-c", "kill -TERM $$"]).check(soon())
    assert result.outcome is FAIL
    assert "SIGTERM" in result.detail


@pytest.mark.parametrize("argv", [[], "true", [""], [1]])
def test_command_probe_refuses_bad_argv(argv: object) -> None:
    with pytest.raises(ConfigError):
        CommandProbe("cmd", argv)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- run_probe


class Weird:
    def __init__(self, name: str, answer: Callable[[], object]) -> None:
        self.name = name
        self._answer = answer

    def check(self, deadline_s: float) -> ProbeResult:
        return self._answer()  # type: ignore[return-value]


def boom() -> object:
    raise RuntimeError("kaput")


@pytest.mark.parametrize(
    ("answer", "evidence"),
    [
        (boom, "RuntimeError: kaput"),
        (lambda: None, "returned NoneType"),
        (lambda: ProbeResult("other", PASS, "", 0, 0), "answered as 'other'"),
        (lambda: ProbeResult("w", "pass", "", 0, 0), "not valid"),  # type: ignore[arg-type]
    ],
)
def test_run_probe_never_raises_and_never_passes_by_accident(
    answer: Callable[[], object], evidence: str
) -> None:
    result = run_probe(Weird("w", answer), soon())
    assert result.outcome is FAIL
    assert evidence in result.detail


# --------------------------------------------------------------------------- run_gate, run_probation


class FakeClock:
    """Time that moves only when the gate sleeps (or a test moves it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


class Scripted:
    """Answers outcomes from a script, then repeats the last one."""

    def __init__(self, name: str, *script: ProbeOutcome) -> None:
        self.name = name
        self.script = list(script)
        self.calls = 0

    def check(self, deadline_s: float) -> ProbeResult:
        outcome = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return ProbeResult(self.name, outcome, f"call {self.calls}", at_s=0.0, duration_s=0.0)


class Blocker:
    """Ignores its deadline: blocks on an event (a probe stuck in uninterruptible I/O)."""

    def __init__(self, name: str, release: threading.Event, *, passes_first: int = 0) -> None:
        self.name = name
        self.release = release
        self.passes_first = passes_first
        self.calls = 0

    def check(self, deadline_s: float) -> ProbeResult:
        self.calls += 1
        if self.calls > self.passes_first:
            self.release.wait(60)
        return ProbeResult(self.name, PASS, "late", at_s=0.0, duration_s=0.0)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def test_run_gate_healthy_after_three_rounds_with_a_fake_clock() -> None:
    clock = FakeClock()
    seen: list[ProbeResult] = []
    probes = [Scripted("api", PASS), Scripted("unit", PASS)]
    began = time.monotonic()
    decision = run_gate(probes, GatePolicy(), clock=clock, sleep=clock.sleep, on_result=seen.append)
    assert decision.verdict is Verdict.HEALTHY
    assert clock.sleeps == [2.0, 2.0]  # rounds start interval_s apart
    assert len(seen) == 6
    assert {r.at_s for r in seen} == {1000.0, 1002.0, 1004.0}
    assert time.monotonic() - began < 1.0


def test_run_gate_slow_start_then_healthy() -> None:
    clock = FakeClock()
    api = Scripted("api", *([FAIL] * 10), PASS)
    decision = run_gate([api], GatePolicy(), clock=clock, sleep=clock.sleep)
    assert decision.verdict is Verdict.HEALTHY
    assert api.calls == 13
    # Start-up rounds 0.25, 0.5, 1 s apart, then interval_s (2 s): first pass at 15.75 s, then two
    # more rounds at the interval (the streak still spans 4 s).
    assert clock.sleeps == [0.25, 0.5, 1.0] + [2.0] * 9
    assert decision.elapsed_s == 19.75


def test_run_gate_polls_sooner_only_until_every_probe_passed() -> None:
    """A service up after ~0.5 s is seen at 0.75 s, not 2 s; the streak keeps its 2 intervals."""
    clock = FakeClock()
    seen: list[ProbeResult] = []
    probes = [Scripted("unit", PASS), Scripted("api", FAIL, FAIL, PASS)]
    decision = run_gate(probes, GatePolicy(), clock=clock, sleep=clock.sleep, on_result=seen.append)
    assert decision.verdict is Verdict.HEALTHY
    assert clock.sleeps == [0.25, 0.5, 2.0, 2.0]
    assert decision.elapsed_s == 4.75  # was 8.0 with every round interval_s apart
    api_passes = [r.at_s for r in seen if r.probe == "api" and r.outcome is PASS]
    assert api_passes == [1000.75, 1002.75, 1004.75]


def test_run_gate_catches_a_crash_loop_at_its_first_restart() -> None:
    clock = FakeClock()
    probes = [Scripted("unit", FAIL, FAIL, FAIL, FATAL), Scripted("api", FAIL)]
    decision = run_gate(probes, GatePolicy(), clock=clock, sleep=clock.sleep)
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.elapsed_s == 1.75  # 0.25 + 0.5 + 1.0: the fourth round, not at 6 s


def test_run_gate_crash_loop_returns_without_waiting(release: threading.Event) -> None:
    clock = FakeClock()
    probes: list[Probe] = [Scripted("unit", PASS, FATAL), Blocker("slow", release, passes_first=1)]
    began = time.monotonic()
    decision = run_gate(probes, GatePolicy(probe_timeout_s=5.0), clock=clock, sleep=clock.sleep)
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.failed_probe == "unit"
    assert time.monotonic() - began < 2.0  # did not wait 5 s for the blocked probe


def test_run_gate_probe_ignoring_its_timeout_does_not_stall(release: threading.Event) -> None:
    clock = FakeClock()
    stuck = Blocker("stuck", release)
    seen: list[ProbeResult] = []
    policy = GatePolicy(probe_timeout_s=0.2, deadline_s=10.0)
    began = time.monotonic()
    decision = run_gate(
        [Scripted("api", PASS), stuck],
        policy,
        clock=clock,
        sleep=clock.sleep,
        on_result=seen.append,
        abandon_slack_s=0.1,
    )
    assert time.monotonic() - began < 0.3 + 1.0  # one abandoned wait, not one per round
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.failed_probe == "stuck"
    assert "10s deadline" in decision.reason
    assert stuck.calls == 1  # never called again while the first call hangs: no thread pile-up
    details = [r.detail for r in seen if r.probe == "stuck"]
    assert "call abandoned" in details[0]
    assert all("still running" in d for d in details[1:])


def test_run_gate_stuck_probe_after_first_pass_spends_its_budget(release: threading.Event) -> None:
    clock = FakeClock()
    policy = GatePolicy(probe_timeout_s=0.2, failure_budget=2)
    decision = run_gate(
        [Blocker("stuck", release, passes_first=1)],
        policy,
        clock=clock,
        sleep=clock.sleep,
        abandon_slack_s=0.1,
    )
    assert decision.verdict is Verdict.UNHEALTHY
    assert "failure budget of 2" in decision.reason
    assert decision.elapsed_s < policy.deadline_s


def test_run_gate_deadline_is_hard_with_the_real_clock(release: threading.Event) -> None:
    policy = GatePolicy(interval_s=0.05, deadline_s=0.4, probe_timeout_s=0.3)
    began = time.monotonic()
    decision = run_gate([Blocker("stuck", release)], policy, abandon_slack_s=5.0)
    assert decision.verdict is Verdict.UNHEALTHY
    assert time.monotonic() - began < 0.4 + SLACK_S


def test_run_gate_raising_probe_is_a_failure_not_a_crash() -> None:
    class Raiser:
        name = "raiser"

        def check(self, deadline_s: float) -> ProbeResult:
            raise SystemExit(3)

    clock = FakeClock()
    seen: list[ProbeResult] = []
    decision = run_gate(
        [Raiser()],
        GatePolicy(deadline_s=6.0),
        clock=clock,
        sleep=clock.sleep,
        on_result=seen.append,
    )
    assert decision.verdict is Verdict.UNHEALTHY
    assert "SystemExit" in seen[0].detail


def test_run_gate_broken_observer_neither_fails_nor_passes_the_gate() -> None:
    clock = FakeClock()

    def broken(_: ProbeResult) -> None:
        raise ValueError("metrics down")

    decision = run_gate(
        [Scripted("api", PASS)], GatePolicy(), clock=clock, sleep=clock.sleep, on_result=broken
    )
    assert decision.verdict is Verdict.HEALTHY


def test_run_gate_with_real_http_probes(http: Server) -> None:
    http.routes["/api/health"] = ok({"status": "ok"})
    port = int(http.base.rsplit(":", 1)[1])
    http.routes["/health"] = ok({"model_loaded": True})
    probes: list[Probe] = [
        HttpProbe.hal0_api(f"{http.base}/api/health"),
        SlotProbe(FakeSystemd(s=Status(SLOT)), SLOT, port),
        UnitProbe(FakeSystemd(u=Status(API)), API, Status(API)),
    ]
    decision = run_gate(probes, GatePolicy(interval_s=0.02, deadline_s=5.0))
    assert decision.verdict is Verdict.HEALTHY, decision.reason


def test_run_gate_refuses_an_empty_probe_set() -> None:
    with pytest.raises(ConfigError):
        run_gate([], GatePolicy())


def test_run_probation_healthy_at_the_end() -> None:
    clock = FakeClock()
    api = Scripted("api", PASS, FAIL, FAIL, PASS)
    decision = run_probation([api], ProbationPolicy(), clock=clock, sleep=clock.sleep)
    assert decision.verdict is Verdict.HEALTHY
    assert decision.elapsed_s == 600.0
    assert api.calls == 40


def test_run_probation_sustained_failure_rolls_back() -> None:
    clock = FakeClock()
    api = Scripted("api", PASS, PASS, FAIL)
    decision = run_probation([api], ProbationPolicy(), clock=clock, sleep=clock.sleep)
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.elapsed_s == 60.0  # failures at 30, 45, 60 s
    assert "sustained" in decision.reason


def test_run_probation_stops_when_asked() -> None:
    clock = FakeClock()
    stop_at = clock.now + 100

    decision = run_probation(
        [Scripted("api", PASS)],
        ProbationPolicy(),
        clock=clock,
        sleep=clock.sleep,
        should_stop=lambda: clock.now >= stop_at,
    )
    assert decision.verdict is Verdict.PENDING
    assert decision.reason.startswith("stopped")
    assert 100 <= decision.elapsed_s <= 101
    assert max(clock.sleeps) <= 1.0  # sleeps in slices to notice the stop


def test_probe_protocol_is_satisfied_by_the_builtin_probes(http: Server) -> None:
    port = int(http.base.rsplit(":", 1)[1])
    for probe in (
        HttpProbe.hal0_api(),
        CommandProbe("c", ["true"]),
        SlotProbe(FakeSystemd(), SLOT, port),
        UnitProbe(FakeSystemd(), API, Status(API)),
    ):
        assert isinstance(probe, Probe)


def test_run_gate_probe_renaming_itself_is_a_failure_not_a_crash() -> None:
    class Shifty:
        def __init__(self) -> None:
            self.reads = 0

        @property
        def name(self) -> str:
            self.reads += 1
            return "shifty" if self.reads == 1 else f"other{self.reads}"

        def check(self, deadline_s: float) -> ProbeResult:
            return ProbeResult(self.name, PASS, "", 0.0, 0.0)

    clock = FakeClock()
    seen: list[ProbeResult] = []
    decision = run_gate(
        [Shifty()],
        GatePolicy(deadline_s=6.0),
        clock=clock,
        sleep=clock.sleep,
        on_result=seen.append,
    )
    assert decision.verdict is Verdict.UNHEALTHY
    assert {r.probe for r in seen} == {"shifty"}
    assert all(r.outcome is FAIL for r in seen)
