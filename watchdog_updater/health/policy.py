"""The health gate's decision, pure: probe results in, verdict out.

Nothing here reads a clock, touches the network or the disk: time is passed in (``now_s``,
``at_s``) in the caller's clock (the runner uses ``time.monotonic``), so every rule is unit-tested
exhaustively.

The gate (after a swap and restart)
-----------------------------------
A gate opens at ``start_s`` and its window is ``[start_s, start_s + deadline_s)``.

- **Streak.** Each probe keeps its number of passes in a row; any FAIL or FATAL resets it to 0. A
  PASS that took longer than ``probe_timeout_s`` counts as a FAIL ("answered too late").
- **HEALTHY** when, at the same moment, *every* probe's current streak is at least ``consecutive``:
  the last ``consecutive`` results of every probe all passed. A probe that was healthy earlier and
  then failed must earn its streak again.
- **UNHEALTHY, at once, on any FATAL** (a unit entered ``failed``, its restart counter grew or its
  invocation changed: a crash loop). No budget, no waiting for the deadline.
- **Failure budget.** Failures a probe has *before its first PASS* are start-up (the service is
  still coming up) and only the deadline ends them. Once a probe has passed at least once, every
  later FAIL counts against its budget; ``failure_budget`` such failures are tolerated and one more
  (``failure_budget + 1`` post-start failures of the same probe, consecutive or not, over the whole
  gate) is UNHEALTHY without waiting for the deadline. ``failure_budget = 0`` means the first
  failure after a pass ends the gate.
- **Deadline.** At ``now_s >= start_s + deadline_s`` a gate that is not HEALTHY is UNHEALTHY; the
  reason names every probe that never became healthy with its last evidence. Results stamped at or
  after the deadline (or before the start) are ignored, so a late pass cannot turn a timed-out gate
  healthy.
- **Cadence.** Rounds start ``interval_s`` apart once every probe has passed at least once. Until
  then the services are still starting, and rounds come sooner (:func:`next_round_in_s`: 0.25 s,
  doubling up to ``interval_s``) so a service that is up in 300 ms is not first seen a whole
  interval later, and a crash loop is caught at its first restart. The streak rule is untouched:
  the last probe to pass for the first time still needs ``consecutive - 1`` more rounds, each
  ``interval_s`` apart, so every probe's last ``consecutive`` results span at least
  ``(consecutive - 1) * interval_s``, as before.
- **Monotone.** The first verdict reached from results (HEALTHY, or UNHEALTHY by FATAL or budget) is
  frozen in the state: later results are ignored. Together with the deadline rule, once
  :func:`decide` returns a verdict other than PENDING it returns that verdict forever after.

Probation (after commit)
------------------------
Same shape, different question: the new version was healthy; does it *stay* healthy for
``duration_s``? UNHEALTHY on any FATAL, or when one probe has ``consecutive_failures`` FAILs in a
row (a sustained failure; isolated failures are forgiven by the next PASS). When the window ends
without that, HEALTHY, provided every probe reported at least one PASS during probation (no
evidence is not health: a probe with no PASS at all is UNHEALTHY at the end).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from watchdog_updater.errors import ConfigError

__all__ = [
    "GateDecision",
    "GatePolicy",
    "GateState",
    "ProbationPolicy",
    "ProbationState",
    "ProbeOutcome",
    "ProbeResult",
    "ProbeSummary",
    "Verdict",
    "decide",
    "decide_probation",
    "next_round_in_s",
    "observe",
    "observe_probation",
    "start",
    "start_probation",
]

# Evidence is bounded everywhere it is stored or printed.
MAX_DETAIL_CHARS = 1000

#: The first gap between rounds while some probe has never passed; doubled each round after.
STARTUP_POLL_S = 0.25


class ProbeOutcome(enum.Enum):
    """What one probe call found."""

    PASS = "pass"  # noqa: S105 - an outcome, not a password
    FAIL = "fail"
    FATAL = "fatal"  # fail fast: unit failed, restart counter grew, invocation changed (crash loop)


class Verdict(enum.Enum):
    """The gate's answer so far."""

    PENDING = "pending"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class ProbeResult:
    """One probe call: its outcome, human evidence, when it completed and how long it took.

    ``at_s`` is in the gate's clock (seconds); ``duration_s`` is wall time spent in the probe.
    """

    probe: str
    outcome: ProbeOutcome
    detail: str
    at_s: float
    duration_s: float

    def __post_init__(self) -> None:
        if len(self.detail) > MAX_DETAIL_CHARS:
            object.__setattr__(self, "detail", self.detail[: MAX_DETAIL_CHARS - 3] + "...")


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool) -> None:
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} = {value!r} is out of range {bracket}{low}, {high}]")


@dataclass(frozen=True, kw_only=True)
class GatePolicy:
    """``[update.health]``: how the gate after a swap decides. Bounds are validated."""

    consecutive: int = 3  # passes in a row each probe needs; 1..100
    interval_s: float = 2.0  # seconds between the starts of two probe rounds; (0, 300]
    deadline_s: float = 120.0  # seconds the whole gate may take; (0, 3600]
    failure_budget: int = 3  # failures tolerated per probe after its first pass; 0..100
    probe_timeout_s: float = 5.0  # hard limit of one probe call, seconds; (0, 300], <= deadline_s

    def __post_init__(self) -> None:
        _check_int("consecutive", self.consecutive, 1, 100)
        _check_range("interval_s", self.interval_s, 0.0, 300.0, low_open=True)
        _check_range("deadline_s", self.deadline_s, 0.0, 3600.0, low_open=True)
        _check_int("failure_budget", self.failure_budget, 0, 100)
        _check_range("probe_timeout_s", self.probe_timeout_s, 0.0, 300.0, low_open=True)
        if self.probe_timeout_s > self.deadline_s:
            raise ConfigError(
                f"probe_timeout_s ({self.probe_timeout_s}) exceeds deadline_s ({self.deadline_s})"
            )


@dataclass(frozen=True, kw_only=True)
class ProbationPolicy:
    """``[update.probation]``: watching a committed version for a while. Bounds are validated."""

    duration_s: float = 600.0  # how long probation lasts, seconds; (0, 86400]
    interval_s: float = 15.0  # seconds between the starts of two probe rounds; (0, 3600]
    consecutive_failures: int = 3  # FAILs in a row of one probe that count as sustained; 1..100
    probe_timeout_s: float = 5.0  # hard limit of one probe call, seconds; (0, 300]

    def __post_init__(self) -> None:
        _check_range("duration_s", self.duration_s, 0.0, 86400.0, low_open=True)
        _check_range("interval_s", self.interval_s, 0.0, 3600.0, low_open=True)
        _check_int("consecutive_failures", self.consecutive_failures, 1, 100)
        _check_range("probe_timeout_s", self.probe_timeout_s, 0.0, 300.0, low_open=True)


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} = {value!r} must be an integer in [{low}, {high}]")


@dataclass(frozen=True)
class ProbeSummary:
    """What the gate knows about one probe."""

    probe: str
    passes_in_a_row: int = 0
    failures_in_a_row: int = 0
    passes: int = 0
    failures: int = 0  # FAIL and FATAL, including start-up failures
    failures_after_first_pass: int = 0  # the ones that count against the failure budget
    fatal: bool = False
    last: ProbeResult | None = None

    @property
    def ever_passed(self) -> bool:
        return self.passes > 0

    def evidence(self) -> str:
        """The last result in one line, for reasons and records."""
        if self.last is None:
            return "no result yet"
        return f"{self.last.outcome.value}: {self.last.detail}"

    def to_json(self) -> dict[str, Any]:
        last = self.last
        return {
            "probe": self.probe,
            "passes_in_a_row": self.passes_in_a_row,
            "failures_in_a_row": self.failures_in_a_row,
            "passes": self.passes,
            "failures": self.failures,
            "failures_after_first_pass": self.failures_after_first_pass,
            "fatal": self.fatal,
            "last": None
            if last is None
            else {
                "outcome": last.outcome.value,
                "detail": last.detail,
                "at_s": round(last.at_s, 3),
                "duration_s": round(last.duration_s, 3),
            },
        }


@dataclass(frozen=True)
class GateDecision:
    """The verdict, why, which probe is to blame (if one is), and each probe's summary."""

    verdict: Verdict
    reason: str
    failed_probe: str | None
    probes: tuple[ProbeSummary, ...]
    elapsed_s: float  # seconds since the gate (or probation) started, at the decision

    @classmethod
    def immediate_failure(cls, result: ProbeResult) -> GateDecision:
        """UNHEALTHY from one result, for a failure before the gate could run (restart failed)."""
        summary = ProbeSummary(
            probe=result.probe,
            failures_in_a_row=1,
            failures=1,
            fatal=result.outcome is ProbeOutcome.FATAL,
            last=result,
        )
        return cls(
            Verdict.UNHEALTHY, f"{result.probe}: {result.detail}", result.probe, (summary,), 0.0
        )

    @property
    def decided(self) -> bool:
        return self.verdict is not Verdict.PENDING

    def summary_of(self, probe: str) -> ProbeSummary:
        for summary in self.probes:
            if summary.probe == probe:
                return summary
        raise KeyError(probe)

    def evidence(self) -> str:
        """The blamed probe's last result, else every probe's, in one bounded line."""
        blamed = [s for s in self.probes if s.probe == self.failed_probe] or list(self.probes)
        text = "; ".join(f"{s.probe}: {s.evidence()}" for s in blamed)
        return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record of the decision (journal, history, ``--json`` output)."""
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "failed_probe": self.failed_probe,
            "elapsed_s": round(self.elapsed_s, 3),
            "probes": [s.to_json() for s in self.probes],
        }


@dataclass(frozen=True)
class _Settled:
    """A verdict reached from results; frozen into the state once reached."""

    verdict: Verdict
    reason: str
    failed_probe: str | None


def _frozen_summaries(names: Iterable[str]) -> Mapping[str, ProbeSummary]:
    ordered: dict[str, ProbeSummary] = {}
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"probe name {name!r} must be a non-empty string")
        if name in ordered:
            raise ConfigError(f"probe name {name!r} is used twice")
        ordered[name] = ProbeSummary(probe=name)
    if not ordered:
        raise ConfigError(
            "the health gate has no probes", hint="an empty gate never passes; configure probes"
        )
    return MappingProxyType(ordered)


def _with(summaries: Mapping[str, ProbeSummary], new: ProbeSummary) -> Mapping[str, ProbeSummary]:
    updated = dict(summaries)
    updated[new.probe] = new
    return MappingProxyType(updated)


def _tally(summary: ProbeSummary, result: ProbeResult, passed: bool) -> ProbeSummary:
    """Fold one result into a probe's counters (shared by the gate and probation)."""
    if passed:
        return replace(
            summary,
            passes_in_a_row=summary.passes_in_a_row + 1,
            failures_in_a_row=0,
            passes=summary.passes + 1,
            last=result,
        )
    return replace(
        summary,
        passes_in_a_row=0,
        failures_in_a_row=summary.failures_in_a_row + 1,
        failures=summary.failures + 1,
        failures_after_first_pass=summary.failures_after_first_pass + int(summary.passes > 0),
        fatal=summary.fatal or result.outcome is ProbeOutcome.FATAL,
        last=result,
    )


def _effective(result: ProbeResult, probe_timeout_s: float) -> tuple[ProbeResult, bool]:
    """A PASS slower than the probe timeout is a FAIL; returns the result to record and pass?"""
    if result.outcome is not ProbeOutcome.PASS:
        return result, False
    if not result.duration_s <= probe_timeout_s:  # also catches NaN
        late = replace(
            result,
            outcome=ProbeOutcome.FAIL,
            detail=f"answered after {result.duration_s:.3g}s, limit {probe_timeout_s:g}s "
            f"(late pass: {result.detail})",
        )
        return late, False
    return result, True


def _lookup(summaries: Mapping[str, ProbeSummary], probe: str) -> ProbeSummary:
    try:
        return summaries[probe]
    except KeyError:
        raise ValueError(f"result for unknown probe {probe!r}") from None


# ---------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateState:
    """Everything the gate has seen. Immutable: :func:`observe` returns a new state."""

    policy: GatePolicy
    start_s: float
    summaries: Mapping[str, ProbeSummary] = field(repr=False)
    settled: _Settled | None = None
    ignored: int = 0  # results outside the window or after the verdict

    @property
    def deadline_at_s(self) -> float:
        return self.start_s + self.policy.deadline_s

    @property
    def probe_names(self) -> tuple[str, ...]:
        return tuple(self.summaries)


def start(policy: GatePolicy, probe_names: Iterable[str], now_s: float) -> GateState:
    """Open a gate at ``now_s`` for the named probes (at least one, names unique)."""
    if not math.isfinite(now_s):
        raise ValueError(f"now_s must be finite, got {now_s!r}")
    return GateState(policy=policy, start_s=now_s, summaries=_frozen_summaries(probe_names))


def observe(state: GateState, result: ProbeResult) -> GateState:
    """Fold one probe result into the gate; ignored once settled or outside the window."""
    summary = _lookup(state.summaries, result.probe)
    outside = not state.start_s <= result.at_s < state.deadline_at_s
    if state.settled is not None or outside:
        return replace(state, ignored=state.ignored + 1)
    recorded, passed = _effective(result, state.policy.probe_timeout_s)
    updated = _with(state.summaries, _tally(summary, recorded, passed))
    return replace(state, summaries=updated, settled=_settle_gate(state.policy, updated, recorded))


def _settle_gate(
    policy: GatePolicy, summaries: Mapping[str, ProbeSummary], latest: ProbeResult
) -> _Settled | None:
    """A verdict that follows from the results alone (the deadline is :func:`decide`'s)."""
    if latest.outcome is ProbeOutcome.FATAL:
        return _Settled(
            Verdict.UNHEALTHY,
            f"probe {latest.probe} failed fatally, not waiting for the deadline: {latest.detail}",
            latest.probe,
        )
    latest_summary = summaries[latest.probe]
    if latest_summary.failures_after_first_pass > policy.failure_budget:
        return _Settled(
            Verdict.UNHEALTHY,
            f"probe {latest.probe} failed {latest_summary.failures_after_first_pass} times after "
            f"first passing, over its failure budget of {policy.failure_budget}: {latest.detail}",
            latest.probe,
        )
    if all(s.passes_in_a_row >= policy.consecutive for s in summaries.values()):
        return _Settled(
            Verdict.HEALTHY,
            f"all {len(summaries)} probes passed {policy.consecutive} times in a row",
            None,
        )
    return None


def next_round_in_s(state: GateState, previous_s: float | None) -> float:
    """Seconds from the start of this round to the start of the next (see *Cadence* above).

    ``previous_s`` is what this returned for the round before (None after the first round).
    """
    interval = state.policy.interval_s
    if all(s.ever_passed for s in state.summaries.values()):
        return interval
    return min(interval, STARTUP_POLL_S if previous_s is None else 2 * previous_s)


def decide(state: GateState, now_s: float) -> GateDecision:
    """The gate's verdict at ``now_s`` (PENDING while inside the window and undecided)."""
    probes = tuple(state.summaries.values())
    elapsed = now_s - state.start_s
    if state.settled is not None:
        settled = state.settled
        return GateDecision(settled.verdict, settled.reason, settled.failed_probe, probes, elapsed)
    if now_s >= state.deadline_at_s:
        laggards = [s for s in probes if s.passes_in_a_row < state.policy.consecutive]
        named = "; ".join(
            f"{s.probe} ({s.passes_in_a_row}/{state.policy.consecutive} in a row, "
            f"last {s.evidence()})"
            for s in laggards
        )
        return GateDecision(
            Verdict.UNHEALTHY,
            f"not healthy within the {state.policy.deadline_s:g}s deadline: {named}",
            laggards[0].probe if laggards else None,
            probes,
            elapsed,
        )
    waiting = sum(s.passes_in_a_row < state.policy.consecutive for s in probes)
    return GateDecision(
        Verdict.PENDING,
        f"{waiting} of {len(probes)} probes not yet at {state.policy.consecutive} passes in a row",
        None,
        probes,
        elapsed,
    )


# ---------------------------------------------------------------------------------------------
# Probation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbationState:
    """Everything probation has seen. Immutable: :func:`observe_probation` returns a new state."""

    policy: ProbationPolicy
    start_s: float
    summaries: Mapping[str, ProbeSummary] = field(repr=False)
    settled: _Settled | None = None
    ignored: int = 0

    @property
    def end_at_s(self) -> float:
        return self.start_s + self.policy.duration_s

    @property
    def probe_names(self) -> tuple[str, ...]:
        return tuple(self.summaries)


def start_probation(
    policy: ProbationPolicy, probe_names: Iterable[str], now_s: float
) -> ProbationState:
    """Open probation at ``now_s`` for the named probes (at least one, names unique)."""
    if not math.isfinite(now_s):
        raise ValueError(f"now_s must be finite, got {now_s!r}")
    return ProbationState(policy=policy, start_s=now_s, summaries=_frozen_summaries(probe_names))


def observe_probation(state: ProbationState, result: ProbeResult) -> ProbationState:
    """Fold one probe result into probation; ignored once settled or outside the window."""
    summary = _lookup(state.summaries, result.probe)
    outside = not state.start_s <= result.at_s < state.end_at_s
    if state.settled is not None or outside:
        return replace(state, ignored=state.ignored + 1)
    recorded, passed = _effective(result, state.policy.probe_timeout_s)
    new = _tally(summary, recorded, passed)
    settled: _Settled | None = None
    if recorded.outcome is ProbeOutcome.FATAL:
        settled = _Settled(
            Verdict.UNHEALTHY,
            f"probe {new.probe} failed fatally during probation: {recorded.detail}",
            new.probe,
        )
    elif new.failures_in_a_row >= state.policy.consecutive_failures:
        settled = _Settled(
            Verdict.UNHEALTHY,
            f"probe {new.probe} failed {new.failures_in_a_row} times in a row during probation "
            f"(sustained failure): {recorded.detail}",
            new.probe,
        )
    return replace(state, summaries=_with(state.summaries, new), settled=settled)


def decide_probation(state: ProbationState, now_s: float) -> GateDecision:
    """Probation's verdict at ``now_s``: PENDING until the window ends or a sustained failure."""
    probes = tuple(state.summaries.values())
    elapsed = now_s - state.start_s
    if state.settled is not None:
        settled = state.settled
        return GateDecision(settled.verdict, settled.reason, settled.failed_probe, probes, elapsed)
    if now_s >= state.end_at_s:
        silent = [s for s in probes if not s.ever_passed]
        if silent:
            named = "; ".join(f"{s.probe} (last {s.evidence()})" for s in silent)
            return GateDecision(
                Verdict.UNHEALTHY,
                f"no passing result during the {state.policy.duration_s:g}s probation: {named}",
                silent[0].probe,
                probes,
                elapsed,
            )
        return GateDecision(
            Verdict.HEALTHY,
            f"no sustained failure during the {state.policy.duration_s:g}s probation",
            None,
            probes,
            elapsed,
        )
    return GateDecision(
        Verdict.PENDING,
        f"on probation, {state.end_at_s - now_s:.0f}s left",
        None,
        probes,
        elapsed,
    )
