"""Crash-looping release to healthy old version, end to end, with the DEFAULT gate settings.

The fake hal0-api unit restarts with RestartSec=1 (as a crash-looping hal0 would be configured to be
detected quickly); the gate uses the defaults (interval 2 s, 3 consecutive passes, 120 s deadline).
Measured: wall time from `update` start to exit 4 (rolled back, old version gated healthy), and the
part of it between the swap and the end. Goal: <= 10 s. Run as root:
`python -m bench.bench_crashloop [--runs 3]`; prints one JSON document (`--json` is accepted for
the `make bench` driver's sake).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from tests.kit.appliance import appliance


def one_run() -> tuple[float, float]:
    with appliance() as app:
        # Default [update.health] except where the fake appliance lives (ports, slots).
        app.configure(
            health={
                "interval": 2,
                "consecutive": 3,
                "deadline": 120,
                "probe_timeout": 5,
                "probation": {"duration": 0},
            }
        )
        app.publish("1.1.0", "crash_at_start")
        started = time.monotonic()
        code, doc = app.cli_json("update")
        total = time.monotonic() - started
        assert code == 4, doc
        history = app.cli_json("history")[1]["history"][-1]
        durations = history["durations_s"]
        after_swap = sum(v for k, v in durations.items() if k not in ("fetch", "stage", "promote"))
        return total, after_swap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="the output is JSON anyway")
    args = parser.parse_args(argv)
    runs = [one_run() for _ in range(args.runs)]
    totals = [r[0] for r in runs]
    after = [r[1] for r in runs]
    result = {
        "crashloop_total_s": {
            "median": statistics.median(totals),
            "min": min(totals),
            "max": max(totals),
        },
        "swap_to_healthy_s": {
            "median": statistics.median(after),
            "min": min(after),
            "max": max(after),
        },
        "goal_s": 10,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
