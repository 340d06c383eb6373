"""Fault campaign on the systemd sandbox: SIGKILL the updater at random instants across whole update,
automatic-rollback and manual-rollback cycles, run `recover`, then check everything.

One appliance (private systemd, fake hal0 units, signed HTTPS channel) lives through the whole
campaign: every cycle starts from what the previous recovery left, so damage left by one recovery
also breaks the cycles after it. Each kill:

1. picks a cycle: `update` to a freshly published healthy release, `update` to a release that
   crashes at start (its gate fails and the updater rolls back on its own), or `update --rollback`;
2. draws an instant with a seeded RNG inside the measured length of that kind of run: anywhere in
   the whole run, or inside one step's measured duration counted from the moment the journal shows
   that step (steps of a few milliseconds, such as the swap, are otherwise almost never hit);
3. sends SIGKILL to the CLI's process group (nsenter and the updater under it), never the sandbox;
4. runs `recover`, then asserts: `current` and every retained version dir hold exactly the files
   of their release; hal0-api is active and serves the current version; no staging, trash or
   temporary links; the lock is free; the journal is closed and holds exactly one well-formed record
   of the killed transaction, with the outcome its step calls for; only a gate verdict quarantines
   a release; config and data are untouched.

WATCHDOG_SYSTEMD_KILLS (default 200) shortens a run; WATCHDOG_SYSTEMD_SEED replays one. Each kill is
also written to campaign.jsonl in the test's tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import signal
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kit.appliance import Appliance, appliance
from tests.kit.fake_hal0 import http_get
from tests.kit.host import PROJECT
from tests.kit.recovery import check_invariants, history_entries, tree_fingerprint
from tests.kit.sigstore_kit import PrivateSigstore
from tests.kit.systemd_sandbox import require_systemd_sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.timeout(1200)]

KILLS = int(os.environ.get("WATCHDOG_SYSTEMD_KILLS", "200"))
SEED = int(os.environ.get("WATCHDOG_SYSTEMD_SEED", "20261126"))
BAD_BEHAVIOR = "crash_at_start"  # the gate fails fast on a crash loop: cheap rollback cycles

_UPDATE = ("fetch", "stage", "promote", "swap", "hooks", "restart", "gate")
_ROLLBACK = ("rollback-swap", "rollback-restart", "rollback-gate")
# The journal steps of each kind of cycle, in the order they happen.
STEPS: dict[str, tuple[str, ...]] = {
    "good": (*_UPDATE, "commit"),
    "bad": (*_UPDATE, *_ROLLBACK),
    "rollback": ("swap", "hooks", "restart", "gate", "commit"),
}
CYCLE_WEIGHTS = {"good": 0.45, "bad": 0.3, "rollback": 0.25}
# Where kills must land, with the minimum count at 200 kills (scaled down for shorter runs).
# "check" is before the journal opens a transaction (start-up, manifest fetch and verification).
PHASE_GROUPS: dict[str, tuple[tuple[str, ...], int]] = {
    "before the journal": (("check",), 10),
    "download/stage": (("fetch", "stage", "promote"), 10),
    "swap/hooks": (("swap", "hooks"), 10),
    "restart": (("restart",), 6),
    "gate": (("gate",), 15),
    "commit": (("commit",), 4),
    "rollback": (_ROLLBACK, 6),
}
# What the uninterrupted run of each cycle records: (outcome, reason fragment).
NATURAL = {
    "good": ("committed", "passed its health gate"),
    "bad": ("rolled-back", "failed its health gate"),
    "rollback": ("committed", "passed its health gate"),
}


@dataclass(frozen=True)
class Timing:
    """An uninterrupted run of one kind of cycle: wall time from launch, and each step's time."""

    total_s: float
    steps_s: Mapping[str, float]


@dataclass
class Kill:
    n: int
    cycle: str
    mode: str  # "run": anywhere in the run; "step": inside `target`'s measured duration
    target: str | None
    delay_s: float
    landed: bool = False
    # The journal step at the kill; "check": no transaction yet; "exit": already recorded.
    phase: str = ""
    outcome: str | None = None  # what the recovered transaction recorded
    current: str | None = None
    seconds: float = 0.0  # the whole kill: launch, kill, recovery, checks


def expected_record(cycle: str, phase: str) -> tuple[str, str] | None:
    """(outcome, reason fragment) of the killed transaction's record; None: it never began."""
    if phase == "check":
        return None
    if phase == "exit" or (cycle == "bad" and phase in ("gate", *_ROLLBACK)):
        return NATURAL[cycle]  # the verdict stands: a re-gate fails again, a rollback is finished
    if phase in ("fetch", "stage", "promote"):
        return ("aborted", f"interrupted by a crash at step {phase}")
    if phase == "commit":
        return ("committed", "interrupted by a crash at step commit")
    if cycle == "rollback" or phase == "gate":
        return ("committed", "passed its health gate")  # re-gated, and healthy
    return ("interrupted", f"interrupted by a crash at step {phase}")  # swapped back, no blame


def release_fingerprint(tarball: bytes) -> dict[str, str]:
    """:func:`tree_fingerprint` of the tree a release tarball unpacks to (top dir stripped)."""
    out: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile():
                data = tar.extractfile(member)
                assert data is not None
                digest = hashlib.sha256(data.read()).hexdigest()
                out[member.name.split("/", 1)[1]] = digest + ("+x" if member.mode & 0o111 else "")
    return out


def journal_step(intent: Path) -> str | None:
    try:
        return str(json.loads(intent.read_bytes())["step"])
    except FileNotFoundError:
        return None


def kill_in_run(
    proc: subprocess.Popen[bytes],
    intent: Path,
    *,
    launched: float,
    order: Sequence[str],
    target: str | None,
    delay_s: float,
) -> bool:
    """SIGKILL the run's process group ``delay_s`` after launch (no ``target``) or after the journal
    first shows ``target`` or a later step; False when the run ended first."""
    start = launched
    if target is not None:
        later = order[order.index(target) :]
        while journal_step(intent) not in later:
            if proc.poll() is not None:
                return False
            time.sleep(0.001)
        start = time.monotonic()
    time.sleep(max(0.0, start + delay_s - time.monotonic()))
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)  # nsenter and the updater it forked share the group
    return True


class Campaign:
    """The appliance, what was published, and what recovery must leave behind."""

    def __init__(self, app: Appliance, log: Path) -> None:
        self.app = app
        self.layout = app.host.layout
        self.intent = self.layout.state_dir / "transaction.json"
        self.log = log
        self.minor = 0
        initial = app.host.current()
        assert initial is not None
        self.fingerprints = {initial: tree_fingerprint(self.layout.version_dir(initial))}
        self.quarantined: set[str] = set()
        self.config = app.host.config_path.read_bytes()
        # Each kind of cycle alternates whole-run and step-anchored instants, and step-anchored
        # kills take its steps in turn: every step gets its share whatever the seed.
        self.modes = {cycle: itertools.cycle(("run", "step")) for cycle in STEPS}
        self.targets = {cycle: itertools.cycle(steps) for cycle, steps in STEPS.items()}

    def previous(self) -> str | None:
        link = self.layout.previous_link
        return link.resolve().name.removeprefix("hal0-") if link.is_symlink() else None

    def prepare(self, cycle: str) -> tuple[list[str], str, str]:
        """Publish what the cycle needs; its CLI arguments, from- and to-version."""
        current = self.app.host.current()
        assert current is not None
        if cycle == "rollback":
            previous = self.previous()
            assert previous is not None and previous != current, (current, previous)
            return ["update", "--rollback"], current, previous
        self.minor += 1
        version = f"1.{self.minor}.0"
        published = self.app.publish(version, "healthy" if cycle == "good" else BAD_BEHAVIOR)
        self.fingerprints[version] = release_fingerprint(published.tarball)
        return ["update"], current, version

    def launch(self, args: Sequence[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.app.cli_argv(*args),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=PROJECT,
            start_new_session=True,  # its own process group, so the kill reaches nsenter's child
        )

    def measure(self, cycle: str) -> Timing:
        """One uninterrupted cycle: its wall time and per-step durations from the journal."""
        args, _, to = self.prepare(cycle)
        started = time.monotonic()
        proc = self.launch(args)
        code = proc.wait(timeout=120)
        total = time.monotonic() - started
        last = history_entries(self.app.host)[-1]
        assert (code, last["to_version"]) == ((4 if cycle == "bad" else 0), to), last
        assert last["outcome"] == NATURAL[cycle][0], last
        if cycle == "bad":
            self.quarantined.add(to)
        return Timing(total, dict(last["durations_s"]))

    def kill_one(self, n: int, rng: random.Random, timings: Mapping[str, Timing]) -> Kill:
        cycle = rng.choices(list(CYCLE_WEIGHTS), weights=list(CYCLE_WEIGHTS.values()))[0]
        timing = timings[cycle]
        if next(self.modes[cycle]) == "run":
            kill = Kill(n, cycle, "run", None, rng.uniform(0, timing.total_s))
        else:
            target = next(self.targets[cycle])
            kill = Kill(n, cycle, "step", target, rng.uniform(0, timing.steps_s.get(target, 0.0)))
        started = time.monotonic()
        args, from_version, to_version = self.prepare(cycle)
        history_before = len(history_entries(self.app.host))
        launched = time.monotonic()
        proc = self.launch(args)
        try:
            kill.landed = kill_in_run(
                proc,
                self.intent,
                launched=launched,
                order=STEPS[cycle],
                target=kill.target,
                delay_s=kill.delay_s,
            )
        finally:
            proc.wait(timeout=120)
        open_tx = json.loads(self.intent.read_bytes()) if self.intent.exists() else None
        new = history_entries(self.app.host)[history_before:]
        if open_tx is not None and all(e["txid"] != open_tx["txid"] for e in new):
            kill.phase = str(open_tx["step"])
        else:  # never began, or already recorded (killed before or after dropping the intent)
            kill.phase = "exit" if new else "check"
        recover = self.app.cli("recover", "--json")
        try:
            self.check(kill, recover, from_version, to_version, history_before, open_tx)
        except AssertionError as e:  # say which kill, so that the seed replays it
            raise AssertionError(
                f"kill #{n} (seed {SEED}): {cycle} {from_version} -> {to_version}, {kill.mode} "
                f"{kill.target or 'run'} +{kill.delay_s:.3f} s, landed at {kill.phase}\n{e}"
            ) from e
        finally:
            kill.seconds = time.monotonic() - started
            with self.log.open("a") as f:
                f.write(json.dumps(asdict(kill)) + "\n")
        return kill

    def check(
        self,
        kill: Kill,
        recover: subprocess.CompletedProcess[str],
        from_version: str,
        to_version: str,
        history_before: int,
        open_tx: Mapping[str, Any] | None,
    ) -> None:
        expected = expected_record(kill.cycle, kill.phase)
        new = history_entries(self.app.host)[history_before:]
        # The journal: the killed transaction (if it began) is recorded exactly once, as its step
        # calls for, and names the versions this cycle moved between.
        if expected is None:
            assert new == [], "no transaction began, yet the history grew"
        else:
            assert len(new) == 1, f"one record per transaction, got {new}"
            record = new[0]
            if open_tx is not None:
                assert record["txid"] == open_tx["txid"], record
            assert (record["from_version"], record["to_version"]) == (from_version, to_version)
            assert record["outcome"] == expected[0], (expected, record)
            assert expected[1] in record["reason"], (expected, record)
            kill.outcome = record["outcome"]
        code = 4 if kill.outcome == "rolled-back" else 0
        if open_tx is None:  # nothing was open: nothing to do
            assert (recover.returncode, json.loads(recover.stdout)["recovered"]) == (0, False)
        elif kill.phase == "exit":  # recorded, only the intent was left: closing it is enough
            assert recover.returncode in (0, code), (recover.stdout, recover.stderr)
        else:
            assert recover.returncode == code, (recover.stdout, recover.stderr)
            said = json.loads(recover.stdout)
            assert (said["recovered"], said["outcome"]) == (True, kill.outcome), said
        if kill.outcome == "rolled-back" and "failed its health gate" in str(new[0]["reason"]):
            self.quarantined.add(to_version)  # a gate verdict: the one legitimate quarantine
        # Files: current and every retained version dir hold exactly their release's files.
        check_invariants(
            self.app.host,
            set(self.fingerprints),
            expected_files=self.fingerprints,
            quarantined=self.quarantined,
        )
        kill.current = self.app.host.current()
        assert kill.current == (to_version if kill.outcome == "committed" else from_version)
        for tree in self.layout.versions_dir.glob("hal0-*"):
            version = tree.name.removeprefix("hal0-")
            assert tree_fingerprint(tree) == self.fingerprints[version], f"{tree} differs"
        previous = self.previous()
        assert previous is None or self.layout.version_dir(previous).is_dir(), previous
        trash = [p.name for p in self.layout.cache_dir.glob(".hal0-*")]
        assert trash == [], f"leftovers in the download cache: {trash}"
        assert self.app.host.config_path.read_bytes() == self.config, "hal0.toml changed"
        # Service: hal0-api runs and serves the version `current` points at.
        unit = self.app.unit("hal0-api.service")
        assert (unit["ActiveState"], unit["SubState"]) == ("active", "running"), unit
        status, body = http_get(f"http://127.0.0.1:{self.app.ports.api}/api/health", timeout=5)
        assert (status, body and body.get("status")) == (200, "ok"), (status, body)
        assert body["version"] == kill.current, f"hal0-api serves {body}, current is {kill.current}"


@pytest.fixture
def campaign(tmp_path: Path, sigstore: PrivateSigstore) -> Iterator[Campaign]:
    require_systemd_sandbox()
    # RestartSec 0.2 s keeps crash loops short. No start limit: hal0-api restarts hundreds of
    # times in minutes here, and systemd would refuse the 6th start within 10 s.
    with appliance(tmp_path, sigstore=sigstore, api_restart_sec=0.2, start_rate_limit=False) as app:
        # A fast gate (2 passes 0.1 s apart) and a hook, so that the hooks step exists.
        app.configure(
            health={"interval": 0.1, "consecutive": 2, "deadline": 10, "probe_timeout": 2},
            install={"post_swap": [["true"]]},
        )
        yield Campaign(app, tmp_path / "campaign.jsonl")


def test_sigkill_update_and_rollback_cycles_on_systemd(campaign: Campaign) -> None:
    began = time.monotonic()
    rng = random.Random(SEED)
    print(f"\nfault campaign: {KILLS} kills, seed {SEED} (WATCHDOG_SYSTEMD_SEED replays it)")
    # Two uninterrupted runs of each kind: the shorter bounds where random instants may fall.
    runs: dict[str, list[Timing]] = {cycle: [] for cycle in STEPS}
    for _ in range(2):
        for cycle, measured in runs.items():
            measured.append(campaign.measure(cycle))
    timings = {
        cycle: Timing(
            min(t.total_s for t in measured),
            {s: min(t.steps_s.get(s, 0.0) for t in measured) for s in STEPS[cycle]},
        )
        for cycle, measured in runs.items()
    }
    for cycle, timing in timings.items():
        steps = ", ".join(f"{s} {timing.steps_s[s]:.3f}" for s in STEPS[cycle])
        print(f"measured {cycle}: {timing.total_s:.2f} s ({steps})")
    kills: list[Kill] = []
    missed = 0
    attempt = 0
    while len(kills) < KILLS and attempt < 2 * KILLS:
        kill = campaign.kill_one(attempt, rng, timings)
        attempt += 1
        if kill.landed:
            kills.append(kill)
        else:
            missed += 1  # the run ended before its instant; recovery was still checked
    # The appliance still works after the campaign: a good release commits, a bad one rolls back.
    for cycle in ("good", "bad"):
        campaign.measure(cycle)
    elapsed = time.monotonic() - began
    phases = Counter(k.phase for k in kills)
    groups = {name: sum(phases[s] for s in steps) for name, (steps, _) in PHASE_GROUPS.items()}
    print(f"{len(kills)} kills ({missed} runs ended before their instant) in {elapsed:.0f} s")
    print(f"by cycle: {dict(Counter(k.cycle for k in kills))}")
    print(f"by step: {dict(sorted(phases.items()))}")
    print(f"by phase group: {groups}")
    print(f"recorded outcomes: {dict(Counter(str(k.outcome) for k in kills))}")
    print(f"slowest kill: {max(k.seconds for k in kills):.1f} s; log: {campaign.log}")
    assert len(kills) == KILLS, f"only {len(kills)} of {KILLS} kills landed in {attempt} runs"
    assert missed <= KILLS // 4, f"{missed} runs ended before their instant: timings are off"
    short = {
        name: (groups[name], need * KILLS // 200)
        for name, (_, need) in PHASE_GROUPS.items()
        if groups[name] < need * KILLS // 200
    }
    assert short == {}, f"too few kills landed in (got, needed): {short}; seed {SEED}"
