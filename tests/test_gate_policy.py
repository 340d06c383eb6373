"""The pure health-gate decision: one short test per behaviour, then hypothesis properties."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog_updater.errors import ConfigError
from watchdog_updater.health.policy import (
    GateDecision,
    GatePolicy,
    GateState,
    ProbationPolicy,
    ProbationState,
    ProbeOutcome,
    ProbeResult,
    Verdict,
    decide,
    decide_probation,
    next_round_in_s,
    observe,
    observe_probation,
    start,
    start_probation,
)

PASS, FAIL, FATAL = ProbeOutcome.PASS, ProbeOutcome.FAIL, ProbeOutcome.FATAL


def r(
    probe: str, outcome: ProbeOutcome, at: float, detail: str = "", took: float = 0.1
) -> ProbeResult:
    return ProbeResult(probe, outcome, detail or outcome.value, at_s=at, duration_s=took)


def feed(state: GateState, results: Iterable[ProbeResult]) -> GateState:
    for result in results:
        state = observe(state, result)
    return state


def rounds(
    probe: str, outcomes: Sequence[ProbeOutcome], *, t0: float = 0.0, every: float = 2.0
) -> list[ProbeResult]:
    return [r(probe, o, t0 + i * every) for i, o in enumerate(outcomes)]


def gate(*names: str, **policy: float) -> GateState:
    return start(GatePolicy(**policy), names or ("api",), 0.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ the gate


def test_healthy_after_consecutive_passes() -> None:
    state = gate("api", "unit")
    state = feed(
        state, [r("api", PASS, 0), r("unit", PASS, 0), r("api", PASS, 2), r("unit", PASS, 2)]
    )
    assert decide(state, 2).verdict is Verdict.PENDING
    state = feed(state, [r("api", PASS, 4)])
    assert decide(state, 4).verdict is Verdict.PENDING  # unit still at 2 in a row
    state = observe(state, r("unit", PASS, 4))
    decision = decide(state, 4)
    assert decision.verdict is Verdict.HEALTHY
    assert decision.failed_probe is None
    assert "3 times in a row" in decision.reason


def test_one_pass_is_not_enough() -> None:
    state = feed(gate(), [r("api", PASS, 0)])
    assert decide(state, 0).verdict is Verdict.PENDING


def test_crash_loop_fails_fast() -> None:
    state = feed(gate("unit", "api"), rounds("unit", [PASS, PASS]))
    state = observe(state, r("unit", FATAL, 4, "restart counter grew from 0 (crash loop)"))
    decision = decide(state, 4)
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.failed_probe == "unit"
    assert "crash loop" in decision.reason
    assert decision.elapsed_s == 4  # long before the 120 s deadline


def test_failed_unit_fails_fast() -> None:
    state = observe(gate("unit"), r("unit", FATAL, 0.5, "unit failed: failed/failed"))
    decision = decide(state, 0.5)
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.failed_probe == "unit"
    assert decision.summary_of("unit").fatal


def test_flaky_probe_below_budget_does_not_roll_back() -> None:
    # 1 failure in 5, after the probe first passed: the budget absorbs it, the streak restarts.
    state = feed(gate("api"), rounds("api", [PASS, PASS, FAIL, PASS, PASS]))
    assert decide(state, 8).verdict is Verdict.PENDING
    state = observe(state, r("api", PASS, 10))
    decision = decide(state, 10)
    assert decision.verdict is Verdict.HEALTHY
    assert decision.summary_of("api").failures_after_first_pass == 1


def test_budget_exceeded_is_unhealthy() -> None:
    pattern = [PASS, FAIL, PASS, FAIL, PASS, FAIL, PASS]  # 3 failures after the first pass
    state = feed(gate("api"), rounds("api", pattern))
    assert decide(state, 12).verdict is Verdict.PENDING  # budget 3: three are tolerated
    state = observe(state, r("api", FAIL, 14, "HTTP 503"))
    decision = decide(state, 14)
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.failed_probe == "api"
    assert "failure budget of 3" in decision.reason
    assert "HTTP 503" in decision.reason


def test_zero_budget_first_failure_after_a_pass_is_unhealthy() -> None:
    state = feed(gate("api", failure_budget=0), rounds("api", [FAIL, FAIL, PASS, FAIL]))
    assert decide(state, 6).verdict is Verdict.UNHEALTHY


def test_start_up_failures_do_not_count_against_the_budget() -> None:
    state = feed(gate("api"), rounds("api", [FAIL] * 20 + [PASS] * 3))
    decision = decide(state, 44)
    assert decision.verdict is Verdict.HEALTHY
    assert decision.summary_of("api").failures == 20
    assert decision.summary_of("api").failures_after_first_pass == 0


def test_deadline_names_probes_never_healthy() -> None:
    state = gate("api", "slot:brain", "slot:chat", deadline_s=20)
    state = feed(state, rounds("api", [PASS] * 3))
    state = feed(state, rounds("slot:chat", [PASS] * 3))
    state = feed(
        state, [r("slot:brain", FAIL, t, "200 but model_loaded is False") for t in (0, 2, 4)]
    )
    state = feed(state, rounds("slot:chat", [FAIL], t0=6))  # healthy once, then lost its streak
    assert decide(state, 19.9).verdict is Verdict.PENDING
    decision = decide(state, 20)
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.failed_probe == "slot:brain"
    assert "20s deadline" in decision.reason
    assert "slot:brain (0/3 in a row" in decision.reason
    assert "model_loaded is False" in decision.reason
    assert "slot:chat" in decision.reason
    assert "api" not in decision.reason.replace("slot:", "")


def test_deadline_with_no_result_at_all_says_so() -> None:
    decision = decide(gate("api", deadline_s=10), 10)
    assert decision.verdict is Verdict.UNHEALTHY
    assert "no result yet" in decision.reason


def test_slow_start_inside_window_passes() -> None:
    state = feed(gate("api"), rounds("api", [FAIL] * 50))  # 0..98 s: still starting
    state = feed(state, rounds("api", [PASS] * 3, t0=110))  # 110, 112, 114 < 120
    assert decide(state, 114).verdict is Verdict.HEALTHY
    assert decide(state, 500).verdict is Verdict.HEALTHY  # and stays so


def test_results_at_or_after_the_deadline_are_ignored() -> None:
    state = feed(gate("api", deadline_s=10), [r("api", PASS, 6), r("api", PASS, 8)])
    state = observe(state, r("api", PASS, 10))  # at the deadline: too late
    assert state.ignored == 1
    assert decide(state, 10).verdict is Verdict.UNHEALTHY


def test_results_before_the_start_are_ignored() -> None:
    state = start(GatePolicy(), ["api"], 100.0)
    state = feed(state, [r("api", PASS, 99), r("api", PASS, 99.5), r("api", PASS, 99.9)])
    assert decide(state, 100).verdict is Verdict.PENDING
    assert state.ignored == 3


def test_every_probe_needs_its_streak_at_the_same_time() -> None:
    state = feed(gate("a", "b"), rounds("a", [PASS, PASS, PASS, FAIL]))
    state = feed(state, rounds("b", [FAIL, PASS, PASS]))
    assert decide(state, 6).verdict is Verdict.PENDING
    state = observe(state, r("b", PASS, 6))  # b reaches 3 while a has lost its streak
    assert decide(state, 6).verdict is Verdict.PENDING
    state = feed(state, rounds("a", [PASS] * 3, t0=8))
    assert decide(state, 12).verdict is Verdict.HEALTHY


def test_late_pass_counts_as_failure() -> None:
    state = gate("api", probe_timeout_s=1.0)
    state = feed(state, [r("api", PASS, t, took=0.2) for t in (0, 2)])
    state = observe(state, r("api", PASS, 4, took=1.5))
    decision = decide(state, 4)
    assert decision.verdict is Verdict.PENDING
    summary = decision.summary_of("api")
    assert summary.passes_in_a_row == 0
    assert summary.last is not None and summary.last.outcome is FAIL
    assert "answered after 1.5s" in summary.last.detail


def test_healthy_then_fatal_stays_healthy() -> None:
    state = feed(gate("api"), rounds("api", [PASS] * 3))
    state = observe(state, r("api", FATAL, 6))
    assert decide(state, 6).verdict is Verdict.HEALTHY
    assert state.ignored == 1


def test_fatal_then_passes_stays_unhealthy() -> None:
    state = feed(gate("api"), rounds("api", [FATAL, PASS, PASS, PASS]))
    decision = decide(state, 6)
    assert decision.verdict is Verdict.UNHEALTHY
    assert "fatal" in decision.reason


def test_unknown_probe_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown probe"):
        observe(gate("api"), r("other", PASS, 0))


def test_empty_gate_never_passes() -> None:
    with pytest.raises(ConfigError, match="no probes"):
        start(GatePolicy(), [], 0.0)


def test_duplicate_probe_names_are_rejected() -> None:
    with pytest.raises(ConfigError, match="twice"):
        start(GatePolicy(), ["api", "api"], 0.0)


def test_start_needs_a_finite_time() -> None:
    with pytest.raises(ValueError, match="finite"):
        start(GatePolicy(), ["api"], math.nan)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive": 0},
        {"consecutive": True},
        {"consecutive": 2.5},
        {"interval_s": 0},
        {"interval_s": math.inf},
        {"deadline_s": -1},
        {"deadline_s": math.nan},
        {"failure_budget": -1},
        {"probe_timeout_s": 0},
        {"probe_timeout_s": 30, "deadline_s": 10},
    ],
)
def test_gate_policy_bounds_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        GatePolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"duration_s": 0},
        {"interval_s": -5},
        {"consecutive_failures": 0},
        {"probe_timeout_s": math.nan},
    ],
)
def test_probation_policy_bounds_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ProbationPolicy(**kwargs)  # type: ignore[arg-type]


def test_defaults_are_the_documented_ones() -> None:
    g, p = GatePolicy(), ProbationPolicy()
    assert (g.consecutive, g.interval_s, g.deadline_s, g.failure_budget, g.probe_timeout_s) == (
        3,
        2.0,
        120.0,
        3,
        5.0,
    )
    assert (p.duration_s, p.interval_s, p.consecutive_failures) == (600.0, 15.0, 3)


def test_evidence_is_bounded() -> None:
    result = r("api", FAIL, 0, "x" * 10_000)
    assert len(result.detail) <= 1000


def test_decision_record_names_the_evidence() -> None:
    state = feed(gate("api", "unit"), [r("api", PASS, 0), r("unit", FATAL, 0.5, "unit failed")])
    decision = decide(state, 1)
    assert decision.evidence() == "unit: fatal: unit failed"
    record = decision.to_json()
    assert record["verdict"] == "unhealthy"
    assert record["failed_probe"] == "unit"
    assert [p["probe"] for p in record["probes"]] == ["api", "unit"]
    assert record["probes"][1]["last"]["outcome"] == "fatal"


def test_immediate_failure_blames_the_given_step() -> None:
    decision = GateDecision.immediate_failure(r("restart", FATAL, 0, "hal0-api: job failed"))
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.failed_probe == "restart"
    assert "job failed" in decision.evidence()


# ------------------------------------------------------------------------------------ probation


def probation(*names: str, **policy: float) -> ProbationState:
    return start_probation(ProbationPolicy(**policy), names or ("api",), 0.0)  # type: ignore[arg-type]


def pfeed(state: ProbationState, results: Iterable[ProbeResult]) -> ProbationState:
    for result in results:
        state = observe_probation(state, result)
    return state


def test_probation_sustained_failure_is_unhealthy() -> None:
    state = pfeed(probation("api"), rounds("api", [PASS, PASS, FAIL, FAIL], every=15))
    assert decide_probation(state, 45).verdict is Verdict.PENDING
    state = observe_probation(state, r("api", FAIL, 60, "HTTP 503"))
    decision = decide_probation(state, 60)
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.failed_probe == "api"
    assert "3 times in a row" in decision.reason


def test_probation_isolated_failures_are_forgiven() -> None:
    pattern = [PASS, FAIL, FAIL, PASS] * 10  # 40 rounds of 15 s = the whole 600 s
    state = pfeed(probation("api"), rounds("api", pattern, every=15))
    assert decide_probation(state, 599).verdict is Verdict.PENDING
    assert decide_probation(state, 600).verdict is Verdict.HEALTHY


def test_probation_fatal_is_unhealthy_at_once() -> None:
    state = pfeed(probation("unit"), rounds("unit", [PASS, FATAL], every=15))
    decision = decide_probation(state, 15)
    assert decision.verdict is Verdict.UNHEALTHY
    assert "fatally" in decision.reason


def test_probation_without_any_pass_is_unhealthy() -> None:
    state = pfeed(probation("api", "slot", duration_s=60), rounds("api", [PASS] * 4, every=15))
    state = pfeed(state, rounds("slot", [FAIL, FAIL], every=30))
    decision = decide_probation(state, 60)
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.failed_probe == "slot"
    assert "no passing result" in decision.reason


def test_probation_ignores_results_after_its_end() -> None:
    state = pfeed(probation("api", duration_s=30), rounds("api", [PASS, PASS], every=15))
    state = pfeed(state, rounds("api", [FATAL], t0=30))
    assert state.ignored == 1
    assert decide_probation(state, 30).verdict is Verdict.HEALTHY


# ------------------------------------------------------------------------------------ properties

NAMES = ("a", "b", "c")


@dataclass(frozen=True)
class Scenario:
    policy: GatePolicy
    names: tuple[str, ...]
    results: tuple[ProbeResult, ...]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    policy = GatePolicy(
        consecutive=draw(st.integers(1, 4)),
        failure_budget=draw(st.integers(0, 3)),
        deadline_s=float(draw(st.integers(4, 40))),
        interval_s=1.0,
        probe_timeout_s=1.0,
    )
    names = NAMES[: draw(st.integers(1, 3))]
    mix = draw(  # steady, flaky, crashing: each scenario has its own blend of outcomes
        st.sampled_from([[PASS] * 6 + [FAIL] * 3 + [FATAL], [PASS, FAIL], [PASS] * 4 + [FAIL]])
    )
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(names),
                st.sampled_from(mix),
                st.integers(0, 4),  # half-seconds since the previous result
                st.sampled_from([0.1, 0.5, 1.0, 1.5]),  # duration; 1.5 is a late answer
            ),
            max_size=60,
        )
    )
    t, results = 0.0, []
    for name, outcome, dt, took in steps:
        t += dt / 2
        results.append(r(name, outcome, t, took=took))
    return Scenario(policy, names, tuple(results))


def trace(s: Scenario) -> list[tuple[int, GateDecision]]:
    """Decision after each result (at its time), then at a few times up to past the deadline."""
    state = start(s.policy, s.names, 0.0)
    out: list[tuple[int, GateDecision]] = []
    for i, result in enumerate(s.results):
        state = observe(state, result)
        out.append((i, decide(state, result.at_s)))
    end = s.results[-1].at_s if s.results else 0.0
    for t in (end, s.policy.deadline_s - 0.01, s.policy.deadline_s, end + 1000):
        if t >= end:
            out.append((len(s.results), decide(state, t)))
    return out


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_property_never_healthy_without_consecutive_passes_of_every_probe(s: Scenario) -> None:
    for i, decision in trace(s):
        if decision.verdict is Verdict.HEALTHY:
            seen = [x for x in s.results[: i + 1] if x.at_s < s.policy.deadline_s]
            for name in s.names:
                mine = [x for x in seen if x.probe == name]
                last = mine[-s.policy.consecutive :]
                assert len(last) == s.policy.consecutive
                assert all(x.outcome is PASS and x.duration_s <= 1.0 for x in last)
            return


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_property_any_fatal_is_unhealthy(s: Scenario) -> None:
    state = start(s.policy, s.names, 0.0)
    for result in s.results:
        before = decide(state, result.at_s)
        state = observe(state, result)
        in_window = result.at_s < s.policy.deadline_s
        if result.outcome is FATAL and in_window and not before.decided:
            assert decide(state, result.at_s).verdict is Verdict.UNHEALTHY
            assert decide(state, result.at_s).failed_probe == result.probe


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.floats(0, 1000))
def test_property_verdict_at_or_after_deadline_is_never_pending(s: Scenario, extra: float) -> None:
    state = start(s.policy, s.names, 0.0)
    for result in s.results:
        state = observe(state, result)
    assert decide(state, s.policy.deadline_s + extra).verdict is not Verdict.PENDING


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_property_once_decided_stays_decided(s: Scenario) -> None:
    first: GateDecision | None = None
    for _, decision in trace(s):
        if first is None:
            if decision.decided:
                first = decision
        else:
            assert decision.verdict is first.verdict
            assert decision.failed_probe == first.failed_probe


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_property_no_early_rollback_without_fatal_or_spent_budget(s: Scenario) -> None:
    for i, decision in trace(s):
        if decision.verdict is Verdict.UNHEALTHY and i < len(s.results):
            at = s.results[i].at_s
            if at >= s.policy.deadline_s:
                continue
            seen = [x for x in s.results[: i + 1] if x.at_s < s.policy.deadline_s]
            fatal = any(x.outcome is FATAL for x in seen)
            spent = False
            for name in s.names:
                mine = [x for x in seen if x.probe == name]
                first_pass = next(
                    (k for k, x in enumerate(mine) if x.outcome is PASS and x.duration_s <= 1.0),
                    None,
                )
                if first_pass is not None:
                    after = [x for x in mine[first_pass + 1 :] if not _passed(x)]
                    spent = spent or len(after) > s.policy.failure_budget
            assert fatal or spent
            return


def _passed(x: ProbeResult) -> bool:
    return x.outcome is PASS and x.duration_s <= 1.0


# ------------------------------------------------------------------------------------ cadence


def test_startup_rounds_come_sooner_and_back_off_to_the_interval() -> None:
    state = gate("api", "unit", interval_s=2.0)
    gaps, gap = [], None
    for _ in range(5):
        gap = next_round_in_s(state, gap)
        gaps.append(gap)
    assert gaps == [0.25, 0.5, 1.0, 2.0, 2.0]
    state = feed(state, [r("api", PASS, 0.0), r("unit", FAIL, 0.0)])
    assert next_round_in_s(state, 0.5) == 1.0  # "unit" never passed: still starting
    state = observe(state, r("unit", PASS, 0.25))
    assert next_round_in_s(state, 0.5) == 2.0  # every probe passed once: the interval


def test_a_short_interval_caps_the_startup_gap() -> None:
    assert next_round_in_s(gate(interval_s=0.1), None) == 0.1


@st.composite
def round_scripts(draw: st.DrawFn) -> tuple[GatePolicy, dict[str, list[ProbeOutcome]]]:
    """Per probe: the outcome of each round (PASS, FAIL, no FATAL), start-up failures first."""
    policy = GatePolicy(
        consecutive=draw(st.integers(1, 4)),
        interval_s=draw(st.sampled_from([0.1, 0.5, 2.0, 7.0])),
        deadline_s=200.0,
        failure_budget=draw(st.integers(0, 3)),
        probe_timeout_s=0.1,
    )
    scripts = {}
    for name in NAMES[: draw(st.integers(1, 3))]:
        startup = [FAIL] * draw(st.integers(0, 12))
        rest = draw(st.lists(st.sampled_from([PASS] * 5 + [FAIL]), min_size=1, max_size=30))
        scripts[name] = startup + rest
    return policy, scripts


@settings(max_examples=200, deadline=None)
@given(round_scripts())
def test_property_sooner_startup_rounds_never_shorten_the_streak(
    case: tuple[GatePolicy, dict[str, list[ProbeOutcome]]],
) -> None:
    """Drive the gate round by round with the cadence: a HEALTHY verdict always rests on the last
    ``consecutive`` results of every probe spanning at least ``(consecutive - 1) * interval``;
    gaps stay within [0.25 s or the interval, the interval] and only shrink before every probe
    has passed."""
    policy, scripts = case
    state = start(policy, scripts, 0.0)
    now, gap = 0.0, None
    times: dict[str, list[float]] = {name: [] for name in scripts}
    for i in range(max(len(v) for v in scripts.values()) + 5 * policy.consecutive):
        for name, script in scripts.items():
            state = observe(state, r(name, script[min(i, len(script) - 1)], now, took=0.0))
            times[name].append(now)
        decision = decide(state, now)
        if decision.decided:
            break
        gap = next_round_in_s(state, gap)
        assert min(0.25, policy.interval_s) <= gap <= policy.interval_s
        if all(s.ever_passed for s in state.summaries.values()):
            assert gap == policy.interval_s
        now += gap
    if decision.verdict is Verdict.HEALTHY:
        for name in scripts:
            last = times[name][-policy.consecutive :]
            assert last[-1] - last[0] >= (policy.consecutive - 1) * policy.interval_s - 1e-9


@st.composite
def probation_runs(draw: st.DrawFn) -> tuple[ProbationPolicy, tuple[str, ...], list[ProbeResult]]:
    policy = ProbationPolicy(
        duration_s=float(draw(st.integers(5, 60))),
        interval_s=1.0,
        consecutive_failures=draw(st.integers(1, 4)),
        probe_timeout_s=1.0,
    )
    names = NAMES[: draw(st.integers(1, 3))]
    t, results = 0.0, []
    for name, outcome, dt in draw(
        st.lists(
            st.tuples(
                st.sampled_from(names),
                st.sampled_from([PASS] * 4 + [FAIL] * 3 + [FATAL]),
                st.integers(0, 6),
            ),
            max_size=60,
        )
    ):
        t += dt / 2
        results.append(r(name, outcome, t))
    return policy, names, results


@settings(max_examples=100, deadline=None)
@given(probation_runs())
def test_property_probation_is_monotone_and_ends(
    run: tuple[ProbationPolicy, tuple[str, ...], list[ProbeResult]],
) -> None:
    policy, names, results = run
    state = start_probation(policy, names, 0.0)
    first: GateDecision | None = None
    streak = dict.fromkeys(names, 0)
    for result in results:
        before_decided = first is not None
        state = observe_probation(state, result)
        decision = decide_probation(state, result.at_s)
        in_window = result.at_s < policy.duration_s
        if in_window and not before_decided:
            streak[result.probe] = 0 if result.outcome is PASS else streak[result.probe] + 1
            if result.outcome is FATAL or streak[result.probe] >= policy.consecutive_failures:
                assert decision.verdict is Verdict.UNHEALTHY
        if first is None and decision.decided:
            first = decision
        elif first is not None:
            assert decision.verdict is first.verdict
    final = decide_probation(state, policy.duration_s)
    assert final.decided
    if first is not None:
        assert final.verdict is first.verdict
