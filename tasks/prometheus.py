"""Metrics for the latency diagnosis: an instant query to Prometheus' HTTP API
(`/api/v1/query`), or — without Prometheus — one scrape of the backend's `/metrics`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import yaml
from prefect import task

from runbook.settings import MissingSetting, load_settings
from tasks.retry_policy import TRANSIENT_HTTP_STATUSES, TRANSIENT_RETRIES, PlatformCallError


def _get(what: str, url: str, params: dict[str, str] | None = None) -> httpx.Response:
    timeout = httpx.Timeout(load_settings().http_timeout_seconds)
    try:
        with httpx.Client(timeout=timeout) as http:
            response = http.get(url, params=params)
    except httpx.TransportError as exc:
        raise PlatformCallError(f"{what}: {type(exc).__name__}", transient=True) from None
    if response.status_code >= 400:
        raise PlatformCallError(
            f"{what}: HTTP {response.status_code} {response.text[:300]}",
            status=response.status_code,
            transient=response.status_code in TRANSIENT_HTTP_STATUSES,
        )
    return response


@task(**TRANSIENT_RETRIES, task_run_name="query prometheus: {query}")
def query_prometheus(query: str) -> float | None:
    """The value of an instant PromQL query that yields one series (None when it yields
    none, or NaN: no traffic in the range)."""
    url = load_settings().prometheus_url
    if url is None:
        raise MissingSetting("prometheus_url")
    base = str(url).rstrip("/")
    body = _get("Prometheus query", f"{base}/api/v1/query", {"query": query}).json()
    if body.get("status") != "success":
        raise PlatformCallError(f"Prometheus query {query!r}: {body.get('error', body)}")
    result = body["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if value != value else value  # NaN: 0/0, nothing observed


@task(**TRANSIENT_RETRIES)
def scrape_backend_metrics() -> str:
    """`curl $API/metrics`: the backend's Prometheus text, as the page's first command."""
    base = str(load_settings().api_base_url).rstrip("/")
    return _get("backend /metrics", f"{base}/metrics").text


# The platform's alert rules, as Prometheus loads them (monitoring/rules/*.yml).
ALERT_RULES_DIR = Path(__file__).resolve().parent.parent / "monitoring" / "rules"


@task
def read_alert_rules() -> list[dict[str, Any]]:
    """The parsed rule files of monitoring/rules, for the alert's own query at RESOLVE."""
    return [yaml.safe_load(p.read_text()) or {} for p in sorted(ALERT_RULES_DIR.glob("*.y*ml"))]
