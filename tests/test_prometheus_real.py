"""A real Prometheus scrapes a live metrics server; every dashboard query and alert expression runs.

Prometheus (Debian's package) runs as a plain process on loopback with a 1 s scrape and rule
interval, tmp storage and the shipped rules file. Phase 1 checks every dashboard query against a
populated state dir. Phase 2 breaks the appliance's state step by step (a rollback, repeated
failures, a freeze, a stale check and heartbeat, an unreadable file, a stopped daemon) until every
alert expression selects series, and the alerts show up in Prometheus.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_metrics import E2_GATE_FAILED, entry, history_line, populate_state
from watchdog_updater.journal import Outcome
from watchdog_updater.layout import Layout
from watchdog_updater.metrics import DaemonMetrics, MetricsServer, build_registry, serve
from watchdog_updater.state import ChannelMemory, Holds, StateStore

PROJECT = Path(__file__).resolve().parents[1]
RULES = PROJECT / "prometheus" / "hal0-updater.rules.yml"
DASHBOARD = PROJECT / "grafana" / "hal0-updater.json"
PROMETHEUS = shutil.which("prometheus")
JOB = "hal0-updater"

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed"),
    pytest.mark.timeout(120),
]

# What Grafana substitutes for the dashboard's variables ("All" selected: the allValue).
GRAFANA_VARS = {
    "job": ".+",
    "instance": ".+",
    "__rate_interval": "15s",
    "__interval": "5s",
    "__range": "5m",
}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str) -> str:
    def one(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        assert name in GRAFANA_VARS, f"unknown dashboard variable ${name} in {expr}"
        return GRAFANA_VARS[name]

    return _VAR.sub(one, expr)


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class QueryError(AssertionError):
    pass


@dataclass
class Prometheus:
    base_url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                doc = json.load(response)
        except urllib.error.HTTPError as e:
            raise QueryError(f"{path} {params}: HTTP {e.code}: {e.read().decode()}") from e
        if doc.get("status") != "success":
            raise QueryError(f"{path} {params}: {doc}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, seconds: float = 10.0) -> list[dict[str, Any]]:
        end = time.time()
        data = self.api(
            "/api/v1/query_range", query=expr, start=str(end - seconds), end=str(end), step="1"
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alert_rules(self) -> list[dict[str, Any]]:
        groups = self.api("/api/v1/rules", type="alert")["groups"]
        return [rule for group in groups for rule in group["rules"]]


@dataclass
class Appliance:
    layout: Layout
    daemon: DaemonMetrics
    server: MetricsServer


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    layout = Layout(tmp_path / "root")
    now = time.time()
    populate_state(layout, now=now)
    registry, daemon = build_registry(layout, "stable")
    daemon.heartbeat()
    daemon.set_auto_updates(True)
    daemon.set_next_run(now + 3600)
    daemon.record_check("up-to-date")
    daemon.add_downloaded(4096)
    server = serve(registry, "127.0.0.1:0")
    try:
        yield Appliance(layout, daemon, server)
    finally:
        server.stop()


def _start_prometheus(tmp_path: Path, target: str) -> Prometheus:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        f"rule_files:\n  - {json.dumps(str(RULES))}\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        f"    static_configs:\n      - targets: [{json.dumps(target)}]\n"
    )
    log = tmp_path / "prometheus.log"
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS or "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Prometheus(f"http://127.0.0.1:{port}", process, log)


def _ready(prom: Prometheus) -> bool:
    if prom.process.poll() is not None:
        raise RuntimeError(f"prometheus exited {prom.process.returncode}:\n{prom.log.read_text()}")
    try:
        with urllib.request.urlopen(f"{prom.base_url}/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _stop(prom: Prometheus) -> None:
    if prom.process.poll() is None:
        prom.process.terminate()
        try:
            prom.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prom.process.kill()
            prom.process.wait(timeout=10)


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    """A Prometheus scraping ``target`` every second, stopped on exit whatever happens."""
    prom: Prometheus | None = None
    try:
        for attempt in range(3):  # the free port may be taken between probing and binding
            workdir = tmp_path / f"prometheus-{attempt}"
            workdir.mkdir(parents=True)
            prom = _start_prometheus(workdir, target)
            try:
                wait_for("prometheus to be ready", lambda p=prom: _ready(p), timeout_s=20)
                break
            except RuntimeError:
                _stop(prom)
                if attempt == 2:
                    raise
        assert prom is not None
        yield prom
    finally:
        if prom is not None:
            _stop(prom)


@pytest.fixture
def prometheus(tmp_path: Path, appliance: Appliance) -> Iterator[Prometheus]:
    with running_prometheus(tmp_path, f"127.0.0.1:{appliance.server.port}") as prom:
        # The first scrapes: three samples, so increase() over the dashboard's 15 s has data.
        wait_for(
            "three scrapes of the metrics server",
            lambda: (
                (prom.value(f'count_over_time(up{{job="{JOB}"}}[1m])') or 0) >= 3
                and prom.value(f'up{{job="{JOB}"}}') == 1
            ),
        )
        yield prom


def dashboard_queries() -> list[tuple[str, str, bool]]:
    """(where, expr, is a range query) for every panel target and every query variable."""
    doc = json.loads(DASHBOARD.read_text())
    queries: list[tuple[str, str, bool]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                where = f"panel {panel['title']!r} {target['refId']}"
                queries.append((where, target["expr"], not target.get("instant", False)))

    walk(doc["panels"])
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match is not None, f"variable {var['name']}: unsupported query {query}"
        queries.append((f"variable {var['name']}", f"count by ({match[2]}) ({match[1]})", False))
    return queries


def test_the_dashboard_is_importable_json_with_a_datasource_variable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    assert doc.get("id") is None  # importable into any Grafana
    ids = []
    for panel in doc["panels"]:
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    assert len(ids) == len(set(ids))
    exprs = " ".join(expr for _, expr, _ in dashboard_queries())
    for needed in (
        "hal0_updater_installed_version_info",
        "hal0_updater_available_version_info",
        "hal0_updater_update_attempts_total",
        "hal0_updater_rollbacks_total",
        "hal0_updater_gate_duration_seconds_bucket",
        "hal0_updater_probe_last_success",
        "hal0_updater_state",
        "hal0_updater_quarantined_version_info",
        "hal0_updater_paused",
        "hal0_updater_frozen",
        "hal0_updater_last_check_timestamp_seconds",
    ):
        assert needed in exprs, needed


def test_real_prometheus_evaluates_every_dashboard_query_and_alert(
    prometheus: Prometheus, appliance: Appliance
) -> None:
    started = time.monotonic()
    # ---------------------------------------------------------------- the scrape itself
    target = prometheus.api("/api/v1/targets")["activeTargets"]
    assert [t["health"] for t in target] == ["up"], target
    assert prometheus.value('hal0_updater_installed_version_info{version="1.1.0"}') == 1

    # ---------------------------------------------------------------- phase 1: dashboard
    failures = []
    for where, expr, is_range in dashboard_queries():
        promql = substitute(expr)
        try:
            if not prometheus.query(promql):
                failures.append(f"{where}: no series for {promql}")
            if is_range and not prometheus.query_range(promql):
                failures.append(f"{where}: no series over a range for {promql}")
        except QueryError as e:
            failures.append(f"{where}: {e}")
    assert not failures, "\n".join(failures)

    # ---------------------------------------------------------------- the rules loaded
    rules = prometheus.alert_rules()
    names = {r["name"] for r in rules}
    assert names == set(re.findall(r"^\s*- alert:\s*(\S+)", RULES.read_text(), re.M))
    wait_for(
        "a rule evaluation",
        lambda: all(
            r["health"] == "ok" and r["lastEvaluation"][:4] != "0001"
            for r in prometheus.alert_rules()
        ),
    )
    for rule in rules:
        prometheus.query(rule["query"])  # raises on an error
        metrics = set(re.findall(r"\bhal0_updater_\w+", rule["query"]))
        metrics |= {"up"} if re.search(r"\bup\{", rule["query"]) else set()
        for metric in metrics:
            assert prometheus.query(f"count({metric})"), f"{rule['name']}: no {metric} series"

    def selecting() -> set[str]:
        return {r["name"] for r in prometheus.alert_rules() if prometheus.query(r["query"])}

    # A healthy-ish appliance: a quarantined version, an old release not applied.
    assert selecting() == {"Hal0UpdaterVersionQuarantined", "Hal0UpdateAvailableNotApplied"}

    # ---------------------------------------------------------------- phase 2: break things
    layout, store = appliance.layout, StateStore(appliance.layout.state_dir)
    now = time.time()
    with (layout.state_dir / "history.jsonl").open("a") as history:
        history.write("\n")  # terminates the torn line populate_state left behind
        for i, outcome in enumerate((Outcome.ROLLED_BACK, Outcome.ROLLBACK_UNHEALTHY)):
            history.write(
                history_line(
                    entry(
                        outcome=outcome,
                        finished_at=now + i,
                        reason=E2_GATE_FAILED.reason,
                        details=dict(E2_GATE_FAILED.details),
                    )
                )
            )
        history.write(history_line(entry(outcome=Outcome.FAILED, finished_at=now + 2)))
    store.save_holds(Holds(frozen_reason="manual attention needed", frozen_at=now))
    store.remember_channel(
        "stable", ChannelMemory("1.2.1", "cd" * 32, signed_at=now - 4 * 86400, accepted_at=0)
    )
    appliance.daemon.heartbeat_timestamp.set(now - 3600)  # a wedged main loop
    (layout.state_dir / "transaction.json").write_text("{ torn")
    wait_for(
        "every state-based alert expression to select series",
        lambda: selecting() >= names - {"Hal0UpdaterDown"},
    )
    # The dashboard still answers with a broken state file: state "unknown".
    assert prometheus.value('hal0_updater_state{state="unknown"}') == 1

    # Alerts without `for` fire at once, the others are pending.
    def alert_states() -> dict[str, str]:
        states: dict[str, str] = {}
        for alert in prometheus.api("/api/v1/alerts")["alerts"]:
            name, state = alert["labels"]["alertname"], alert["state"]
            if states.get(name) != "firing":
                states[name] = state
        return states

    wait_for(
        "every alert but Down to be pending or firing",
        lambda: set(alert_states()) >= names - {"Hal0UpdaterDown"},
    )
    states = alert_states()
    for name in (
        "Hal0UpdaterRollback",
        "Hal0UpdaterFailingRepeatedly",
        "Hal0UpdaterRollbackUnhealthy",
        "Hal0UpdaterVersionQuarantined",
    ):
        assert states[name] == "firing", states

    appliance.server.stop()  # the daemon dies
    wait_for("the scrape to fail", lambda: prometheus.value(f'up{{job="{JOB}"}}') == 0)
    down = next(r["query"] for r in rules if r["name"] == "Hal0UpdaterDown")
    assert prometheus.query(down)
    wait_for("Hal0UpdaterDown to be pending", lambda: "Hal0UpdaterDown" in alert_states())
    assert time.monotonic() - started < 60


def test_prometheus_is_stopped_even_when_the_test_fails(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), running_prometheus(tmp_path, "127.0.0.1:9") as prom:
        assert prom.process.poll() is None
        _ = 1 / 0
    assert prom.process.poll() is not None
