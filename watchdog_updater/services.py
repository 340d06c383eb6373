"""The service-manager boundary: restart a unit, read its state, list units.

Everything the updater asks systemd goes through the small :class:`ServiceManager` protocol, so the
orchestrator and the health gate never see a subprocess or a D-Bus message. Two backends:

- :class:`SystemctlManager` runs ``systemctl`` (optionally behind a command prefix such as
  ``nsenter -t PID -m -p``, which is how tests reach a private systemd).
- :class:`PystemdManager` speaks D-Bus through pystemd (an optional extra): the system bus when one
  exists, else, as root, systemd's private socket ``/run/systemd/private`` peer to peer.

Every foreign failure (``OSError``, a timeout, a D-Bus error, a non-zero exit) is translated into
:class:`~watchdog_updater.errors.ServiceError` at this boundary with ``raise ... from e``.

Unit names are checked before use (no option injection into ``systemctl``) and mangled the way
``systemctl`` does it: a name without a unit-type suffix gets ``.service``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from .errors import ServiceError

__all__ = [
    "PRIVATE_SOCKET",
    "SYSTEM_BUS_SOCKET",
    "PystemdManager",
    "ServiceManager",
    "ServiceManagerKind",
    "SystemctlManager",
    "UnitStatus",
    "make_service_manager",
    "normalize_unit_name",
]

ServiceManagerKind = Literal["auto", "pystemd", "systemctl"]

#: systemd's private socket; only root may connect, and only from systemd's own mount namespace.
PRIVATE_SOCKET = Path("/run/systemd/private")
#: The D-Bus system bus socket (absent on hosts and containers without dbus-daemon).
SYSTEM_BUS_SOCKET = Path("/run/dbus/system_bus_socket")

_UNIT_SUFFIXES = (
    ".service",
    ".socket",
    ".target",
    ".timer",
    ".path",
    ".mount",
    ".automount",
    ".swap",
    ".slice",
    ".scope",
    ".device",
)
# Unit names: letters, digits, ":-_.\@"; patterns additionally "*?[]". Never a leading "-".
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@][A-Za-z0-9:_.\\@-]{0,255}")
_PATTERN_RE = re.compile(r"[A-Za-z0-9:_.\\@*?\[\]][A-Za-z0-9:_.\\@*?\[\]-]{0,255}")

_PYSTEMD_HINT = "install the optional extra: pip install 'watchdog-updater[systemd]'"


@dataclass(frozen=True)
class UnitStatus:
    """One snapshot of a unit, as systemd reports it.

    ``invocation_id`` is 32 lowercase hex digits, or ``""`` when the unit never ran; it changes on
    every start, so a changed id proves a restart happened. ``n_restarts`` counts automatic
    restarts (``Restart=``) since the last manual start. ``exec_main_status`` is the exit status
    (or signal number) of the last main process; ``exec_main_pid`` is 0 when none runs. Units that
    are not services report 0 for the three service-only fields. ``load_state`` is ``loaded``,
    ``not-found``, ``masked``...
    """

    name: str
    active_state: str
    sub_state: str
    n_restarts: int
    invocation_id: str
    exec_main_status: int
    exec_main_pid: int
    load_state: str = "loaded"

    @property
    def is_active(self) -> bool:
        """The single binary check of hal0's health contract (``systemctl is-active``)."""
        return self.active_state == "active"


class ServiceManager(Protocol):
    """What the updater needs from the service manager."""

    def restart(self, unit: str, *, timeout_s: float) -> None:
        """Restart ``unit`` and wait until its job finishes.

        The unit's failed state and start-rate counter are reset first (``reset-failed``): a
        deliberate restart, say back to the old version, must not be refused because the release
        just left crash-looped into systemd's start limit.

        Raises :class:`ServiceError` when the job fails or is cancelled, or takes longer than
        ``timeout_s`` seconds.
        """
        ...

    def status(self, unit: str) -> UnitStatus:
        """The unit's current state (a unit systemd does not know reports ``not-found``)."""
        ...

    def list_units(self, pattern: str) -> list[str]:
        """Sorted names of loaded units matching a glob, e.g. ``hal0-slot@*.service``."""
        ...


def normalize_unit_name(unit: str) -> str:
    """Check a unit name and add ``.service`` when it has no unit-type suffix (as systemctl does).

    Raises :class:`ServiceError` for names that are not unit names (empty, leading ``-``,
    whitespace, slashes...).
    """
    if not _UNIT_RE.fullmatch(unit):
        raise ServiceError(f"not a valid unit name: {unit!r}")
    if not unit.endswith(_UNIT_SUFFIXES):
        unit = f"{unit}.service"
    return unit


def _check_pattern(pattern: str) -> str:
    if not _PATTERN_RE.fullmatch(pattern):
        raise ServiceError(f"not a valid unit pattern: {pattern!r}")
    return pattern


def _check_timeout(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ServiceError(f"timeout must be positive, got {timeout_s!r}")
    return timeout_s


def _to_int(unit: str, key: str, value: str) -> int:
    if value in ("", "[not set]"):
        return 0
    try:
        return int(value)
    except ValueError as e:
        raise ServiceError(f"systemd reported a non-numeric {key} for {unit}: {value!r}") from e


# --------------------------------------------------------------------------------------------------
# systemctl


class SystemctlManager:
    """:class:`ServiceManager` through the ``systemctl`` command.

    ``command_prefix`` is put before ``systemctl`` (e.g. ``["nsenter", "-t", PID, "-m", "-p"]``);
    ``timeout_s`` bounds the read-only calls (``show``, ``list-units``); a restart is bounded by its
    own ``timeout_s`` argument.
    """

    _SHOW_PROPERTIES = (
        "Id",
        "LoadState",
        "ActiveState",
        "SubState",
        "NRestarts",
        "InvocationID",
        "ExecMainStatus",
        "ExecMainPID",
    )

    def __init__(
        self,
        command_prefix: Sequence[str] = (),
        *,
        systemctl: str = "systemctl",
        timeout_s: float = 30.0,
    ) -> None:
        self._argv0 = [*command_prefix, systemctl]
        self._timeout_s = _check_timeout(timeout_s)

    def __repr__(self) -> str:
        return f"SystemctlManager(argv={self._argv0!r})"

    def _run(self, args: Sequence[str], *, timeout_s: float, what: str) -> str:
        argv = [*self._argv0, "--no-pager", "--no-ask-password", *args]
        try:
            # A session of its own, so a timeout kills everything the prefix may have forked.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        except OSError as e:
            raise ServiceError(
                f"{what}: cannot run {argv[0]}", hint="is systemd installed and in PATH?"
            ) from e
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ServiceError(
                f"{what}: systemctl did not finish within {timeout_s:g} s",
                hint="the job may still be queued: see 'systemctl list-jobs'",
            ) from e
        if proc.returncode != 0:
            detail = (stderr.strip() or stdout.strip()).splitlines()
            reason = detail[0] if detail else "no output"
            raise ServiceError(
                f"{what}: systemctl exited with status {proc.returncode}: {reason}",
                hint=" ".join(line.strip() for line in detail[1:]) or None,
            )
        return stdout

    def restart(self, unit: str, *, timeout_s: float) -> None:
        name = normalize_unit_name(unit)
        with contextlib.suppress(ServiceError):  # the restart itself reports what is wrong
            self._run(["reset-failed", "--", name], timeout_s=self._timeout_s, what="")
        self._run(
            ["restart", "--", name],
            timeout_s=_check_timeout(timeout_s),
            what=f"restarting {name}",
        )

    def status(self, unit: str) -> UnitStatus:
        name = normalize_unit_name(unit)
        out = self._run(
            ["show", f"--property={','.join(self._SHOW_PROPERTIES)}", "--", name],
            timeout_s=self._timeout_s,
            what=f"reading the state of {name}",
        )
        props: dict[str, str] = {}
        for line in out.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                props[key] = value
        if "ActiveState" not in props:
            raise ServiceError(f"systemctl show gave no ActiveState for {name}: {out!r}")
        return UnitStatus(
            name=props.get("Id") or name,
            active_state=props["ActiveState"],
            sub_state=props.get("SubState", ""),
            n_restarts=_to_int(name, "NRestarts", props.get("NRestarts", "")),
            invocation_id=props.get("InvocationID", "").lower(),
            exec_main_status=_to_int(name, "ExecMainStatus", props.get("ExecMainStatus", "")),
            exec_main_pid=_to_int(name, "ExecMainPID", props.get("ExecMainPID", "")),
            load_state=props.get("LoadState", ""),
        )

    def list_units(self, pattern: str) -> list[str]:
        pattern = _check_pattern(pattern)
        out = self._run(
            ["list-units", "--all", "--plain", "--no-legend", "--full", "--", pattern],
            timeout_s=self._timeout_s,
            what=f"listing units matching {pattern}",
        )
        names: set[str] = set()
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0] == "●":  # older systemctl marks failed units even with --plain
                fields = fields[1:]
            if len(fields) >= 2 and fields[1] != "not-found":
                names.add(fields[0])
        return sorted(names)


# --------------------------------------------------------------------------------------------------
# pystemd (D-Bus)

_DEST = b"org.freedesktop.systemd1"
_MANAGER_PATH = b"/org/freedesktop/systemd1"
_MANAGER_IFACE = b"org.freedesktop.systemd1.Manager"
_UNIT_IFACE = b"org.freedesktop.systemd1.Unit"
_SERVICE_IFACE = b"org.freedesktop.systemd1.Service"
_JOB_POLL_S = 0.5  # how often restart() re-reads the unit's job, in case a signal was missed


def _import_pystemd() -> tuple[Any, Any, Any, type[BaseException]]:
    """``(DBus, DBusAddress, apply_signature, DBusBaseError)``, or ServiceError with a hint."""
    try:
        from pystemd.dbusexc import DBusBaseError
        from pystemd.dbuslib import DBus, DBusAddress, apply_signature
    except ImportError as e:
        raise ServiceError("pystemd is not installed", hint=_PYSTEMD_HINT) from e
    return DBus, DBusAddress, apply_signature, DBusBaseError


def _text(value: object, what: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    raise ServiceError(f"systemd sent {what} of unexpected type {type(value).__name__}")


def _number(value: object, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ServiceError(f"systemd sent {what} of unexpected type {type(value).__name__}")


def _hex_id(value: object) -> str:
    """An ``ay`` id as hex; ``""`` for an empty or all-zero id (as ``systemctl show`` prints it)."""
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    elif isinstance(value, list) and all(isinstance(b, int) for b in value):
        try:
            raw = bytes(value)
        except ValueError as e:
            raise ServiceError(f"systemd sent a malformed InvocationID: {value!r}") from e
    else:
        raise ServiceError(
            f"systemd sent an InvocationID of unexpected type {type(value).__name__}"
        )
    return raw.hex() if any(raw) else ""


class PystemdManager:
    """:class:`ServiceManager` over D-Bus with pystemd.

    ``address`` is a D-Bus address such as ``unix:path=/run/systemd/private``; ``peer_to_peer``
    must be true for systemd's private socket (no bus daemon in between). Without an address the
    system bus is used when its socket exists, else (as root) the private socket.
    A new connection is opened per call, so a daemon re-exec between calls does no harm.
    """

    def __init__(self, *, address: str | None = None, peer_to_peer: bool = False) -> None:
        self._dbus, self._dbus_address, self._apply_signature, self._dbus_error = _import_pystemd()
        if address is None:
            if SYSTEM_BUS_SOCKET.exists():
                pass  # libsystemd's default system bus (honours DBUS_SYSTEM_BUS_ADDRESS)
            elif os.geteuid() == 0 and PRIVATE_SOCKET.exists():
                address, peer_to_peer = f"unix:path={PRIVATE_SOCKET}", True
            else:
                raise ServiceError(
                    "no D-Bus system bus and no systemd private socket is reachable",
                    hint=f"{SYSTEM_BUS_SOCKET} is missing; {PRIVATE_SOCKET} needs root; "
                    "use the systemctl backend instead",
                )
        self._address = address
        self._peer_to_peer = peer_to_peer

    def __repr__(self) -> str:
        where = self._address or "system bus"
        return f"PystemdManager(address={where!r}, peer_to_peer={self._peer_to_peer})"

    # -- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _bus(self, what: str) -> Iterator[Any]:
        """An open connection; every D-Bus or OS error inside becomes a ServiceError."""
        if self._address is None:
            bus = self._dbus()
        else:
            bus = self._dbus_address(self._address.encode(), peer_to_peer=self._peer_to_peer)
        try:
            bus.open()
        except (self._dbus_error, OSError) as e:
            raise ServiceError(
                f"{what}: cannot connect to systemd over D-Bus ({self._address or 'system bus'})",
                hint="is systemd running, and are we root?",
            ) from e
        try:
            yield bus
        except (self._dbus_error, OSError) as e:
            detail = getattr(e, "err_message", None) or str(e)
            if isinstance(detail, bytes):
                detail = detail.decode("utf-8", "replace")
            raise ServiceError(f"{what}: {detail}") from e
        finally:
            bus.close()

    def _call(
        self, bus: Any, path: bytes, iface: bytes, method: bytes, sig: bytes, *args: Any
    ) -> Any:
        call_args = self._apply_signature(sig, list(args)) if sig else []
        return bus.call_method(_DEST, path, iface, method, call_args).body

    def _unit_path(self, bus: Any, name: str) -> bytes:
        path = self._call(bus, _MANAGER_PATH, _MANAGER_IFACE, b"LoadUnit", b"s", name.encode())
        if not isinstance(path, bytes):
            raise ServiceError(f"systemd sent no object path for {name}")
        return path

    def _job_of(self, bus: Any, path: bytes) -> bytes:
        """The object path of the unit's pending job, or ``b"/"`` when none."""
        job = bus.get_property(_DEST, path, _UNIT_IFACE, b"Job", b"(uo)")
        if isinstance(job, list | tuple) and len(job) == 2 and isinstance(job[1], bytes):
            return job[1]
        raise ServiceError(f"systemd sent a malformed Job property: {job!r}")

    def _watch_job_removals(self, bus: Any, removed: dict[bytes, str]) -> Any:
        """Record ``{job path: result}`` of every JobRemoved signal seen while the bus is processed.

        Returns the callback: the caller must keep it referenced while the bus is open (pystemd
        holds only a borrowed pointer to it).
        """

        def on_job_removed(msg: Any, error: Any = None, userdata: Any = None) -> None:
            # Runs inside sd_bus_process(); an exception here could not be surfaced, so none leaves.
            try:
                msg.process_reply(False)
                _job_id, job_path, _unit, result = msg.body
                if isinstance(job_path, bytes) and isinstance(result, bytes):
                    removed[job_path] = result.decode("utf-8", "replace")
            except Exception:  # noqa: S110 - a malformed signal is ignored; polling still ends the wait
                pass

        # Peer to peer there is no bus daemon and messages carry no sender; on a bus, the daemon
        # routes systemd's signals to us only through this match.
        sender = None if self._peer_to_peer else _DEST
        bus.match_signal(sender, _MANAGER_PATH, _MANAGER_IFACE, b"JobRemoved", on_job_removed)
        return on_job_removed

    @staticmethod
    def _pump(bus: Any) -> None:
        """Dispatch queued messages (match callbacks run here); unmatched ones are dropped."""
        for _ in range(1000):
            if bus.process().is_empty():
                return

    # -- ServiceManager ---------------------------------------------------------------------------

    def ping(self) -> str:
        """Connect and read systemd's version; ServiceError when unreachable."""
        with self._bus("contacting systemd") as bus:
            version = bus.get_property(_DEST, _MANAGER_PATH, _MANAGER_IFACE, b"Version", b"s")
            return _text(version, "Version")

    def restart(self, unit: str, *, timeout_s: float) -> None:
        name = normalize_unit_name(unit)
        _check_timeout(timeout_s)
        what = f"restarting {name}"
        deadline = time.monotonic() + timeout_s
        with self._bus(what) as bus:
            path = self._unit_path(bus, name)
            # Watch and subscribe before queueing the job, so its JobRemoved cannot be missed.
            removed: dict[bytes, str] = {}
            _keepalive = self._watch_job_removals(bus, removed)  # referenced until we return
            self._call(bus, _MANAGER_PATH, _MANAGER_IFACE, b"Subscribe", b"")
            with contextlib.suppress(Exception):  # the restart itself reports what is wrong
                self._call(bus, path, _UNIT_IFACE, b"ResetFailed", b"")
            job = self._call(bus, path, _UNIT_IFACE, b"Restart", b"s", b"replace")
            if not isinstance(job, bytes):
                raise ServiceError(f"{what}: systemd sent no job path")
            next_poll = time.monotonic() + _JOB_POLL_S
            while True:
                self._pump(bus)
                if job in removed:
                    result = removed[job]
                    break
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + _JOB_POLL_S
                    if self._job_of(bus, path) != job:  # finished, but its signal was missed
                        self._pump(bus)
                        result = removed.get(job) or self._result_from_state(bus, path)
                        break
                if now >= deadline:
                    raise ServiceError(
                        f"{what}: the job did not finish within {timeout_s:g} s",
                        hint=f"see 'systemctl status {name}' and 'systemctl list-jobs'",
                    )
                bus.wait(int(max(0.01, min(deadline, next_poll) - now) * 1_000_000))
        if result != "done":
            raise ServiceError(
                f"{what}: the job finished with result '{result}'",
                hint=f"see 'systemctl status {name}' and 'journalctl -xeu {name}'",
            )

    def _result_from_state(self, bus: Any, path: bytes) -> str:
        state = _text(bus.get_property(_DEST, path, _UNIT_IFACE, b"ActiveState", b"s"), "state")
        return "failed" if state == "failed" else "done"

    def status(self, unit: str) -> UnitStatus:
        name = normalize_unit_name(unit)
        with self._bus(f"reading the state of {name}") as bus:
            path = self._unit_path(bus, name)

            def unit_prop(prop: bytes, sig: bytes) -> Any:
                return bus.get_property(_DEST, path, _UNIT_IFACE, prop, sig)

            def service_prop(prop: bytes, sig: bytes) -> int:
                if not name.endswith(".service"):
                    return 0
                value = bus.get_property(_DEST, path, _SERVICE_IFACE, prop, sig)
                return _number(value, prop.decode())

            load_state = _text(unit_prop(b"LoadState", b"s"), "LoadState")
            loaded = load_state != "not-found"
            return UnitStatus(
                name=_text(unit_prop(b"Id", b"s"), "Id"),
                active_state=_text(unit_prop(b"ActiveState", b"s"), "ActiveState"),
                sub_state=_text(unit_prop(b"SubState", b"s"), "SubState"),
                n_restarts=service_prop(b"NRestarts", b"u") if loaded else 0,
                invocation_id=_hex_id(unit_prop(b"InvocationID", b"ay")),
                exec_main_status=service_prop(b"ExecMainStatus", b"i") if loaded else 0,
                exec_main_pid=service_prop(b"ExecMainPID", b"u") if loaded else 0,
                load_state=load_state,
            )

    def list_units(self, pattern: str) -> list[str]:
        pattern = _check_pattern(pattern)
        with self._bus(f"listing units matching {pattern}") as bus:
            rows = self._call(
                bus,
                _MANAGER_PATH,
                _MANAGER_IFACE,
                b"ListUnitsByPatterns",
                b"asas",
                [],
                [pattern.encode()],
            )
        if not isinstance(rows, list):
            raise ServiceError(f"systemd sent a malformed unit list: {rows!r}")
        names: set[str] = set()
        for row in rows:
            if not isinstance(row, list | tuple) or len(row) < 3:
                raise ServiceError(f"systemd sent a malformed unit list row: {row!r}")
            if _text(row[2], "LoadState") != "not-found":
                names.add(_text(row[0], "a unit name"))
        return sorted(names)


# --------------------------------------------------------------------------------------------------


def make_service_manager(kind: ServiceManagerKind = "auto") -> ServiceManager:
    """The backend to use.

    ``auto`` picks pystemd when it is importable and systemd answers over D-Bus (system bus, or
    the private socket as root), else ``systemctl``. ``pystemd`` fails with ServiceError when that
    is not possible; ``systemctl`` is always constructed (its errors surface on use).
    """
    if kind == "systemctl":
        return SystemctlManager()
    if kind == "pystemd":
        manager = PystemdManager()
        manager.ping()
        return manager
    if kind != "auto":
        raise ServiceError(f"unknown service manager kind: {kind!r}")
    try:
        manager = PystemdManager()
        manager.ping()
    except ServiceError:
        return SystemctlManager()
    return manager
