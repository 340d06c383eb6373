"""The fake hal0 kit behaves as documented: real processes, no systemd needed."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kit.fake_hal0 import (
    build_release_tarball,
    free_port,
    hal0_units,
    http_get,
    install_release,
    parse_behavior,
    set_slot_behavior,
    slot_control_path,
    wait_for_http,
    write_aux_script,
    write_release_tree,
)

Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a process; every one is killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def start_api(
    spawn: Spawn, tmp_path: Path, behavior: str, version: str = "1.2.3"
) -> tuple[subprocess.Popen[bytes], int]:
    tree = write_release_tree(tmp_path, version, behavior)
    port = free_port()
    proc = spawn([str(tree / "bin" / "hal0-api")], env={"HAL0_PORT": str(port)})
    return proc, port


def health(port: int, path: str = "/api/health", timeout: float = 2.0) -> tuple[int, object]:
    return http_get(f"http://127.0.0.1:{port}{path}", timeout=timeout)


# -- release tree and tarball ---------------------------------------------------------------------


def test_release_tree_has_hal0_layout(tmp_path: Path) -> None:
    tree = write_release_tree(tmp_path, "1.4.0-rc.2", "healthy")
    assert tree == tmp_path / "hal0-1.4.0-rc.2"
    assert (tree / "VERSION").read_text().strip() == "1.4.0-rc.2"
    assert json.loads((tree / "release.json").read_text())["version"] == "1.4.0-rc.2"
    assert 'version = "1.4.0-rc.2"' in (tree / "pyproject.toml").read_text()
    assert "1.4.0-rc.2" in (tree / "src" / "hal0" / "__init__.py").read_text()
    api = tree / "bin" / "hal0-api"
    assert os.access(api, os.X_OK)
    assert api.read_text().splitlines()[0] == f"#!{sys.executable}"


def test_tarball_has_one_top_level_dir_and_is_reproducible(tmp_path: Path) -> None:
    first = build_release_tarball("2.0.0", "hang", tmp_path / "a")
    second = build_release_tarball("2.0.0", "hang", tmp_path / "b")
    assert first.name == "hal0-2.0.0.tar.gz"
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(first.read_bytes()), mode="r:gz") as tar:
        names = tar.getnames()
        assert {n.split("/")[0] for n in names} == {"hal0-2.0.0"}
        api = tar.getmember("hal0-2.0.0/bin/hal0-api")
        assert api.mode & 0o111
        assert {"hal0-2.0.0/VERSION", "hal0-2.0.0/release.json"} <= set(names)


@pytest.mark.parametrize("bad", ["sick", "crash_after", "crash_after:x", "flaky:0", "hang:3"])
def test_unknown_behaviour_is_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        write_release_tree(tmp_path, "1.0.0", bad)


def test_parse_behavior() -> None:
    assert parse_behavior("healthy") == ("healthy", None)
    assert parse_behavior("slow_start:2.5") == ("slow_start", 2.5)


def test_install_release_points_current_relatively(tmp_path: Path) -> None:
    install_release(tmp_path, "1.0.0")
    tree = install_release(tmp_path, "1.0.1")
    current = tmp_path / "usr/lib/hal0/current"
    assert os.readlink(current) == "hal0-1.0.1"
    assert current.resolve() == tree.resolve()


# -- API behaviours -------------------------------------------------------------------------------


def test_healthy_api_answers_the_health_contract(spawn: Spawn, tmp_path: Path) -> None:
    _, port = start_api(spawn, tmp_path, "healthy", version="3.1.4")
    body = wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=10)
    assert body == {"status": "ok", "name": "hal0", "version": "3.1.4"}
    status, system = health(port, "/api/health/system")
    assert status == 200
    assert isinstance(system, dict)
    assert system["status"] == "ok"
    assert "checks" in system
    assert health(port, "/nope")[0] == 404


def test_port_argument_overrides_environment(spawn: Spawn, tmp_path: Path) -> None:
    tree = write_release_tree(tmp_path, "1.0.0")
    port = free_port()
    spawn([str(tree / "bin" / "hal0-api"), "serve", "--port", str(port)], env={"HAL0_PORT": "1"})
    wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=10)


def test_crash_at_start_exits_1(spawn: Spawn, tmp_path: Path) -> None:
    proc, _ = start_api(spawn, tmp_path, "crash_at_start")
    assert proc.wait(timeout=10) == 1


def test_crash_after_serves_then_exits_1(spawn: Spawn, tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc, port = start_api(spawn, tmp_path, "crash_after:1.5")
    wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=10)
    assert proc.poll() is None
    assert proc.wait(timeout=10) == 1
    assert time.monotonic() - t0 >= 1.4


def test_hang_accepts_but_never_answers(spawn: Spawn, tmp_path: Path) -> None:
    proc, port = start_api(spawn, tmp_path, "hang")
    deadline = time.monotonic() + 10
    while True:  # wait until it listens
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert time.monotonic() < deadline, "hang release never listened"
            time.sleep(0.05)
    t0 = time.monotonic()
    assert health(port, timeout=0.5) == (0, None)
    assert time.monotonic() - t0 >= 0.4
    assert proc.poll() is None


def test_status_503_forever(spawn: Spawn, tmp_path: Path) -> None:
    _, port = start_api(spawn, tmp_path, "status_503")
    wait_for_http(f"http://127.0.0.1:{port}/api/health", status=503, timeout=10)
    for _ in range(3):
        assert health(port)[0] == 503
        assert health(port, "/api/health/system")[0] == 503


def test_slow_start_listens_late(spawn: Spawn, tmp_path: Path) -> None:
    t0 = time.monotonic()
    _, port = start_api(spawn, tmp_path, "slow_start:1.5")
    assert health(port, timeout=0.3)[0] == 0
    wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=10)
    assert time.monotonic() - t0 >= 1.4


def test_flaky_fails_every_fifth_request(spawn: Spawn, tmp_path: Path) -> None:
    _, port = start_api(spawn, tmp_path, "flaky:5")
    wait_for_http(f"http://127.0.0.1:{port}/api/health/system", timeout=10)
    statuses = [health(port)[0] for _ in range(10)]
    assert statuses == [200, 200, 200, 200, 500] * 2


# -- slots and OpenWebUI --------------------------------------------------------------------------


def test_slot_behaviours_switch_live(spawn: Spawn, tmp_path: Path) -> None:
    script = write_aux_script(tmp_path / "aux")
    port = free_port()
    proc = spawn(
        [str(script), "slot", "--port", str(port), "--name", "a"],
        env={"FAKE_SLOT_CONTROL": str(slot_control_path(tmp_path, "a"))},
    )
    body = wait_for_http(f"http://127.0.0.1:{port}/health", timeout=10)
    assert body == {"status": "ok", "model_loaded": True}
    assert health(port, "/v1/models")[0] == 200

    set_slot_behavior(tmp_path, "a", "never_loaded")
    status, body = health(port, "/health")
    assert status == 200
    assert isinstance(body, dict)
    assert body["model_loaded"] is False
    assert health(port, "/v1/models")[0] == 503

    set_slot_behavior(tmp_path, "a", "error")
    assert health(port, "/health")[0] == 503

    set_slot_behavior(tmp_path, "a", "down")
    assert proc.wait(timeout=5) == 1


def test_slot_down_at_start_exits_1(spawn: Spawn, tmp_path: Path) -> None:
    script = write_aux_script(tmp_path / "aux")
    proc = spawn(
        [str(script), "slot", "--port", str(free_port())], env={"FAKE_SLOT_BEHAVIOR": "down"}
    )
    assert proc.wait(timeout=10) == 1


def test_openwebui_health(spawn: Spawn, tmp_path: Path) -> None:
    script = write_aux_script(tmp_path / "aux")
    port = free_port()
    spawn([str(script), "openwebui", "--port", str(port)])
    wait_for_http(f"http://127.0.0.1:{port}/health", timeout=10)


def test_hal0_units_reference_root_and_ports(tmp_path: Path) -> None:
    units = hal0_units(
        root=tmp_path, api_port=18080, openwebui_port=13001, slots={"a": 18081}, python="/py"
    )
    assert set(units) == {
        "hal0-api.service",
        "hal0-openwebui.service",
        "hal0-slot@.service",
        "hal0.target",
    }
    api = units["hal0-api.service"]
    assert f"WorkingDirectory={tmp_path}/usr/lib/hal0/current\n" in api
    assert f"ExecStart={tmp_path}/usr/lib/hal0/current/bin/hal0-api" in api
    assert "HAL0_PORT=18080" in api
    assert "Restart=on-failure" in api
    assert "--port 13001" in units["hal0-openwebui.service"]
    assert "hal0-slot@a.service" in units["hal0.target"]
    assert (tmp_path / "etc/hal0/slots/a.env").read_text() == "SLOT_PORT=18081\n"
    with pytest.raises(ValueError):
        hal0_units(root=tmp_path, api_port=1, openwebui_port=2, slots={"a b": 3}, python="/py")
