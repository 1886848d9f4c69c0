"""The logs runbook as an operator starts it: through the REST API of the served
deployments, with a bad filter refused by the server before a run exists."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import prefect_rest
from tests.test_served_e2e import _artifact, _start, _wait_final

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("parameters", "name"),
    [
        ({"numeric_condition": "duration_ms>fast"}, "numeric_condition"),
        ({"field_match": "user123"}, "field_match"),
        ({"max_matches": 0}, "max_matches"),
    ],
)
def test_bad_filters_are_refused_by_the_server_naming_them(platform, served_api, parameters, name):
    with prefect_rest(served_api) as api:
        refused = _start(api, "logs/logs", parameters)
    assert refused.status_code == 409
    assert name in refused.text


def test_a_users_activity_through_the_rest_api(platform, served_api):
    with httpx.Client(base_url=platform.backend.url, timeout=10) as backend:
        backend.get("/api/v1/scans", headers={"X-User-Id": "user123"})
        backend.get("/api/v1/scans", headers={"X-User-Id": "user456"})

    with prefect_rest(served_api) as api:
        run = _start(api, "logs/logs", {"field_match": 'user_id:"user123"'})
        final = _wait_final(api, run.raise_for_status().json()["id"])
        assert final["state"]["type"] == "COMPLETED", final["state"]["message"]
        table = json.loads(_artifact(api, final["id"], "log-matches"))
    assert len(table) == 1
    assert "path=/api/v1/scans" in table[0]["line"] and "user_id=user123" in table[0]["line"]
