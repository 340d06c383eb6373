"""`make bench`: run every benchmark in this folder, one after the other, and keep what each printed.

Each benchmark measures its own baseline in the same run (see the module docstrings). The output of
each run is written to bench/results/<UTC time>-<name>.txt, and a summary of which ran and how long
they took is printed at the end. Run as root (the crash-loop bench uses the systemd sandbox).
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("bench_download", "bench_install", "bench_crashloop", "bench_daemon")


def main() -> int:
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    summary: list[tuple[str, int, float]] = []
    for name in BENCHES:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", f"bench.{name}"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        elapsed = time.monotonic() - started
        out = proc.stdout + (f"\n--- stderr ---\n{proc.stderr}" if proc.stderr.strip() else "")
        (results / f"{stamp}-{name}.txt").write_text(out)
        print(proc.stdout, flush=True)
        summary.append((name, proc.returncode, elapsed))
    print(f"{'benchmark':<18} {'exit':>4} {'wall s':>8}")
    for name, code, elapsed in summary:
        print(f"{name:<18} {code:>4} {elapsed:>8.1f}")
    print(f"outputs: {results}/{stamp}-*.txt")
    return 0 if all(code == 0 for _, code, _ in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
