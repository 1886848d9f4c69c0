"""The incident's records in Prefect itself: its claim (a Prefect Variable per alert group),
its events (`complianceagent.incident.<step>`), and the watch that escalates while it waits.

Why a Prefect Variable for "one incident per alert group": creating a variable whose name
exists is refused by the server (unique name), so two runs started for the same group at
the same moment cannot both open an incident; it needs nothing beyond the Prefect server
the runbooks already depend on (not the platform's Redis, which may be the thing that is
down), it survives the run's process, and an operator can read or clear it in the UI
(Variables). Prefect's idempotency key would not do: the alert bridge's automations start
runs without one, and a resolved group that fires again must open a new incident.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.events import Event, emit_event
from prefect.events.filters import (
    EventAnyResourceFilter,
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from runbook.alert_events import RESOLVED as ALERT_RESOLVED
from runbook.alert_events import alert_resource_id as alert_resource
from runbook.decisions.incidents import (
    PAGERDUTY_SEVERITY,
    RESPONSE_TARGET_SECONDS,
    Contact,
    Priority,
    dedup_key,
    due_contacts,
    format_duration,
    response_time,
)
from tasks.logs import run_logger
from tasks.notify import notify_chat, page_on_call
from tasks.retry_policy import call_with_retries

ACKNOWLEDGED = "complianceagent.incident.acknowledged"


def incident_resource(incident: str) -> str:
    return f"complianceagent.incident.{incident}"


def record_name(incident: str) -> str:
    return "incident_" + incident.replace("-", "_")


# --- the claim -------------------------------------------------------------------------


def claim_incident(incident: str, record: dict[str, Any]) -> bool:
    """Create the incident's record; False if one exists (the server's unique name decides,
    so of two simultaneous starts exactly one gets True)."""
    with get_client(sync_client=True) as prefect_api:
        try:
            prefect_api.create_variable(VariableCreate(name=record_name(incident), value=record))
        except ObjectAlreadyExists:
            return False
    return True


def read_incident(incident: str) -> dict[str, Any] | None:
    """The incident's record, with `run_final` telling whether its run has ended."""
    with get_client(sync_client=True) as prefect_api:
        variable = prefect_api.read_variable_by_name(record_name(incident))
        if variable is None or not isinstance(variable.value, dict):
            return None
        record = dict(variable.value)
        try:
            run = prefect_api.read_flow_run(UUID(record["flow_run_id"]))
            record["run_final"] = bool(run.state and run.state.is_final())
        except (ObjectNotFound, KeyError, ValueError):
            record["run_final"] = True
    return record


def update_incident(incident: str, record: dict[str, Any]) -> None:
    with get_client(sync_client=True) as prefect_api:
        prefect_api.update_variable(VariableUpdate(name=record_name(incident), value=record))


def release_incident(incident: str) -> None:
    """Remove the record (before a re-claim); already gone is fine."""
    with get_client(sync_client=True) as prefect_api, suppress(ObjectNotFound):
        prefect_api.delete_variable_by_name(record_name(incident))


# --- events ----------------------------------------------------------------------------


def emit_step(incident: str, step: str, run_id: UUID, **payload: Any) -> Event | None:
    """`complianceagent.incident.<step>` about the incident, related to this run."""
    return emit_event(
        event=f"complianceagent.incident.{step}",
        resource={"prefect.resource.id": incident_resource(incident)},
        related=[
            {
                "prefect.resource.id": f"prefect.flow-run.{run_id}",
                "prefect.resource.role": "flow-run",
            }
        ],
        payload=payload,
    )


def read_incident_events(
    resources: Sequence[str], since: dt.datetime, names: Sequence[str] | None = None
) -> list[Event]:
    """Recorded events about these resources since `since`, oldest first."""
    query = EventFilter(
        occurred=EventOccurredFilter(
            since=since, until=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
        ),
        any_resource=EventAnyResourceFilter(id=list(resources)),
        event=EventNameFilter(name=list(names)) if names else None,
    )
    events: list[Event] = []
    with get_client(sync_client=True) as prefect_api:
        page = prefect_api.read_events(filter=query, limit=50)  # the server's maximum
        events += page.events
        while page.next_page and len(events) < 2000:
            page = prefect_api.read_events_page(str(page.next_page))
            events += page.events
    return sorted(events, key=lambda e: e.occurred)


# --- the watch: escalation timers, acknowledgement and resolution events ---------------


@dataclass
class Signal:
    by: str
    note: str
    at: float  # epoch seconds
    via: str


@dataclass
class IncidentWatch:
    """Runs beside the flow from declaration to resolution, in a thread of its process.

    Every `poll_seconds` it pages each escalation contact whose time has come (PagerDuty
    trigger to the contact's routing key + chat) until someone acknowledges, reports the
    response-time target's breach once, and turns an acknowledgement event or the alert's
    resolved event into the input of the pause the flow is waiting in. It calls the notify
    tasks' functions directly: while the run is paused Prefect would not run its tasks.
    """

    incident: str
    title: str
    priority: Priority
    run_id: UUID
    declared_at: float
    group_key: str | None
    contacts: Sequence[Contact]
    poll_seconds: float
    targets: Mapping[Priority, int] = field(default_factory=lambda: dict(RESPONSE_TARGET_SECONDS))
    paged: dict[str, Contact] = field(default_factory=dict)
    failed_pages: list[str] = field(default_factory=list)
    acknowledged: Signal | None = None
    resolution: Signal | None = None
    breach_reported: bool = False
    seen: set[UUID] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    # The flow's side.
    def start(self) -> None:
        self.tick()  # the on-call page goes out now, not one poll later
        self._thread = threading.Thread(
            target=self._loop, name=f"incident-{self.incident}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def acknowledge(self, by: str, note: str, via: str) -> Signal:
        with self._lock:
            if self.acknowledged is None:
                self.acknowledged = Signal(by, note, time.time(), via)
                emit_step(self.incident, "acknowledged", self.run_id, by=by, note=note, via=via)
            return self.acknowledged

    def resolve(self, by: str, note: str, via: str) -> Signal:
        with self._lock:
            if self.resolution is None:
                self.resolution = Signal(by, note, time.time(), via)
            return self.resolution

    def reopen(self) -> None:
        """The resolution did not hold (the health check failed): wait for another."""
        with self._lock:
            self.resolution = None

    # The thread's side.
    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.tick()
            except Exception as exc:  # a Prefect or network hiccup: try again next tick
                run_logger().warning("incident watch: %s", exc)

    def tick(self) -> None:
        try:
            self._read_signals()
        except Exception as exc:  # pages still go out when Prefect's event API hiccups
            run_logger().warning("incident watch could not read events: %s", exc)
        elapsed = time.time() - self.declared_at
        if self.acknowledged is None and self.resolution is None:
            for contact in due_contacts(self.priority, self.contacts, elapsed, self.paged):
                self._page(contact, elapsed)
            timing = response_time(self.priority, None, elapsed, self.targets)
            if timing.breached and not self.breach_reported:
                self.breach_reported = True
                text = f"{self.title}: {timing.text(self.priority)}"
                emit_step(self.incident, "response-target-breached", self.run_id, detail=text)
                _best_effort("chat", lambda: notify_chat.fn(f":alarm_clock: {text}"))
        self._resume_waiting_pause()

    def _page(self, contact: Contact, elapsed: float) -> None:
        key = dedup_key(self.incident, contact)
        summary = f"[{self.priority}] {self.title}"
        if contact.after_minutes > 0:
            summary = f"ESCALATED to {contact.role} after {format_duration(elapsed)}: {summary}"
        self.paged[contact.slug] = contact
        sent = _best_effort(
            f"PagerDuty ({contact.role})",
            lambda: page_on_call.fn(
                summary,
                PAGERDUTY_SEVERITY[self.priority],
                dedup_key=key,
                details={"incident": self.incident, "contact": contact.role, "name": contact.name},
                routing_key=contact.routing_key,
            ),
        )
        if not sent:
            self.failed_pages.append(contact.role)
        _best_effort(
            "chat",
            lambda: notify_chat.fn(f":pager: {contact.role} ({contact.name}) paged: {summary}"),
        )
        step = "paged" if contact.after_minutes == 0 else "escalated"
        emit_step(
            self.incident,
            step,
            self.run_id,
            contact=contact.role,
            name=contact.name,
            dedup_key=key,
            delivered=sent,
        )

    def _read_signals(self) -> None:
        since = dt.datetime.fromtimestamp(self.declared_at - 1, dt.UTC)
        resources = [incident_resource(self.incident)]
        if self.group_key:
            resources.append(alert_resource(self.group_key))
        events = read_incident_events(resources, since, names=[ACKNOWLEDGED, ALERT_RESOLVED])
        for event in events:
            if event.id in self.seen:
                continue
            self.seen.add(event.id)
            payload = event.payload or {}
            if event.event == ACKNOWLEDGED and self.acknowledged is None:
                by = str(payload.get("by") or "unknown")
                with self._lock:
                    self.acknowledged = Signal(
                        by, str(payload.get("note", "")), event.occurred.timestamp(), "event"
                    )
            if event.event == ALERT_RESOLVED and self.resolution is None:
                self.resolve("alertmanager", "the alert resolved", "alert resolved event")

    def _resume_waiting_pause(self) -> None:
        """Answer the pause the flow waits in, if an event already answered it."""
        with get_client(sync_client=True) as prefect_api:
            run = prefect_api.read_flow_run(self.run_id)
            state = run.state
            if state is None or not state.is_paused():
                return
            key = state.state_details.pause_key
            answer: dict[str, str] | None = None
            if key == "acknowledge" and (self.acknowledged or self.resolution):
                signal = self.acknowledged or self.resolution
                assert signal is not None
                answer = {"acknowledged_by": signal.by, "note": f"{signal.note} ({signal.via})"}
            elif key == "resolve" and self.resolution:
                answer = {"resolved_by": self.resolution.by, "note": self.resolution.note}
            if answer is not None:
                with suppress(Exception):  # already resumed by someone else: fine
                    prefect_api.resume_flow_run(self.run_id, run_input=answer)


def _best_effort(what: str, call: Callable[[], object]) -> bool:
    try:
        return call_with_retries(what, call) is not None
    except Exception as exc:
        run_logger().error("%s failed: %s", what, exc)
        return False


# --- the diagnosis run -------------------------------------------------------------------


def wait_for_run(
    run_id: UUID,
    deadline_seconds: float,
    poll_seconds: float = 1.0,
    *,
    final_only: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Any:
    """The flow run once it is paused (waiting for its remediation's approval) or final
    (with `final_only`: once final), or as it is at the deadline or when `stop()` says so."""
    give_up = time.monotonic() + deadline_seconds
    with get_client(sync_client=True) as prefect_api:
        while True:
            run = prefect_api.read_flow_run(run_id)
            state = run.state
            if state is not None and state.is_final():
                return run
            if not final_only and _paused_run(prefect_api, run) is not None:
                return run
            if time.monotonic() >= give_up or (stop is not None and stop()):
                return run
            time.sleep(poll_seconds)


def withdraw_approvals(run_id: UUID, approver: str, reason: str, timeout: float = 60) -> Any:
    """Refuse every approval the run still waits for (recorded as a rejection by
    `approver`, with `reason`), until it ends; the run as it is then."""
    answer = {"approve": False, "approver": approver, "reason": reason}
    give_up = time.monotonic() + timeout
    with get_client(sync_client=True) as prefect_api:
        while True:
            run = prefect_api.read_flow_run(run_id)
            state = run.state
            if state is None or state.is_final() or time.monotonic() >= give_up:
                return run
            paused = _paused_run(prefect_api, run)
            if paused is not None:
                with suppress(Exception):  # decided by someone else meanwhile: fine
                    prefect_api.resume_flow_run(paused.id, run_input=answer)
            time.sleep(0.5)


def _paused_run(prefect_api: Any, run: Any) -> Any:
    """`run` if it waits for an approval, else its subflow run that does (a `rollback`
    proposal asks in the rollback runbook's own form), else None."""
    if run.state is not None and run.state.is_paused():
        return run
    children = prefect_api.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])
        )
    )
    return next((c for c in children if c.state is not None and c.state.is_paused()), None)


def read_mitigation(
    incident: str, run_id: UUID, since: dt.datetime, wait_seconds: float = 15
) -> Event | None:
    """The `mitigated` event a diagnosis run sent for this incident (who approved what),
    waiting briefly: the server stores events a moment after they are sent."""
    give_up = time.monotonic() + wait_seconds
    related = f"prefect.flow-run.{run_id}"
    while True:
        events = read_incident_events(
            [incident_resource(incident)], since, names=["complianceagent.incident.mitigated"]
        )
        for event in events:
            if any(r.id == related for r in event.related):
                return event
        if time.monotonic() >= give_up:
            return None
        time.sleep(0.5)


def read_run_markdown(run_id: UUID) -> list[tuple[str, str]]:
    """(key, markdown) of a run's markdown artifacts: the diagnosis's evidence."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect_api:
        artifacts = prefect_api.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return [
        (a.key or a.type or "artifact", str(a.data))
        for a in sorted(artifacts, key=lambda a: a.created or 0)
        if a.type == "markdown"
    ]
