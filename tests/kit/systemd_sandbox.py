"""A real, private systemd for tests: PID 1 of its own PID, mount and UTS namespaces.

``SystemdSandbox(unit_dir, units)`` writes the given units (plus stub ``sysinit.target``,
``basic.target``, ``shutdown.target`` and the boot target, so units keep their default
dependencies) into ``unit_dir`` and starts ``/lib/systemd/systemd --system`` with
``SYSTEMD_UNIT_PATH`` set to that directory only: the host's units stay out. Inside, ``/run`` is a
private tmpfs (so ``/run/systemd/private`` belongs to this instance) and the instance gets its own
cgroup namespace rooted at a fresh cgroup2 directory, so two sandboxes (or a host systemd) never
share ``/system.slice/<unit>`` cgroups. Everything else of the file system is shared, and so is the
network namespace: services must listen on free ports the test picks.

Talk to it from inside its namespaces: :meth:`run` (``nsenter -t PID -m -p``), :meth:`systemctl`,
or ``nsenter_prefix()`` for the code under test. :meth:`stop` sends SIGKILL to exactly the systemd
process this object started (through a pidfd, so a recycled PID is never hit); the kernel then
kills every process of the namespace. It is idempotent and also runs at interpreter exit.

Service output goes to the sandbox log (``log_path``), together with systemd's own messages;
failures of :meth:`wait_for` and :meth:`systemctl` quote its tail.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
import tty
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "DEFAULT_SYSTEMD",
    "SandboxError",
    "SystemdSandbox",
    "require_systemd_sandbox",
    "sandbox_unavailable_reason",
]

DEFAULT_SYSTEMD = "/lib/systemd/systemd"
_STUB_TARGETS = ("sysinit.target", "basic.target", "shutdown.target")
_LOG_NAME = "systemd.console.log"  # ".log" is no unit suffix: systemd ignores it in the unit dir
_POLL_S = 0.02
_CGROUP_PREFIX = "wdu-sandbox-"
_DBUS_DAEMON = "/usr/bin/dbus-daemon"
# With system_bus=True: a D-Bus system bus inside the sandbox, as on a booted host. systemd attaches
# to it once both units run (it watches for exactly these names).
_DBUS_UNITS = {
    "dbus.socket": (
        "[Unit]\nDescription=sandbox D-Bus system bus socket\n"
        "[Socket]\nListenStream=/run/dbus/system_bus_socket\n"
    ),
    "dbus.service": (
        "[Unit]\nDescription=sandbox D-Bus system bus\nRequires=dbus.socket\n"
        "[Service]\nType=notify\nNotifyAccess=main\n"
        f"ExecStart={_DBUS_DAEMON} --system --address=systemd: --nofork --nopidfile "
        "--systemd-activation --syslog-only\n"
    ),
}

# Runs as the first process of the new namespaces, then becomes systemd.
# $1 systemd binary, $2 unit dir, $3 boot unit, $4 "1" to mount a private cgroup2, $5 console tty.
# systemd (as PID 1) logs only to a terminal on /dev/console, so a pty slave is bound there; the
# units' default output goes there too (tty), and a thread copies the pty into the log file.
_INIT_SCRIPT = r"""
set -eu
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
if [ "$4" = 1 ]; then mount -t cgroup2 cgroup2 /sys/fs/cgroup; fi
mount --bind "$5" /dev/console
export container=other SYSTEMD_UNIT_PATH="$2"
exec "$1" --system --unit="$3" --log-target=console --log-color=no --show-status=no \
    --default-standard-output=tty --default-standard-error=tty
"""


class SandboxError(RuntimeError):
    """The sandbox could not start, or a command or wait inside it failed."""


def sandbox_unavailable_reason(
    systemd: str = DEFAULT_SYSTEMD, *, system_bus: bool = False
) -> str | None:
    """Why no sandbox can run here, or ``None`` when it can."""
    if os.geteuid() != 0:
        return "the systemd sandbox needs root (unshare --pid --mount)"
    tools = ["unshare", "nsenter", "mount", "systemctl"] + (["busctl"] if system_bus else [])
    for tool in tools:
        if shutil.which(tool) is None:
            return f"the systemd sandbox needs {tool!r} in PATH"
    if system_bus and not os.access(_DBUS_DAEMON, os.X_OK):
        return f"a sandbox with a system bus needs {_DBUS_DAEMON}"
    if not os.access(systemd, os.X_OK):
        return f"no systemd binary at {systemd}"
    return None


def require_systemd_sandbox(systemd: str = DEFAULT_SYSTEMD, *, system_bus: bool = False) -> None:
    """``pytest.skip`` with the reason when no sandbox can run here."""
    reason = sandbox_unavailable_reason(systemd, system_bus=system_bus)
    if reason is not None:
        import pytest

        pytest.skip(reason)


def _stub_target(name: str) -> str:
    return f"[Unit]\nDescription=sandbox stub for {name}\nDefaultDependencies=no\n"


def _cgroup2_mount() -> Path | None:
    with Path("/proc/self/mountinfo").open() as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    return None


def _own_cgroup2_path() -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _remove_cgroup_tree(top: Path, timeout_s: float = 5.0) -> None:
    """rmdir a cgroup tree bottom-up; retries while the kernel still reaps its processes."""
    deadline = time.monotonic() + timeout_s
    while top.exists():
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
        busy = False
        for d in [*reversed(dirs), top]:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                busy = True
        if not busy or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _reap_stale_cgroups(parent: Path, min_age_s: float = 60.0) -> None:
    """Remove cgroups of sandboxes whose process died without stop() (no process left inside).

    Only trees older than ``min_age_s`` are touched, so a sandbox that has created its cgroup but
    not yet entered it is left alone.
    """
    now = time.time()
    for top in parent.glob(f"{_CGROUP_PREFIX}*"):
        try:
            populated = "populated 0" not in (top / "cgroup.events").read_text()
            old = now - top.stat().st_mtime > min_age_s
        except OSError:
            continue
        if old and not populated:
            _remove_cgroup_tree(top, timeout_s=0)


class SystemdSandbox:
    """A private systemd instance; use as a context manager (or ``start()`` / ``stop()``).

    ``units`` ({file name: text}) are written to ``unit_dir`` before the start; ``boot_units`` are
    pulled in by the boot target (``target``), so they start with the instance. ``system_bus``
    adds a D-Bus system bus (dbus-daemon) and waits until systemd answers on it; without it, only
    systemd's private socket exists, as on this kind of machine.
    """

    def __init__(
        self,
        unit_dir: Path,
        units: Mapping[str, str] | None = None,
        *,
        boot_units: Sequence[str] = (),
        target: str = "sandbox.target",
        start_timeout_s: float = 15.0,
        systemd: str = DEFAULT_SYSTEMD,
        system_bus: bool = False,
    ) -> None:
        self.unit_dir = Path(unit_dir).resolve()
        self.target = target
        self.start_timeout_s = start_timeout_s
        self.systemd = systemd
        self.log_path = self.unit_dir / _LOG_NAME
        self.startup_s: float | None = None  # seconds from start() to "running"
        self.system_bus = system_bus
        self._units = dict(units or {})
        self._boot_units = list(boot_units)
        if system_bus:
            for name, text in _DBUS_UNITS.items():
                self._units.setdefault(name, text)
            self._boot_units += [n for n in _DBUS_UNITS if n not in self._boot_units]
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._cgroup: Path | None = None
        self._log: IO[bytes] | None = None
        self._pty: tuple[int, int] | None = None  # (master, slave)
        self._pump: threading.Thread | None = None
        self._stopped = False

    # -- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> SystemdSandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """Host PID of the sandbox's systemd (PID 1 inside)."""
        if self._pid is None or self._stopped:
            raise SandboxError("the sandbox is not running")
        return self._pid

    @property
    def running(self) -> bool:
        return (
            self._pid is not None
            and not self._stopped
            and self._proc is not None
            and (self._proc.poll() is None)
        )

    def start(self) -> SystemdSandbox:
        if self._proc is not None:
            raise SandboxError("a SystemdSandbox starts only once")
        reason = sandbox_unavailable_reason(self.systemd, system_bus=self.system_bus)
        if reason is not None:
            raise SandboxError(reason)
        t0 = time.monotonic()
        self._write_units()
        atexit.register(self.stop)
        try:
            self._spawn()
            self._wait_running(t0 + self.start_timeout_s)
            if self.system_bus:
                self._wait_bus(t0 + self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _write_units(self) -> None:
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        units = dict(self._units)
        for stub in _STUB_TARGETS:
            units.setdefault(stub, _stub_target(stub))
        wants = " ".join(self._boot_units)
        units.setdefault(
            self.target,
            "[Unit]\nDescription=sandbox boot target\nDefaultDependencies=no\n"
            + (f"Wants={wants}\n" if wants else ""),
        )
        for name, text in units.items():
            (self.unit_dir / name).write_text(text)

    def _prepare_cgroup(self) -> Path | None:
        """A fresh cgroup2 directory below ours, or None when cgroup2 is not writable here."""
        mount, own = _cgroup2_mount(), _own_cgroup2_path()
        if mount is None or own is None:
            return None
        parent = mount / own.lstrip("/")
        _reap_stale_cgroups(parent)
        cgroup = parent / f"{_CGROUP_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            cgroup.mkdir()
        except OSError:
            return None
        return cgroup

    def _start_console(self) -> str:
        """A pty whose output is appended to the log; returns the slave's path."""
        master, slave = os.openpty()
        self._pty = (master, slave)
        tty.setraw(slave)

        def pump() -> None:
            with self.log_path.open("ab", buffering=0) as log:
                while True:
                    try:
                        data = os.read(master, 65536)
                    except OSError:  # EIO once the last slave fd is closed
                        return
                    if not data:
                        return
                    log.write(data.replace(b"\r", b""))

        self._pump = threading.Thread(target=pump, name="sandbox-console", daemon=True)
        self._pump.start()
        return os.ttyname(slave)

    def _spawn(self) -> None:
        self.log_path.write_bytes(b"")
        self._log = self.log_path.open("ab")
        console = self._start_console()
        self._cgroup = self._prepare_cgroup()
        unshare = ["unshare", "--pid", "--mount", "--uts", "--fork", "--mount-proc"]
        unshare += ["--kill-child=SIGKILL"]
        if self._cgroup is not None:
            unshare.append("--cgroup")
        argv = [
            *unshare,
            "--",
            "sh",
            "-c",
            _INIT_SCRIPT,
            "sandbox-init",
            self.systemd,
            str(self.unit_dir),
            self.target,
            "1" if self._cgroup is not None else "0",
            console,
        ]
        if self._cgroup is not None:
            # Enter the fresh cgroup first: the cgroup namespace is rooted where unshare runs.
            argv = [
                "sh",
                "-c",
                'echo $$ > "$1/cgroup.procs" && shift && exec "$@"',
                "sandbox-cgroup",
                str(self._cgroup),
                *argv,
            ]
        if shutil.which("setpriv"):
            # Should this Python process die without running stop() (SIGKILL, os._exit), unshare
            # gets SIGKILL and --kill-child passes it on to systemd: no sandbox outlives its test.
            # (The death signal follows the thread that started the sandbox.)
            argv = ["setpriv", "--pdeathsig", "SIGKILL", "--", *argv]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
            start_new_session=True,
        )
        # The first child of unshare becomes systemd (sh execs it): that PID is the sandbox.
        children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise SandboxError(
                    f"unshare exited with {self._proc.returncode}\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                found = children.read_text().split()
                if found:
                    self._pid = int(found[0])
                    self._pidfd = os.pidfd_open(self._pid)
                    return
            if time.monotonic() > deadline:
                raise SandboxError("the sandbox's first process did not appear")
            time.sleep(0.005)

    def _wait_running(self, deadline: float) -> None:
        last = ""
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise SandboxError(f"systemd exited during start-up\n{self.log_tail()}")
            try:
                r = self.run(["systemctl", "is-system-running"], timeout=5)
                last = r.stdout.strip() or r.stderr.strip()
                if r.stdout.strip() in ("running", "degraded"):
                    return
            except subprocess.TimeoutExpired:
                last = "systemctl timed out"
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"systemd did not reach running within {self.start_timeout_s:g} s "
                    f"(last answer: {last!r})\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def _wait_bus(self, deadline: float) -> None:
        ping = ["busctl", "--system", "--timeout=2", "call", "org.freedesktop.systemd1"]
        ping += ["/org/freedesktop/systemd1", "org.freedesktop.DBus.Peer", "Ping"]
        while True:
            r = self.run(ping, timeout=5)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"systemd did not appear on the sandbox's system bus: {r.stderr.strip()}\n"
                    f"{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """SIGKILL the sandbox's systemd (and so its whole PID namespace); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            os.close(self._pidfd)
            self._pidfd = None
        if self._proc is not None:
            if self._pid is None and self._proc.poll() is None:
                self._proc.kill()  # systemd never appeared; --kill-child takes its child along
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        if self._cgroup is not None:
            _remove_cgroup_tree(self._cgroup)
        if self._pty is not None:
            master, slave = self._pty
            os.close(slave)  # the pump reads what is left, then gets EIO and ends
            if self._pump is not None:
                self._pump.join(timeout=5)
            os.close(master)
            self._pty = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- talking to it ----------------------------------------------------------------------------

    def nsenter_prefix(self) -> list[str]:
        """Put before a command to run it inside the sandbox's mount and PID namespaces."""
        return ["nsenter", "-t", str(self.pid), "-m", "-p"]

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | Path | None = None,
        check: bool = False,
        timeout: float = 60.0,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespaces; text mode, output captured unless overridden.

        ``cwd`` is applied inside (nsenter ``--wd``), since entering a mount namespace resets it.
        """
        prefix = self.nsenter_prefix()
        if cwd is not None:
            prefix.append(f"--wd={cwd}")
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        kwargs.setdefault("stdin", subprocess.DEVNULL if "input" not in kwargs else None)
        r: subprocess.CompletedProcess[str] = subprocess.run(
            [*prefix, *argv], text=True, timeout=timeout, check=False, **kwargs
        )
        if check and r.returncode != 0:
            raise SandboxError(
                f"{' '.join(argv)} exited with {r.returncode}\nstdout: {r.stdout}\n"
                f"stderr: {r.stderr}\n{self.log_tail()}"
            )
        return r

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` inside; SandboxError on a non-zero exit unless ``check=False``."""
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def write_unit(self, name: str, text: str, *, reload: bool = True) -> Path:
        """Write (or replace) a unit file, then ``daemon-reload`` when the sandbox runs."""
        path = self.unit_dir / name
        path.write_text(text)
        if reload and self.running:
            self.daemon_reload()
        return path

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` as a dict (all properties unless some are named)."""
        args = ["show", *([f"--property={','.join(props)}"] if props else []), "--", unit]
        out = self.systemctl(*args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(
        self,
        unit: str,
        active_state: str | Collection[str],
        timeout: float = 10.0,
        *,
        sub_state: str | Collection[str] | None = None,
        until: Callable[[dict[str, str]], bool] | None = None,
    ) -> dict[str, str]:
        """Poll until the unit's ActiveState (and SubState, and ``until(props)``) match.

        Returns the matching properties (ActiveState, SubState, NRestarts, InvocationID,
        ExecMainPID, ExecMainStatus, Result); raises SandboxError with the log tail on timeout.
        """
        wanted = {active_state} if isinstance(active_state, str) else set(active_state)
        subs = {sub_state} if isinstance(sub_state, str) else sub_state
        deadline = time.monotonic() + timeout
        props: dict[str, str] = {}
        while True:
            props = self.show(
                unit,
                "ActiveState",
                "SubState",
                "NRestarts",
                "InvocationID",
                "ExecMainPID",
                "ExecMainStatus",
                "Result",
            )
            if (
                props.get("ActiveState") in wanted
                and (subs is None or props.get("SubState") in subs)
                and (until is None or until(props))
            ):
                return props
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"{unit} did not reach {sorted(wanted)}/{subs} within {timeout:g} s; "
                    f"last: {props}\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of systemd's console log (service output included)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no sandbox log)"
        tail = text.splitlines()[-lines:]
        return "--- sandbox log (tail) ---\n" + "\n".join(tail)
