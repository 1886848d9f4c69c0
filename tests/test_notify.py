"""Notifications reach the local receiver in each channel's wire format."""

from __future__ import annotations

from prefect import flow

from sandbox.platform import PAGERDUTY_ROUTING_KEY
from tasks.notify import notify_chat, page_on_call, update_status_page


def test_chat_message_is_posted_to_the_webhook(platform):
    assert notify_chat.fn("deploy of 1.5.0 finished") is True
    [sent] = platform.receiver.received
    assert sent.path == "/slack/T000/B000/sandbox"
    assert sent.json == {"text": "deploy of 1.5.0 finished"}


def test_pagerduty_event_v2_shape(platform):
    key = page_on_call.fn(
        "API down", "critical", dedup_key="incident-42", details={"endpoint": "/health"}
    )
    [sent] = platform.receiver.received
    assert sent.path == "/v2/enqueue"
    assert sent.json == {
        "routing_key": PAGERDUTY_ROUTING_KEY,
        "event_action": "trigger",
        "dedup_key": "incident-42",
        "payload": {
            "summary": "API down",
            "severity": "critical",
            "source": "complianceagent-runbooks",
            "custom_details": {"endpoint": "/health"},
        },
    }
    assert key == "incident-42"


def test_status_page_update(platform):
    assert update_status_page.fn("investigating", "Elevated API latency") is True
    [sent] = platform.receiver.received
    assert sent.path == "/statuspage/incidents"
    assert sent.json == {"incident": {"status": "investigating", "body": "Elevated API latency"}}


def test_unconfigured_channel_is_skipped(platform, monkeypatch):
    monkeypatch.delenv("RUNBOOK_SLACK_WEBHOOK_URL")
    assert notify_chat.fn("nobody listens") is False
    assert platform.receiver.received == []


@flow
def send_chat(text: str) -> bool:
    return notify_chat(text)


def test_receiver_outage_is_retried(platform):
    platform.receiver.fail_next(times=2, status=503)
    assert send_chat("after two 503s", return_state=True).is_completed()
    assert [n.status for n in platform.receiver.received] == [503, 503, 200]
