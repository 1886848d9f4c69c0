"""Tell people: a Slack-style chat webhook, PagerDuty Events API v2, and a status page.

Each channel is optional: a channel with no configured target is skipped with a log line
(a runbook must not fail because nobody set up chat). A configured channel that fails
after retries does fail the task, so a lost page is never silent. A message *about* an
outcome goes through `announce`: its failure is logged, and never changes the run's
outcome or hides the error it reports.
"""

from __future__ import annotations

from typing import Any, Literal

import httpx
from prefect import task
from pydantic import SecretStr

from runbook.settings import load_settings
from tasks.logs import run_logger
from tasks.retry_policy import TRANSIENT_HTTP_STATUSES, TRANSIENT_RETRIES, PlatformCallError

PagerDutySeverity = Literal["critical", "error", "warning", "info"]


def _post(
    channel: str, url: str, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    timeout = httpx.Timeout(load_settings().http_timeout_seconds)
    try:
        with httpx.Client(timeout=timeout) as http:
            response = http.post(url, json=payload, headers=headers)
    except httpx.TransportError as exc:
        # The URL may carry a token (chat webhooks do): name the channel, not the URL.
        raise PlatformCallError(f"{channel}: {type(exc).__name__}", transient=True) from None
    if response.status_code >= 400:
        raise PlatformCallError(
            f"{channel}: HTTP {response.status_code}",
            status=response.status_code,
            transient=response.status_code in TRANSIENT_HTTP_STATUSES,
        )
    return response


@task(**TRANSIENT_RETRIES)
def notify_chat(text: str) -> bool:
    """Post `text` to the chat webhook. Returns False when no webhook is configured."""
    settings = load_settings()
    if settings.slack_webhook_url is None:
        run_logger().warning("no chat webhook configured; not sent: %s", text[:200])
        return False
    _post("chat webhook", settings.slack_webhook_url.get_secret_value(), {"text": text})
    return True


def announce(text: str) -> bool:
    """Tell chat about an outcome, best effort: True if it was sent.

    Use it after the fact (a report of success or failure, often inside an `except`): a
    chat outage is logged as a warning, and the run keeps its own outcome and its own error.
    """
    state = notify_chat(text, return_state=True)
    if state.is_completed():
        return bool(state.result())
    run_logger().warning("could not tell chat (%s); the message was: %s", state.message, text[:500])
    return False


@task(**TRANSIENT_RETRIES)
def page_on_call(
    summary: str,
    severity: PagerDutySeverity,
    dedup_key: str,
    source: str = "complianceagent-runbooks",
    action: Literal["trigger", "acknowledge", "resolve"] = "trigger",
    details: dict[str, Any] | None = None,
    routing_key: SecretStr | None = None,
) -> str | None:
    """Send a PagerDuty Events v2 event; returns the dedup key PagerDuty answered with.

    `routing_key`: another service's integration key (an escalation contact's); default
    RUNBOOK_PAGERDUTY_ROUTING_KEY.
    """
    settings = load_settings()
    routing_key = routing_key or settings.pagerduty_routing_key
    if routing_key is None:
        run_logger().warning("no PagerDuty routing key configured; not paged: %s", summary)
        return None
    event: dict[str, Any] = {
        "routing_key": routing_key.get_secret_value(),
        "event_action": action,
        "dedup_key": dedup_key,
    }
    if action == "trigger":
        event["payload"] = {
            "summary": summary[:1024],
            "severity": severity,
            "source": source,
            "custom_details": details or {},
        }
    response = _post("PagerDuty", str(settings.pagerduty_events_url), event)
    answered: str | None = response.json().get("dedup_key", dedup_key)
    return answered


@task(**TRANSIENT_RETRIES)
def update_status_page(
    status: Literal["investigating", "identified", "monitoring", "resolved", "scheduled"],
    message: str,
) -> bool:
    """Post an incident/maintenance update to the status page. False when none configured."""
    settings = load_settings()
    if settings.statuspage_url is None:
        run_logger().warning("no status page configured; not updated: %s", message[:200])
        return False
    headers = {}
    if settings.statuspage_api_key is not None:
        headers["Authorization"] = f"OAuth {settings.statuspage_api_key.get_secret_value()}"
    _post(
        "status page",
        str(settings.statuspage_url),
        {"incident": {"status": status, "body": message}},
        headers,
    )
    return True
