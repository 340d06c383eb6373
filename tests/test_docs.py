"""Keep docs/cli.md, docs/config.md and docs/hal0.toml.example true to the code.

The command list and options come from the real argparse parser, the exit codes from ``ExitCode``,
the environment variables from the CLI's source, the ``--json`` field names from running the
commands against a scratch root, and the configuration keys from what ``parse_config`` itself reads
(its tables record every key they look up).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from watchdog_updater import _cli, config
from watchdog_updater.config import Config, parse_config
from watchdog_updater.errors import ExitCode
from watchdog_updater.health.policy import GateDecision, ProbeOutcome, ProbeResult
from watchdog_updater.journal import HistoryEntry, Outcome, Transaction
from watchdog_updater.releases import Offer
from watchdog_updater.state import Holds, QuarantineEntry

DOCS = Path(__file__).resolve().parent.parent / "docs"
CLI_MD = DOCS / "cli.md"
CONFIG_MD = DOCS / "config.md"
EXAMPLE = DOCS / "hal0.toml.example"

# Options every command gets from the shared parent parser (and argparse's own --help); they are
# documented once, under "Options of every command".
COMMON_OPTIONS = {"--json", "--verbose", "--help"}


# --------------------------------------------------------------------------- helpers


def _sections(text: str, level: str) -> dict[str, str]:
    """Heading text -> body, for headings of exactly ``level`` ("##", "###")."""
    found: dict[str, str] = {}
    matches = list(re.finditer(rf"^{level} (.+)$", text, flags=re.M))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        nxt = re.search(rf"^#{{2,{len(level)}}} ", text[match.end() : end], flags=re.M)
        stop = match.end() + nxt.start() if nxt else end
        found[match.group(1).strip()] = text[match.end() : stop]
    return found


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    """(command path, its long options) for the parser and every subparser."""
    options: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))
        options += [o for o in action.option_strings if o.startswith("--")]
    yield path, options


def _command_sections() -> dict[str, str]:
    return _sections(CLI_MD.read_text(encoding="utf-8"), "###")


_SETTING = re.compile(r"^#\s?((?:[A-Za-z0-9_]+)\s*=\s*\S.*)$")
_HEADER = re.compile(r"^#\s?(\[\[?[A-Za-z0-9_.]+\]\]?)(\s*#.*)?$")
_EXAMPLE_TAG = re.compile(r"#\s*example\b")


def _uncommented(*, examples: bool) -> str:
    """The example with its commented settings turned on.

    ``examples=False``: only the lines that show defaults (not tagged ``# example``).
    ``examples=True``: every line; an example line replaces the default line of the same key.
    """
    out: list[str] = []
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        tagged = bool(_EXAMPLE_TAG.search(line))
        header = _HEADER.match(line)
        setting = _SETTING.match(line)
        if header or setting:
            if tagged and not examples:
                continue
            body = header.group(0)[1:].strip() if header else setting.group(1)
            if tagged and setting:
                key = body.split("=", 1)[0].strip()
                # Drop the default line of the same key in this table, shown just above.
                for j in range(len(out) - 1, -1, -1):
                    if out[j].lstrip().startswith("["):
                        break
                    if out[j].split("=", 1)[0].strip() == key:
                        del out[j]
                        break
            out.append(body)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _accepted_keys(text: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Table path -> keys the parser looks up there, recorded while it parses ``text``."""
    seen: dict[str, set[str]] = {}
    finish = config._Table.finish

    def recording(self: Any) -> None:
        path = re.sub(r"\[\d+\]", "", self.path)
        seen.setdefault(path, set()).update(self.seen)
        finish(self)

    monkeypatch.setattr(config._Table, "finish", recording)
    parse_config(text)
    monkeypatch.undo()
    tables = set(seen)
    # Drop keys that are themselves tables (verify, health, probation, http, ...).
    return {t: {k for k in keys if f"{t}.{k}" not in tables} for t, keys in seen.items()}


def _run_json(capsys: pytest.CaptureFixture[str], root: Path, *argv: str) -> Any:
    capsys.readouterr()
    code = _cli.main(["--root", str(root), *argv, "--json"])
    assert code == 0, capsys.readouterr()
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------- cli.md


def test_every_command_has_a_section() -> None:
    sections = _command_sections()
    text = CLI_MD.read_text(encoding="utf-8")
    for path, _ in _walk(_cli._parser()):
        if not path:
            continue
        assert path[0] in sections, f"docs/cli.md has no '### {path[0]}' section"
        assert f"watchdog-updater {' '.join(path)}" in text, f"{' '.join(path)} not in SYNOPSIS"
        if len(path) > 1:
            assert " ".join(path) in sections[path[0]], f"'{' '.join(path)}' not documented"


def test_every_long_option_is_documented() -> None:
    text = CLI_MD.read_text(encoding="utf-8")
    sections = _command_sections()
    for path, options in _walk(_cli._parser()):
        for option in options:
            if not path or option in COMMON_OPTIONS:
                assert f"`{option}" in text, f"{option} is not documented in docs/cli.md"
                continue
            body = sections[path[0]]
            assert f"`{option}" in body, f"{' '.join(path)} {option}: not in its section"


def test_global_and_common_options_are_in_their_tables() -> None:
    text = CLI_MD.read_text(encoding="utf-8")
    globals_ = _sections(text, "##")["GLOBAL OPTIONS"]
    for option in ("--root", "--config", "--json", "--verbose"):
        assert f"`{option}" in globals_


def test_every_exit_code_is_documented() -> None:
    status = _sections(CLI_MD.read_text(encoding="utf-8"), "##")["EXIT STATUS"]
    for code in ExitCode:
        assert re.search(rf"^\| {int(code)} \| `{code.name}` \|", status, flags=re.M), code
    assert re.search(r"^\| 130 \|", status, flags=re.M)


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def interrupted(*_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(_cli.COMMANDS, "status", interrupted)
    assert _cli.main(["--root", str(tmp_path), "status"]) == 130


def test_environment_variables_read_by_the_cli_are_documented() -> None:
    source = Path(_cli.__file__).read_text(encoding="utf-8")
    names = set(re.findall(r"os\.environ\.(?:get|pop)\(\s*\"(\w+)\"", source))
    assert {"NO_COLOR", "NOTIFY_SOCKET", "WATCHDOG_USEC"} <= names
    environment = _sections(CLI_MD.read_text(encoding="utf-8"), "##")["ENVIRONMENT"]
    for name in names:
        assert f"`{name}`" in environment, f"{name} is read by the CLI but not documented"


def test_json_fields_match_what_the_commands_emit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sections = _command_sections()

    def documented(section: str, doc: dict[str, Any]) -> None:
        for key in doc:
            assert f"`{key}`" in sections[section], f"{section} --json: field {key!r} undocumented"

    status = _run_json(capsys, tmp_path, "status")
    documented("status", status)
    documented("explain", {"reasons": 0, "status": 0})
    documented("history", _run_json(capsys, tmp_path, "history"))
    for argv in (("pause", "--until", "2h"), ("skip", "1.2.3"), ("resume",)):
        doc = _run_json(capsys, tmp_path, *argv)
        documented("skip", doc)
        documented("skip", doc["holds"])
    documented("quarantine", _run_json(capsys, tmp_path, "quarantine", "list"))
    documented("quarantine", _run_json(capsys, tmp_path, "quarantine", "clear"))
    documented("recover", _run_json(capsys, tmp_path, "recover"))
    documented("config", _run_json(capsys, tmp_path, "config", "validate"))


def test_json_record_fields_are_documented() -> None:
    """Records nested in the --json documents, by their dataclass fields and to_json keys."""
    sections = _command_sections()
    result = ProbeResult("hal0-api", ProbeOutcome.FAIL, "refused", 1.0, 0.1)
    decision = GateDecision.immediate_failure(result)
    offer = Offer(installed=None, channel="stable", candidate=None, available=False, reason="x")
    expected = {
        "history": [f.name for f in dataclasses.fields(HistoryEntry)],
        "status": [f.name for f in dataclasses.fields(Transaction)],
        "quarantine": [f.name for f in dataclasses.fields(QuarantineEntry)],
        "skip": [f.name for f in dataclasses.fields(Holds)],
        "gate": [*decision.to_json(), *decision.to_json()["probes"][0]],
        "update": [*offer.to_json(), "exit_code", "action", "outcome", "rollback_gate"],
    }
    for section, keys in expected.items():
        for key in keys:
            assert f"`{key}`" in sections[section], f"{section}: field {key!r} undocumented"
    last = decision.to_json()["probes"][0]["last"]
    for key in last:
        assert f"{key}" in sections["gate"], f"gate: probe field last.{key} undocumented"
    for outcome in Outcome:
        assert f"`{outcome.value}`" in sections["update"], outcome


def test_json_error_document_is_documented(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[update]\nchanel = 'preview'\n")
    code = _cli.main(
        ["--root", str(tmp_path), "--config", str(bad), "config", "validate", "--json"]
    )
    assert code == ExitCode.USAGE
    doc = json.loads(capsys.readouterr().out)
    errors = _sections(CLI_MD.read_text(encoding="utf-8"), "##")["ERRORS"]
    for key in doc:
        assert f"`{key}`" in errors
    assert "did you mean 'channel'" in doc["error"]


# --------------------------------------------------------------------------- configuration


def test_example_as_shipped_gives_the_defaults() -> None:
    assert parse_config(EXAMPLE.read_text(encoding="utf-8")) == Config()


def test_example_defaults_are_the_real_defaults() -> None:
    """Every commented value not tagged '# example' is exactly the built-in default."""
    assert parse_config(_uncommented(examples=False)) == Config()


def test_example_with_everything_uncommented_parses() -> None:
    parsed = parse_config(_uncommented(examples=True))
    assert parsed.health.command and parsed.health.command[0].name == "disk-writable"
    assert parsed.schedule.window == ("01:00", "05:00")
    assert parsed.health.slot_ports == {"brain": 8081, "coder": 8082}


def test_every_accepted_key_is_in_the_example_and_config_md(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = _uncommented(examples=True)
    accepted = _accepted_keys(text, monkeypatch)
    assert {"update", "update.health.http", "update.health.command"} <= set(accepted)
    example = tomllib.loads(text)
    reference = CONFIG_MD.read_text(encoding="utf-8")
    sections = {**_sections(reference, "##"), **_sections(reference, "###")}
    for table, keys in accepted.items():
        node: Any = example
        for part in table.split("."):
            node = node[part]
        present = set().union(*node) if isinstance(node, list) else set(node)
        heading = next(
            (h for h in sections if re.search(rf"`\[\[?{re.escape(table)}\]\]?`", h)), None
        )
        assert heading is not None, f"docs/config.md has no section for [{table}]"
        for key in keys:
            assert key in present, f"{table}.{key} is accepted but missing from the example"
            assert f"`{key}`" in sections[heading], f"{table}.{key} not in docs/config.md"
    assert "channel" in example["telemetry"]
    assert "`channel`" in next(h for h in sections if "[telemetry]" in h)
