"""The maintenance window's judgements, over plain data: is the backend drained, what the
window's annotation says, what the silence covers, what the status page says afterwards.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]

# On the backend Deployment while a window is open: who opened it, why, until when.
WINDOW_ANNOTATION = "runbooks.complianceagent.ai/maintenance-window"
IN_FLIGHT_METRIC = "http_requests_in_flight"

# `name{labels} value` or `name value` (Prometheus text exposition format).
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)")


def in_flight_requests(metrics_text: str) -> int | None:
    """Requests in flight according to a `/metrics` page: the sum of every
    `http_requests_in_flight` sample (one per worker or label set), or None when the page
    has none (then a drain cannot be measured)."""
    total: float | None = None
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and match.group("name") == IN_FLIGHT_METRIC:
            total = (total or 0.0) + float(match.group("value"))
    return None if total is None else int(total)


@dataclass(frozen=True)
class Window:
    """An open maintenance window: what the annotation records."""

    opened_by: str
    reason: str
    work: str
    opened_at: dt.datetime
    deadline: dt.datetime
    run_id: str

    def annotation(self) -> str:
        return json.dumps(
            {
                "openedBy": self.opened_by,
                "reason": self.reason,
                "work": self.work,
                "openedAt": _rfc3339(self.opened_at),
                "deadline": _rfc3339(self.deadline),
                "flowRunId": self.run_id,
            },
            sort_keys=True,
        )

    def remaining_seconds(self, now: dt.datetime) -> float:
        return max(0.0, (self.deadline - now).total_seconds())


def open_window_of(deployment: JSON) -> JSON | None:
    """The window recorded on a Deployment, if one is open (its annotation, parsed)."""
    raw = (deployment.get("metadata") or {}).get("annotations", {}).get(WINDOW_ANNOTATION)
    if not raw:
        return None
    try:
        found = json.loads(raw)
    except ValueError:
        return {"raw": raw}
    return found if isinstance(found, dict) else {"raw": raw}


def silence_body(matchers: dict[str, str], window: Window, ends_at: dt.datetime) -> JSON:
    """An Alertmanager v2 silence of every alert with these labels, for the window."""
    return {
        "matchers": [
            {"name": k, "value": v, "isRegex": False, "isEqual": True}
            for k, v in sorted(matchers.items())
        ],
        "startsAt": _rfc3339(window.opened_at),
        "endsAt": _rfc3339(ends_at),
        "createdBy": f"maintenance-window ({window.opened_by})",
        "comment": f"Planned maintenance: {window.reason} ({silence_marker(window.run_id)})",
    }


def silence_marker(run_id: str) -> str:
    """What a window's silence comment says of its run: how reconcile finds the silences
    of a run that died before it could record their ids."""
    return f"flow run {run_id}"


def silences_of_run(silences: list[JSON], run_id: str) -> list[str]:
    """Ids of the silences (Alertmanager v2 `GET /silences`) still active or pending that
    the window of run `run_id` created."""
    marker = f"({silence_marker(run_id)})"
    return [
        str(s["id"])
        for s in silences
        if marker in str(s.get("comment", ""))
        and (s.get("status") or {}).get("state") in ("active", "pending")
    ]


def interrupted_window_update(reason: str) -> str:
    """What the status page says when reconcile closes a window whose run died."""
    return (
        f"Maintenance ({reason}) has ended; its runbook was interrupted and the platform "
        "was put back by the crash recovery. We are verifying that all systems are "
        "operational."
    )


@dataclass(frozen=True)
class Closing:
    """What the status page says when the window closes."""

    status: str  # "resolved", or "identified" when the platform is not healthy
    message: str


def closing_update(reason: str, health_problem: str, inside_problem: str) -> Closing:
    """Resolved when health passed; otherwise "identified" (degraded) with the reason."""
    if health_problem:
        return Closing(
            "identified",
            f"Maintenance ({reason}) has ended, but the platform is degraded: {health_problem}. "
            "We are investigating.",
        )
    note = " Some planned work was not completed and will be rescheduled." if inside_problem else ""
    return Closing(
        "resolved", f"Maintenance ({reason}) is complete; all systems operational.{note}"
    )


def _rfc3339(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
