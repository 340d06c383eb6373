"""The orchestrator: one update, one rollback, one recovery, as a handful of named steps.

Every step is written to the journal before it acts (:mod:`watchdog_updater.journal`). The rules
that make a crash or power cut at any instant safe:

- before the swap, nothing outside the cache and a hidden staging dir has changed: recovery removes
  the staging dir and records the transaction as aborted;
- from the swap until the verdict, ``current`` may point at either version: recovery re-runs the
  gate on the new version (``on_interrupted_gate = "regate"``, only when the gate step was reached)
  or swaps back to the old one; an interruption is recorded as such and never quarantines a release;
- during a rollback, recovery finishes the rollback.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from watchdog_updater import extract, links, retention
from watchdog_updater.errors import Error, ExitCode, HookError, InstallError, ServiceError
from watchdog_updater.gateplan import build_probes
from watchdog_updater.health.policy import (
    GateDecision,
    ProbeOutcome,
    ProbeResult,
    Verdict,
)
from watchdog_updater.hooks import run_hooks
from watchdog_updater.journal import (
    ROLLBACK_STEPS,
    SWAPPED_STEPS,
    HistoryEntry,
    Journal,
    Outcome,
    Step,
    Transaction,
)
from watchdog_updater.state import Holds, Probation, QuarantineEntry, StateStore
from watchdog_updater.versions import Version, VersionError, parse_version

if TYPE_CHECKING:
    from pathlib import Path

    from watchdog_updater.config import Config
    from watchdog_updater.health.probes import Probe
    from watchdog_updater.layout import Layout
    from watchdog_updater.releases import Offer, ReleaseSource, VerifiedManifest
    from watchdog_updater.services import ServiceManager

__all__ = ["Event", "Reporter", "Result", "Updater", "ignore_events", "version_order_key"]


@dataclass(frozen=True)
class Event:
    """Progress reported to the CLI renderer, the daemon's status line and metrics."""

    kind: str  # "step", "download", "probe", "outcome", "info"
    message: str
    data: dict[str, Any] = field(default_factory=dict)


Reporter = Callable[[Event], None]


def ignore_events(_event: Event) -> None:
    return None


@dataclass(frozen=True)
class Result:
    """What a command achieved; the CLI maps it to an exit code."""

    action: str  # "update", "rollback", "recover", "noop"
    outcome: Outcome | None
    message: str
    from_version: str | None = None
    to_version: str | None = None
    gate: GateDecision | None = None
    rollback_gate: GateDecision | None = None
    entry: HistoryEntry | None = None

    @property
    def exit_code(self) -> ExitCode:
        return {
            None: ExitCode.OK,
            Outcome.COMMITTED: ExitCode.OK,
            Outcome.ROLLED_BACK: ExitCode.ROLLED_BACK,
            Outcome.ROLLBACK_UNHEALTHY: ExitCode.ROLLBACK_UNHEALTHY,
            Outcome.FAILED: ExitCode.FAILED,
            Outcome.ABORTED: ExitCode.OK,  # only recovery produces it: the clean-up succeeded
            Outcome.INTERRUPTED: ExitCode.OK,
        }[self.outcome]


def version_order_key(version: str) -> tuple[int, Any]:
    """Release order for retention; unparseable names sort first (deleted first)."""
    try:
        return (1, parse_version(version))
    except VersionError:
        return (0, version)


def _decision_json(decision: GateDecision | None) -> dict[str, Any] | None:
    return None if decision is None else decision.to_json()


class Updater:
    """Applies, gates and rolls back hal0 versions under one :class:`Layout`.

    The caller holds the update lock (:class:`watchdog_updater.lock.UpdateLock`) around every
    method that changes the system.
    """

    def __init__(
        self,
        config: Config,
        layout: Layout,
        *,
        journal: Journal,
        store: StateStore,
        services: Callable[[], ServiceManager],
        source: Callable[[], ReleaseSource],
        probes: Callable[[ServiceManager, Sequence[str]], Sequence[Probe]] | None = None,
        reporter: Reporter = ignore_events,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.layout = layout
        self.journal = journal
        self.store = store
        self._services_factory = services
        self._source_factory = source
        self._services: ServiceManager | None = None
        self._source: ReleaseSource | None = None
        self._probes_factory = probes
        self.report = reporter
        self.clock = clock

    # --------------------------------------------------------------------------- lazy parts
    @property
    def services(self) -> ServiceManager:
        if self._services is None:
            self._services = self._services_factory()
        return self._services

    @property
    def source(self) -> ReleaseSource:
        if self._source is None:
            self._source = self._source_factory()
        return self._source

    # --------------------------------------------------------------------------- reading
    def installed_version(self) -> str | None:
        return links.read_link_version(self.layout, self.layout.current_link)

    def previous_version(self) -> str | None:
        return links.read_link_version(self.layout, self.layout.previous_link)

    def check(self, channel: str | None = None, *, force: bool = False) -> Offer:
        """Fetch and verify the channel's manifest and say whether it should be installed."""
        return self._offer(channel or self.config.channel, force=force)[1]

    def _offer(self, channel: str, *, force: bool) -> tuple[VerifiedManifest, Offer]:
        from watchdog_updater.releases import evaluate_offer

        now = self.clock()
        verified = self.source.fetch_manifest(channel, now=now)
        self.source.remember(channel, verified, now=now)
        offer = evaluate_offer(
            verified.manifest,
            installed=_parse_or_none(self.installed_version()),
            channel=channel,
            quarantine=self.store.quarantine(),
            holds=self.store.holds(),
            min_release_age_s=self.config.min_release_age_s,
            allow_downgrade=self.config.allow_downgrade,
            now=now,
            force=force,
        )
        return verified, offer

    # --------------------------------------------------------------------------- update
    def update(
        self,
        channel: str | None = None,
        *,
        force: bool = False,
        gate: bool = True,
        restart_slots: bool = False,
        trigger: str = "cli",
        progress: Callable[[int, int | None], None] | None = None,
    ) -> Result:
        """Check, then install the offered release with a gate and automatic rollback."""
        channel = channel or self.config.channel
        verified, offer = self._offer(channel, force=force)
        installed = self.installed_version()
        if not offer.available:
            return Result("noop", None, offer.reason, installed, installed)
        manifest = verified.manifest
        target = str(manifest.version)
        tx = self.journal.begin(
            kind="update",
            from_version=installed,
            to_version=target,
            channel=channel,
            trigger=trigger,
            step=Step.FETCH,
            digest_sha256=manifest.digest_sha256,
            gate=gate,
            previous_before=self.previous_version(),
        )
        self._step(tx, f"downloading and verifying {target}")
        try:
            cached = self.source.download(verified, progress=progress)
            tx = self._stage(tx, cached.tarball)
        except Error as e:
            self._cleanup_staging()
            entry = self.journal.finish(tx, Outcome.FAILED, str(e))
            self._outcome(entry)
            raise
        return self._activate(tx, restart_slots=restart_slots)

    def _stage(self, tx: Transaction, tarball: Path) -> Transaction:
        target = tx.to_version
        version_dir = self.layout.version_dir(target)
        if version_dir.is_dir() and not version_dir.is_symlink():
            # A retained copy of this version is already unpacked and complete (it was renamed
            # into place only after a full flush): reuse it.
            return tx
        tx = self.journal.advance(tx, Step.STAGE)
        self._step(tx, f"unpacking {target}")
        staging = self.layout.staging_dir(tx.txid)
        self.layout.versions_dir.mkdir(parents=True, exist_ok=True)
        extract.extract_release(tarball, staging, version=target, limits=self.config.install.limits)
        tx = self.journal.advance(tx, Step.PROMOTE)
        links.promote_staging(staging, version_dir)
        return tx

    def _activate(self, tx: Transaction, *, restart_slots: bool = False) -> Result:
        """Swap, hooks, restart, gate; commit or roll back."""
        tx = self.journal.advance(tx, Step.SWAP)
        self._step(tx, f"switching current to {tx.to_version}")
        self._point_links(current=tx.to_version, previous=tx.from_version)
        if self.config.install.post_swap:
            tx = self.journal.advance(tx, Step.HOOKS)
            self._step(tx, "running activation hooks")
            try:
                self._run_hooks(tx.to_version)
            except HookError as e:
                self._point_links(current=tx.from_version, previous=tx.previous_before)
                entry = self.journal.finish(tx, Outcome.FAILED, str(e))
                self._outcome(entry)
                raise
        return self._restart_and_gate(tx, restart_slots=restart_slots)

    def _restart_and_gate(self, tx: Transaction, *, restart_slots: bool = False) -> Result:
        tx = self.journal.advance(tx, Step.RESTART)
        units = self._restart_set(restart_slots)
        self._step(tx, f"restarting {', '.join(units)}" if units else "no services to restart")
        restart_error = self._restart(restart_slots)
        tx = self.journal.advance(tx, Step.GATE)
        if restart_error is not None:
            decision = _failure_decision("restart", restart_error)
        elif not tx.gate:
            decision = None
        else:
            self._step(tx, f"health gate on {tx.to_version}")
            decision = self.run_gate()
        if decision is None or decision.verdict is Verdict.HEALTHY:
            return self._commit(tx, decision)
        return self._rollback_after_failure(tx, decision)

    def _commit(self, tx: Transaction, decision: GateDecision | None) -> Result:
        tx = self.journal.advance(tx, Step.COMMIT)
        probation = self.config.health.probation
        if tx.kind == "update" and decision is not None and probation is not None:
            # Saved before retention runs, which keeps what its rollback would restore.
            self.store.save_probation(
                Probation(
                    version=tx.to_version,
                    from_version=tx.from_version,
                    previous_before=tx.previous_before,
                    digest_sha256=tx.digest_sha256,
                    channel=tx.channel,
                    until=self.clock() + probation.duration_s,
                )
            )
        self._collect_garbage(protect={tx.to_version})
        reason = (
            f"{tx.to_version} passed its health gate"
            if decision is not None
            else f"{tx.to_version} committed WITHOUT a health gate (--no-gate)"
        )
        entry = self.journal.finish(
            tx, Outcome.COMMITTED, reason, {"gate": _decision_json(decision)}
        )
        self._outcome(entry)
        return Result(
            tx.kind,
            Outcome.COMMITTED,
            reason,
            tx.from_version,
            tx.to_version,
            decision,
            entry=entry,
        )

    # --------------------------------------------------------------------------- rollback
    def _rollback_after_failure(
        self,
        tx: Transaction,
        decision: GateDecision,
        *,
        quarantine: bool = True,
        phase: str = "its health gate",
    ) -> Result:
        """The new version failed its gate: quarantine it, swap back, gate the old version."""
        failed = tx.to_version
        reason = f"{failed} failed {phase}: {decision.reason}"
        if quarantine and tx.kind == "update":
            self.store.add_quarantine(
                QuarantineEntry(
                    version=failed,
                    digest_sha256=tx.digest_sha256,
                    failed_probe=decision.failed_probe,
                    reason=decision.reason,
                    evidence=decision.evidence(),
                    at=self.clock(),
                )
            )
        tx = self.journal.advance(tx, Step.ROLLBACK_SWAP, reason=reason)
        return self._finish_rollback(tx, decision)

    def _finish_rollback(self, tx: Transaction, decision: GateDecision | None) -> Result:
        """Swap back to ``tx.from_version`` and gate it: ``rolled-back``, or ``interrupted`` when
        what is undone is an interruption (a crash or power cut after the swap), not a verdict."""
        reason = tx.reason or "rollback"
        if tx.from_version is None:
            return self._unhealthy(
                tx, decision, None, f"{reason}; no previous version to return to"
            )
        self._step(tx, f"rolling back to {tx.from_version}")
        self._point_links(current=tx.from_version, previous=tx.previous_before)
        tx = self.journal.advance(tx, Step.ROLLBACK_RESTART)
        restart_error = self._restart(False)
        tx = self.journal.advance(tx, Step.ROLLBACK_GATE)
        if restart_error is not None:
            old = _failure_decision("restart", restart_error)
        else:
            self._step(tx, f"health gate on {tx.from_version} (rollback)")
            old = self.run_gate()
        if old.verdict is not Verdict.HEALTHY:
            return self._unhealthy(tx, decision, old, reason)
        outcome = Outcome.INTERRUPTED if _undoes_interruption(tx) else Outcome.ROLLED_BACK
        entry = self.journal.finish(
            tx,
            outcome,
            reason,
            {"gate": _decision_json(decision), "rollback_gate": _decision_json(old)},
        )
        self._outcome(entry)
        return Result(
            tx.kind,
            outcome,
            reason,
            tx.to_version,
            tx.from_version,
            decision,
            old,
            entry,
        )

    def _unhealthy(
        self,
        tx: Transaction,
        decision: GateDecision | None,
        old: GateDecision | None,
        reason: str,
    ) -> Result:
        """The version we returned to is unhealthy too: freeze updates and say so loudly."""
        why = f"manual attention needed: {reason}; the rollback target is unhealthy too" + (
            f" ({old.reason})" if old is not None else ""
        )
        holds = self.store.holds()
        self.store.save_holds(
            Holds(
                paused_until=holds.paused_until,
                pause_reason=holds.pause_reason,
                skipped=holds.skipped,
                frozen_reason=why,
                frozen_at=self.clock(),
            )
        )
        entry = self.journal.finish(
            tx,
            Outcome.ROLLBACK_UNHEALTHY,
            why,
            {"gate": _decision_json(decision), "rollback_gate": _decision_json(old)},
        )
        self._outcome(entry)
        return Result(
            tx.kind,
            Outcome.ROLLBACK_UNHEALTHY,
            why,
            tx.to_version,
            tx.from_version,
            decision,
            old,
            entry,
        )

    def rollback(self, to: str | None = None, *, gate: bool = True, trigger: str = "cli") -> Result:
        """Manual rollback: point ``current`` at ``previous`` (or ``to``), restart, gate."""
        current = self.installed_version()
        target = to or self.previous_version()
        if target is None:
            raise InstallError(
                "no previous version to roll back to",
                hint="list retained versions with `status`, then use `update --rollback --to V`",
            )
        if target == current:
            return Result("rollback", None, f"{target} is already current", current, current)
        if not self.layout.version_dir(target).is_dir():
            raise InstallError(
                f"version {target} is not installed here (retained: "
                f"{', '.join(links.installed_versions(self.layout)) or 'none'})"
            )
        tx = self.journal.begin(
            kind="rollback",
            from_version=current,
            to_version=target,
            channel=None,
            trigger=trigger,
            step=Step.SWAP,
            gate=gate,
            previous_before=self.previous_version(),
        )
        return self._activate(tx)

    # --------------------------------------------------------------------------- probation
    def watch_probation(self, *, should_stop: Callable[[], bool] | None = None) -> Result | None:
        """Watch the committed version until its probation ends; roll back on sustained failure.

        Returns None when there is nothing to watch, when probation passed, or when ``should_stop``
        interrupted it (the window stays recorded and is resumed later). Call with the lock held.
        """
        from watchdog_updater.health.runner import DEFAULT_ABANDON_SLACK_S, run_probation

        probation = self.store.probation()
        if probation is None:
            return None
        remaining = probation.until - self.clock()
        configured = self.config.health.probation
        if configured is None or remaining <= 0 or self.installed_version() != probation.version:
            if configured is not None and remaining <= 0:
                self.report(Event("info", f"{probation.version}: probation ended unwatched"))
            self.store.clear_probation()
            return None
        # Resumed near its end, the window still lets one round of probes finish: "no passing
        # result" must be the service's doing, never a window shorter than a probe.
        window = max(
            min(remaining, configured.duration_s),
            configured.probe_timeout_s + DEFAULT_ABANDON_SLACK_S,
        )
        policy = dataclasses.replace(configured, duration_s=window)
        decision = run_probation(
            self._build_probes(), policy, on_result=self._probe_event, should_stop=should_stop
        )
        if decision.verdict is Verdict.PENDING:
            return None
        self.store.clear_probation()
        if decision.verdict is Verdict.HEALTHY:
            self.report(Event("info", f"{probation.version} passed probation"))
            return None
        tx = self.journal.begin(
            kind="update",
            from_version=probation.from_version,
            to_version=probation.version,
            channel=probation.channel,
            trigger="probation",
            step=Step.GATE,
            digest_sha256=probation.digest_sha256,
            previous_before=probation.previous_before,
        )
        return self._rollback_after_failure(tx, decision, phase="probation")

    # --------------------------------------------------------------------------- recovery
    def recover(self) -> Result | None:
        """Finish or undo an interrupted transaction. Call with the lock held, before anything.

        Whatever the transaction's step, leftovers of the interrupted process (staging and trash
        dirs, temporary links) are removed afterwards: none of them is ever pointed at.
        """
        result = self._recover_transaction()
        self._cleanup_staging()
        return result

    def _recover_transaction(self) -> Result | None:
        tx = self.journal.current()
        if tx is None:
            return None
        finished = self.journal.finished_entry(tx.txid)
        if finished is not None:  # killed between recording the outcome and dropping the intent
            self.journal.drop_intent()
            self.report(
                Event("info", f"transaction {tx.txid} had finished: {finished.get('reason')}")
            )
            return None
        cause = "a power cut or reboot" if tx.boot_id != self.journal.boot_id else "a crash"
        note = f"{_INTERRUPTED_BY}{cause} at step {tx.step.value}"
        self.report(Event("info", f"recovering transaction {tx.txid}: {note}"))
        if tx.step in (Step.FETCH, Step.STAGE, Step.PROMOTE):
            entry = self.journal.finish(tx, Outcome.ABORTED, f"{note}; nothing was changed")
            self._outcome(entry)
            return Result(
                "recover",
                Outcome.ABORTED,
                entry.reason,
                tx.from_version,
                tx.from_version,
                entry=entry,
            )
        if tx.step is Step.COMMIT:
            entry = self.journal.finish(
                tx, Outcome.COMMITTED, f"{tx.to_version} committed ({note} after the verdict)"
            )
            self._outcome(entry)
            return Result(
                "recover",
                Outcome.COMMITTED,
                entry.reason,
                tx.from_version,
                tx.to_version,
                entry=entry,
            )
        if tx.step in ROLLBACK_STEPS:
            tx = self.journal.advance(tx, Step.ROLLBACK_SWAP)
            return self._finish_rollback(tx, None)
        assert tx.step in SWAPPED_STEPS
        regate = tx.kind == "rollback" or (
            self.config.health.on_interrupted_gate == "regate" and tx.step is Step.GATE
        )
        if regate and self.layout.version_dir(tx.to_version).is_dir():
            # Bring the transaction's target back up and judge it again; a genuine gate failure
            # still rolls back (and quarantines), the interruption itself is not held against it.
            self._point_links(current=tx.to_version, previous=tx.from_version)
            return self._restart_and_gate(tx)
        # Undo: back to the old version, gated. Recorded as an interruption, no quarantine.
        tx = self.journal.advance(tx, Step.ROLLBACK_SWAP, reason=note)
        return self._finish_rollback(tx, None)

    # --------------------------------------------------------------------------- gate
    def run_gate(self) -> GateDecision:
        """Run the configured health gate against what runs now."""
        from watchdog_updater.health.runner import run_gate

        probes = self._build_probes()
        return run_gate(probes, self.config.health.gate, on_result=self._probe_event)

    def _build_probes(self) -> Sequence[Probe]:
        if self._probes_factory is not None:
            return self._probes_factory(self.services, self.config.health.units)
        return build_probes(self.config, self.services, root=self.layout.root)

    def _probe_event(self, result: ProbeResult) -> None:
        self.report(
            Event(
                "probe",
                f"{result.probe}: {result.outcome.value} {result.detail}",
                {"probe": result.probe, "outcome": result.outcome.value, "detail": result.detail},
            )
        )

    # --------------------------------------------------------------------------- helpers
    def _restart_set(self, restart_slots: bool) -> list[str]:
        units = list(self.config.services.restart)
        if restart_slots:
            units += self.services.list_units(self.config.services.slots_pattern)
        return units

    def _restart(self, restart_slots: bool) -> str | None:
        """Restart the restart set; the first failure is returned as evidence for the gate."""
        for unit in self._restart_set(restart_slots):
            try:
                self.services.restart(unit, timeout_s=self.config.services.restart_timeout_s)
            except ServiceError as e:
                return f"{unit}: {e}"
        return None

    def _point_links(self, *, current: str | None, previous: str | None) -> None:
        if previous is not None and previous != current:
            if self.layout.version_dir(previous).is_dir():
                links.swap_link(self.layout, self.layout.previous_link, previous)
            else:
                # Gone (retention with a small `keep`, or deleted by hand): better no rollback
                # target than a transaction that can never finish.
                links.remove_link(self.layout.previous_link)
                self.report(
                    Event("info", f"{previous} is no longer installed: no previous version")
                )
        if current is not None:
            links.swap_link(self.layout, self.layout.current_link, current)

    def _run_hooks(self, version: str) -> None:
        version_dir = self.layout.version_dir(version)
        run_hooks(
            self.config.install.post_swap,
            cwd=version_dir,
            env={
                "HAL0_VERSION": version,
                "HAL0_VERSION_DIR": str(version_dir),
                "HAL0_ROOT": str(self.layout.root),
            },
            timeout_s=self.config.install.hook_timeout_s,
        )

    def _cleanup_staging(self) -> None:
        extract.clean_staging(self.layout)
        links.clean_temp_links(self.layout)

    def _collect_garbage(self, *, protect: set[str]) -> None:
        protected = set(protect)
        for link in (self.layout.current_link, self.layout.previous_link):
            version = links.read_link_version(self.layout, link)
            if version is not None:
                protected.add(version)
        probation = self.store.probation()
        if probation is not None and probation.until > self.clock():
            # A probation rollback restores both links: keep their targets while it may happen.
            protected.update(v for v in (probation.from_version, probation.previous_before) if v)
        quarantine = self.store.quarantine()
        removed = retention.collect_garbage(
            self.layout,
            keep=self.config.install.keep,
            protected=protected,
            order_key=version_order_key,
            cache_dir=self.layout.cache_dir,
            # Never installed again: a quarantined version must not push out a good one.
            quarantined=quarantine.keys() - protected,
        )
        if removed:
            self.report(Event("info", f"removed old versions: {', '.join(removed)}"))

    def _step(self, tx: Transaction, message: str) -> None:
        self.report(Event("step", message, {"step": tx.step.value, "txid": tx.txid}))

    def _outcome(self, entry: HistoryEntry) -> None:
        self.report(Event("outcome", entry.reason, entry.to_json()))


# The reason recovery gives an interrupted transaction it undoes; a later recovery of that same
# undo (interrupted again) reads it back to record ``interrupted``, not a verdict.
_INTERRUPTED_BY = "interrupted by "


def _undoes_interruption(tx: Transaction) -> bool:
    return (tx.reason or "").startswith(_INTERRUPTED_BY)


def _parse_or_none(version: str | None) -> Version | None:
    if version is None:
        return None
    try:
        return parse_version(version)
    except VersionError:
        return None


def _failure_decision(probe: str, evidence: str) -> GateDecision:
    """An UNHEALTHY verdict for a failure before any probe could run (a restart failed)."""
    return GateDecision.immediate_failure(
        ProbeResult(
            probe=probe, outcome=ProbeOutcome.FATAL, detail=evidence, at_s=0.0, duration_s=0.0
        )
    )
