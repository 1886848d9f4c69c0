"""Is an endpoint healthy, and what does a sweep of them say? Pure, over plain values."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# The runbook's table: endpoint → the `status` its JSON body must carry when healthy.
EXPECTED_STATUS: dict[str, str] = {
    "/health": "healthy",
    "/health/ready": "ready",
    "/health/live": "alive",
    "/health/db": "connected",
    "/health/redis": "connected",
}

# What each endpoint stands for, in the words of the runbook's health-check script.
COMPONENT: dict[str, str] = {
    "/health": "API",
    "/health/ready": "API readiness",
    "/health/live": "API liveness",
    "/health/db": "Database",
    "/health/redis": "Redis",
}


@dataclass(frozen=True)
class EndpointCheck:
    endpoint: str
    healthy: bool
    status_code: int | None
    latency_ms: float | None
    body: str
    problem: str = ""

    def as_row(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "component": COMPONENT.get(self.endpoint, self.endpoint),
            "result": "✅ healthy" if self.healthy else "❌ " + (self.problem or "unhealthy"),
            "status": self.status_code if self.status_code is not None else "-",
            "latency_ms": round(self.latency_ms, 1) if self.latency_ms is not None else "-",
            "body": self.body[:200],
        }


def judge_response(endpoint: str, status_code: int, body: Any) -> str:
    """Empty when the answer is the healthy one; otherwise what is wrong with it."""
    expected = EXPECTED_STATUS.get(endpoint)
    actual = body.get("status") if isinstance(body, dict) else None
    if status_code != 200:
        return f"HTTP {status_code}" + (f" ({actual})" if actual else "")
    if expected is not None and actual != expected:
        return f"status {actual!r}, expected {expected!r}"
    return ""


@dataclass(frozen=True)
class HealthSummary:
    healthy: bool
    failed: tuple[str, ...]
    text: str


def summarize(checks: Iterable[EndpointCheck]) -> HealthSummary:
    """One line a human reads at 3 a.m.: which endpoints failed and why."""
    checks = list(checks)
    failed = [c for c in checks if not c.healthy]
    if not failed:
        return HealthSummary(True, (), f"All {len(checks)} health checks passed")
    detail = "; ".join(
        f"{c.endpoint} ({COMPONENT.get(c.endpoint, '?')}): {c.problem}" for c in failed
    )
    return HealthSummary(
        False,
        tuple(c.endpoint for c in failed),
        f"{len(failed)} of {len(checks)} health checks failed: {detail}",
    )
