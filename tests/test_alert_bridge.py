"""The alert bridge, run as `python -m bridge` against the real Prefect test server, with
posted webhooks: each alert becomes one Prefect event; repeats and out-of-order deliveries
add nothing; bad, unknown and huge payloads are refused and post nothing; an unreachable
Prefect is a 503 (the one answer Alertmanager retries)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import httpx
import pytest
from prefect.settings import PREFECT_API_URL

from runbook.alert_events import FIRING, RESOLVED, event_id
from sandbox.services import free_port
from tests.alert_helpers import (
    alert_events_of,
    running_bridge,
    wait_for_alert_events,
    webhook,
    webhook_alert,
)
from tests.prefect_servers import PrefectServer


@pytest.fixture(scope="module")
def api_url(prefect_server: None) -> str:
    return str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def bridge(api_url: str) -> Iterator[str]:
    with running_bridge(api_url, ALERT_BRIDGE_MAX_BODY_BYTES=str(64 * 1024)) as url:
        yield url


def _group() -> str:
    return f'{{}}:{{alertname="HighErrorRate", test="{uuid.uuid4().hex}"}}'


def _post(bridge: str, body: object) -> httpx.Response:
    return httpx.post(f"{bridge}/alertmanager", json=body, timeout=30)


def test_each_alert_becomes_one_event_with_its_labels(bridge: str, api_url: str) -> None:
    group = _group()
    starts = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=2)
    first = webhook_alert(fingerprint="f00000000000001", starts_at=starts)
    second = webhook_alert(fingerprint="f00000000000002", starts_at=starts)

    response = _post(bridge, webhook(group, first, second))

    assert response.status_code == 200, response.text
    assert response.json()["events"] == 2
    events = wait_for_alert_events(api_url, group, 2)
    assert {e["id"] for e in events} == {
        str(event_id("f00000000000001", "firing", starts)),
        str(event_id("f00000000000002", "firing", starts)),
    }
    event = events[0]
    assert event["event"] == FIRING
    assert event["resource"]["prefect.resource.id"] == f"complianceagent.alert.{group}"
    assert event["resource"]["complianceagent.alert.runbook"] == "incident-response"
    assert event["payload"]["alertname"] == "HighErrorRate"
    assert event["payload"]["labels"]["severity"] == "critical"
    assert event["payload"]["summary"] == "HighErrorRate summary"
    assert event["payload"]["group_key"] == group
    assert dt.datetime.fromisoformat(event["occurred"]) == starts


def test_a_repeated_notification_is_one_event(bridge: str, api_url: str) -> None:
    group = _group()
    starts = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3)
    alert = webhook_alert(fingerprint="fa1", starts_at=starts)

    for _ in range(3):  # Alertmanager's redelivery and repeat_interval both resend it
        assert _post(bridge, webhook(group, alert)).status_code == 200
    # Then it resolves: once that event is visible, the repeats have been processed too.
    ended = webhook_alert(
        fingerprint="fa1", status="resolved", starts_at=starts, ends_at=dt.datetime.now(dt.UTC)
    )
    assert _post(bridge, webhook(group, ended)).status_code == 200

    events = wait_for_alert_events(api_url, group, 2)
    assert [e["event"] for e in events] == [FIRING, RESOLVED]
    assert len(alert_events_of(api_url, group)) == 2


def test_resolved_before_firing_records_the_same_two_events(bridge: str, api_url: str) -> None:
    group = _group()
    starts = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ends = starts + dt.timedelta(minutes=4)
    firing = webhook_alert(fingerprint="fb1", starts_at=starts)
    resolved = webhook_alert(fingerprint="fb1", status="resolved", starts_at=starts, ends_at=ends)

    # Delivered out of order: the resolution first, then a late firing notification.
    assert _post(bridge, webhook(group, resolved)).status_code == 200
    assert _post(bridge, webhook(group, firing)).status_code == 200

    events = wait_for_alert_events(api_url, group, 2)
    # Ordered by when they happened, not when they arrived.
    assert [e["event"] for e in events] == [FIRING, RESOLVED]
    assert dt.datetime.fromisoformat(events[1]["occurred"]) == ends


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"version": "3", "groupKey": "g", "status": "firing", "alerts": []}, "version"),
        ({"version": "4", "groupKey": "g", "status": "firing", "alerts": []}, "alerts"),
        ({"version": "4", "status": "firing", "alerts": [webhook_alert()]}, "groupKey"),
        (
            {"version": "4", "groupKey": "g", "status": "firing", "alerts": [{"status": "on"}]},
            "status",
        ),
    ],
)
def test_a_malformed_webhook_is_refused_naming_the_field(
    bridge: str, body: dict, names: str
) -> None:
    response = _post(bridge, body)

    assert response.status_code == 400
    assert "Alertmanager webhook" in response.json()["error"]
    assert names in response.text


def test_not_json_is_refused(bridge: str) -> None:
    response = httpx.post(f"{bridge}/alertmanager", content=b"{not json", timeout=10)
    assert response.status_code == 400


def test_an_unknown_alert_is_refused_and_posts_nothing(bridge: str, api_url: str) -> None:
    group = _group()
    known = webhook_alert("HighErrorRate", fingerprint="fc1")
    unknown = webhook_alert("DropAllTables", fingerprint="fc2")

    response = _post(bridge, webhook(group, known, unknown))

    assert response.status_code == 422
    assert response.json()["unknown"] == ["DropAllTables"]
    # A valid delivery to the same group afterwards is the only event there.
    assert _post(bridge, webhook(group, known)).status_code == 200
    events = wait_for_alert_events(api_url, group, 1)
    assert [e["payload"]["fingerprint"] for e in events] == ["fc1"]


def test_a_huge_payload_is_refused_with_413(bridge: str, api_url: str) -> None:
    group = _group()
    alert = webhook_alert(fingerprint="fd1")
    alert["annotations"]["description"] = "x" * 4000
    body = webhook(group, *[dict(alert, fingerprint=f"fd{i}") for i in range(40)])  # ~170 KB

    response = _post(bridge, body)

    assert response.status_code == 413
    assert alert_events_of(api_url, group) == []


def test_prefect_unreachable_is_503_so_alertmanager_retries() -> None:
    nobody = f"http://127.0.0.1:{free_port()}/api"
    with running_bridge(nobody) as bridge:
        response = _post(bridge, webhook(_group(), webhook_alert()))

    assert response.status_code == 503
    assert "Prefect unreachable" in response.json()["error"]


@pytest.mark.slow
def test_behind_basic_auth_the_bridge_sends_the_servers_credential(tmp_path) -> None:
    """A self-hosted server with PREFECT_SERVER_API_AUTH_STRING (production's, README
    "Production"): without the credential Prefect answers 401, which retrying cannot
    mend (502); with PREFECT_API_AUTH_STRING, as Prefect's own client sends it, the
    event is recorded."""
    user, password = "alertbridge", "s3cret-for-this-test"
    server = PrefectServer(tmp_path, {"PREFECT_SERVER_API_AUTH_STRING": f"{user}:{password}"})
    server.start()
    try:
        group = _group()
        with running_bridge(server.url) as bridge:
            refused = _post(bridge, webhook(group, webhook_alert()))
        with running_bridge(server.url, PREFECT_API_AUTH_STRING=f"{user}:{password}") as bridge:
            accepted = _post(bridge, webhook(group, webhook_alert()))
        events = wait_for_alert_events(server.url, group, 1, auth=(user, password))
    finally:
        server.stop()

    assert refused.status_code == 502 and "(401)" in refused.json()["error"]
    assert accepted.status_code == 200
    assert [e["event"] for e in events] == ["complianceagent.alert.firing"]
    assert password not in refused.text + accepted.text
