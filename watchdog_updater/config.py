"""Configuration: hal0.toml ``[update]`` tables into frozen dataclasses.

Every invalid or unknown key is reported at once, each with its dotted path, its line in the file
and the reason (unknown keys get a did-you-mean). ``[telemetry] channel`` (where hal0 keeps the channel
today) is read as a fallback for ``[update] channel``. Nothing here reads the environment.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from watchdog_updater.errors import ConfigError
from watchdog_updater.extract import ExtractLimits
from watchdog_updater.fetch_settings import FetchSettings
from watchdog_updater.health.policy import GatePolicy, ProbationPolicy
from watchdog_updater.layout import LayoutStyle

__all__ = [
    "CHANNELS",
    "GITHUB_ISSUER",
    "HAL0_IDENTITY_PATTERNS",
    "HAL0_WORKFLOW",
    "CommandProbeConfig",
    "Config",
    "DownloadConfig",
    "HealthConfig",
    "HttpProbeConfig",
    "InstallConfig",
    "MetricsConfig",
    "ScheduleConfig",
    "ServicesConfig",
    "VerifyConfig",
    "load_config",
    "parse_config",
    "parse_duration",
]

Channel = Literal["stable", "preview", "nightly"]
CHANNELS: tuple[Channel, ...] = ("stable", "preview", "nightly")
GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
HAL0_WORKFLOW = "https://github.com/Hal0ai/hal0/.github/workflows/release.yml"
_HAL0_PREFIX = r"^https://github\.com/(Hal0ai|hal0ai)/hal0/\.github/workflows/release\.yml@"
HAL0_IDENTITY_PATTERNS: Mapping[str, str] = {
    "stable": _HAL0_PREFIX + r"refs/tags/v\d+\.\d+\.\d+$",
    "preview": _HAL0_PREFIX + r"refs/tags/v\d+\.\d+\.\d+(-(alpha|beta|rc)\.(0|[1-9]\d*))?$",
    "nightly": _HAL0_PREFIX + r"refs/heads/main$",
}
DEFAULT_MANIFEST_URL = "https://releases.hal0.dev/{channel}.json"
MiB = 1024 * 1024


@dataclass(frozen=True)
class VerifyConfig:
    """``[update.verify]``: who may sign releases, and which root to trust."""

    trusted_root: str = "public-good"
    signer_issuer: str = GITHUB_ISSUER
    signer_identity: Mapping[str, str] = field(default_factory=lambda: dict(HAL0_IDENTITY_PATTERNS))
    # The exact identity a release must carry is derived from this workflow and the version.
    workflow: str = HAL0_WORKFLOW


@dataclass(frozen=True)
class DownloadConfig:
    """``[update.download]``: every download is bounded."""

    fetch: FetchSettings = field(default_factory=FetchSettings)
    max_manifest_bytes: int = 1 * MiB
    max_bundle_bytes: int = 256 * 1024
    max_tarball_bytes: int = 2048 * MiB
    ca_file: Path | None = None


@dataclass(frozen=True)
class InstallConfig:
    """``[update.install]``: unpacking, activation hooks and retention."""

    limits: ExtractLimits = field(default_factory=ExtractLimits)
    keep: int = 3
    post_swap: tuple[tuple[str, ...], ...] = ()
    hook_timeout_s: float = 600.0


@dataclass(frozen=True)
class ServicesConfig:
    """``[update.services]``: what gets restarted, and how systemd is reached."""

    manager: Literal["auto", "pystemd", "systemctl"] = "auto"
    restart: tuple[str, ...] = ("hal0-api.service", "hal0-openwebui.service")
    slots_pattern: str = "hal0-slot@*.service"
    restart_timeout_s: float = 90.0


@dataclass(frozen=True)
class HttpProbeConfig:
    name: str
    url: str
    expect_status: int = 200
    expect_json: Mapping[str, object] = field(default_factory=dict)
    timeout_s: float | None = None


@dataclass(frozen=True)
class CommandProbeConfig:
    name: str
    argv: tuple[str, ...]
    timeout_s: float | None = None


def _default_http_probes() -> tuple[HttpProbeConfig, ...]:
    return (
        HttpProbeConfig(
            name="hal0-api",
            url="http://127.0.0.1:8080/api/health",
            expect_json={"status": "ok"},
        ),
    )


@dataclass(frozen=True)
class HealthConfig:
    """``[update.health]``: the gate after a swap, and probation after commit."""

    gate: GatePolicy = field(default_factory=GatePolicy)
    probation: ProbationPolicy | None = field(default_factory=ProbationPolicy)  # None: disabled
    units: tuple[str, ...] = ("hal0-api.service",)
    http: tuple[HttpProbeConfig, ...] = field(default_factory=_default_http_probes)
    command: tuple[CommandProbeConfig, ...] = ()
    slots: bool = True
    slot_ports: Mapping[str, int] = field(default_factory=dict)
    slots_dir: Path | None = None
    on_interrupted_gate: Literal["regate", "rollback"] = "regate"


@dataclass(frozen=True)
class ScheduleConfig:
    """``[update.schedule]``: when the daemon updates by itself."""

    cron: str = "0 3 * * *"
    jitter_s: float = 1800.0
    window: tuple[str, str] | None = None  # ("HH:MM", "HH:MM"), may wrap midnight
    check_interval_s: float = 3600.0


@dataclass(frozen=True)
class MetricsConfig:
    """``[update.metrics]``."""

    listen: str = "127.0.0.1:9877"
    textfile: Path | None = None


@dataclass(frozen=True)
class Config:
    """The whole ``[update]`` configuration."""

    channel: Channel = "stable"
    manifest_url: str = DEFAULT_MANIFEST_URL
    auto: bool = True
    allow_downgrade: bool = False
    min_release_age_s: float = 0.0
    layout: LayoutStyle = "seed"
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    install: InstallConfig = field(default_factory=InstallConfig)
    services: ServicesConfig = field(default_factory=ServicesConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: Path | None = None

    def manifest_url_for(self, channel: str) -> str:
        return self.manifest_url.replace("{channel}", channel)


# --------------------------------------------------------------------------- parsing helpers

_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d|w)?")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"10m"``, ``"1h30m"``, ``"7d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, seconds = 0, 0.0
        while pos < len(text):
            match = _DURATION.match(text, pos)
            if match is None or match.end() == pos:
                raise ValueError(
                    f"not a duration: {value!r} (examples: 30, '90s', '10m', '2h', '7d')"
                )
            seconds += float(match["n"]) * _UNIT_S[match["unit"]]
            pos = match.end()
        if not text:
            raise ValueError("empty duration")
    else:
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be finite and >= 0, got {value!r}")
    return seconds


T = TypeVar("T")


class _Problems:
    """Collects every problem so the operator sees them all at once."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.items: list[str] = []

    def line_of(self, dotted: str) -> int | None:
        """Best-effort line number of a dotted key (tomllib keeps no positions).

        ``update.health.http[1].url`` is looked up in the second ``[[update.health.http]]``
        block; a key that is itself a table is found at its ``[header]``.
        """
        path = re.sub(r"\[(\d+)\]", r".#\1", dotted)
        *tables, key = path.split(".")
        table_name = ".".join(t for t in tables if not t.startswith("#"))
        index = next((int(t[1:]) for t in tables if t.startswith("#")), None)
        header_re = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
        key_re = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        own_header = ".".join(filter(None, [table_name, key]))
        current, seen = "", -1
        for number, line in enumerate(self.lines, start=1):
            header = header_re.match(line)
            if header:
                current = header[1].replace(" ", "")
                if current == own_header and not key.startswith("#"):
                    return number
                if current == table_name and line.lstrip().startswith("[["):
                    seen += 1
                continue
            if current == table_name and (index is None or index == seen) and key_re.match(line):
                return number
        return None

    def add(self, dotted: str, reason: str) -> None:
        line = self.line_of(dotted)
        where = f" (line {line})" if line else ""
        self.items.append(f"{dotted}{where}: {reason}")


class _Table:
    """One TOML table being read: typed getters, unknown-key detection."""

    def __init__(self, data: Mapping[str, Any], path: str, problems: _Problems) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()

    def dotted(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        try:
            return convert(self.data[key])
        except (TypeError, ValueError) as e:
            self.problems.add(self.dotted(key), str(e))
            return default

    def table(self, key: str) -> _Table:
        self.seen.add(key)
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            self.problems.add(self.dotted(key), f"expected a table, got {type(value).__name__}")
            value = {}
        return _Table(value, self.dotted(key), self.problems)

    def array_of_tables(self, key: str) -> list[_Table]:
        self.seen.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            self.problems.add(self.dotted(key), "expected an array of tables ([[...]])")
            return []
        return [_Table(v, f"{self.dotted(key)}[{i}]", self.problems) for i, v in enumerate(value)]

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                near = difflib.get_close_matches(key, list(self.seen), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                self.problems.add(self.dotted(key), f"unknown key{hint}")

    def build(self, factory: Callable[..., T], default: T, **kwargs: Any) -> T:
        """Construct a settings object; its own bounds checks become problems of this table."""
        try:
            return factory(**kwargs)
        except (TypeError, ValueError, ConfigError) as e:
            self.problems.add(self.path, str(e))
            return default


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _nonempty_str(value: Any) -> str:
    if not _str(value).strip():
        raise ValueError("must not be empty")
    return cast(str, value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__}")
    return value


def _int(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        return value

    return convert


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _one_of(*choices: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {value!r}")
        return cast(str, value)

    return convert


def _str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("expected a list of strings")
    return tuple(value)


def _argv_list(value: Any) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list):
        raise TypeError("expected a list of commands, each a list of strings")
    commands = tuple(_str_list(v) for v in value)
    if any(not c for c in commands):
        raise ValueError("a command must not be empty")
    return commands


def _regex(value: Any) -> str:
    text = _nonempty_str(value)
    try:
        re.compile(text)
    except (re.error, OverflowError, RecursionError) as e:
        raise ValueError(f"invalid regular expression: {e}") from e
    return text


def _path(value: Any) -> Path:
    return Path(_nonempty_str(value))


def _url(value: Any) -> str:
    text = _nonempty_str(value)
    if not re.match(r"^https?://", text):
        raise ValueError(f"expected an http(s) URL, got {text!r}")
    return text


def _hhmm(value: str) -> str:
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
        raise ValueError(f"expected HH:MM, got {value!r}")
    return value


def _window(value: Any) -> tuple[str, str] | None:
    text = _str(value).strip()
    if not text:
        return None
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"expected 'HH:MM-HH:MM', got {text!r}")
    return (_hhmm(start.strip()), _hhmm(end.strip()))


def _cron(value: Any) -> str:
    text = _nonempty_str(value)
    if len(text.split()) != 5:
        raise ValueError(f"expected 5 cron fields (minute hour day month weekday), got {text!r}")
    return text


def _port_map(value: Any) -> Mapping[str, int]:
    if not isinstance(value, Mapping):
        raise TypeError("expected a table of slot token = port")
    ports: dict[str, int] = {}
    for token, port in value.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"slot {token!r}: port must be 1-65535, got {port!r}")
        ports[str(token)] = port
    return ports


def _json_table(value: Any) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise TypeError("expected a table of JSON field = expected value")
    return dict(value)


# --------------------------------------------------------------------------- sections


def _verify(t: _Table) -> VerifyConfig:
    identities = dict(HAL0_IDENTITY_PATTERNS)
    ids = t.table("signer_identity")
    for channel in CHANNELS:
        identities[channel] = ids.get(channel, _regex, identities[channel])
    ids.finish()
    config = VerifyConfig(
        trusted_root=t.get("trusted_root", _nonempty_str, "public-good"),
        signer_issuer=t.get("signer_issuer", _nonempty_str, GITHUB_ISSUER),
        signer_identity=identities,
        workflow=t.get("workflow", _nonempty_str, HAL0_WORKFLOW),
    )
    t.finish()
    return config


def _download(t: _Table) -> DownloadConfig:
    d = FetchSettings()
    fetch = t.build(
        FetchSettings,
        d,
        connect_timeout_s=t.get("connect_timeout", _positive_duration, d.connect_timeout_s),
        read_timeout_s=t.get("read_timeout", _positive_duration, d.read_timeout_s),
        deadline_s=t.get("deadline", _positive_duration, d.deadline_s),
        min_speed_bytes_per_s=t.get("min_speed_bytes_per_s", _int(0), d.min_speed_bytes_per_s),
        speed_window_s=t.get("speed_window", _positive_duration, d.speed_window_s),
        max_redirects=t.get("max_redirects", _int(0), d.max_redirects),
        retries=t.get("retries", _int(0), d.retries),
        backoff_s=t.get("backoff", parse_duration, d.backoff_s),
    )
    dd = DownloadConfig()
    config = DownloadConfig(
        fetch=fetch,
        max_manifest_bytes=t.get("max_manifest_bytes", _int(1024), dd.max_manifest_bytes),
        max_bundle_bytes=t.get("max_bundle_bytes", _int(1024), dd.max_bundle_bytes),
        max_tarball_bytes=t.get("max_tarball_bytes", _int(1024), dd.max_tarball_bytes),
        ca_file=t.get("ca_file", _path, None),
    )
    t.finish()
    return config


def _install(t: _Table) -> InstallConfig:
    d = ExtractLimits()
    limits = t.build(
        ExtractLimits,
        d,
        max_unpacked_bytes=t.get("max_unpacked_bytes", _int(1), d.max_unpacked_bytes),
        max_entries=t.get("max_entries", _int(1), d.max_entries),
        free_space_margin_bytes=t.get(
            "free_space_margin_bytes", _int(0), d.free_space_margin_bytes
        ),
    )
    di = InstallConfig()
    config = InstallConfig(
        limits=limits,
        keep=t.get("keep", _int(2), di.keep),
        post_swap=t.get("post_swap", _argv_list, di.post_swap),
        hook_timeout_s=t.get("hook_timeout", _positive_duration, di.hook_timeout_s),
    )
    t.finish()
    return config


def _services(t: _Table) -> ServicesConfig:
    d = ServicesConfig()
    config = ServicesConfig(
        manager=t.get("manager", _one_of("auto", "pystemd", "systemctl"), d.manager),
        restart=t.get("restart", _str_list, d.restart),
        slots_pattern=t.get("slots_pattern", _nonempty_str, d.slots_pattern),
        restart_timeout_s=t.get("restart_timeout", _positive_duration, d.restart_timeout_s),
    )
    t.finish()
    return config


def _health(t: _Table) -> HealthConfig:
    g = GatePolicy()
    gate = t.build(
        GatePolicy,
        g,
        consecutive=t.get("consecutive", _int(1), g.consecutive),
        interval_s=t.get("interval", _positive_duration, g.interval_s),
        deadline_s=t.get("deadline", _positive_duration, g.deadline_s),
        failure_budget=t.get("failure_budget", _int(0), g.failure_budget),
        probe_timeout_s=t.get("probe_timeout", _positive_duration, g.probe_timeout_s),
    )
    pt = t.table("probation")
    p = ProbationPolicy()
    duration = pt.get("duration", parse_duration, p.duration_s)
    probation: ProbationPolicy | None = None
    if duration > 0:  # 0 disables probation
        probation = pt.build(
            ProbationPolicy,
            p,
            duration_s=duration,
            interval_s=pt.get("interval", _positive_duration, p.interval_s),
            consecutive_failures=pt.get("consecutive_failures", _int(1), p.consecutive_failures),
            probe_timeout_s=gate.probe_timeout_s,
        )
    else:
        pt.seen.update({"interval", "consecutive_failures"})
    pt.finish()
    http: list[HttpProbeConfig] = []
    for probe in t.array_of_tables("http"):
        http.append(
            HttpProbeConfig(
                name=probe.get("name", _nonempty_str, f"http-{len(http)}"),
                url=probe.get("url", _url, "http://127.0.0.1/"),
                expect_status=probe.get("status", _int(100), 200),
                expect_json=probe.get("json", _json_table, {}),
                timeout_s=probe.get("timeout", _positive_duration, None),
            )
        )
        if "url" not in probe.data:
            probe.problems.add(probe.dotted("url"), "required")
        probe.finish()
    commands: list[CommandProbeConfig] = []
    for probe in t.array_of_tables("command"):
        commands.append(
            CommandProbeConfig(
                name=probe.get("name", _nonempty_str, f"command-{len(commands)}"),
                argv=probe.get("argv", _str_list, ("false",)),
                timeout_s=probe.get("timeout", _positive_duration, None),
            )
        )
        if not probe.data.get("argv"):
            probe.problems.add(probe.dotted("argv"), "required: a non-empty list of strings")
        probe.finish()
    d = HealthConfig()
    config = HealthConfig(
        gate=gate,
        probation=probation,
        units=t.get("units", _str_list, d.units),
        http=tuple(http) if "http" in t.data else d.http,
        command=tuple(commands),
        slots=t.get("slots", _bool, d.slots),
        slot_ports=t.get("slot_ports", _port_map, d.slot_ports),
        slots_dir=t.get("slots_dir", _path, d.slots_dir),
        on_interrupted_gate=t.get(
            "on_interrupted_gate", _one_of("regate", "rollback"), d.on_interrupted_gate
        ),
    )
    t.finish()
    return config


def _schedule(t: _Table) -> ScheduleConfig:
    d = ScheduleConfig()
    config = ScheduleConfig(
        cron=t.get("cron", _cron, d.cron),
        jitter_s=t.get("jitter", parse_duration, d.jitter_s),
        window=t.get("window", _window, d.window),
        check_interval_s=t.get("check_interval", _positive_duration, d.check_interval_s),
    )
    t.finish()
    return config


def _metrics(t: _Table) -> MetricsConfig:
    d = MetricsConfig()
    config = MetricsConfig(
        listen=t.get("listen", _str, d.listen),
        textfile=t.get("textfile", _path, d.textfile),
    )
    t.finish()
    return config


def parse_config(text: str, *, source: Path | None = None) -> Config:
    """Build a :class:`Config` from hal0.toml text; :class:`ConfigError` lists every problem."""
    where = str(source) if source else "configuration"
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}", hint="fix the syntax and retry") from e
    problems = _Problems(text)
    update = _Table(document.get("update", {}), "update", problems)
    if not isinstance(document.get("update", {}), Mapping):
        problems.add("update", "expected a table")
        update = _Table({}, "update", problems)
    telemetry = document.get("telemetry", {})
    raw_channel = telemetry.get("channel", "stable") if isinstance(telemetry, Mapping) else "stable"
    fallback: Channel = "stable"
    if raw_channel in CHANNELS:
        fallback = raw_channel
    else:
        problems.add("telemetry.channel", f"expected one of {', '.join(CHANNELS)}")
    channel_of = _one_of(*CHANNELS)
    config = Config(
        channel=update.get("channel", channel_of, fallback),
        manifest_url=update.get("manifest_url", _url, DEFAULT_MANIFEST_URL),
        auto=update.get("auto", _bool, True),
        allow_downgrade=update.get("allow_downgrade", _bool, False),
        min_release_age_s=update.get("min_release_age", parse_duration, 0.0),
        layout=update.get("layout", _one_of("seed", "hal0"), "seed"),
        verify=_verify(update.table("verify")),
        download=_download(update.table("download")),
        install=_install(update.table("install")),
        services=_services(update.table("services")),
        health=_health(update.table("health")),
        schedule=_schedule(update.table("schedule")),
        metrics=_metrics(update.table("metrics")),
        source=source,
    )
    update.finish()
    if problems.items:
        count = len(problems.items)
        raise ConfigError(
            f"{where}: {count} invalid setting{'s' if count > 1 else ''}:\n  "
            + "\n  ".join(problems.items),
            hint="see docs/config.md for every key, its type and default",
        )
    return config


def load_config(path: Path, *, missing_ok: bool = True) -> Config:
    """Read hal0.toml; a missing file gives the defaults when ``missing_ok``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return Config(source=None)
        raise ConfigError(f"configuration file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read configuration {path}: {e}") from e
    return parse_config(text, source=path)
