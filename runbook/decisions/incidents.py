"""Judgements of the incident runbook: severity (P1-P4) by the page's table, the incident's
id, who is paged when (the escalation path), response-time targets, which diagnosis an
alert gets, and the durations a post-mortem reports. Plain data in and out; tested with
literals.

Runbook > Incident Response > Severity Levels, and Contacts > Escalation Path:

| Level | Definition | Response Time |      1. On-call engineer (at once)
| P1 | Service down, data breach | 15 min  |      2. Team lead (15 min without ack)
| P2 | Major feature broken | 1 hour       |      3. Engineering manager (30 min)
| P3 | Degraded performance | 4 hours      |      4. VP Engineering (1 hour, P1 only)
| P4 | Minor issue | 24 hours              |
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from runbook.decisions.refusal import Refused

Priority = Literal["P1", "P2", "P3", "P4"]
PRIORITIES: tuple[Priority, ...] = ("P1", "P2", "P3", "P4")

# The page's "Response Time" column: how soon someone must be on it (acknowledged).
RESPONSE_TARGET_SECONDS: dict[Priority, int] = {"P1": 900, "P2": 3600, "P3": 14400, "P4": 86400}

# PagerDuty Events v2 severities, most to least urgent.
PAGERDUTY_SEVERITY: dict[Priority, Literal["critical", "error", "warning", "info"]] = {
    "P1": "critical",
    "P2": "error",
    "P3": "warning",
    "P4": "info",
}

# Customers hear about outages and broken features, not about slowness or a UI glitch.
STATUS_PAGE_PRIORITIES: frozenset[Priority] = frozenset({"P1", "P2"})

# "Service down" in the alert's own words: a critical alert with one of these names (or an
# `impact` label saying so) is P1; any other critical alert is a major feature broken (P2).
SERVICE_DOWN_ALERTS = frozenset(
    {"ServiceDown", "TargetDown", "InstanceDown", "APIDown", "BackendDown", "HealthCheckFailed"}
)
P1_IMPACTS = frozenset({"service-down", "outage", "data-breach"})

# Fixed namespace: the same alert group gives the same incident id on every machine.
INCIDENT_NAMESPACE = uuid.UUID("6f1c3c2e-6a55-4d1b-9a55-2f0d8f1e0c11")


@dataclass(frozen=True)
class Triage:
    priority: Priority
    reason: str


def triage(
    alertname: str,
    severity: str,
    labels: Mapping[str, str],
    given: Priority | None = None,
) -> Triage:
    """The incident's priority: given by a person, else from the alert by the page's table.

    critical → P1 when the rule's `priority` label says so or the alert means the service
    is down (its name, or `impact` = service-down/outage/data-breach), else P2; warning →
    P3; info/none → P4. A `priority` label (P1-P4) on the rule always wins. An unknown or
    missing severity is taken as P2 and says so: an alert nobody classified is paged, not
    dropped.
    """
    if given is not None:
        return Triage(given, "given by the person who declared it")
    label = (labels.get("priority") or "").upper()
    if label in PRIORITIES:
        return Triage(label, f"the rule's priority label is {label}")  # type: ignore[arg-type]
    severity = (severity or labels.get("severity") or "").lower()
    if severity == "critical":
        impact = (labels.get("impact") or "").lower()
        if alertname in SERVICE_DOWN_ALERTS or impact in P1_IMPACTS:
            why = f"impact {impact}" if impact in P1_IMPACTS else f"{alertname} means service down"
            return Triage("P1", f"critical and {why}")
        return Triage("P2", "critical, service not down: a major feature broken")
    if severity == "warning":
        return Triage("P3", "warning: degraded performance")
    if severity in ("info", "none"):
        return Triage("P4", f"severity {severity}: minor issue")
    return Triage("P2", f"unknown severity {severity or '(none)'!r}: treated as P2 until triaged")


def incident_id(group_key: str) -> str:
    """The incident of an alert group: the same group key always gives the same id, so a
    repeated notification joins the open incident instead of opening a second one."""
    if not group_key:
        raise Refused("group_key", "an incident needs a group key")
    return str(uuid.uuid5(INCIDENT_NAMESPACE, group_key))


class Verdict(StrEnum):
    OPEN = "open"  # no incident for this group: open one
    JOIN = "join"  # the group's incident is open: this start is a repeat
    LATE = "late"  # resolved moments ago: a late or out-of-order repeat of the same firing


def on_start(
    record_state: str | None, resolved_seconds_ago: float | None, quiet_seconds: float
) -> Verdict:
    """What a start for an alert group does, given the group's incident record (if any).

    A firing that arrives within `quiet_seconds` of the incident's resolution is a late
    copy of the old notification (Alertmanager resends; webhooks arrive out of order) and
    opens nothing; later, the same group firing again is a new incident.
    """
    if record_state == "open":
        return Verdict.JOIN
    if record_state != "resolved":  # none, or its run ended without resolving it
        return Verdict.OPEN
    if resolved_seconds_ago is not None and resolved_seconds_ago < quiet_seconds:
        return Verdict.LATE
    return Verdict.OPEN


# --- escalation path -----------------------------------------------------------------


class Contact(BaseModel):
    """One step of the escalation path, from configuration (RUNBOOK_ESCALATION_CONTACTS)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: str = Field(min_length=1, max_length=60, description="e.g. Team lead.")
    name: str = Field(min_length=1, max_length=100, description="Who, or which rotation.")
    after_minutes: float = Field(
        ge=0,
        le=7 * 24 * 60,
        description="Paged this long after the incident is declared if nobody acknowledged; "
        "0 = at once. Fractions allowed (tests use seconds).",
    )
    routing_key: SecretStr | None = Field(
        None, description="PagerDuty routing key of this contact's service; unset: the default."
    )
    priorities: tuple[Priority, ...] = Field(
        PRIORITIES, description="Priorities this step applies to (VP Engineering: P1 only)."
    )

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.role.lower()).strip("-") or "contact"


DEFAULT_CONTACTS: tuple[Contact, ...] = (
    Contact(role="On-call engineer", name="on-call rotation", after_minutes=0),
    Contact(role="Team lead", name="team lead", after_minutes=15),
    Contact(role="Engineering manager", name="engineering manager", after_minutes=30),
    Contact(role="VP Engineering", name="VP Engineering", after_minutes=60, priorities=("P1",)),
)


def escalation_path(priority: Priority, contacts: Iterable[Contact]) -> list[Contact]:
    """The contacts paged for this priority, in the order they are due."""
    return sorted((c for c in contacts if priority in c.priorities), key=lambda c: c.after_minutes)


def due_contacts(
    priority: Priority,
    contacts: Iterable[Contact],
    elapsed_seconds: float,
    already_paged: Collection[str],
) -> list[Contact]:
    """Contacts whose time has come and who were not paged yet (by role slug)."""
    return [
        c
        for c in escalation_path(priority, contacts)
        if c.after_minutes * 60 <= elapsed_seconds and c.slug not in already_paged
    ]


def seconds_to_next(
    priority: Priority,
    contacts: Iterable[Contact],
    elapsed_seconds: float,
    already_paged: Collection[str],
) -> float | None:
    """How long until the next contact is due; None when the path is exhausted."""
    waiting = [
        c.after_minutes * 60 - elapsed_seconds
        for c in escalation_path(priority, contacts)
        if c.slug not in already_paged
    ]
    return max(0.0, min(waiting)) if waiting else None


def dedup_key(incident: str, contact: Contact) -> str:
    """The on-call page carries the incident id itself; each escalation its own key, so
    PagerDuty opens it even when it shares the default routing key."""
    return incident if contact.after_minutes == 0 else f"{incident}/{contact.slug}"


# --- response-time targets -----------------------------------------------------------


@dataclass(frozen=True)
class ResponseTime:
    target_seconds: int
    acknowledged_after: float | None  # None: not acknowledged (yet)
    breached: bool

    def text(self, priority: Priority) -> str:
        target = format_duration(self.target_seconds)
        if self.acknowledged_after is None:
            took = "not acknowledged"
        else:
            took = f"acknowledged after {format_duration(self.acknowledged_after)}"
        verdict = "BREACHED" if self.breached else "met"
        return f"{priority} response target {target}: {took} — {verdict}"


def response_time(
    priority: Priority,
    acknowledged_after: float | None,
    elapsed_seconds: float,
    targets: Mapping[Priority, int] = RESPONSE_TARGET_SECONDS,
) -> ResponseTime:
    """Was the response target met: acknowledged within the priority's response time
    (`targets`, the page's by default)? Unacknowledged, it is breached once
    `elapsed_seconds` passes the target."""
    target = targets.get(priority, RESPONSE_TARGET_SECONDS[priority])
    took = acknowledged_after if acknowledged_after is not None else elapsed_seconds
    return ResponseTime(target, acknowledged_after, took > target)


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


# --- investigation -------------------------------------------------------------------

# Runbook > Common Issues: the diagnosis deployment for an alert, by the rule's `runbook`
# label (the contract with the alert rules) or else by the alert's name.
DIAGNOSES = (
    "diagnose-latency",
    "diagnose-connections",
    "diagnose-redis-memory",
    "diagnose-queue-backlog",
)
DIAGNOSIS_BY_ALERT_PREFIX: tuple[tuple[str, str], ...] = (
    ("HighLatency", "diagnose-latency"),
    ("HighErrorRate", "diagnose-latency"),
    ("DatabaseConnections", "diagnose-connections"),
    ("ConnectionPool", "diagnose-connections"),
    ("RedisMemory", "diagnose-redis-memory"),
    ("QueueDepth", "diagnose-queue-backlog"),
    ("QueueBacklog", "diagnose-queue-backlog"),
)


def diagnosis_for(alertname: str, labels: Mapping[str, str]) -> str | None:
    """The diagnose-* flow for this alert (its deployment is `<name>/<name>`), or None."""
    runbook = labels.get("runbook", "")
    if runbook in DIAGNOSES:
        return runbook
    for prefix, diagnosis in DIAGNOSIS_BY_ALERT_PREFIX:
        if alertname.startswith(prefix):
            return diagnosis
    return None


# --- post-mortem ---------------------------------------------------------------------


@dataclass(frozen=True)
class Durations:
    to_acknowledge: float | None
    to_mitigate: float | None
    to_resolve: float | None


def durations(
    declared: float, acknowledged: float | None, mitigated: float | None, resolved: float | None
) -> Durations:
    """Seconds from declaration to each milestone (epoch seconds in; None if never)."""

    def since(at: float | None) -> float | None:
        return None if at is None else max(0.0, at - declared)

    return Durations(since(acknowledged), since(mitigated), since(resolved))


# --- mitigation ----------------------------------------------------------------------

COMPONENTS = ("backend", "frontend", "celery-workers")


@dataclass(frozen=True)
class Proposal:
    """A temporary fix: start `deployment` with exactly `parameters`, once approved."""

    title: str
    deployment: str  # "<flow>/<deployment>"
    parameters: dict[str, str]
    why: str


def mitigation_proposals(alertname: str, labels: Mapping[str, str]) -> list[Proposal]:
    """The page's temporary fixes that incident-response itself offers (the diagnose-*
    flows propose and carry out their own, behind their own approvals).

    Errors or an outage of one component: "review recent deployments for regressions" →
    roll that component back to its previous revision (the rollback runbook, which shows
    current → target revision and image before it acts).
    """
    component = labels.get("deployment") or labels.get("component") or ""
    if component not in COMPONENTS:
        return []
    if alertname == "HighErrorRate" or alertname in SERVICE_DOWN_ALERTS:
        return [
            Proposal(
                title=f"Roll back {component} to its previous revision",
                deployment="rollback/rollback",
                parameters={"deployment": component},
                why=f"{alertname} on {component}: undo a regression from a recent deploy",
            )
        ]
    return []
