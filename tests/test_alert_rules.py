"""The alert rules in monitoring/ are valid and do what their unit tests say: `promtool
check rules` and `promtool test rules` (input series, `for:` durations, expected alerts),
run here so `make test` and CI run them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
RULE_TESTS = sorted((MONITORING / "tests").glob("*_test.yml"))
# The deployments an alert may name in its `runbook` label (prefect.yaml, issue 9).
RUNBOOKS = {
    "incident-response",
    "diagnose-latency",
    "diagnose-connections",
    "diagnose-redis-memory",
    "diagnose-queue-backlog",
}
KEY_METRICS = {"latency_p99", "error_rate", "cpu", "memory", "db_connections", "queue_depth"}


def _promtool() -> str:
    found = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(found).is_file():
        pytest.fail("promtool is missing: run scripts/setup.sh (Debian's `prometheus`)")
    return found


def _rules() -> list[dict]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def test_promtool_check_rules() -> None:
    assert RULE_FILES
    result = subprocess.run(
        [_promtool(), "check", "rules", *map(str, RULE_FILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS
    result = subprocess.run(
        [_promtool(), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=MONITORING,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_names_its_severity_and_runbook() -> None:
    for rule in _rules():
        labels = rule["labels"]
        assert labels["severity"] in ("warning", "critical"), rule["alert"]
        assert labels["runbook"] in RUNBOOKS, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_page_rules_and_a_pair_per_key_metric() -> None:
    rules = _rules()
    names = {rule["alert"] for rule in rules}
    assert {"HighErrorRate", "HighLatency"} <= names
    pairs: dict[str, set[str]] = {}
    for rule in rules:
        pairs.setdefault(rule["labels"]["metric"], set()).add(rule["labels"]["severity"])
    for metric in KEY_METRICS:
        assert pairs.get(metric) == {"warning", "critical"}, metric


def test_every_rule_is_unit_tested() -> None:
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in _rules()} <= tested
