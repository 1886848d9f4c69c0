"""HTTP checks against the platform's API (the runbook's `curl -sf $API_URL/health...`)."""

from __future__ import annotations

import json
import time

import httpx
from prefect import task
from prefect.cache_policies import NONE
from pydantic import SecretStr

from runbook.decisions.health import EndpointCheck, judge_response
from runbook.decisions.maintenance import IN_FLIGHT_METRIC, in_flight_requests
from tasks.retry_policy import (
    TRANSIENT_HTTP_STATUSES,
    TRANSIENT_RETRIES,
    DeadlineExceeded,
    PlatformCallError,
)


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


# The path an authenticated request goes to, to see which API key the backend's pods hold.
WHOAMI_PATH = "/api/v1/me"


@task(
    **TRANSIENT_RETRIES,
    persist_result=False,
    cache_policy=NONE,
    task_run_name="GET {path} with an API key",
)
def status_with_api_key(
    base_url: str, api_key: SecretStr, timeout_seconds: float, path: str = WHOAMI_PATH
) -> int:
    """GET `path` with `X-API-Key`; returns the HTTP status (200 accepted, 401 refused).

    The key is an argument because the request needs it; Prefect does not store task
    arguments, and this task stores no result. A 429/5xx or no answer is retried.
    """
    url = base_url.rstrip("/") + path
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_seconds)) as http:
            response = http.get(url, headers={"X-API-Key": api_key.get_secret_value()})
    except httpx.TransportError as exc:
        raise PlatformCallError(f"GET {path}: {type(exc).__name__}", transient=True) from None
    if response.status_code in TRANSIENT_HTTP_STATUSES:
        raise PlatformCallError(
            f"GET {path}: HTTP {response.status_code}",
            status=response.status_code,
            transient=True,
        )
    return response.status_code


@task(**TRANSIENT_RETRIES, task_run_name="wait until {base_url} is drained")
def wait_until_drained(
    base_url: str, timeout_seconds: float, poll_seconds: float = 0.25
) -> dict[str, float]:
    """Scrape `/metrics` until `http_requests_in_flight` is 0, at most `timeout_seconds`.

    Returns `{"seconds", "scrapes", "in_flight_at_start"}`. Raises `DeadlineExceeded`
    naming the requests still in flight, or `PlatformCallError` when the page has no
    in-flight gauge (a drain cannot be measured there).
    """
    url = base_url.rstrip("/") + "/metrics"
    started = time.perf_counter()
    scrapes, first = 0, None
    with httpx.Client(timeout=httpx.Timeout(min(timeout_seconds, 10.0))) as http:
        while True:
            try:
                response = http.get(url)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                raise PlatformCallError(
                    f"GET {url}: {exc}", transient=isinstance(exc, httpx.TransportError)
                ) from None
            scrapes += 1
            in_flight = in_flight_requests(response.text)
            if in_flight is None:
                raise PlatformCallError(f"{url} has no {IN_FLIGHT_METRIC} gauge")
            first = in_flight if first is None else first
            elapsed = time.perf_counter() - started
            if in_flight == 0:
                return {"seconds": elapsed, "scrapes": scrapes, "in_flight_at_start": first}
            if elapsed >= timeout_seconds:
                raise DeadlineExceeded(
                    f"{in_flight} request(s) still in flight at {url} after {timeout_seconds:g}s"
                )
            time.sleep(poll_seconds)
