"""hal0.toml ``[update]``: defaults, the full example, and every problem reported at once."""

from __future__ import annotations

import json
import math
import re
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchdog_updater.config import (
    GITHUB_ISSUER,
    HAL0_IDENTITY_PATTERNS,
    Config,
    HttpProbeConfig,
    load_config,
    parse_config,
    parse_duration,
)
from watchdog_updater.errors import ConfigError


def cfg(text: str) -> Config:
    return parse_config(textwrap.dedent(text))


def problems(text: str) -> str:
    """The ConfigError message for ``text`` (which must be invalid)."""
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text))
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path / "hal0.toml")
    assert config == Config()
    assert config.channel == "stable"
    assert config.auto is True
    assert config.allow_downgrade is False
    assert config.source is None
    assert config.verify.signer_issuer == GITHUB_ISSUER
    assert dict(config.verify.signer_identity) == dict(HAL0_IDENTITY_PATTERNS)
    assert config.manifest_url_for("nightly") == "https://releases.hal0.dev/nightly.json"
    assert [p.url for p in config.health.http] == ["http://127.0.0.1:8080/api/health"]


def test_missing_file_refused_when_not_missing_ok(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "hal0.toml", missing_ok=False)


def test_empty_file_gives_defaults_with_source(tmp_path: Path) -> None:
    path = tmp_path / "hal0.toml"
    path.write_text("")
    config = load_config(path)
    assert config.source == path
    assert config.channel == "stable"


def test_file_without_update_table_gives_defaults() -> None:
    assert cfg("[server]\nport = 8080\n").channel == "stable"


def test_invalid_toml_is_a_config_error_naming_the_source(tmp_path: Path) -> None:
    path = tmp_path / "hal0.toml"
    path.write_text("[update\nchannel = ")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_undecodable_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "hal0.toml"
    path.write_bytes(b"\xff\xfe[update]")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)


# --------------------------------------------------------------------------- full example

FULL = """\
[telemetry]
channel = "stable"

[update]
channel = "preview"
manifest_url = "https://mirror.example/hal0/{channel}.json"
auto = false
allow_downgrade = true
min_release_age = "2d"
layout = "hal0"

[update.verify]
trusted_root = "/etc/hal0/trusted_root.json"
signer_issuer = "https://issuer.example"
workflow = "https://github.com/Hal0ai/hal0/.github/workflows/other.yml"

[update.verify.signer_identity]
stable = "^https://example/stable$"
nightly = "^https://example/nightly$"

[update.download]
connect_timeout = "5s"
read_timeout = "1m"
deadline = "2h"
min_speed_bytes_per_s = 2048
speed_window = "45s"
max_redirects = 3
retries = 2
backoff = "2s"
max_manifest_bytes = 65536
max_bundle_bytes = 131072
max_tarball_bytes = 1073741824
ca_file = "/etc/hal0/ca.pem"

[update.install]
keep = 5
post_swap = [["/usr/lib/hal0/venv/bin/pip", "install", "."], ["true"]]
hook_timeout = "15m"

[update.services]
manager = "systemctl"
restart = ["hal0-api.service"]
slots_pattern = "hal0-slot@*.service"
restart_timeout = "2m"

[update.health]
consecutive = 5
interval = "3s"
deadline = "5m"
failure_budget = 1
probe_timeout = "4s"
units = ["hal0-api.service", "hal0-openwebui.service"]
slots = false
slot_ports = { alpha = 8081, beta = 8090 }
slots_dir = "/var/lib/hal0/slots"
on_interrupted_gate = "rollback"

[update.health.probation]
duration = "30m"
interval = "20s"
consecutive_failures = 4

[[update.health.http]]
name = "api"
url = "http://127.0.0.1:8080/api/health"
status = 200
json = { status = "ok" }
timeout = "3s"

[[update.health.http]]
url = "http://127.0.0.1:3001/health"

[[update.health.command]]
name = "db"
argv = ["/usr/bin/pg_isready"]
timeout = "10s"

[update.schedule]
cron = "30 2 * * 1-5"
jitter = "10m"
window = "02:00-05:00"
check_interval = "1h30m"

[update.metrics]
listen = "127.0.0.1:9999"
textfile = "/var/lib/node_exporter/watchdog.prom"
"""


def test_full_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "hal0.toml"
    path.write_text(FULL)
    c = load_config(path)
    assert c.source == path
    assert c.channel == "preview"
    assert c.manifest_url_for("preview") == "https://mirror.example/hal0/preview.json"
    assert (c.auto, c.allow_downgrade, c.layout) == (False, True, "hal0")
    assert c.min_release_age_s == 2 * 86400

    assert c.verify.trusted_root == "/etc/hal0/trusted_root.json"
    assert c.verify.signer_issuer == "https://issuer.example"
    assert c.verify.workflow.endswith("/other.yml")
    assert c.verify.signer_identity["stable"] == "^https://example/stable$"
    assert c.verify.signer_identity["nightly"] == "^https://example/nightly$"
    assert c.verify.signer_identity["preview"] == HAL0_IDENTITY_PATTERNS["preview"]

    f = c.download.fetch
    assert (f.connect_timeout_s, f.read_timeout_s, f.deadline_s) == (5.0, 60.0, 7200.0)
    assert (f.min_speed_bytes_per_s, f.speed_window_s) == (2048, 45.0)
    assert (f.max_redirects, f.retries, f.backoff_s) == (3, 2, 2.0)
    assert c.download.max_manifest_bytes == 65536
    assert c.download.max_bundle_bytes == 131072
    assert c.download.max_tarball_bytes == 1 << 30
    assert c.download.ca_file == Path("/etc/hal0/ca.pem")

    assert c.install.keep == 5
    assert c.install.post_swap == (("/usr/lib/hal0/venv/bin/pip", "install", "."), ("true",))
    assert c.install.hook_timeout_s == 900.0

    assert c.services.manager == "systemctl"
    assert c.services.restart == ("hal0-api.service",)
    assert c.services.restart_timeout_s == 120.0

    h = c.health
    assert (h.gate.consecutive, h.gate.interval_s, h.gate.deadline_s) == (5, 3.0, 300.0)
    assert (h.gate.failure_budget, h.gate.probe_timeout_s) == (1, 4.0)
    assert h.units == ("hal0-api.service", "hal0-openwebui.service")
    assert h.slots is False
    assert dict(h.slot_ports) == {"alpha": 8081, "beta": 8090}
    assert h.slots_dir == Path("/var/lib/hal0/slots")
    assert h.on_interrupted_gate == "rollback"
    assert h.probation.duration_s == 1800.0
    assert h.probation.interval_s == 20.0
    assert h.probation.consecutive_failures == 4
    assert h.http[0] == HttpProbeConfig(
        name="api",
        url="http://127.0.0.1:8080/api/health",
        expect_status=200,
        expect_json={"status": "ok"},
        timeout_s=3.0,
    )
    assert h.http[1].url == "http://127.0.0.1:3001/health"
    assert h.http[1].name and h.http[1].name != "api"
    assert len(h.command) == 1
    assert h.command[0].name == "db"
    assert h.command[0].argv == ("/usr/bin/pg_isready",)
    assert h.command[0].timeout_s == 10.0

    s = c.schedule
    assert s.cron == "30 2 * * 1-5"
    assert s.jitter_s == 600.0
    assert s.window == ("02:00", "05:00")
    assert s.check_interval_s == 5400.0

    assert c.metrics.listen == "127.0.0.1:9999"
    assert c.metrics.textfile == Path("/var/lib/node_exporter/watchdog.prom")


# --------------------------------------------------------------------------- channel


@pytest.mark.parametrize("channel", ["stable", "preview", "nightly"])
def test_telemetry_channel_is_the_fallback(channel: str) -> None:
    assert cfg(f'[telemetry]\nchannel = "{channel}"\n').channel == channel


def test_update_channel_overrides_telemetry() -> None:
    text = '[telemetry]\nchannel = "nightly"\n[update]\nchannel = "preview"\n'
    assert cfg(text).channel == "preview"


def test_invalid_telemetry_channel_is_reported() -> None:
    message = problems('[telemetry]\nchannel = "beta"\n')
    assert "telemetry.channel" in message


def test_invalid_update_channel_is_reported() -> None:
    message = problems('[update]\nchannel = "beta"\n')
    assert "update.channel (line 2)" in message
    assert "stable, preview, nightly" in message


def test_telemetry_without_channel_defaults_to_stable() -> None:
    assert cfg("[telemetry]\nenabled = true\n").channel == "stable"


# --------------------------------------------------------------------------- unknown keys


def test_unknown_key_names_dotted_key_line_and_suggestion() -> None:
    message = problems(
        """\
        [update]
        channel = "stable"
        chanel = "nightly"
        """
    )
    assert "update.chanel (line 3)" in message
    assert "unknown key" in message
    assert "did you mean 'channel'" in message


def test_unknown_key_in_a_nested_table() -> None:
    message = problems(
        """\
        [update]
        auto = true

        [update.health]
        consecutive = 3
        consecutve = 4
        """
    )
    assert "update.health.consecutve (line 6)" in message
    assert "did you mean 'consecutive'" in message


def test_unknown_key_far_from_anything_has_no_suggestion() -> None:
    message = problems("[update]\nzzzzzzzz = 1\n")
    assert "update.zzzzzzzz (line 2): unknown key" in message
    assert "did you mean" not in message


def test_unknown_channel_in_signer_identity() -> None:
    message = problems('[update.verify.signer_identity]\nstabel = "^x$"\n')
    assert "update.verify.signer_identity.stabel (line 2)" in message
    assert "did you mean 'stable'" in message


def test_misspelled_table_is_reported_with_suggestion() -> None:
    message = problems("[update.helth]\nconsecutive = 3\n")
    assert "update.helth" in message
    assert "did you mean 'health'" in message


def test_misspelled_table_reports_its_line() -> None:
    assert "update.helth (line 3)" in problems("[update]\nauto = true\n[update.helth]\nx = 1\n")


def test_unknown_key_in_array_of_tables_reports_its_line() -> None:
    text = '[[update.health.http]]\nurl = "http://127.0.0.1/"\nnmae = "x"\n'
    assert "update.health.http[0].nmae (line 3)" in problems(text)


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("toml", "dotted", "reason"),
    [
        ('[update]\nauto = "yes"', "update.auto", "true or false"),
        ("[update]\nallow_downgrade = 1", "update.allow_downgrade", "true or false"),
        ('[update]\nlayout = "flat"', "update.layout", "seed, hal0"),
        ('[update]\nmanifest_url = "ftp://x/{channel}.json"', "update.manifest_url", "http(s)"),
        ("[update]\nmanifest_url = 5", "update.manifest_url", "string"),
        ('[update.install]\nkeep = "3"', "update.install.keep", "integer"),
        ("[update.install]\nkeep = 1", "update.install.keep", ">= 2"),
        ("[update.install]\nkeep = true", "update.install.keep", "integer"),
        ("[update.install]\nkeep = 2.5", "update.install.keep", "integer"),
        ('[update.install]\npost_swap = ["pip"]', "update.install.post_swap", "list of strings"),
        ("[update.install]\npost_swap = [[]]", "update.install.post_swap", "empty"),
        ('[update.services]\nrestart = "hal0-api"', "update.services.restart", "list of strings"),
        ('[update.services]\nmanager = "runit"', "update.services.manager", "auto"),
        ('[update.services]\nslots_pattern = "  "', "update.services.slots_pattern", "empty"),
        ("[update.download]\nmax_tarball_bytes = 10", "update.download.max_tarball_bytes", ">="),
        ('[update.download]\nca_file = ""', "update.download.ca_file", "empty"),
        ("[update.health]\nunits = [1, 2]", "update.health.units", "list of strings"),
        ('[update.health]\nslots = "no"', "update.health.slots", "true or false"),
        (
            '[update.health]\non_interrupted_gate = "x"',
            "update.health.on_interrupted_gate",
            "regate",
        ),
        ("[update.metrics]\nlisten = 9877", "update.metrics.listen", "string"),
        ('[update.verify]\nsigner_issuer = ""', "update.verify.signer_issuer", "empty"),
        ('[update]\nverify = "strict"', "update.verify", "expected a table"),
        ("update = 5", "update", "expected a table"),
    ],
)
def test_wrong_type_is_reported_with_key_and_reason(toml: str, dotted: str, reason: str) -> None:
    message = problems(toml + "\n")
    assert f"{dotted} " in message or f"{dotted}:" in message
    assert reason in message


def test_several_errors_are_reported_at_once() -> None:
    message = problems(
        """\
        [update]
        auto = "yes"
        chanel = "nightly"

        [update.install]
        keep = 0

        [update.schedule]
        cron = "daily"
        """
    )
    assert "4 invalid settings" in message
    assert "update.auto (line 2)" in message
    assert "update.chanel (line 3)" in message
    assert "update.install.keep (line 6)" in message
    assert "update.schedule.cron (line 9)" in message


def test_config_error_carries_a_hint() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[update]\nauto = "yes"\n')
    assert info.value.hint


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("7d", 604800.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("30", 30.0),
        (" 5m ", 300.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["", "  ", "10x", "m", "h30", "-5", "-5s", "1e3", "1h-30m", "ten minutes", "1.s", True,
     None, [10], -1, math.inf, math.nan],
)  # fmt: skip
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_durations_in_config() -> None:
    c = cfg(
        """\
        [update]
        min_release_age = "7d"
        [update.schedule]
        check_interval = 45
        jitter = "90s"
        [update.health]
        deadline = "10m"
        interval = 3
        """
    )
    assert c.min_release_age_s == 604800.0
    assert c.schedule.check_interval_s == 45.0
    assert c.schedule.jitter_s == 90.0
    assert c.health.gate.deadline_s == 600.0
    assert c.health.gate.interval_s == 3.0


@pytest.mark.parametrize(
    ("toml", "dotted"),
    [
        ('[update]\nmin_release_age = "soon"', "update.min_release_age"),
        ("[update]\nmin_release_age = -1", "update.min_release_age"),
        ("[update]\nmin_release_age = true", "update.min_release_age"),
        ("[update]\nmin_release_age = nan", "update.min_release_age"),
        ('[update.schedule]\ncheck_interval = "0s"', "update.schedule.check_interval"),
        ('[update.schedule]\njitter = "5 minutes"', "update.schedule.jitter"),
        ('[update.download]\nread_timeout = "0"', "update.download.read_timeout"),
        ("[update.install]\nhook_timeout = inf", "update.install.hook_timeout"),
    ],
)
def test_bad_durations_in_config(toml: str, dotted: str) -> None:
    assert f"{dotted} (line 2)" in problems(toml + "\n")


# --------------------------------------------------------------------------- verify


def test_signer_identity_must_be_a_valid_regex() -> None:
    message = problems('[update.verify.signer_identity]\nnightly = "refs/heads/(main"\n')
    assert "update.verify.signer_identity.nightly (line 2)" in message
    assert "invalid regular expression" in message


def test_signer_identity_must_not_be_empty() -> None:
    assert "update.verify.signer_identity.stable" in problems(
        '[update.verify.signer_identity]\nstable = ""\n'
    )


def test_signer_identity_with_huge_repeat_count_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"signer_identity\.stable"):
        parse_config('[update.verify.signer_identity]\nstable = "a{4294967296}"\n')


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ("02:00-05:00", ("02:00", "05:00")),
        ("22:30-04:15", ("22:30", "04:15")),
        (" 00:00 - 23:59 ", ("00:00", "23:59")),
        ("", None),
    ],
)
def test_window(window: str, expected: tuple[str, str] | None) -> None:
    assert cfg(f'[update.schedule]\nwindow = "{window}"\n').schedule.window == expected


@pytest.mark.parametrize(
    "window", ["02:00", "2:00-05:00", "24:00-01:00", "02:60-03:00", "02:00-05", "02:00~05:00",
               "aa:bb-cc:dd", "02:00-05:00-06:00"],
)  # fmt: skip
def test_bad_window_is_reported(window: str) -> None:
    message = problems(f'[update.schedule]\nwindow = "{window}"\n')
    assert "update.schedule.window (line 2)" in message


def test_window_of_wrong_type_is_reported() -> None:
    assert "update.schedule.window" in problems("[update.schedule]\nwindow = 2\n")


@pytest.mark.parametrize("cron", ["0 3 * *", "0 3 * * * *", "@daily", ""])
def test_cron_with_wrong_field_count_is_reported(cron: str) -> None:
    assert "update.schedule.cron (line 2)" in problems(f'[update.schedule]\ncron = "{cron}"\n')


def test_cron_with_five_fields_is_accepted() -> None:
    assert cfg('[update.schedule]\ncron = "*/15 1-5 * * mon"\n').schedule.cron == "*/15 1-5 * * mon"


# --------------------------------------------------------------------------- health probes


def test_http_probes_replace_the_default() -> None:
    c = cfg('[[update.health.http]]\nurl = "http://127.0.0.1:3001/health"\nstatus = 204\n')
    assert len(c.health.http) == 1
    assert c.health.http[0].url == "http://127.0.0.1:3001/health"
    assert c.health.http[0].expect_status == 204
    assert c.health.http[0].timeout_s is None


def test_http_probe_without_url_is_reported() -> None:
    message = problems('[[update.health.http]]\nname = "api"\n')
    assert "update.health.http[0].url" in message
    assert "required" in message


def test_second_http_probe_without_url_is_reported_by_index() -> None:
    message = problems(
        '[[update.health.http]]\nurl = "http://127.0.0.1/"\n[[update.health.http]]\nname = "b"\n'
    )
    assert "update.health.http[1].url" in message
    assert "update.health.http[0]" not in message


@pytest.mark.parametrize(
    ("entry", "dotted"),
    [
        ('url = "ftp://x/"', "update.health.http[0].url"),
        ('url = "http://127.0.0.1/"\nstatus = 99', "update.health.http[0].status"),
        ('url = "http://127.0.0.1/"\njson = "ok"', "update.health.http[0].json"),
        ('url = "http://127.0.0.1/"\ntimeout = "0s"', "update.health.http[0].timeout"),
        ('url = "http://127.0.0.1/"\nname = ""', "update.health.http[0].name"),
    ],
)
def test_bad_http_probe_fields(entry: str, dotted: str) -> None:
    assert dotted in problems(f"[[update.health.http]]\n{entry}\n")


def test_http_must_be_an_array_of_tables() -> None:
    assert "update.health.http" in problems('[update.health]\nhttp = "http://127.0.0.1/"\n')


def test_command_probe_needs_argv() -> None:
    message = problems('[[update.health.command]]\nname = "db"\n')
    assert "update.health.command[0].argv" in message


def test_command_probe_with_empty_argv_is_reported() -> None:
    assert "update.health.command[0].argv" in problems("[[update.health.command]]\nargv = []\n")


@pytest.mark.parametrize("ports", ["{ a = 1 }", "{ a = 65535, b = 8081 }", "{}"])
def test_valid_slot_ports(ports: str) -> None:
    c = cfg(f"[update.health]\nslot_ports = {ports}\n")
    assert dict(c.health.slot_ports) == tomllib.loads(f"x = {ports}")["x"]


@pytest.mark.parametrize(
    "ports", ["{ a = 0 }", "{ a = 65536 }", '{ a = "8081" }', "{ a = true }", "{ a = 80.5 }",
              "[8081]", "8081"],
)  # fmt: skip
def test_invalid_slot_ports_are_reported(ports: str) -> None:
    assert "update.health.slot_ports (line 2)" in problems(
        f"[update.health]\nslot_ports = {ports}\n"
    )


# --------------------------------------------------------------------------- policy bounds


def test_health_consecutive_zero_is_reported() -> None:
    message = problems("[update.health]\nconsecutive = 0\n")
    assert "update.health.consecutive (line 2)" in message


@pytest.mark.parametrize(
    ("toml", "table", "detail"),
    [
        ("[update.health]\nconsecutive = 101", "update.health", "consecutive"),
        ("[update.health]\nfailure_budget = 1000", "update.health", "failure_budget"),
        ('[update.health]\ninterval = "10m"', "update.health", "interval"),
        ('[update.health]\ndeadline = "2h"', "update.health", "deadline"),
        ('[update.health]\nprobe_timeout = "1m"\ndeadline = "30s"', "update.health", "deadline"),
        ('[update.health.probation]\nduration = "2d"', "update.health.probation", "duration"),
        ("[update.health.probation]\nconsecutive_failures = 0", "update.health.probation",
         "consecutive_failures"),
        ('[update.download]\nbackoff = "2m"', "update.download", "backoff"),
        ("[update.download]\nretries = 50", "update.download", "retries"),
        ("[update.install]\nmax_entries = 20000000", "update.install", "max_entries"),
    ],
)  # fmt: skip
def test_policy_bounds_surface_as_config_error_naming_the_table(
    toml: str, table: str, detail: str
) -> None:
    message = problems(toml + "\n")
    assert re.search(rf"^\s*{re.escape(table)}[ .:(]", message, re.MULTILINE), message
    assert detail in message


def test_policy_error_does_not_hide_other_problems() -> None:
    message = problems("[update]\nauto = 1\n[update.health]\nconsecutive = 101\n")
    assert "2 invalid settings" in message
    assert "update.auto" in message
    assert "update.health" in message


# --------------------------------------------------------------------------- property

# A tiny TOML writer: every table is written inline, which tomllib reads back as the same dicts.


def _toml_key(key: str) -> str:
    return _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's escapes are a subset of TOML basic-string escapes, except DEL must be escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(document: dict[str, Any]) -> str:
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in document.items())


KEYS = [
    "channel", "manifest_url", "auto", "allow_downgrade", "min_release_age", "layout",
    "trusted_root", "signer_issuer", "workflow", "stable", "preview", "nightly",
    "connect_timeout", "read_timeout", "deadline", "min_speed_bytes_per_s", "speed_window",
    "max_redirects", "retries", "backoff", "max_manifest_bytes", "max_bundle_bytes",
    "max_tarball_bytes", "ca_file", "max_unpacked_bytes", "max_entries",
    "free_space_margin_bytes", "keep", "post_swap", "hook_timeout", "manager", "restart",
    "slots_pattern", "restart_timeout", "consecutive", "interval", "failure_budget",
    "probe_timeout", "duration", "consecutive_failures", "units", "slots", "slot_ports",
    "slots_dir", "on_interrupted_gate", "name", "url", "status", "json", "timeout", "argv",
    "cron", "jitter", "window", "check_interval", "listen", "textfile",
]  # fmt: skip
TABLES = [
    "verify", "signer_identity", "download", "install", "services", "health", "probation",
    "http", "command", "schedule", "metrics", "slot_ports", "json",
]  # fmt: skip

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-5, max_value=70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["10m", "1h30m", "90s", "0", "7d", "stable", "nightly", "02:00-05:00", "0 3 * * *",
         "http://127.0.0.1/", "https://x/{channel}.json", "(", "^x$", "auto", "hal0", "regate"]
    ),
)  # fmt: skip
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=8))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)
update_tables = st.recursive(
    st.dictionaries(keys, values, max_size=5),
    lambda children: st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(TABLES), keys), children, max_size=4),
        st.builds(lambda d, t, arr: {**d, t: arr},
                  children, st.sampled_from(["http", "command"]),
                  st.lists(st.dictionaries(keys, values, max_size=4), max_size=3)),
    ),
    max_leaves=6,
)  # fmt: skip


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    return False


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(update_tables, st.one_of(st.none(), values))
def test_parse_config_returns_config_or_raises_config_error(
    update: dict[str, Any], telemetry_channel: Any
) -> None:
    document: dict[str, Any] = {"update": update}
    if telemetry_channel is not None:
        document["telemetry"] = {"channel": telemetry_channel}
    text = to_toml(document)
    if not _has_nan(document):
        assert tomllib.loads(text) == document  # the writer is faithful
    try:
        config = parse_config(text)
    except ConfigError as e:
        assert str(e)
        return
    assert isinstance(config, Config)
