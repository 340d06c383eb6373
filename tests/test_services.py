"""Both service-manager backends against a real, private systemd (tests/kit/systemd_sandbox.py).

The systemctl backend reaches the sandbox through ``command_prefix`` (nsenter). pystemd must run
inside the sandbox's mount namespace (the private socket is not reachable from outside), so its
backend is driven through a small helper process started with the sandbox's nsenter prefix.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kit.fake_hal0 import (
    free_port,
    hal0_units,
    install_release,
    set_slot_behavior,
    wait_for_http,
)
from tests.kit.systemd_sandbox import SystemdSandbox, require_systemd_sandbox
from watchdog_updater.errors import ServiceError
from watchdog_updater.services import (
    PRIVATE_SOCKET,
    SYSTEM_BUS_SOCKET,
    ServiceManager,
    SystemctlManager,
    UnitStatus,
    make_service_manager,
    normalize_unit_name,
)

pytestmark = pytest.mark.systemd

TEST_UNITS = {
    "sleeper.service": "[Service]\nExecStart=/bin/sleep 1000\n",
    # Its start job lasts about a second, so a restart that did not wait would be caught.
    "slowstart.service": (
        "[Service]\nType=simple\nExecStartPre=/bin/sleep 1\nExecStart=/bin/sleep 1000\n"
    ),
    "crashloop.service": (
        "[Unit]\nStartLimitIntervalSec=0\n"
        "[Service]\nExecStart=/bin/sh -c 'sleep 1; exit 3'\nRestart=on-failure\nRestartSec=1\n"
    ),
    "dies.service": "[Service]\nExecStart=/bin/sh -c 'exit 7'\n",
    "badjob.service": "[Service]\nType=oneshot\nExecStart=/bin/false\n",
}


@dataclass(frozen=True)
class Hal0Ports:
    api: int
    openwebui: int
    slots: dict[str, int]


@dataclass
class Env:
    sandbox: SystemdSandbox
    root: Path
    ports: Hal0Ports


@contextmanager
def make_env(tmp_path: Path, *, system_bus: bool = False) -> Iterator[Env]:
    require_systemd_sandbox(system_bus=system_bus)
    root = tmp_path / "root"
    ports = Hal0Ports(free_port(), free_port(), {"a": free_port(), "b": free_port()})
    units = dict(TEST_UNITS)
    units.update(
        hal0_units(
            root=root,
            api_port=ports.api,
            openwebui_port=ports.openwebui,
            slots=ports.slots,
            python=sys.executable,
        )
    )
    sandbox = SystemdSandbox(tmp_path / "units", units, system_bus=system_bus)
    with sandbox:
        pid = sandbox.pid
        yield Env(sandbox, root, ports)
    # Nothing of the sandbox survives it: its systemd (and so its PID namespace) is gone.
    assert not Path(f"/proc/{pid}").exists()


@pytest.fixture(params=["systemctl", "pystemd-private", "pystemd-bus"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env(tmp_path: Path, backend: str) -> Iterator[Env]:
    """A sandbox with the test units and a fake hal0; with a system bus for pystemd-bus."""
    with make_env(tmp_path, system_bus=backend == "pystemd-bus") as e:
        yield e


@pytest.fixture
def plain_env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as e:
        yield e


# -- the pystemd backend, run inside the sandbox --------------------------------------------------

_HELPER = r"""
import dataclasses, json, sys
from watchdog_updater.errors import ServiceError
from watchdog_updater.services import make_service_manager
req = json.loads(sys.argv[1])
try:
    m = make_service_manager(req.get("kind", "pystemd"))
    op = req["op"]
    if op == "restart":
        out = m.restart(req["unit"], timeout_s=req["timeout_s"])
    elif op == "status":
        out = dataclasses.asdict(m.status(req["unit"]))
    elif op == "list_units":
        out = m.list_units(req["pattern"])
    else:
        out = repr(m)
    print(json.dumps({"ok": out}))
except ServiceError as e:
    print(json.dumps({"error": e.message, "hint": e.hint}))
"""


class SandboxPystemd:
    """ServiceManager that runs :class:`PystemdManager` inside the sandbox, one process per call."""

    def __init__(self, sandbox: SystemdSandbox) -> None:
        self.sandbox = sandbox

    def _call(self, **req: Any) -> Any:
        r = self.sandbox.run([sys.executable, "-c", _HELPER, json.dumps(req)], timeout=60)
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        if "error" in answer:
            raise ServiceError(answer["error"], hint=answer["hint"])
        return answer["ok"]

    def restart(self, unit: str, *, timeout_s: float) -> None:
        self._call(op="restart", unit=unit, timeout_s=timeout_s)

    def status(self, unit: str) -> UnitStatus:
        return UnitStatus(**self._call(op="status", unit=unit))

    def list_units(self, pattern: str) -> list[str]:
        names = self._call(op="list_units", pattern=pattern)
        assert isinstance(names, list)
        return [str(n) for n in names]

    def auto_kind(self) -> str:
        return str(self._call(op="repr", kind="auto"))


@pytest.fixture
def manager(env: Env, backend: str) -> ServiceManager:
    if backend == "systemctl":
        return SystemctlManager(env.sandbox.nsenter_prefix())
    return SandboxPystemd(env.sandbox)


def wait_status(
    manager: ServiceManager, unit: str, pred: Any, timeout: float = 15.0
) -> list[UnitStatus]:
    """Poll status until pred(status) holds; returns every status seen."""
    seen: list[UnitStatus] = []
    deadline = time.monotonic() + timeout
    while True:
        seen.append(manager.status(unit))
        if pred(seen[-1]):
            return seen
        assert time.monotonic() < deadline, f"{unit}: condition not met; seen {seen[-5:]}"
        time.sleep(0.1)


# -- tests ----------------------------------------------------------------------------------------


def test_restart_changes_invocation_id_and_waits_for_the_job(
    env: Env, manager: ServiceManager
) -> None:
    env.sandbox.systemctl("start", "slowstart.service")
    before = manager.status("slowstart.service")
    assert before.is_active
    assert len(before.invocation_id) == 32

    t0 = time.monotonic()
    manager.restart("slowstart.service", timeout_s=20)
    elapsed = time.monotonic() - t0

    after = manager.status("slowstart.service")
    assert elapsed >= 0.9, "restart returned before the start job finished"
    assert (after.active_state, after.sub_state) == ("active", "running")
    assert after.invocation_id != before.invocation_id
    assert after.exec_main_pid not in (0, before.exec_main_pid)


def test_restart_starts_an_inactive_unit(env: Env, manager: ServiceManager) -> None:
    assert manager.status("sleeper").active_state == "inactive"
    manager.restart("sleeper", timeout_s=10)
    status = manager.status("sleeper")
    assert status.name == "sleeper.service"
    assert status.is_active


def test_crash_loop_shows_auto_restart_and_growing_restarts(
    env: Env, manager: ServiceManager
) -> None:
    env.sandbox.systemctl("start", "crashloop.service")
    seen = wait_status(manager, "crashloop.service", lambda s: s.n_restarts >= 2)
    waiting = [s for s in seen if (s.active_state, s.sub_state) == ("activating", "auto-restart")]
    assert waiting, f"never saw activating/auto-restart: {seen}"
    assert all(s.exec_main_status == 3 for s in waiting)
    counts = [s.n_restarts for s in seen]
    assert counts == sorted(counts)
    assert len(set(counts)) >= 2, f"NRestarts did not grow: {counts}"


def test_unit_that_fails_shows_failed(env: Env, manager: ServiceManager) -> None:
    manager.restart("dies.service", timeout_s=10)  # Type=simple: the start job itself succeeds
    status = wait_status(manager, "dies.service", lambda s: s.active_state == "failed")[-1]
    assert status.sub_state == "failed"
    assert status.exec_main_status == 7


def test_restart_whose_job_fails_raises(env: Env, manager: ServiceManager) -> None:
    with pytest.raises(ServiceError, match=r"badjob\.service"):
        manager.restart("badjob.service", timeout_s=10)
    assert manager.status("badjob.service").active_state == "failed"


def test_restart_of_unknown_unit_raises(env: Env, manager: ServiceManager) -> None:
    with pytest.raises(ServiceError, match="not found"):
        manager.restart("no-such-unit.service", timeout_s=10)


def test_status_of_unknown_unit_is_not_found(env: Env, manager: ServiceManager) -> None:
    status = manager.status("no-such-unit.service")
    assert (status.load_state, status.active_state) == ("not-found", "inactive")
    assert status.invocation_id == ""
    assert status.exec_main_pid == 0


def test_restart_timeout_raises(env: Env, manager: ServiceManager) -> None:
    env.sandbox.write_unit(
        "verysnail.service", "[Service]\nExecStartPre=/bin/sleep 5\nExecStart=/bin/sleep 1000\n"
    )
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match="within"):
        manager.restart("verysnail.service", timeout_s=0.5)
    assert time.monotonic() - t0 < 4


def test_list_units_finds_slot_instances(env: Env, manager: ServiceManager) -> None:
    env.sandbox.systemctl("start", "hal0-slot@a.service", "hal0-slot@b.service")
    assert manager.list_units("hal0-slot@*.service") == [
        "hal0-slot@a.service",
        "hal0-slot@b.service",
    ]
    assert manager.list_units("nothing-like-this-*.service") == []


def test_fake_hal0_api_answers_through_its_unit(env: Env, manager: ServiceManager) -> None:
    install_release(env.root, "1.2.3")
    manager.restart("hal0-api.service", timeout_s=10)
    url = f"http://127.0.0.1:{env.ports.api}/api/health"
    assert wait_for_http(url, timeout=15)["version"] == "1.2.3"
    first = manager.status("hal0-api.service")

    install_release(env.root, "1.2.4")  # swap `current`, restart: the new tree serves
    manager.restart("hal0-api.service", timeout_s=10)
    deadline = time.monotonic() + 15
    while wait_for_http(url, timeout=15)["version"] != "1.2.4":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert manager.status("hal0-api.service").invocation_id != first.invocation_id


def test_invalid_unit_names_are_refused(manager: ServiceManager) -> None:
    for bad in ("", "-H", "--host=x", "a b.service", "../x.service"):
        with pytest.raises(ServiceError):
            manager.status(bad)
    with pytest.raises(ServiceError):
        manager.list_units("--all")


# -- sandbox-level checks (one backend is enough) -------------------------------------------------


def test_fake_hal0_appliance_comes_up(plain_env: Env) -> None:
    env = plain_env
    install_release(env.root, "0.9.0")
    set_slot_behavior(env.root, "b", "never_loaded")
    env.sandbox.systemctl("start", "hal0.target")
    for unit in ("hal0-api", "hal0-openwebui", "hal0-slot@a", "hal0-slot@b"):
        env.sandbox.wait_for(f"{unit}.service", "active")
    assert wait_for_http(f"http://127.0.0.1:{env.ports.api}/api/health/system")["status"] == "ok"
    assert wait_for_http(f"http://127.0.0.1:{env.ports.openwebui}/health")
    slot_a = wait_for_http(f"http://127.0.0.1:{env.ports.slots['a']}/health")
    slot_b = wait_for_http(f"http://127.0.0.1:{env.ports.slots['b']}/health")
    assert slot_a["model_loaded"] is True
    assert slot_b["model_loaded"] is False

    set_slot_behavior(env.root, "a", "down")  # the slot process exits 1: systemd restarts it
    env.sandbox.wait_for(
        "hal0-slot@a.service", ("activating", "failed"), until=lambda p: p["NRestarts"] != "0"
    )


def test_crashing_release_crash_loops_its_unit(plain_env: Env) -> None:
    env = plain_env
    install_release(env.root, "0.9.1", "crash_at_start")
    env.sandbox.systemctl("start", "hal0-api.service")
    props = env.sandbox.wait_for(
        "hal0-api.service", "activating", sub_state="auto-restart", timeout=10
    )
    assert props["ExecMainStatus"] == "1"


def test_auto_picks_pystemd_on_the_private_socket(plain_env: Env) -> None:
    kind = SandboxPystemd(plain_env.sandbox).auto_kind()
    assert kind == "PystemdManager(address='unix:path=/run/systemd/private', peer_to_peer=True)"


def test_auto_picks_pystemd_on_the_system_bus(tmp_path: Path) -> None:
    with make_env(tmp_path, system_bus=True) as env:
        kind = SandboxPystemd(env.sandbox).auto_kind()
    assert kind == "PystemdManager(address='system bus', peer_to_peer=False)"


def test_sandbox_processes_die_with_it(tmp_path: Path) -> None:
    require_systemd_sandbox()
    with SystemdSandbox(tmp_path / "units", TEST_UNITS) as sandbox:
        sandbox.systemctl("start", "sleeper.service")
        main_pid = sandbox.show("sleeper.service", "MainPID")["MainPID"]
        assert main_pid != "0"
        # the sleeper's host PID: the only `sleep 1000` whose PID namespace is the sandbox's
        ns = os.readlink(f"/proc/{sandbox.pid}/ns/pid")
        host_pids = [
            p.name
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _pidns(p) == ns and _cmdline(p) == "/bin/sleep 1000"
        ]
        assert len(host_pids) == 1
        assert sandbox.startup_s is not None
        assert sandbox.startup_s < 5
    assert not Path(f"/proc/{host_pids[0]}").exists()
    sandbox.stop()  # idempotent


def _pidns(proc_dir: Path) -> str | None:
    try:
        return os.readlink(proc_dir / "ns" / "pid")
    except OSError:
        return None


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_normalize_unit_name() -> None:
    assert normalize_unit_name("hal0-api") == "hal0-api.service"
    assert normalize_unit_name("hal0.target") == "hal0.target"
    assert normalize_unit_name("hal0-slot@a") == "hal0-slot@a.service"


@pytest.mark.skipif(
    SYSTEM_BUS_SOCKET.exists() or PRIVATE_SOCKET.exists(), reason="this host has a systemd bus"
)
def test_pystemd_without_a_bus_is_a_service_error() -> None:
    with pytest.raises(ServiceError):
        make_service_manager("pystemd")
    assert isinstance(make_service_manager("auto"), SystemctlManager)
