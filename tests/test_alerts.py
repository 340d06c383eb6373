"""The shipped alert rules: valid for promtool, unit-tested, and every alert has a runbook."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
RULES = PROJECT / "prometheus" / "hal0-updater.rules.yml"
RULE_TESTS = PROJECT / "prometheus" / "hal0-updater.rules.test.yml"
DOCS = PROJECT / "docs" / "metrics.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")

# Required by the issue; the rules file may add more, never fewer.
REQUIRED_ALERTS = {
    "Hal0UpdaterRollback",
    "Hal0UpdaterFailingRepeatedly",
    "Hal0UpdaterRollbackUnhealthy",
    "Hal0UpdaterNoRecentCheck",
    "Hal0UpdaterDown",
    "Hal0UpdaterAbsent",
    "Hal0UpdaterVersionQuarantined",
    "Hal0UpdateAvailableNotApplied",
}


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)\s*$", RULES.read_text(), re.MULTILINE)


def alert_blocks() -> dict[str, str]:
    """Each alert's text in the rules file, up to the next alert."""
    text = RULES.read_text()
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*- alert:\s*(\S+)", text, re.M)]
    ends = [s for s, _ in starts[1:]] + [len(text)]
    return {name: text[start:end] for (start, name), end in zip(starts, ends, strict=True)}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def eval_cases() -> list[tuple[str, bool]]:
    """(alertname, expects a firing alert) for every eval_time case of the unit tests."""
    cases = []
    for block in re.split(r"^\s*- eval_time:", RULE_TESTS.read_text(), flags=re.M)[1:]:
        name = re.search(r"alertname:\s*(\S+)", block)
        assert name is not None, block
        fires = re.search(r"exp_alerts:\s*\[\]", block) is None
        cases.append((name.group(1), fires))
    return cases


@needs_promtool
def test_promtool_check_rules_accepts_the_rules() -> None:
    result = subprocess.run(
        [PROMTOOL or "promtool", "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = subprocess.run(
        [PROMTOOL or "promtool", "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_required_alerts_exist_once() -> None:
    names = alert_names()
    assert len(names) == len(set(names)), names
    assert set(names) >= REQUIRED_ALERTS


def test_every_alert_is_unit_tested_both_firing_and_quiet() -> None:
    cases = eval_cases()
    tested = {name for name, _ in cases}
    assert tested == set(alert_names())
    for name in alert_names():
        assert (name, True) in cases, f"{name}: no case where it fires"
        assert (name, False) in cases, f"{name}: no case where it stays quiet"


def test_every_alert_has_severity_summary_description_and_a_runbook_in_the_docs() -> None:
    docs = DOCS.read_text()
    anchors = {
        github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", docs, re.MULTILINE)
    }
    for name, block in alert_blocks().items():
        assert re.search(r"severity:\s*(info|warning|critical)\b", block), name
        assert re.search(r"^\s*summary:", block, re.M), name
        assert re.search(r"^\s*description:", block, re.M), name
        runbook = re.search(r'runbook_url:\s*"docs/metrics\.md#([^"]+)"', block)
        assert runbook is not None, f"{name}: no runbook_url into docs/metrics.md"
        assert runbook.group(1) == name.lower(), name
        assert runbook.group(1) in anchors, f"{name}: docs/metrics.md has no #{runbook.group(1)}"


def test_rollback_unhealthy_is_the_critical_one() -> None:
    blocks = alert_blocks()
    assert "severity: critical" in blocks["Hal0UpdaterRollbackUnhealthy"]
