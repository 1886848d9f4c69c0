"""Alerts as Prefect events: the one definition the alert bridge, prefect.yaml's triggers
and `incident-response` share.

Alertmanager's webhook (version 4) is validated by `AlertmanagerWebhook`; each of its
alerts becomes one Prefect event (`alert_events`):

- name `complianceagent.alert.firing` or `complianceagent.alert.resolved` (the alert's
  own `status`, not the group's);
- resource `complianceagent.alert.<groupKey>`: one resource per alert group, so the
  triggers open one incident per group however many alerts and repeats it carries;
- id: uuid5 of fingerprint + status + startsAt, so a redelivered or repeated
  notification is the same event and Prefect drops it;
- occurred: when the alert started firing (firing) or ended (resolved), not when it was
  delivered, so a late repeat is an old event to the triggers;
- payload: alertname, status, severity, runbook, labels, annotations, summary, startsAt,
  endsAt, fingerprint, group_key, generator_url.

Pure: no clients, no Prefect, no settings.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

FIRING = "complianceagent.alert.firing"
RESOLVED = "complianceagent.alert.resolved"
RESOURCE_PREFIX = "complianceagent.alert."
# Resource labels the triggers and the incident flow may match on.
LABEL_GROUP_KEY = "complianceagent.alert.group-key"
LABEL_ALERTNAME = "complianceagent.alert.alertname"
LABEL_SEVERITY = "complianceagent.alert.severity"
LABEL_RUNBOOK = "complianceagent.alert.runbook"

# uuid5 namespace of the event ids (a fixed, random uuid: ids are stable across processes).
EVENT_NAMESPACE = uuid.UUID("8f9b3c3e-2d4a-4c1e-9a57-5b8e1f0c6d21")

Status = Literal["firing", "resolved"]
_Text = Annotated[str, StringConstraints(max_length=4096)]
_Key = Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class WebhookAlert(BaseModel):
    """One alert of the payload, as Alertmanager sends it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: Status
    labels: dict[str, _Text] = Field(max_length=64)
    annotations: dict[str, _Text] = Field(default_factory=dict, max_length=64)
    startsAt: dt.datetime  # Alertmanager's field names, as sent
    endsAt: dt.datetime | None = None
    generatorURL: _Text = ""
    fingerprint: Annotated[str, StringConstraints(min_length=1, max_length=64)]

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")


class AlertmanagerWebhook(BaseModel):
    """Alertmanager's webhook body (`version: "4"`); anything else is refused."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: Literal["4"]
    groupKey: _Key
    status: Status
    receiver: _Text = ""
    groupLabels: dict[str, _Text] = Field(default_factory=dict)
    commonLabels: dict[str, _Text] = Field(default_factory=dict)
    commonAnnotations: dict[str, _Text] = Field(default_factory=dict)
    externalURL: _Text = ""
    truncatedAlerts: int = Field(default=0, ge=0)
    alerts: list[WebhookAlert] = Field(min_length=1, max_length=1000)


def alert_resource_id(group_key: str) -> str:
    """The Prefect resource of an alert group: what one incident is keyed on."""
    return f"{RESOURCE_PREFIX}{group_key}"


def event_id(fingerprint: str, status: str, starts_at: dt.datetime) -> uuid.UUID:
    """The same alert in the same state from the same start is the same event."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{fingerprint}|{status}|{_iso(starts_at)}")


def unknown_alertnames(webhook: AlertmanagerWebhook, known: Mapping[str, str]) -> list[str]:
    """Alert names in the payload that no rule of ours defines (sorted, unique)."""
    return sorted({a.alertname for a in webhook.alerts if a.alertname not in known})


def alert_events(
    webhook: AlertmanagerWebhook, runbooks: Mapping[str, str], now: dt.datetime
) -> list[dict[str, Any]]:
    """The Prefect events (JSON for `POST /api/events`) for each alert of the payload.

    `runbooks` maps each known alertname to the deployment that handles it (the rule's
    `runbook` label; the alert's own label wins when present). `now` stands in for a
    resolved alert's missing `endsAt`.
    """
    events = []
    for alert in webhook.alerts:
        name = alert.alertname
        runbook = alert.labels.get("runbook") or runbooks.get(name, "incident-response")
        severity = alert.labels.get("severity", "")
        # Alertmanager sends a firing alert's endsAt as year 1 (or a future estimate).
        ends_at = alert.endsAt if alert.endsAt and alert.endsAt.year > 1 else None
        occurred = alert.startsAt
        if alert.status == "resolved":
            occurred = ends_at or now
        events.append(
            {
                "id": str(event_id(alert.fingerprint, alert.status, alert.startsAt)),
                "occurred": _iso(occurred),
                "event": FIRING if alert.status == "firing" else RESOLVED,
                "resource": {
                    "prefect.resource.id": alert_resource_id(webhook.groupKey),
                    "prefect.resource.name": name,
                    LABEL_GROUP_KEY: webhook.groupKey,
                    LABEL_ALERTNAME: name,
                    LABEL_SEVERITY: severity,
                    LABEL_RUNBOOK: runbook,
                },
                "related": [],
                "payload": {
                    "alertname": name,
                    "status": alert.status,
                    "severity": severity,
                    "runbook": runbook,
                    "labels": dict(alert.labels),
                    "annotations": dict(alert.annotations),
                    "summary": alert.annotations.get("summary", name),
                    "startsAt": _iso(alert.startsAt),
                    "endsAt": _iso(alert.endsAt)
                    if alert.endsAt and alert.endsAt.year > 1
                    else None,
                    "fingerprint": alert.fingerprint,
                    "group_key": webhook.groupKey,
                    "generator_url": alert.generatorURL,
                },
            }
        )
    return events


def _iso(moment: dt.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat()
