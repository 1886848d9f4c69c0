"""HTTP checks against the platform's API (the runbook's `curl -sf $API_URL/health...`)."""

from __future__ import annotations

import json
import time

import httpx
from prefect import task

from runbook.decisions.health import EndpointCheck, judge_response
from tasks.retry_policy import TRANSIENT_HTTP_STATUSES, TRANSIENT_RETRIES, PlatformCallError


@task(**TRANSIENT_RETRIES, task_run_name="check {endpoint}")
def check_endpoint(base_url: str, endpoint: str, timeout_seconds: float) -> EndpointCheck:
    """GET one health endpoint and judge its answer.

    A timeout, a refused connection or a 429/5xx answer raises a transient
    `PlatformCallError` (so Prefect retries it); any other answer is returned as an
    `EndpointCheck`, healthy or not. Messages leave out the endpoint: the task run's
    name and the flow's summary carry it.
    """
    url = base_url.rstrip("/") + endpoint
    started = time.perf_counter()
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_seconds)) as http:
            response = http.get(url)
    except httpx.TimeoutException:
        raise PlatformCallError(f"no answer within {timeout_seconds:g}s", transient=True) from None
    except httpx.TransportError as exc:
        raise PlatformCallError(f"{type(exc).__name__}: {exc}", transient=True) from None
    latency_ms = (time.perf_counter() - started) * 1000
    text = response.text[:500]
    if response.status_code in TRANSIENT_HTTP_STATUSES:
        raise PlatformCallError(
            f"HTTP {response.status_code} {text}",
            status=response.status_code,
            transient=True,
        )
    try:
        body = response.json()
    except json.JSONDecodeError:
        body = None
    problem = judge_response(endpoint, response.status_code, body)
    return EndpointCheck(endpoint, not problem, response.status_code, latency_ms, text, problem)
