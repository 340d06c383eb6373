"""``watchdog-updater daemon`` whose scheduler can be told "your next run is due now" (SIGUSR1).

    python -m tests.kit.warp_daemon --root ROOT daemon

The real CLI entry point (``watchdog_updater._cli.main``: config, logging, sd_notify, signals) runs
the real daemon loop, jobs and metrics server, with one difference: the clock the daemon plans by
(``Daemon(clock=...)``, the seam the in-process tests use) is wall time plus an offset, and SIGUSR1
moves the offset forward to the planned run and wakes the main loop. The scheduled update job then
starts as it would at 03:00. Why: cron has minute granularity and the plan is loaded only at start,
so the unmodified daemon runs at most one scheduled update a minute - too slow for a soak. Job child
processes are untouched (they run on real time); only the parent's notion of "now" jumps.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import watchdog_updater.daemon as daemon_module
from watchdog_updater._cli import main as cli_main

WARP_SIGNAL = signal.SIGUSR1


class WarpDaemon(daemon_module.Daemon):
    """The daemon, on a clock that jumps to the planned run on :data:`WARP_SIGNAL`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._offset_s = 0.0
        super().__init__(*args, clock=self._warped_time, **kwargs)
        signal.signal(WARP_SIGNAL, self._warp)

    def _warped_time(self) -> float:
        return time.time() + self._offset_s

    def _warp(self, _signum: int, _frame: object) -> None:
        # Before start-up planned anything there is no run to jump to: the signal is a no-op.
        try:
            due = self.schedule.planned.at.timestamp()
        except RuntimeError:
            return
        self._offset_s += max(0.0, due - self._warped_time())
        self.wakeup()


def main(argv: list[str]) -> int:
    # _cmd_daemon imports Daemon from the module when it runs: it builds this subclass.
    daemon_module.Daemon = WarpDaemon  # type: ignore[misc]
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
