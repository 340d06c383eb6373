"""Daemon footprint and CLI cold start, against the goals of issue 5.

    python -m bench.bench_daemon [--runs 5] [--idle 5]

1. Idle daemon RSS: ``watchdog-updater daemon`` runs as a real subprocess under a temporary root
   (metrics served, a fake ``NOTIFY_SOCKET`` with a 60 s watchdog, nothing due); VmRSS of its main
   process is read from /proc after ``--idle`` seconds idle. Then one channel check runs (in the
   daemon's job process) and the main process's RSS is read again: verification's imports must not
   stay in the daemon. Wake-ups while idle are the context switches of each thread over the idle
   period. Goal: at most 45 MiB, no busy wake-ups.
2. Cold start: wall time of ``watchdog-updater --root TMP status`` and of ``update --check`` against
   a closed port on loopback (connection refused at once: everything up to the first network call
   is measured, the network itself is not), each in a fresh interpreter, median of ``--runs``.
   Goal: ``update --check`` at most 0.5 s. Over budget, ``-X importtime`` names the imports that
   dominate.
3. The whole check, for the record (no goal): ``update --check`` against a signed channel served
   over HTTPS on loopback by the test kit, so the manifest is downloaded and its Sigstore bundle
   verified (sigstore's imports included: they load only once a verification runs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RSS_GOAL_MIB = 45.0
COLD_START_GOAL_S = 0.5
sys.path.insert(0, str(ROOT))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepare(root: Path) -> None:
    from tests.kit.host import Host
    from watchdog_updater.config import ScheduleConfig
    from watchdog_updater.daemon import write_schedule_state
    from watchdog_updater.schedule import Planned

    host = Host(root)
    host.prepare()
    host.install_initial("1.0.0")
    host.write_config(
        manifest_base=f"http://127.0.0.1:{_closed_port()}",
        trusted_root=Path("unused"),
        extra={
            "verify": {"trusted_root": "public-good"},
            "download": {"retries": 0},
            "schedule": {"cron": "0 3 * * *", "jitter": 0, "check_interval": "1h"},
            "metrics": {"listen": "127.0.0.1:0"},
        },
    )
    # Nothing due for hours, and the channel was "checked" just now: a truly idle daemon.
    later = datetime.fromtimestamp(time.time() + 6 * 3600, UTC)
    write_schedule_state(
        host.layout.state_dir,
        ScheduleConfig(cron="0 3 * * *", jitter_s=0.0),
        Planned(slot=later, at=later),
        time.time(),
    )


def _cli(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "watchdog_updater", "--root", str(root), *args]


def _status_field(pid: int, name: str, task: str | None = None) -> int:
    path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    with open(path) as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def _switches(pid: int) -> dict[str, int]:
    """Context switches (voluntary + involuntary) per thread name."""
    out: dict[str, int] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
            total = _status_field(pid, "voluntary_ctxt_switches", task)
            total += _status_field(pid, "nonvoluntary_ctxt_switches", task)
        except (OSError, KeyError):
            continue
        key = "main thread" if task == str(pid) else f"thread {name}[{task}]"
        out[key] = total
    return out


def _recv_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(message)
        if wanted in message:
            return got
    raise RuntimeError(f"no {wanted!r} within {timeout} s (got {got})")


def bench_idle(idle_s: float) -> dict[str, object]:
    from watchdog_updater.config import ScheduleConfig
    from watchdog_updater.daemon import read_schedule_state, write_schedule_state

    with tempfile.TemporaryDirectory(prefix="wdu-bench-") as tmp:
        root = Path(tmp) / "root"
        _prepare(root)
        notify_path = Path(tmp) / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "60000000"}
        started = time.monotonic()
        proc = subprocess.Popen(_cli(root, "daemon"), env=env, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            _recv_until(sock, "READY=1", 30)
            ready_s = time.monotonic() - started
            time.sleep(0.5)  # the recovery job's exit, the first STATUS
            before = _switches(proc.pid)
            time.sleep(idle_s)
            after = _switches(proc.pid)
            rss_idle = _status_field(proc.pid, "VmRSS") / 1024
            hwm = _status_field(proc.pid, "VmHWM") / 1024
            wakeups = {k: after[k] - before.get(k, 0) for k in after}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        # A second start that finds no record of a check: its first job is a channel check.
        state = root / "var/lib/watchdog-updater"
        schedule = ScheduleConfig(cron="0 3 * * *", jitter_s=0.0)
        planned, _ = read_schedule_state(state, schedule, UTC)
        write_schedule_state(state, schedule, planned, None)
        proc = subprocess.Popen(_cli(root, "daemon"), env=env, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            _recv_until(sock, "READY=1", 30)
            _recv_until(sock, "STATUS=checking", 30)
            messages = _recv_until(sock, "last: check failed", 60)
            time.sleep(0.5)
            rss_after_check = _status_field(proc.pid, "VmRSS") / 1024
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            sock.close()
    return {
        "ready_s": ready_s,
        "rss_idle_mib": rss_idle,
        "rss_peak_mib": hwm,
        "rss_after_check_mib": rss_after_check,
        "wakeups": wakeups,
        "idle_s": idle_s,
        "check_status": messages[-1],
    }


def _timed(argv: list[str], runs: int) -> tuple[float, list[float], int]:
    times, code = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        code = subprocess.run(argv, capture_output=True, cwd=ROOT, check=False).returncode
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, code


def _importtime(root: Path, *args: str, top: int = 12) -> list[tuple[float, str]]:
    """The imports with the largest cumulative time (s), from ``-X importtime``."""
    argv = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "watchdog_updater",
        "--root",
        str(root),
        *args,
    ]
    err = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False).stderr
    rows: list[tuple[float, str, int]] = []
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((int(m[2]) / 1e6, m[4], len(m[3])))
    # Top-level imports only (one space of indentation): what each import statement of the
    # process cost with everything it pulled in, largest first.
    best: dict[str, float] = {}
    for cumulative, name, indent in rows:
        if indent == 1:
            best[name] = best.get(name, 0.0) + cumulative
    return sorted(((t, n) for n, t in best.items()), reverse=True)[:top]


def bench_cold_start(runs: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="wdu-bench-") as tmp:
        root = Path(tmp) / "root"
        _prepare(root)
        bare, bare_runs, _ = _timed([sys.executable, "-c", "pass"], runs)
        status, status_runs, status_code = _timed(_cli(root, "status"), runs)
        check, check_runs, check_code = _timed(_cli(root, "update", "--check"), runs)
        imports = _importtime(root, "update", "--check")
    return {
        "python_bare_s": bare,
        "status_s": status,
        "status_runs": status_runs,
        "status_code": status_code,
        "check_s": check,
        "check_runs": check_runs,
        "check_code": check_code,
        "check_imports": imports,
        "bare_runs": bare_runs,
    }


def bench_full_check(runs: int) -> dict[str, object]:
    from tests.kit.channel import ReleaseChannel
    from tests.kit.release_server import ReleaseServer
    from tests.kit.sigstore_kit import PrivateSigstore
    from tests.kit.tls import TestCA

    with tempfile.TemporaryDirectory(prefix="wdu-bench-") as tmp:
        root = Path(tmp) / "root"
        _prepare(root)
        ca, sigstore = TestCA(), PrivateSigstore()
        with ReleaseServer(tls=ca) as server:
            from tests.kit.host import Host

            host = Host(root)
            host.write_config(
                manifest_base=server.base_url,
                trusted_root=sigstore.write_trusted_root(Path(tmp) / "trusted_root.json"),
                ca_file=ca.ca_file,
            )
            channel = ReleaseChannel(server, sigstore)
            channel.publish(channel.release("1.1.0"))
            median, times, code = _timed(_cli(root, "update", "--check"), runs)
    return {"check_full_s": median, "check_full_runs": times, "check_full_code": code}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    idle = bench_idle(args.idle)
    cold = bench_cold_start(args.runs)
    full = bench_full_check(args.runs)
    if args.json:
        print(json.dumps({"idle": idle, "cold": cold, "full": full}, default=str))
        return 0

    def verdict(ok: bool) -> str:
        return "OK" if ok else "OVER BUDGET"

    rss = float(idle["rss_idle_mib"])  # type: ignore[arg-type]
    print(f"daemon READY after            {idle['ready_s']:.2f} s (recovery job included)")
    print(
        f"idle daemon RSS ({args.idle:g} s idle)    {rss:.1f} MiB   goal <= {RSS_GOAL_MIB:g} MiB: "
        f"{verdict(rss <= RSS_GOAL_MIB)}"
    )
    print(f"  peak RSS (VmHWM)            {idle['rss_peak_mib']:.1f} MiB")
    print(
        f"  after one channel check     {idle['rss_after_check_mib']:.1f} MiB "
        "(verification runs in the job process)"
    )
    print(f"  wake-ups in {args.idle:g} s idle, per thread:")
    for thread, count in sorted(idle["wakeups"].items()):  # type: ignore[attr-defined]
        print(f"    {thread:<28} {count}")
    print(f"python -c pass                median {cold['python_bare_s']:.3f} s")
    print(
        f"status cold start             median {cold['status_s']:.3f} s  "
        f"[{', '.join(f'{t:.3f}' for t in cold['status_runs'])}]"  # type: ignore[attr-defined]
    )
    check = float(cold["check_s"])  # type: ignore[arg-type]
    print(
        f"update --check cold start     median {check:.3f} s  "
        f"[{', '.join(f'{t:.3f}' for t in cold['check_runs'])}]"  # type: ignore[attr-defined]
        f"   goal <= {COLD_START_GOAL_S:g} s: {verdict(check <= COLD_START_GOAL_S)}"
    )
    print("  (network excluded: the channel is a closed port on loopback, refused at once)")
    print("  largest imports of update --check (cumulative, -X importtime):")
    for seconds, name in cold["check_imports"]:  # type: ignore[attr-defined]
        print(f"    {seconds:7.3f} s  {name}")
    print(
        f"update --check, whole           median {full['check_full_s']:.3f} s  "
        f"[{', '.join(f'{t:.3f}' for t in full['check_full_runs'])}]"  # type: ignore[attr-defined]
        f"   exit {full['check_full_code']} (100: update available)"
    )
    print("  (signed channel over HTTPS on loopback: download, verification, sigstore imports)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
