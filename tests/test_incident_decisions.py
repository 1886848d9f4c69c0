"""Incident triage, escalation timing, response targets and routing, on literal data."""

from __future__ import annotations

import pytest

from runbook.decisions.incidents import (
    DEFAULT_CONTACTS,
    Contact,
    Verdict,
    dedup_key,
    diagnosis_for,
    due_contacts,
    durations,
    escalation_path,
    incident_id,
    mitigation_proposals,
    on_start,
    response_time,
    seconds_to_next,
    triage,
)
from runbook.decisions.refusal import Refused


@pytest.mark.parametrize(
    ("alertname", "severity", "labels", "given", "expected"),
    [
        ("HighErrorRate", "critical", {}, None, "P2"),
        ("ServiceDown", "critical", {}, None, "P1"),
        ("HighErrorRate", "critical", {"impact": "outage"}, None, "P1"),
        ("HighErrorRate", "critical", {"priority": "p1"}, None, "P1"),
        ("HighLatency", "warning", {}, None, "P3"),
        ("HighLatency", "warning", {"priority": "P2"}, None, "P2"),
        ("UIGlitch", "info", {}, None, "P4"),
        ("Odd", "", {"severity": "critical"}, None, "P2"),
        ("Odd", "page-me", {}, None, "P2"),
        ("ServiceDown", "critical", {}, "P3", "P3"),
    ],
)
def test_triage_follows_the_pages_table(alertname, severity, labels, given, expected):
    assert triage(alertname, severity, labels, given).priority == expected


def test_unknown_severity_is_paged_and_says_why():
    assert "unknown severity 'page-me'" in triage("X", "page-me", {}).reason


def test_incident_id_is_stable_per_group_and_refuses_none():
    assert incident_id('{}:{alertname="A"}') == incident_id('{}:{alertname="A"}')
    assert incident_id("g1") != incident_id("g2")
    with pytest.raises(Refused, match="group_key"):
        incident_id("")


@pytest.mark.parametrize(
    ("state", "ago", "expected"),
    [
        (None, None, Verdict.OPEN),
        ("open", None, Verdict.JOIN),
        ("resolved", 30.0, Verdict.LATE),
        ("resolved", 3600.0, Verdict.OPEN),
        ("failed", None, Verdict.OPEN),
    ],
)
def test_a_start_opens_joins_or_is_a_late_copy(state, ago, expected):
    assert on_start(state, ago, quiet_seconds=600) is expected


def test_escalation_path_by_the_page():
    p1 = [c.role for c in escalation_path("P1", DEFAULT_CONTACTS)]
    p2 = [c.role for c in escalation_path("P2", DEFAULT_CONTACTS)]
    assert p1 == ["On-call engineer", "Team lead", "Engineering manager", "VP Engineering"]
    assert p2 == ["On-call engineer", "Team lead", "Engineering manager"]


def test_due_contacts_over_time():
    def due(priority, minutes, paged=()):
        return [c.slug for c in due_contacts(priority, DEFAULT_CONTACTS, minutes * 60, paged)]

    assert due("P1", 0) == ["on-call-engineer"]
    assert due("P1", 14.9, {"on-call-engineer"}) == []
    assert due("P1", 15, {"on-call-engineer"}) == ["team-lead"]
    assert due("P1", 61, {"on-call-engineer", "team-lead"}) == [
        "engineering-manager",
        "vp-engineering",
    ]
    assert due("P2", 61, {"on-call-engineer", "team-lead", "engineering-manager"}) == []


def test_seconds_to_next_escalation():
    paged = {"on-call-engineer"}
    assert seconds_to_next("P1", DEFAULT_CONTACTS, 600, paged) == 300
    everyone = {"on-call-engineer", "team-lead", "engineering-manager"}
    assert seconds_to_next("P2", DEFAULT_CONTACTS, 5000, everyone) is None


def test_dedup_keys_on_call_is_the_incident_and_escalations_their_own():
    lead = Contact(role="Team lead", name="t", after_minutes=15)
    assert dedup_key("abc", DEFAULT_CONTACTS[0]) == "abc"
    assert dedup_key("abc", lead) == "abc/team-lead"


@pytest.mark.parametrize(
    ("priority", "ack_after", "elapsed", "breached"),
    [
        ("P1", 600.0, 5000.0, False),
        ("P1", 901.0, 5000.0, True),
        ("P1", None, 899.0, False),
        ("P1", None, 901.0, True),
        ("P2", 3599.0, 9999.0, False),
        ("P3", None, 14401.0, True),
        ("P4", None, 86399.0, False),
    ],
)
def test_response_targets(priority, ack_after, elapsed, breached):
    assert response_time(priority, ack_after, elapsed).breached is breached


def test_response_time_text():
    text = response_time("P1", None, 1000).text("P1")
    assert text == "P1 response target 15m 00s: not acknowledged — BREACHED"


@pytest.mark.parametrize(
    ("alertname", "labels", "expected"),
    [
        ("HighLatency", {}, "diagnose-latency"),
        ("DatabaseConnectionsCritical", {}, "diagnose-connections"),
        ("Whatever", {"runbook": "diagnose-redis-memory"}, "diagnose-redis-memory"),
        ("QueueDepthWarning", {}, "diagnose-queue-backlog"),
        ("Whatever", {"runbook": "rm -rf"}, None),
        ("", {}, None),
    ],
)
def test_diagnosis_for_alert(alertname, labels, expected):
    assert diagnosis_for(alertname, labels) == expected


def test_mitigation_proposals():
    (proposal,) = mitigation_proposals("HighErrorRate", {"deployment": "backend"})
    assert proposal.deployment == "rollback/rollback"
    assert proposal.parameters == {"deployment": "backend"}
    assert mitigation_proposals("HighErrorRate", {"deployment": "postgres"}) == []
    assert mitigation_proposals("HighLatency", {"deployment": "backend"}) == []


def test_durations():
    d = durations(1000.0, 1060.0, None, 1600.0)
    assert (d.to_acknowledge, d.to_mitigate, d.to_resolve) == (60.0, None, 600.0)


def test_response_time_against_configured_targets():
    targets = {"P1": 900, "P2": 3600, "P3": 2, "P4": 86400}
    assert response_time("P3", None, 3, targets).breached
    assert not response_time("P3", 1.5, 10, targets).breached  # acknowledged in time
    assert response_time("P3", 2.5, 10, targets).breached
    assert response_time("P3", None, 3, targets).text("P3") == (
        "P3 response target 2s: not acknowledged — BREACHED"
    )
    assert not response_time("P3", None, 3).breached  # the page's 4 h by default
