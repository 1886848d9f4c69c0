"""Runbook > System Health > Health Check Script.

Checks the five health endpoints at once, each with its own timeout; temporary faults
are retried, real failures reported. Publishes a table (endpoint, status, latency, body);
if any check fails, notifies chat and fails the run with a summary naming the endpoints.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger
from prefect.states import State
from pydantic import Field

from runbook.decisions.health import EXPECTED_STATUS, EndpointCheck, summarize
from runbook.settings import load_settings
from tasks.http import check_endpoint
from tasks.notify import notify_chat


class UnhealthyPlatform(RuntimeError):
    """One or more health endpoints failed; the message names them."""


def _as_check(endpoint: str, state: State) -> EndpointCheck:
    if state.is_completed():
        return state.result()  # type: ignore[no-any-return]
    problem = str(state.result(raise_on_failure=False))
    return EndpointCheck(endpoint, False, None, None, "", problem)


@flow(name="health-check", flow_run_name="health-check", log_prints=False)
def health_check(
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0,
    notify_on_failure: bool = True,
) -> list[dict[str, object]]:
    """Check the platform's five health endpoints, as the runbook's health-check script.

    Args:
        timeout_seconds: Timeout of each endpoint's request, in seconds (0-60).
        notify_on_failure: Post to the chat webhook when a check fails.
    """
    logger = get_run_logger()
    base_url = str(load_settings().api_base_url)

    # Check all five endpoints concurrently.
    futures = {
        endpoint: check_endpoint.submit(base_url, endpoint, timeout_seconds)
        for endpoint in EXPECTED_STATUS
    }
    for future in futures.values():
        future.wait()
    checks = [_as_check(endpoint, future.state) for endpoint, future in futures.items()]

    # Report every result in one table.
    summary = summarize(checks)
    rows = [check.as_row() for check in checks]
    create_table_artifact(rows, key="health-check", description=summary.text)
    logger.info(summary.text)

    # Fail loudly, naming the endpoints.
    if not summary.healthy:
        if notify_on_failure:
            notify_chat(f":rotating_light: ComplianceAgent health check: {summary.text}")
        raise UnhealthyPlatform(summary.text)
    return rows
