"""End to end as an operator meets it: deployments served by one process (as `make up`
does), runs started through the REST API, results read back from the server."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from tests.helpers import prefect_rest

pytestmark = pytest.mark.slow


def _start(api: httpx.Client, deployment: str, parameters: dict[str, Any]) -> httpx.Response:
    found = api.get(f"/deployments/name/{deployment}").raise_for_status().json()
    return api.post(f"/deployments/{found['id']}/create_flow_run", json={"parameters": parameters})


def _wait_final(api: httpx.Client, run_id: str, timeout: float = 120) -> dict[str, Any]:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        run = api.get(f"/flow_runs/{run_id}").raise_for_status().json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} not finished after {timeout}s")


def _artifact(api: httpx.Client, run_id: str, key: str) -> Any:
    found = api.post(
        "/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [key]}}},
    ).raise_for_status()
    return found.json()[0]["data"]


def test_health_check_through_the_rest_api(platform, served_api):
    with prefect_rest(served_api) as api:
        run = _start(api, "health-check/health-check", {}).raise_for_status().json()
        final = _wait_final(api, run["id"])
        assert final["state"]["type"] == "COMPLETED", final["state"]["message"]
        table = json.loads(_artifact(api, run["id"], "health-check"))
        assert {row["endpoint"] for row in table} == {
            "/health",
            "/health/ready",
            "/health/live",
            "/health/db",
            "/health/redis",
        }

        # Redis goes down: the next run fails naming /health/redis, and chat hears of it.
        platform.redis.stop()
        run = _start(api, "health-check/health-check", {}).raise_for_status().json()
        final = _wait_final(api, run["id"])
        assert final["state"]["type"] == "FAILED"
        assert "/health/redis (Redis)" in final["state"]["message"]
        chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
        assert "/health/redis" in chat.json["text"]


def test_bad_parameters_are_refused_by_the_server_before_a_run_exists(platform, served_api):
    with prefect_rest(served_api) as api:
        refused = _start(api, "health-check/health-check", {"timeout_seconds": -1})
        assert refused.status_code == 409
        assert "timeout_seconds" in refused.text
    # Prometheus keeps scraping /metrics meanwhile; no health endpoint was asked.
    assert {p: n for p, n in platform.backend.requests.items() if p.startswith("/health")} == {}
