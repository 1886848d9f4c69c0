"""runbook/alert_events.py on literal webhooks: names, resource, stable ids, occurred."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from runbook.alert_events import (
    FIRING,
    RESOLVED,
    AlertmanagerWebhook,
    alert_events,
    event_id,
    unknown_alertnames,
)

STARTS = dt.datetime(2026, 11, 28, 3, 0, tzinfo=dt.UTC)
ENDS = dt.datetime(2026, 11, 28, 3, 20, tzinfo=dt.UTC)
NOW = dt.datetime(2026, 11, 28, 4, 0, tzinfo=dt.UTC)
RUNBOOKS = {"HighLatency": "diagnose-latency"}


def _webhook(status: str, ends: str = "0001-01-01T00:00:00Z") -> AlertmanagerWebhook:
    return AlertmanagerWebhook.model_validate(
        {
            "version": "4",
            "groupKey": '{}:{alertname="HighLatency"}',
            "status": status,
            "alerts": [
                {
                    "status": status,
                    "labels": {"alertname": "HighLatency", "severity": "critical"},
                    "annotations": {"summary": "High API latency detected"},
                    "startsAt": "2026-11-28T03:00:00Z",
                    "endsAt": ends,
                    "fingerprint": "9f1c2b",
                }
            ],
        }
    )


def test_firing_alert_event() -> None:
    (event,) = alert_events(_webhook("firing"), RUNBOOKS, NOW)

    assert event["event"] == FIRING
    assert event["id"] == str(event_id("9f1c2b", "firing", STARTS))
    assert event["occurred"] == STARTS.isoformat()
    assert event["resource"]["prefect.resource.id"] == (
        'complianceagent.alert.{}:{alertname="HighLatency"}'
    )
    assert event["payload"]["runbook"] == "diagnose-latency"  # from the rule
    assert event["payload"]["endsAt"] is None
    assert event["payload"]["summary"] == "High API latency detected"


def test_resolved_alert_event_occurs_when_it_ended() -> None:
    (event,) = alert_events(_webhook("resolved", "2026-11-28T03:20:00Z"), RUNBOOKS, NOW)

    assert event["event"] == RESOLVED
    assert event["occurred"] == ENDS.isoformat()
    assert event["id"] != str(event_id("9f1c2b", "firing", STARTS))


def test_ids_are_stable_and_distinct_by_status_and_start() -> None:
    assert event_id("a", "firing", STARTS) == event_id("a", "firing", STARTS)
    assert event_id("a", "firing", STARTS) != event_id("a", "resolved", STARTS)
    assert event_id("a", "firing", STARTS) != event_id("a", "firing", ENDS)


def test_unknown_alertnames() -> None:
    assert unknown_alertnames(_webhook("firing"), RUNBOOKS) == []
    assert unknown_alertnames(_webhook("firing"), {}) == ["HighLatency"]


def test_version_other_than_4_is_refused() -> None:
    with pytest.raises(ValidationError, match="version"):
        AlertmanagerWebhook.model_validate({"version": "3", "groupKey": "g", "alerts": []})
