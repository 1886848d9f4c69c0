"""The notification receiver records what was sent and answers like PagerDuty or a webhook."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from sandbox.receiver import NotificationReceiver


@pytest.fixture(scope="module")
def module_receiver() -> Iterator[NotificationReceiver]:
    with NotificationReceiver() as server:
        yield server


@pytest.fixture
def receiver(module_receiver) -> NotificationReceiver:
    module_receiver.clear()
    return module_receiver


@pytest.fixture
def http(receiver) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=receiver.url, timeout=10) as client:
        yield client


def test_webhook_post_is_recorded_and_answered_ok(http, receiver):
    response = http.post(
        "/slack/hooks/T1", json={"text": "deploy started"}, headers={"X-Request-Id": "abc"}
    )
    assert (response.status_code, response.text) == (200, "ok")

    [received] = receiver.received
    assert received.path == "/slack/hooks/T1"
    assert received.json == {"text": "deploy started"}
    assert received.body == b'{"text":"deploy started"}'
    assert received.headers["x-request-id"] == "abc"
    assert received.headers["content-type"] == "application/json"
    assert received.status == 200
    assert received.at.tzinfo is not None


def test_pagerduty_events_v2_answers(http, receiver):
    event = {
        "routing_key": "rk",
        "event_action": "trigger",
        "dedup_key": "incident-42",
        "payload": {"summary": "backend down", "severity": "critical", "source": "t"},
    }
    response = http.post("/v2/enqueue", json=event)
    assert response.status_code == 202
    assert response.json() == {
        "status": "success",
        "message": "Event processed",
        "dedup_key": "incident-42",
    }

    response = http.post("/v2/enqueue", json={**event, "dedup_key": None})
    assert response.status_code == 202
    generated = response.json()["dedup_key"]
    assert generated
    assert generated != "incident-42"

    response = http.post("/v2/enqueue", content=b"not json")
    assert response.status_code == 400
    assert [n.status for n in receiver.received] == [202, 202, 400]
    assert receiver.received[2].json is None


def test_fail_next_refuses_then_recovers_and_records_every_attempt(http, receiver):
    receiver.fail_next(times=2, status=503)
    statuses = [http.post("/v2/enqueue", json={"dedup_key": "k"}).status_code for _ in range(3)]
    assert statuses == [503, 503, 202]
    assert [n.status for n in receiver.received] == [503, 503, 202]

    receiver.fail_next(status=429)
    assert http.post("/hook", content=b"x").status_code == 429
    assert http.post("/hook", content=b"x").status_code == 200


def test_wait_for_a_notification_sent_later(receiver):
    def send_later() -> None:
        time.sleep(0.2)
        with httpx.Client() as client:
            client.post(f"{receiver.url}/hook", json={"n": 1})
            client.post(f"{receiver.url}/v2/enqueue", json={"event_action": "resolve"})

    sender = threading.Thread(target=send_later)
    sender.start()
    try:
        found = receiver.wait_for(
            lambda n: n.json is not None and n.json.get("event_action") == "resolve", timeout=5
        )
    finally:
        sender.join()
    assert found.path == "/v2/enqueue"
    assert receiver.wait_for(timeout=0).path == "/hook"  # already there: no waiting


def test_wait_for_times_out_listing_what_arrived(http, receiver):
    http.post("/slack/hooks/T1", json={"text": "something else"})

    def is_pagerduty(n):
        return n.path.startswith("/v2/enqueue")

    with pytest.raises(TimeoutError, match="is_pagerduty") as caught:
        receiver.wait_for(is_pagerduty, timeout=0.2)
    assert "/slack/hooks/T1" in str(caught.value)
    assert "something else" in str(caught.value)


def test_get_is_not_a_notification_and_clear_forgets(http, receiver):
    assert http.get("/").text == "ok"
    assert receiver.received == []
    receiver.fail_next()
    http.post("/hook", content=b"x")
    receiver.clear()
    assert receiver.received == []
    assert http.post("/hook", content=b"x").status_code == 200  # queued failure forgotten too


def test_stop_and_start_again_on_the_same_port():
    receiver = NotificationReceiver()
    with receiver, httpx.Client() as client:
        url = receiver.url
        receiver.stop()
        with pytest.raises(httpx.ConnectError):
            client.post(f"{url}/hook", content=b"x", timeout=2)
        receiver.start()
        assert receiver.url == url
        assert client.post(f"{url}/hook", content=b"x").status_code == 200
    assert len(receiver.received) == 1
