"""Alertmanager's API v2: silence alerts for a planned window, and expire the silence.

`POST /api/v2/silences` answers `{"silenceID": …}`; `DELETE /api/v2/silence/{id}` expires
it (it stays listed, `status.state: expired`). Expiring one already expired or unknown is
done, so the undo is safe to run twice.
"""

from __future__ import annotations

from typing import Any

import httpx
from prefect import task

from runbook.settings import load_settings
from tasks.retry_policy import TRANSIENT_HTTP_STATUSES, TRANSIENT_RETRIES, PlatformCallError


def _call(method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    settings = load_settings()
    if settings.alertmanager_url is None:
        raise PlatformCallError("RUNBOOK_ALERTMANAGER_URL is not set")
    url = str(settings.alertmanager_url).rstrip("/") + path
    try:
        with httpx.Client(timeout=httpx.Timeout(settings.http_timeout_seconds)) as http:
            response = http.request(method, url, json=body)
    except httpx.TransportError as exc:
        raise PlatformCallError(f"alertmanager {method} {path}: {exc}", transient=True) from None
    if response.status_code >= 400:
        raise PlatformCallError(
            f"alertmanager {method} {path}: HTTP {response.status_code} {response.text[:200]}",
            status=response.status_code,
            transient=response.status_code in TRANSIENT_HTTP_STATUSES,
        )
    return response


@task(**TRANSIENT_RETRIES)
def create_silence(body: dict[str, Any]) -> str:
    """`amtool silence add`: silence the alerts matching `body["matchers"]`; returns its id."""
    silence_id: str = _call("POST", "/api/v2/silences", body).json()["silenceID"]
    return silence_id


@task(**TRANSIENT_RETRIES)
def expire_silence(silence_id: str) -> bool:
    """`amtool silence expire ID`. False if Alertmanager no longer knows it (done already)."""
    try:
        _call("DELETE", f"/api/v2/silence/{silence_id}")
    except PlatformCallError as exc:
        if exc.status == 404:
            return False
        raise
    return True


@task(**TRANSIENT_RETRIES)
def list_silences() -> list[dict[str, Any]]:
    """`amtool silence query`: every silence Alertmanager knows (active, pending, expired)."""
    silences: list[dict[str, Any]] = _call("GET", "/api/v2/silences").json()
    return silences
