"""Drive the probes against the pure policy until a verdict: the gate and probation loops.

Rounds. Every ``interval_s`` (measured from the start of one round to the start of the next; a
round that overruns is followed at once by the next, never by a burst; the gate starts rounds
sooner while some probe has never passed: :func:`~.policy.next_round_in_s`) all probes are
called, each in its own daemon worker thread and all at once, with the deadline
``time.monotonic() + probe_timeout_s``. Results are folded into the policy as they arrive, so a
FATAL ends the gate without waiting for slower probes of the same round.

Hard limits. The runner waits for a round at most ``probe_timeout_s + abandon_slack_s`` seconds
(real time) and never past the gate's deadline. A probe still running then is *abandoned*: it gets
a FAIL "no answer within ...", its thread is left to finish on its own (daemon threads do not hold
up the process exit), and until it does, later rounds do not call that probe again but record a
FAIL "previous call still running" for it straight away. So a probe that ignores its own timeout
costs one bounded wait, cannot stall the gate, and cannot pile up threads.

Clocks. ``clock``/``sleep`` (injectable, for tests) drive the interval, the deadline and the
results' ``at_s``. Waiting for worker threads cannot be faked, so that wait is in real seconds;
``duration_s`` of a result is the real time the probe took, which is what ``probe_timeout_s`` is
about.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from watchdog_updater.health.policy import (
    GateDecision,
    GatePolicy,
    ProbationPolicy,
    ProbeOutcome,
    ProbeResult,
    decide,
    decide_probation,
    next_round_in_s,
    observe,
    observe_probation,
    start,
    start_probation,
)
from watchdog_updater.health.probes import Probe, run_probe

__all__ = ["DEFAULT_ABANDON_SLACK_S", "run_gate", "run_probation"]

_log = logging.getLogger(__name__)

DEFAULT_ABANDON_SLACK_S = 0.5  # grace past probe_timeout_s before a probe call is abandoned
STOP_POLL_S = 1.0  # probation sleeps in slices this long to notice should_stop

Clock = Callable[[], float]
Sleep = Callable[[float], None]
OnResult = Callable[[ProbeResult], None]
_S = TypeVar("_S")


@dataclass
class _Call:
    """One probe call in flight: its worker thread and when it was launched (real time)."""

    thread: threading.Thread
    launched: float


class _Rounds:
    """Calls probes concurrently with a hard, real-time bound per round."""

    def __init__(
        self, probes: Sequence[tuple[str, Probe]], probe_timeout_s: float, slack_s: float
    ) -> None:
        self._probes = list(probes)  # names read once: a probe cannot rename itself mid-gate
        self._timeout_s = probe_timeout_s
        self._slack_s = slack_s
        self._inflight: dict[str, _Call] = {}

    def run(self, clock: Clock, wait_cap_s: float) -> Iterator[ProbeResult]:
        """Yield one result per probe, as they arrive, within ``min(timeout + slack, cap)``."""
        answers: queue.SimpleQueue[tuple[str, ProbeResult, float]] = queue.SimpleQueue()
        launched_at = time.monotonic()
        probe_deadline = launched_at + self._timeout_s
        pending: dict[str, float] = {}
        stuck: list[ProbeResult] = []
        for name, probe in self._probes:
            previous = self._inflight.get(name)
            if previous is not None and previous.thread.is_alive():
                age = launched_at - previous.launched
                stuck.append(
                    _fail(
                        name,
                        f"previous call still running after {age:.1f}s (abandoned); not called",
                        clock(),
                        0.0,
                    )
                )
                continue
            thread = threading.Thread(
                target=_work,
                args=(name, probe, probe_deadline, answers),
                name=f"health-probe:{name}",
                daemon=True,
            )
            try:
                thread.start()
            except RuntimeError as e:  # out of threads: a failure of this call, not of the gate
                stuck.append(_fail(name, f"cannot start a probe thread: {e}", clock(), 0.0))
                continue
            self._inflight[name] = _Call(thread, launched_at)
            pending[name] = launched_at
        yield from stuck
        wait_s = max(0.0, min(self._timeout_s + self._slack_s, wait_cap_s))
        give_up = launched_at + wait_s
        while pending:
            left = give_up - time.monotonic()
            try:
                name, result, took = answers.get(timeout=left) if left > 0 else answers.get_nowait()
            except queue.Empty:
                break
            if pending.pop(name, None) is not None:
                yield replace(result, at_s=clock(), duration_s=took)
        for name, began in pending.items():
            took = time.monotonic() - began
            yield _fail(
                name,
                f"no answer within {took:.1f}s (limit {self._timeout_s:g}s); call abandoned",
                clock(),
                took,
            )


def _fail(name: str, detail: str, at_s: float, duration_s: float) -> ProbeResult:
    return ProbeResult(name, ProbeOutcome.FAIL, detail, at_s=at_s, duration_s=duration_s)


def _work(
    name: str,
    probe: Probe,
    deadline_s: float,
    answers: queue.SimpleQueue[tuple[str, ProbeResult, float]],
) -> None:
    """Worker thread body: always posts exactly one answer, under the probe's known name."""
    began = time.monotonic()
    try:
        result = run_probe(probe, deadline_s)
        if result.probe != name:
            result = _fail(name, f"probe now calls itself {result.probe!r}", 0.0, 0.0)
    except BaseException as e:  # even SystemExit in a probe must not go unanswered
        result = _fail(name, f"probe raised {type(e).__name__}: {e}", 0.0, 0.0)
    answers.put((name, result, time.monotonic() - began))


def _emit(on_result: OnResult | None, result: ProbeResult) -> None:
    if on_result is None:
        return
    try:
        on_result(result)
    except Exception:
        # A broken observer (metrics, logging) must neither fail nor pass the gate.
        _log.exception("health gate: on_result callback failed for %s", result.probe)


def _drive(
    named: Sequence[tuple[str, Probe]],
    state: _S,
    *,
    observe_fn: Callable[[_S, ProbeResult], _S],
    decide_fn: Callable[[_S, float], GateDecision],
    end_at_s: float,
    gap_fn: Callable[[_S, float | None], float],
    probe_timeout_s: float,
    clock: Clock,
    sleep: Sleep,
    on_result: OnResult | None,
    should_stop: Callable[[], bool] | None,
    abandon_slack_s: float,
) -> GateDecision:
    if not abandon_slack_s >= 0:
        raise ValueError(f"abandon_slack_s must be >= 0, got {abandon_slack_s!r}")
    rounds = _Rounds(named, probe_timeout_s, abandon_slack_s)
    next_round_s = clock()
    gap_s: float | None = None
    while True:
        decision = decide_fn(state, clock())
        if decision.decided:
            return decision
        if should_stop is not None and should_stop():
            return replace(decision, reason=f"stopped before a verdict; {decision.reason}")
        for result in rounds.run(clock, wait_cap_s=end_at_s - clock()):
            _emit(on_result, result)
            state = observe_fn(state, result)
            decision = decide_fn(state, clock())
            if decision.decided:
                return decision
        gap_s = gap_fn(state, gap_s)
        next_round_s = max(next_round_s + gap_s, clock())
        _sleep_until(min(next_round_s, end_at_s), clock, sleep, should_stop)


def _sleep_until(
    until_s: float, clock: Clock, sleep: Sleep, should_stop: Callable[[], bool] | None
) -> None:
    while (left := until_s - clock()) > 0:
        if should_stop is None:
            sleep(left)
            return
        if should_stop():
            return
        sleep(min(left, STOP_POLL_S))


def run_gate(
    probes: Sequence[Probe],
    policy: GatePolicy,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    on_result: OnResult | None = None,
    abandon_slack_s: float = DEFAULT_ABANDON_SLACK_S,
) -> GateDecision:
    """Run the health gate until HEALTHY or UNHEALTHY; returns by the deadline (+ slack at most).

    ``on_result`` sees every result as it arrives (for logs, metrics, the journal); an exception
    it raises is logged and ignored. Raises ``ConfigError`` for an empty or ambiguous probe set.
    """
    named = [(p.name, p) for p in probes]
    state = start(policy, [name for name, _ in named], clock())
    return _drive(
        named,
        state,
        observe_fn=observe,
        decide_fn=decide,
        end_at_s=state.deadline_at_s,
        gap_fn=next_round_in_s,
        probe_timeout_s=policy.probe_timeout_s,
        clock=clock,
        sleep=sleep,
        on_result=on_result,
        should_stop=None,
        abandon_slack_s=abandon_slack_s,
    )


def run_probation(
    probes: Sequence[Probe],
    policy: ProbationPolicy,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    on_result: OnResult | None = None,
    should_stop: Callable[[], bool] | None = None,
    abandon_slack_s: float = DEFAULT_ABANDON_SLACK_S,
) -> GateDecision:
    """Watch a committed version for ``policy.duration_s``.

    Returns HEALTHY at the end, UNHEALTHY on a FATAL or a sustained failure, or - when
    ``should_stop()`` turns true (checked before every round and at least every second while
    waiting) - a PENDING decision whose reason starts with "stopped", so the caller can resume
    probation later rather than count it as passed.
    """
    named = [(p.name, p) for p in probes]
    state = start_probation(policy, [name for name, _ in named], clock())
    return _drive(
        named,
        state,
        observe_fn=observe_probation,
        decide_fn=decide_probation,
        end_at_s=state.end_at_s,
        gap_fn=lambda _state, _previous: policy.interval_s,
        probe_timeout_s=policy.probe_timeout_s,
        clock=clock,
        sleep=sleep,
        on_result=on_result,
        should_stop=should_stop,
        abandon_slack_s=abandon_slack_s,
    )
