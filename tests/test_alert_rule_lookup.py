"""The rule lookup RESOLVE verifies with, on literal rule files and on the project's own."""

from __future__ import annotations

from pathlib import Path

import yaml

from runbook.decisions.alert_rules import alert_expression, alert_query_clear

RULES = {
    "groups": [
        {"name": "rec", "rules": [{"record": "job:errors:rate5m", "expr": "sum(rate(x[5m]))"}]},
        {
            "name": "alerts",
            "rules": [
                {"alert": "HighErrorRate", "expr": "sum(rate(a[5m]))\n  / sum(rate(b[5m])) > 0.05"},
                {"alert": "HighLatency", "expr": "p99 > 2"},
            ],
        },
    ]
}


def test_the_alerts_expression_is_found_by_name_and_normalised():
    assert (
        alert_expression([RULES], "HighErrorRate") == "sum(rate(a[5m])) / sum(rate(b[5m])) > 0.05"
    )
    assert alert_expression([{}, RULES], "HighLatency") == "p99 > 2"


def test_unknown_alerts_and_recording_rules_have_no_expression():
    assert alert_expression([RULES], "NoSuchAlert") is None
    assert alert_expression([RULES], "job:errors:rate5m") is None
    assert alert_expression([{"groups": None}], "HighLatency") is None


def test_the_projects_rules_define_the_pages_two_alerts():
    root = Path(__file__).resolve().parent.parent / "monitoring" / "rules"
    documents = [yaml.safe_load(p.read_text()) for p in sorted(root.glob("*.yml"))]
    assert alert_expression(documents, "HighErrorRate") == (
        'sum(rate(http_requests_total{status=~"5.."}[5m])) '
        "/ sum(rate(http_requests_total[5m])) > 0.05"
    )
    assert (alert_expression(documents, "HighLatency") or "").endswith("> 2")


def test_clear_only_when_nothing_or_zero():
    assert alert_query_clear(None) and alert_query_clear(0.0)
    assert not alert_query_clear(0.07) and not alert_query_clear(1.0)
