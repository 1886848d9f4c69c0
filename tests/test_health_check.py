"""The health-check runbook against the sandbox's real backend, PostgreSQL and Redis."""

from __future__ import annotations

import json

import pytest
from prefect.exceptions import ParameterTypeError

from flows.health_check import health_check
from tests.helpers import read_artifacts

ENDPOINTS = ["/health", "/health/ready", "/health/live", "/health/db", "/health/redis"]


def test_healthy_platform_passes_with_a_table_of_all_five(platform):
    state = health_check(return_state=True)

    assert state.is_completed(), state.message
    rows = state.result()
    assert [r["endpoint"] for r in rows] == ENDPOINTS
    assert all(r["result"] == "✅ healthy" and r["status"] == 200 for r in rows)
    table = json.loads(read_artifacts(state.state_details.flow_run_id)["health-check"].data)
    assert [r["endpoint"] for r in table] == ENDPOINTS
    assert json.loads(table[3]["body"]) == {"status": "connected"}
    assert platform.receiver.received == []


def test_redis_down_fails_naming_the_endpoint_and_notifies(platform):
    platform.redis.stop()

    state = health_check(return_state=True)

    assert state.is_failed()
    assert "1 of 5 health checks failed: /health/redis (Redis)" in state.message
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "/health/redis" in chat.json["text"]


def test_transient_error_is_retried(platform):
    platform.backend.fail_next("/health/db", status=503, times=1)

    state = health_check(return_state=True)

    assert state.is_completed(), state.message
    assert platform.backend.requests["/health/db"] == 2


def test_endpoint_that_never_answers_in_time_is_reported(platform):
    platform.backend.delay_seconds["/health/live"] = 1.0

    state = health_check(timeout_seconds=0.2, notify_on_failure=False, return_state=True)

    assert state.is_failed()
    assert "/health/live (API liveness): no answer within 0.2s" in state.message
    assert platform.receiver.received == []


def test_maintenance_mode_is_reported_as_unhealthy(platform):
    platform.backend.maintenance_mode = lambda: True
    try:
        state = health_check(notify_on_failure=False, return_state=True)
    finally:
        platform.backend.maintenance_mode = platform._backend_in_maintenance
    assert state.is_failed()
    assert '/health (API): HTTP 503 {"status": "maintenance"}' in state.message


@pytest.mark.parametrize("bad", [0, -1, 61, "soon"])
def test_bad_timeout_is_refused_before_any_request(platform, bad):
    with pytest.raises(ParameterTypeError, match="timeout_seconds"):
        health_check(timeout_seconds=bad)
    # Prometheus keeps scraping /metrics meanwhile; no health endpoint was asked.
    assert {p: n for p, n in platform.backend.requests.items() if p.startswith("/health")} == {}
