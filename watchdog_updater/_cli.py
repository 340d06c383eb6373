"""The command line: argument parsing, rendering and exit codes. The only module that reads
environment variables itself (child processes inherit them). One ``except Error`` at the top prints
diagnostics and picks the exit code; an OSError outside the updater's own handling becomes one."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from watchdog_updater.errors import ConfigError, Error, ExitCode, PermissionRefused
from watchdog_updater.journal import Outcome

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["main"]

PROG = "watchdog-updater"
CHANNELS = ("stable", "preview", "nightly")


# --------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="machine-readable output (stable schema)"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="show details of errors")
    # The same options on the actions of `quarantine` and `config`, accepted on either level: an
    # action's unset option must not overwrite the group's (`quarantine --json list`).
    action_common = argparse.ArgumentParser(add_help=False)
    action_common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="as for the command"
    )
    action_common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as for the command"
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Self-healing, Sigstore-verified updater for hal0.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage/config error, 3 refused by verification, "
        "4 rolled back, 5 rollback also unhealthy, 6 busy, 100 update available (--check).",
    )
    parser.add_argument("--root", type=Path, default=Path("/"), help="root prefix (default /)")
    parser.add_argument(
        "--config", type=Path, default=None, help="configuration (default ROOT/etc/hal0/hal0.toml)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    update = sub.add_parser(
        "update", parents=[common], help="check for, apply or roll back updates"
    )
    update.add_argument("--check", action="store_true", help="only report what is available")
    update.add_argument("--channel", choices=CHANNELS, help="channel (default: configured)")
    update.add_argument("--rollback", action="store_true", help="go back to the previous version")
    update.add_argument("--to", metavar="VERSION", help="with --rollback: a retained version")
    update.add_argument("--version", dest="want", metavar="VERSION", help="require this version")
    update.add_argument("--yes", action="store_true", help="confirm dangerous options")
    update.add_argument(
        "--force",
        action="store_true",
        help="ignore pause, freeze, cooldown, skip and quarantine (never signatures)",
    )
    update.add_argument("--no-gate", action="store_true", help="skip the health gate (needs --yes)")
    update.add_argument("--restart-slots", action="store_true", help="also restart slot units")
    update.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    update.add_argument(
        "--probation",
        action="store_true",
        help="after a commit, stay and watch the probation window (the daemon does this itself)",
    )

    sub.add_parser("status", parents=[common], help="installed, previous, available, holds")
    history = sub.add_parser("history", parents=[common], help="finished transactions")
    history.add_argument("--limit", type=int, default=20)
    sub.add_parser("explain", parents=[common], help="why nothing updated right now")

    pause = sub.add_parser("pause", parents=[common], help="pause automatic updates")
    pause.add_argument("--until", help="a duration (e.g. 2h, 7d) or an ISO time; default forever")
    pause.add_argument("--reason", default="")
    sub.add_parser("resume", parents=[common], help="resume automatic updates, lift a freeze")
    skip = sub.add_parser("skip", parents=[common], help="never install this version automatically")
    skip.add_argument("version")

    quarantine = sub.add_parser("quarantine", parents=[common], help="versions that failed a gate")
    qsub = quarantine.add_subparsers(dest="action", required=True)
    qsub.add_parser("list", parents=[action_common])
    qclear = qsub.add_parser("clear", parents=[action_common])
    qclear.add_argument("version", nargs="?")

    sub.add_parser("gate", parents=[common], help="run the health gate against what runs now")
    sub.add_parser(
        "recover",
        parents=[common],
        help="finish or undo an interrupted transaction (also automatic)",
    )

    config = sub.add_parser("config", parents=[common], help="show or validate the configuration")
    csub = config.add_subparsers(dest="action", required=True)
    csub.add_parser("show", parents=[action_common])
    csub.add_parser("validate", parents=[action_common])
    csub.add_parser(
        "edit",
        parents=[action_common],
        help="edit in $VISUAL/$EDITOR, validate, replace atomically",
    )

    # --- daemon subcommand (watchdog_updater/daemon.py) ---
    daemon = sub.add_parser(
        "daemon", parents=[common], help="run the update scheduler (a systemd Type=notify service)"
    )
    daemon.add_argument(
        "--once",
        action="store_true",
        help="one scheduled cycle (recover, then update or check) and exit: for a timer unit",
    )
    # --- end daemon subcommand ---
    return parser


# --------------------------------------------------------------------------- output


def _console(*, stderr: bool) -> Console:
    from rich.console import Console

    no_color = bool(os.environ.get("NO_COLOR"))
    # emoji=False: "slot:a:" must not become an emoji; soft_wrap: never break lines for a pipe.
    return Console(stderr=stderr, highlight=False, emoji=False, no_color=no_color, soft_wrap=True)


class Output:
    """Human output through rich (no colour off a TTY or with NO_COLOR), or JSON."""

    def __init__(self, *, json_mode: bool, verbose: bool) -> None:
        self.json_mode = json_mode
        self.verbose = verbose

    # Built at first use: a --json run (the daemon's, a script's) never loads rich (~4 MiB).
    @functools.cached_property
    def console(self) -> Console:
        return _console(stderr=False)

    @functools.cached_property
    def err(self) -> Console:
        return _console(stderr=True)

    def emit(self, document: Any, human: Callable[[], None]) -> None:
        if self.json_mode:
            sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
        else:
            human()

    def line(self, text: str) -> None:
        self.console.print(text, markup=False)

    def lines(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.line(text)

    def event(self, event: Any) -> None:
        if self.json_mode:
            return
        if event.kind == "probe" and self.err.is_terminal:
            self._gate_view.update(event.data)
            return
        self._gate_view.stop()
        style = {"step": "bold", "probe": "dim", "outcome": "bold", "info": ""}.get(event.kind, "")
        prefix = {"step": "==>", "probe": "   ", "outcome": "==>", "info": "   "}.get(
            event.kind, ""
        )
        self.err.print(f"{prefix} {event.message}", style=style, markup=False)

    @functools.cached_property
    def _gate_view(self) -> GateView:
        return GateView(self.err)


class GateView:
    """A live table of the gate's probes on a terminal: each probe's last result and counts."""

    _STYLE: ClassVar[dict[str, str]] = {"pass": "green", "fail": "yellow", "fatal": "bold red"}

    def __init__(self, console: Any) -> None:
        self.console = console
        self.rows: dict[str, tuple[str, str, int, int]] = {}
        self.live: Any = None

    def update(self, data: dict[str, Any]) -> None:
        from rich.live import Live

        probe, outcome = str(data["probe"]), str(data["outcome"])
        _, _, passes, failures = self.rows.get(probe, ("", "", 0, 0))
        passed = outcome == "pass"
        self.rows[probe] = (outcome, str(data["detail"]), passes + passed, failures + (not passed))
        if self.live is None:
            self.live = Live(self._table(), console=self.console, auto_refresh=False)
            self.live.start()
        self.live.update(self._table(), refresh=True)

    def _table(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        table = Table(title="health gate", title_justify="left", expand=False)
        for column in ("probe", "last", "passes", "failures", "evidence"):
            table.add_column(column, overflow="ellipsis", no_wrap=column != "evidence")
        for probe, (outcome, detail, passes, failures) in self.rows.items():
            table.add_row(
                probe,
                Text(outcome, style=self._STYLE.get(outcome, "")),
                str(passes),
                str(failures),
                Text(detail[:160]),
            )
        return table

    def stop(self) -> None:
        """End the live view (the table stays on screen); the next gate starts a fresh one."""
        if self.live is not None:
            self.live.stop()
            self.live = None
            self.rows = {}


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    if ts == float("inf"):
        return "until resumed"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# --------------------------------------------------------------------------- helpers


def _load(args: argparse.Namespace) -> Any:
    from watchdog_updater.app import App
    from watchdog_updater.config import load_config

    root: Path = args.root
    path = args.config or (root / "etc/hal0/hal0.toml")
    config = load_config(path, missing_ok=args.config is None)
    return App.create(root, config)


def _require_write(app: Any) -> None:
    """Changing the system needs root, unless --root is a writable sandbox."""
    if os.geteuid() == 0:
        return
    root = app.layout.root
    if root.resolve() != Path("/") and os.access(root, os.W_OK):
        return
    raise PermissionRefused(
        "this command changes the system and needs root",
        hint="run it with sudo, or point --root at a writable sandbox",
    )


def _recover(app: Any, out: Output) -> None:
    """Finish or undo an interrupted transaction before doing anything else (lock held)."""
    result = app.updater(out.event).recover()
    if result is not None and not out.json_mode:
        out.err.print(f"recovered: {result.message}", markup=False)


def _progress(out: Output) -> Callable[[int, int | None], None] | None:
    if out.json_mode or not out.err.is_terminal:
        return None
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=out.err,
        transient=True,
    )
    task = bar.add_task("download", total=None)
    bar.start()

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)
        if total is not None and done >= total:
            bar.stop()

    return update


# --------------------------------------------------------------------------- commands


def _cmd_update(args: argparse.Namespace, out: Output) -> int:
    app = _load(args)
    if args.to and not args.rollback:
        raise ConfigError("--to needs --rollback")
    if args.want and (args.rollback or args.check or args.dry_run):
        mode = "--rollback" if args.rollback else "--check" if args.check else "--dry-run"
        raise ConfigError(  # it would be silently ignored
            f"--version applies to an update, not to {mode}",
            hint="`update --check` shows what the channel offers; `--rollback --to VERSION` "
            "returns to a retained version",
        )
    if args.no_gate and not args.yes:
        raise ConfigError(
            "--no-gate skips the health gate and the automatic rollback",
            hint="add --yes to confirm; the skip is recorded in the history",
        )
    if args.check:
        return _cmd_check(app, args, out)
    if args.dry_run:
        return _cmd_plan(app, args, out)
    _require_write(app)
    with app.lock():
        _recover(app, out)
        updater = app.updater(out.event)
        if args.rollback:
            result = updater.rollback(args.to, gate=not args.no_gate)
        else:
            if args.want:
                offer = updater.check(args.channel, force=args.force)
                offered = str(offer.candidate.version) if offer.candidate else None
                if offered != args.want:
                    raise ConfigError(
                        f"the {offer.channel} channel offers {offered}, not {args.want}",
                        hint="a retained version is reached with `update --rollback --to VERSION`",
                    )
            result = updater.update(
                args.channel,
                force=args.force,
                gate=not args.no_gate,
                restart_slots=args.restart_slots,
                progress=_progress(out),
            )
            if args.probation and result.outcome is Outcome.COMMITTED:
                result = updater.watch_probation() or result
    document = {
        "action": result.action,
        "outcome": result.outcome.value if result.outcome else None,
        "message": result.message,
        "from": result.from_version,
        "to": result.to_version,
        "gate": result.gate.to_json() if result.gate else None,
        "rollback_gate": result.rollback_gate.to_json() if result.rollback_gate else None,
        "exit_code": int(result.exit_code),
    }
    out.emit(document, lambda: out.line(result.message))
    return int(result.exit_code)


def _try_recover(app: Any, out: Output) -> None:
    """Read-mostly commands recover too when they can take the lock; a busy lock is fine."""
    from watchdog_updater.errors import BusyError

    if os.geteuid() != 0 and not os.access(app.layout.root, os.W_OK):
        return
    try:
        with app.lock("check"):
            _recover(app, out)
    except BusyError:
        return


def _cmd_check(app: Any, args: argparse.Namespace, out: Output) -> int:
    _try_recover(app, out)
    updater = app.updater(out.event)
    offer = updater.check(args.channel, force=args.force)
    code = ExitCode.UPDATE_AVAILABLE if offer.available else ExitCode.OK

    def human() -> None:
        out.line(f"installed: {offer.installed or 'none'}")
        c = offer.candidate
        if c is not None:
            released = c.released_at.isoformat() if c.released_at else "unknown"
            out.line(f"offered:   {c.version} ({c.channel}, released {released})")
        out.line(offer.reason)

    out.emit({**offer.to_json(), "exit_code": int(code)}, human)
    return int(code)


def _cmd_plan(app: Any, args: argparse.Namespace, out: Output) -> int:
    updater = app.updater(out.event)
    installed = updater.installed_version()
    steps: list[str] = []
    if args.rollback:
        target = args.to or updater.previous_version()
        steps = [
            f"swap current {installed} -> {target}",
            "restart " + ", ".join(app.config.services.restart),
            "health gate" if not args.no_gate else "NO health gate",
        ]
        available = target is not None
    else:
        offer = updater.check(args.channel, force=args.force)
        available = offer.available
        if offer.available and offer.candidate is not None:
            v = offer.candidate.version
            steps = [
                f"download {offer.candidate.url} and verify digest and signature",
                f"unpack into {app.layout.version_dir(str(v))}",
                f"swap current {installed} -> {v} (previous -> {installed})",
                *(f"run hook {' '.join(h)}" for h in app.config.install.post_swap),
                "restart " + ", ".join(app.config.services.restart),
                "health gate, roll back automatically on failure"
                if not args.no_gate
                else "NO health gate",
            ]
        else:
            steps = [f"nothing to do: {offer.reason}"]
    out.emit(
        {"dry_run": True, "available": available, "steps": steps},
        lambda: out.lines(f"{i}. {s}" for i, s in enumerate(steps, 1)),
    )
    return int(ExitCode.OK)


def _status_document(app: Any) -> dict[str, Any]:
    from watchdog_updater import links

    layout = app.layout
    store = app.store
    journal = app.journal
    holds = store.holds()
    paused = holds.paused(time.time())
    memory = store.channel_memory(app.config.channel)
    history = journal.history(limit=1)
    tx = journal.current()
    return {
        "root": str(layout.root),
        "channel": app.config.channel,
        "installed": links.read_link_version(layout, layout.current_link),
        "previous": links.read_link_version(layout, layout.previous_link),
        "retained": links.installed_versions(layout),
        "available": memory.version if memory else None,
        "last_check": memory.accepted_at if memory else None,
        "transaction": tx.to_json() if tx else None,
        "last": history[-1] if history else None,
        # A pause that has run out is no pause: reported as none, as the daemon treats it.
        "paused_until": holds.to_json()["paused_until"] if paused else None,
        "pause_reason": holds.pause_reason if paused else None,
        "skipped": list(holds.skipped),
        "frozen": holds.frozen_reason,
        "quarantine": {v: e.to_json() for v, e in store.quarantine().items()},
    }


def _cmd_status(args: argparse.Namespace, out: Output) -> int:
    app = _load(args)
    doc = _status_document(app)

    def human() -> None:
        out.line(f"installed:   {doc['installed'] or 'none'}")
        out.line(f"previous:    {doc['previous'] or 'none'}")
        out.line(f"retained:    {', '.join(doc['retained']) or 'none'}")
        out.line(f"channel:     {doc['channel']}")
        out.line(f"available:   {doc['available'] or 'unknown (no check yet)'}")
        out.line(f"last check:  {_fmt_time(doc['last_check'])}")
        if doc["transaction"]:
            tx = doc["transaction"]
            out.line(
                f"in flight:   {tx['kind']} {tx['from_version']} -> {tx['to_version']}, step {tx['step']}"
            )
        if doc["last"]:
            last = doc["last"]
            out.line(f"last:        {last['outcome']}: {last['reason']}")
            gate = (last.get("details") or {}).get("gate")
            for probe in (gate or {}).get("probes", []):
                last = probe.get("last") or {"outcome": "no result", "detail": ""}
                out.line(f"  probe {probe['probe']}: {last['outcome']} {last['detail']}")
        if doc["frozen"]:
            out.line(f"FROZEN:      {doc['frozen']}")
        if doc["paused_until"] is not None:
            until = doc["paused_until"]
            until_text = "resumed" if until == "forever" else _fmt_time(until)
            out.line(f"paused:      until {until_text} {doc['pause_reason'] or ''}")
        for version, entry in doc["quarantine"].items():
            out.line(f"quarantined: {version}: {entry['reason']}")

    out.emit(doc, human)
    return int(ExitCode.OK)


def _cmd_history(args: argparse.Namespace, out: Output) -> int:
    app = _load(args)
    entries = app.journal.history(limit=args.limit)

    def human() -> None:
        if not entries:
            out.line("no history yet")
        for e in entries:
            out.line(
                f"{_fmt_time(e['finished_at'])}  {e['kind']:<8} {e['from_version'] or '-'} -> "
                f"{e['to_version']}  {e['outcome']}: {e['reason']}"
            )

    out.emit({"history": entries}, human)
    return int(ExitCode.OK)


def _cmd_explain(args: argparse.Namespace, out: Output) -> int:
    app = _load(args)
    doc = _status_document(app)
    reasons: list[str] = []
    if doc["frozen"]:
        reasons.append(f"updates are frozen: {doc['frozen']} (lift with `resume` once healthy)")
    if not app.config.auto:
        reasons.append("automatic updates are off (update.auto = false): check only")
    code = ExitCode.OK
    try:
        offer = app.updater(out.event).check(None)
        reasons.append(offer.reason)
        if offer.available:
            code = ExitCode.UPDATE_AVAILABLE
    except Error as e:
        reasons.append(f"the channel check failed: {e}")
        code = e.exit_code
    out.emit({"reasons": reasons, "status": doc}, lambda: out.lines(reasons))
    return int(code)


def _parse_until(text: str | None, now: float) -> float:
    from datetime import datetime

    from watchdog_updater.config import parse_duration

    if text is None:
        return float("inf")
    try:
        until = now + parse_duration(text)
    except ValueError:
        try:
            until = datetime.fromisoformat(text).timestamp()
        except ValueError as e:
            raise ConfigError(
                f"--until: expected a duration (2h, 7d) or an ISO time, got {text!r}"
            ) from e
    if until <= now:  # a pause that is over before it starts: surely a typo
        raise ConfigError(
            f"--until {text}: that is not in the future", hint="give a later time or a duration"
        )
    return until


def _cmd_holds(args: argparse.Namespace, out: Output) -> int:
    from watchdog_updater.state import Holds

    app = _load(args)
    _require_write(app)
    store = app.store
    holds = store.holds()
    if args.command == "pause":
        holds = dataclasses.replace(
            holds, paused_until=_parse_until(args.until, time.time()), pause_reason=args.reason
        )
        message = (
            f"paused {'until ' + _fmt_time(holds.paused_until) if args.until else 'until resumed'}"
        )
    elif args.command == "resume":
        message = "resumed" + (" and lifted the freeze" if holds.frozen_reason else "")
        holds = Holds(skipped=holds.skipped)
    else:
        holds = dataclasses.replace(holds, skipped=tuple(sorted({*holds.skipped, args.version})))
        message = f"{args.version} will be skipped"
    store.save_holds(holds)
    out.emit({"message": message, "holds": holds.to_json()}, lambda: out.line(message))
    return int(ExitCode.OK)


def _cmd_quarantine(args: argparse.Namespace, out: Output) -> int:
    app = _load(args)
    store = app.store
    if args.action == "list":
        entries = {v: e.to_json() for v, e in store.quarantine().items()}

        def human() -> None:
            if not entries:
                out.line("no quarantined versions")
            for v, e in entries.items():
                out.line(f"{v}: {e['reason']} (probe {e['failed_probe']}, {_fmt_time(e['at'])})")

        out.emit({"quarantine": entries}, human)
        return int(ExitCode.OK)
    _require_write(app)
    cleared = store.clear_quarantine(args.version)
    message = f"cleared: {', '.join(cleared)}" if cleared else "nothing to clear"
    out.emit({"cleared": cleared}, lambda: out.line(message))
    return int(ExitCode.OK)


def _cmd_gate(args: argparse.Namespace, out: Output) -> int:
    from watchdog_updater.health.policy import Verdict

    app = _load(args)
    decision = app.updater(out.event).run_gate()
    healthy = decision.verdict is Verdict.HEALTHY
    out.emit(decision.to_json(), lambda: out.line(f"{decision.verdict.value}: {decision.reason}"))
    return int(ExitCode.OK if healthy else ExitCode.FAILED)


def _cmd_recover(args: argparse.Namespace, out: Output) -> int:
    app = _load(args)
    _require_write(app)
    with app.lock("recovery"):
        result = app.updater(out.event).recover()
    if result is None:
        out.emit(
            {"recovered": False, "message": "nothing to recover"},
            lambda: out.line("nothing to recover"),
        )
        return int(ExitCode.OK)
    document = {
        "recovered": True,
        "outcome": result.outcome.value if result.outcome else None,
        "message": result.message,
        "from": result.from_version,
        "to": result.to_version,
    }
    out.emit(document, lambda: out.line(result.message))
    return int(result.exit_code)


def _cmd_config_edit(args: argparse.Namespace, out: Output) -> int:
    from watchdog_updater.config_edit import edit_config, editor_command

    path = args.config or (args.root / "etc/hal0/hal0.toml")
    if os.geteuid() != 0 and not os.access(path.parent, os.W_OK):
        raise PermissionRefused(f"editing {path} needs root", hint="run it with sudo")

    def ask(prompt: str) -> str:
        try:
            return input(prompt)
        except EOFError:  # nobody to answer: keep the original
            return "a"

    editor = editor_command(os.environ.get("VISUAL"), os.environ.get("EDITOR"))
    outcome = edit_config(
        path, editor=editor, ask=ask, report=lambda m: out.err.print(m, markup=False)
    )
    out.emit({"outcome": outcome, "path": str(path)}, lambda: out.line(f"{outcome}: {path}"))
    return int(ExitCode.OK if outcome in ("saved", "unchanged") else ExitCode.USAGE)


def _cmd_config(args: argparse.Namespace, out: Output) -> int:
    if args.action == "edit":  # before loading: an invalid file must still be editable
        return _cmd_config_edit(args, out)
    app = _load(args)
    if args.action == "validate":
        from watchdog_updater.trust import load_trusted_root

        # Other commands load the trusted root only when they first verify; a check of the
        # configuration must not wait for that night to say the root is unusable.
        load_trusted_root(app.config.verify.trusted_root)
        source = app.config.source or "defaults (no configuration file)"
        out.emit({"valid": True, "source": str(source)}, lambda: out.line(f"valid: {source}"))
        return int(ExitCode.OK)
    doc = dataclasses.asdict(app.config)
    out.emit(doc, lambda: out.line(json.dumps(doc, indent=2, default=str)))
    return int(ExitCode.OK)


# --- daemon command (watchdog_updater/daemon.py) ---
def _cmd_daemon(args: argparse.Namespace, out: Output) -> int:
    """Run the scheduler. The systemd variables are read here (the only place that reads the
    environment) and then removed, so that the daemon's job processes never pose as its main
    process towards systemd (sd_notify's unset_environment)."""
    import functools
    import logging
    import signal
    import threading

    from watchdog_updater.daemon import Daemon, parse_watchdog_usec, sd_notify
    from watchdog_updater.schedule import local_zone

    app = _load(args)
    _require_write(app)
    notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
    watchdog_usec = parse_watchdog_usec(
        os.environ.pop("WATCHDOG_USEC", None), os.environ.pop("WATCHDOG_PID", None), os.getpid()
    )
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(message)s",
            stream=sys.stderr,
        )
    # Every request of every probe is not news; the probes report their own results.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    daemon = Daemon(
        app,
        notify=functools.partial(sd_notify, socket_path=notify_socket),
        watchdog_usec=watchdog_usec,
        tz=local_zone(),
    )
    if args.once:
        return daemon.run_once()
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()
        daemon.wakeup()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return daemon.run(stop)


# --- end daemon command ---


COMMANDS: dict[str, Callable[[argparse.Namespace, Output], int]] = {
    "update": _cmd_update,
    "status": _cmd_status,
    "history": _cmd_history,
    "explain": _cmd_explain,
    "pause": _cmd_holds,
    "resume": _cmd_holds,
    "skip": _cmd_holds,
    "quarantine": _cmd_quarantine,
    "gate": _cmd_gate,
    "recover": _cmd_recover,
    "config": _cmd_config,
    "daemon": _cmd_daemon,
}


_PERMISSION_HINT = "the updater's state and the versions belong to root: run it with sudo"
_PERMISSION_HINT_ROOT = (
    "root was refused: look for an immutable file (lsattr), a read-only mount, or a security "
    "module (AppArmor, SELinux) in the way"
)


def _os_error(e: OSError) -> Error:
    if isinstance(e, PermissionError):  # e.g. a read-only command without access to the state dir
        return PermissionRefused(
            f"permission denied: {e.filename or e.strerror}",
            hint=_PERMISSION_HINT_ROOT if os.geteuid() == 0 else _PERMISSION_HINT,
        )
    where = f": {e.filename}" if e.filename else ""
    return Error(
        f"{e.strerror or e}{where}",
        hint="fix the cause (space, permissions, a read-only or missing mount) and retry; -v "
        "shows the underlying error",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    out = Output(json_mode=getattr(args, "json", False), verbose=getattr(args, "verbose", False))
    try:
        try:
            return COMMANDS[args.command](args, out)
        except OSError as e:  # outside the updater's own handling: say what, not a traceback
            if out.verbose or args.command == "daemon":  # where it came from: for the journal
                traceback.print_exc()
            raise _os_error(e) from e
    except Error as e:
        if out.json_mode:
            sys.stdout.write(
                json.dumps(
                    {
                        "error": e.message,
                        "hint": e.hint,
                        "kind": type(e).__name__,
                        "exit_code": int(e.exit_code),
                    },
                    indent=2,
                )
                + "\n"
            )
        text = (
            e.diagnostics()
            if out.verbose
            else (f"{e.message}\nhint: {e.hint}" if e.hint else e.message)
        )
        out.err.print(f"error: {text}", markup=False)
        return int(e.exit_code)
    except KeyboardInterrupt:
        out.err.print("interrupted", markup=False)
        return 130
