"""`make bench`: run every benchmark, print one table, keep one JSON document per run.

Each benchmark measures its baseline in the same run (see the module docstrings), as the median
of several runs with min and max kept. Every benchmark is run with ``--json``; its last stdout
line is its result document. Written to bench/results/:

- ``<UTC time>.json``: the machine (CPUs, load before and after, kernel, commit), each
  benchmark's exit status, wall time and result document, and the table's rows;
- ``<UTC time>.md``: the table as Markdown (docs/performance.md quotes one);
- ``<UTC time>-<name>.txt``: everything each benchmark printed.

Run as root (the end-to-end and crash-loop benchmarks use the systemd sandbox). Takes ~10 min.
``python -m bench --only bench_daemon`` runs a subset; ``python -m bench --render RESULTS.json``
prints the table of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# name -> extra arguments; each module also gets --json.
BENCHES: dict[str, list[str]] = {
    "bench_download": ["--tls"],
    "bench_download_http": [],
    "bench_install": [],
    "bench_e2e": [],
    "bench_crashloop": [],
    "bench_daemon": [],
}
MODULE = {"bench_download_http": "bench_download"}


@dataclass
class Row:
    figure: str
    measured: str
    baseline: str
    ratio: str
    goal: str
    met: bool | None  # None: reported, no goal


def _span(values: list[float], unit: str = "s", digits: int = 2) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f} {unit}"
    return f"{med:.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _ratio_row(
    figure: str, ours: list[float], base: list[float], base_name: str, goal: float
) -> Row:
    ratio = statistics.median(ours) / statistics.median(base)
    return Row(
        figure,
        _span(ours),
        f"{base_name} {_span(base)}",
        f"{ratio:.3f}x",
        f"<= {goal:g}x",
        ratio <= goal,
    )


def _stat_values(doc: Mapping[str, Any]) -> list[float]:
    """A {median, min, max} document as a list that has those statistics."""
    return [float(doc["min"]), float(doc["median"]), float(doc["max"])]


def rows_download(doc: Mapping[str, Any]) -> list[Row]:
    scheme, mib = doc["scheme"], doc["payload_mib"]
    base = doc["baselines_s"]["curl | sha256sum"]
    rows = [
        _ratio_row(
            f"download + hash + verify, {mib} MiB, {scheme} loopback (verifier loaded, as for "
            "the tarball in an update)",
            doc["updater_warm_s"],
            base,
            "`curl | sha256sum`",
            1.15,
        )
    ]
    cold = doc["updater_s"]
    ratio = statistics.median(cold) / statistics.median(base)
    rows.append(
        Row(
            f"same, {scheme}, verifier cold (sigstore imported at the verification)",
            _span(cold),
            f"`curl | sha256sum` {_span(base)}",
            f"{ratio:.2f}x",
            "-",
            None,
        )
    )
    fair = doc["baselines_s"]["curl | openssl sha256"]
    ratio = statistics.median(doc["updater_warm_s"]) / statistics.median(fair)
    rows.append(
        Row(
            f"same, {scheme}, verifier loaded, against a SHA-NI hasher",
            _span(doc["updater_warm_s"]),
            f"`curl | openssl sha256` {_span(fair)}",
            f"{ratio:.2f}x",
            "-",
            None,
        )
    )
    rows.append(
        Row(
            f"peak RSS, download + verify ({scheme})",
            f"{doc['peak_rss_mib']:.1f} MiB",
            "-",
            "-",
            "<= 64 MiB",
            doc["peak_rss_mib"] <= 64,
        )
    )
    return rows


def rows_install(doc: Mapping[str, Any]) -> list[Row]:
    figure = f"unpack + flush + swap, {doc['files']:,} files / {doc['unpacked_mib']} MiB"
    return [_ratio_row(figure, doc["updater_s"], doc["tar_sync_s"], "`tar -xzf && sync`", 1.2)]


def rows_e2e(doc: Mapping[str, Any]) -> list[Row]:
    release = doc["release"]
    updater, naive = _stat_values(doc["updater_s"]), _stat_values(doc["naive_s"])
    ratio = float(doc["ratio"])
    rss = float(doc["updater_peak_rss_mib"]["median"])
    floors = doc.get("import_floor_rss_mib")  # absent from results before it was measured
    floor_cell, floor_ratio = "-", "-"
    if floors is not None:
        floor = float(floors["everything an update imports"])
        floor_cell = (
            f"import floor {floor:.1f} MiB (python + sigstore.verify "
            f"{float(floors['python + sigstore.verify']):.1f})"
        )
        floor_ratio = f"{rss / floor:.2f}x"
    outage = _stat_values(doc["api_outage_updater_s"])
    restart = _stat_values(doc["api_outage_restart_s"])
    outage_ratio = statistics.median(outage) / statistics.median(restart)
    return [
        Row(
            f"end-to-end update, {release['files']:,} files / {release['unpacked_mib']} MiB, "
            "systemd sandbox (check, download, verify, stage, swap, restart, gate)",
            _span(updater),
            f"naive script {_span(naive)}",
            f"{ratio:.3f}x",
            f"<= {doc['goal_ratio']:g}x",
            ratio <= float(doc["goal_ratio"]),
        ),
        Row(
            "same update, against the naive script + `sync` (its tree durable, as the updater's)",
            _span(updater),
            f"naive + sync {_span(_stat_values(doc['naive_sync_s']))}",
            f"{statistics.median(updater) / float(doc['naive_sync_s']['median']):.2f}x",
            "-",
            None,
        ),
        Row(
            "peak RSS during an update (largest process); tiny release for comparison",
            f"{rss:.1f} MiB; tiny {doc['small_release_peak_rss_mib']:.1f} MiB",
            floor_cell,
            floor_ratio,
            f"<= {doc['goal_rss_mib']:g} MiB, independent of size",
            rss <= float(doc["goal_rss_mib"]),
        ),
        Row(
            "hal0-api unavailable during a good update",
            _span(outage),
            f"`systemctl restart hal0-api` alone {_span(restart)}",
            f"{outage_ratio:.2f}x",
            "-",
            None,
        ),
        Row(
            "failed slot requests during an update",
            f"{doc['slot_failures_updater']} of {doc['slot_requests_updater']}",
            f"naive script: {doc['slot_failures_naive']}",
            "-",
            "0",
            doc["slot_failures_updater"] == 0,
        ),
    ]


def rows_crashloop(doc: Mapping[str, Any]) -> list[Row]:
    total = _stat_values(doc["crashloop_total_s"])
    return [
        Row(
            "crash-looping release to healthy old version (default gate, RestartSec=1)",
            _span(total),
            "-",
            "-",
            f"<= {doc['goal_s']:g} s",
            statistics.median(total) <= float(doc["goal_s"]),
        )
    ]


def rows_daemon(doc: Mapping[str, Any]) -> list[Row]:
    idle, cold, full = doc["idle"], doc["cold"], doc["full"]
    wakeups = sum(int(v) for v in idle["wakeups"].values())
    return [
        Row(
            f"idle daemon RSS ({idle['idle_s']:g} s idle)",
            f"{idle['rss_idle_mib']:.1f} MiB",
            "-",
            "-",
            "<= 45 MiB",
            idle["rss_idle_mib"] <= 45,
        ),
        Row(
            "idle daemon wake-ups, all threads, 60 s watchdog",
            f"{wakeups} in {idle['idle_s']:g} s",
            "-",
            "-",
            "no busy wake-ups",
            wakeups == 0,
        ),
        Row(
            "`update --check` cold start, network excluded",
            _span(cold["check_runs"], digits=3),
            f"`python -c pass` {cold['python_bare_s']:.3f} s",
            "-",
            "<= 0.5 s",
            cold["check_s"] <= 0.5,
        ),
        Row(
            "`update --check`, whole (HTTPS loopback channel, Sigstore verification)",
            _span(full["check_full_runs"], digits=3),
            "-",
            "-",
            "-",
            None,
        ),
    ]


ROWS: dict[str, Callable[[Mapping[str, Any]], list[Row]]] = {
    "bench_e2e": rows_e2e,
    "bench_download": rows_download,
    "bench_download_http": rows_download,
    "bench_install": rows_install,
    "bench_crashloop": rows_crashloop,
    "bench_daemon": rows_daemon,
}


def markdown(rows: list[Row]) -> str:
    verdict = {True: "met", False: "**not met**", None: "-"}
    lines = [
        "| figure | measured, median (min-max) | baseline, same run | ratio | goal | |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (r.figure, r.measured, r.baseline, r.ratio, r.goal, verdict[r.met])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit or None,
        "loadavg_before": os.getloadavg(),
    }


def render(path: Path) -> str:
    """The table of a results document written by an earlier run."""
    run = json.loads(path.read_text())
    rows: list[Row] = []
    for name, bench in run["benches"].items():
        if bench["result"] is not None:
            rows.extend(ROWS[name](bench["result"]))
    return markdown(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run these only")
    parser.add_argument(
        "--render", type=Path, help="print the table of a results .json, run nothing"
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render(args.render))
        return 0
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run: dict[str, Any] = {"started": stamp, "machine": _machine(), "benches": {}}
    rows: list[Row] = []
    for name in args.only or BENCHES:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        argv_ = [sys.executable, "-m", f"bench.{MODULE.get(name, name)}", *BENCHES[name], "--json"]
        proc = subprocess.run(argv_, cwd=HERE.parent, capture_output=True, text=True, check=False)
        elapsed = time.monotonic() - started
        (results / f"{stamp}-{name}.txt").write_text(
            proc.stdout + "\n--- stderr ---\n" + proc.stderr
        )
        doc: Any = None
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            doc = json.loads(lines[-1])
            rows.extend(ROWS[name](doc))
        else:
            print(f"   failed (exit {proc.returncode}); see {stamp}-{name}.txt", flush=True)
        run["benches"][name] = {"exit": proc.returncode, "seconds": elapsed, "result": doc}
        print(f"   {elapsed:.0f} s", flush=True)
    run["machine"]["loadavg_after"] = os.getloadavg()
    run["table"] = [asdict(r) for r in rows]
    (results / f"{stamp}.json").write_text(json.dumps(run, indent=2) + "\n")
    table = markdown(rows)
    (results / f"{stamp}.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nresults: {results}/{stamp}.json (table: {stamp}.md)")
    failed = [n for n, b in run["benches"].items() if b["exit"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
