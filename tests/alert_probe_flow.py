"""A flow with incident-response's parameters, for testing the alert triggers before that
runbook lands on this branch: the automations start it exactly as they will start
incident-response (same trigger definitions, read from prefect.yaml)."""

from __future__ import annotations

from typing import Any

from prefect import flow


@flow(name="alert-probe")
def alert_probe(
    alertname: str = "",
    severity: str = "",
    labels: dict[str, Any] | None = None,
    summary: str = "",
    fingerprint: str = "",
    group_key: str = "",
    status: str = "firing",
) -> None:
    """Does nothing: the test reads the parameters the trigger gave it."""
