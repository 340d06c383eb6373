"""The health gate: a pure decision (:mod:`.policy`), probes at the I/O edge (:mod:`.probes`) and
the loops that drive them with hard time limits (:mod:`.runner`)."""

from watchdog_updater.health.policy import (
    GateDecision,
    GatePolicy,
    GateState,
    ProbationPolicy,
    ProbationState,
    ProbeOutcome,
    ProbeResult,
    ProbeSummary,
    Verdict,
    decide,
    decide_probation,
    observe,
    observe_probation,
    start,
    start_probation,
)

# Probes and runners import the HTTP stack: load them on first use (PEP 562), so that reading the
# configuration (which needs only the policies) stays fast.
_LAZY = {
    "DEFAULT_SLOT_PATTERN": "probes",
    "HAL0_API_HEALTH_URL": "probes",
    "CommandProbe": "probes",
    "HttpProbe": "probes",
    "Probe": "probes",
    "ServiceManagerLike": "probes",
    "SlotProbe": "probes",
    "UnitProbe": "probes",
    "UnitStatusLike": "probes",
    "discover_slots": "probes",
    "run_probe": "probes",
    "DEFAULT_ABANDON_SLACK_S": "runner",
    "run_gate": "runner",
    "run_probation": "runner",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "DEFAULT_ABANDON_SLACK_S",
    "DEFAULT_SLOT_PATTERN",
    "HAL0_API_HEALTH_URL",
    "CommandProbe",
    "GateDecision",
    "GatePolicy",
    "GateState",
    "HttpProbe",
    "ProbationPolicy",
    "ProbationState",
    "Probe",
    "ProbeOutcome",
    "ProbeResult",
    "ProbeSummary",
    "ServiceManagerLike",
    "SlotProbe",
    "UnitProbe",
    "UnitStatusLike",
    "Verdict",
    "decide",
    "decide_probation",
    "discover_slots",
    "observe",
    "observe_probation",
    "run_gate",
    "run_probation",
    "run_probe",
    "start",
    "start_probation",
]
