"""The maintenance window's pure decisions, on literal data."""

from __future__ import annotations

import datetime as dt

from runbook.decisions.maintenance import (
    Window,
    closing_update,
    in_flight_requests,
    open_window_of,
    silence_body,
    silences_of_run,
)

METRICS = """\
# HELP http_requests_in_flight Requests being served now (scrapes excluded).
# TYPE http_requests_in_flight gauge
http_requests_in_flight 3
http_request_duration_seconds_count 12
"""


def test_in_flight_is_read_from_the_metrics_page_summing_label_sets():
    assert in_flight_requests(METRICS) == 3
    assert (
        in_flight_requests(
            'http_requests_in_flight{pod="a"} 2\nhttp_requests_in_flight{pod="b"} 1.0\n'
        )
        == 3
    )
    assert in_flight_requests("http_requests_in_flight 0\n") == 0
    assert in_flight_requests("http_requests_in_flight_total 5\nup 1\n") is None  # not the gauge


WINDOW = Window(
    "alice",
    "upgrade",
    "manual",
    dt.datetime(2026, 11, 3, 2, 0, tzinfo=dt.UTC),
    dt.datetime(2026, 11, 3, 2, 30, tzinfo=dt.UTC),
    "run-1",
)


def test_the_window_annotation_records_who_why_and_the_deadline_and_reads_back():
    deployment = {
        "metadata": {
            "annotations": {"runbooks.complianceagent.ai/maintenance-window": WINDOW.annotation()}
        }
    }
    assert open_window_of(deployment) == {
        "openedBy": "alice",
        "reason": "upgrade",
        "work": "manual",
        "openedAt": "2026-11-03T02:00:00.000Z",
        "deadline": "2026-11-03T02:30:00.000Z",
        "flowRunId": "run-1",
    }
    assert open_window_of({"metadata": {}}) is None
    assert WINDOW.remaining_seconds(dt.datetime(2026, 11, 3, 2, 20, tzinfo=dt.UTC)) == 600
    assert WINDOW.remaining_seconds(dt.datetime(2026, 11, 3, 3, 0, tzinfo=dt.UTC)) == 0


def test_the_silence_covers_the_namespace_until_its_end():
    body = silence_body({"namespace": "complianceagent"}, WINDOW, WINDOW.deadline)
    assert body["matchers"] == [
        {"name": "namespace", "value": "complianceagent", "isRegex": False, "isEqual": True}
    ]
    assert (body["startsAt"], body["endsAt"]) == (
        "2026-11-03T02:00:00.000Z",
        "2026-11-03T02:30:00.000Z",
    )
    assert "alice" in body["createdBy"] and "upgrade" in body["comment"]


def test_the_status_page_is_resolved_only_when_healthy():
    assert closing_update("upgrade", "", "").status == "resolved"
    degraded = closing_update("upgrade", "/health/db failed", "")
    assert degraded.status == "identified" and "degraded: /health/db failed" in degraded.message
    assert "not completed" in closing_update("upgrade", "", "migrations failed").message


def test_the_silences_of_a_dead_windows_run_are_found_by_its_comment():
    comment = "Planned maintenance: {} (flow run {})"
    silences = [
        {"id": "a", "comment": comment.format("x", "run-1"), "status": {"state": "active"}},
        {"id": "b", "comment": comment.format("x", "run-1"), "status": {"state": "pending"}},
        {"id": "c", "comment": comment.format("x", "run-1"), "status": {"state": "expired"}},
        {"id": "d", "comment": comment.format("x", "run-10"), "status": {"state": "active"}},
        {"id": "e", "comment": "someone's own silence", "status": {"state": "active"}},
    ]
    assert silences_of_run(silences, "run-1") == ["a", "b"]
