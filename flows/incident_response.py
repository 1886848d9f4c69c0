"""Runbook > Incident Response (Severity Levels, Incident Workflow) and Contacts > Escalation Path.

    1. DETECT       alert triggered or user report
    2. TRIAGE       assign severity level, notify on-call engineer, create incident ticket
    3. INVESTIGATE  dashboards, logs, root cause
    4. MITIGATE     temporary fix, communicate status
    5. RESOLVE      permanent fix, verify resolution, update status page
    6. POST-MORTEM  timeline, improvements, runbook updates

`incident-response` is that workflow as one run, started by an alert (the alert bridge's
trigger passes the alert's name, severity, labels, summary, fingerprint, group key and
status) or by a person from the UI/API with a description and a priority.

Guarantees:
- One incident per alert group: the incident id is a uuid5 of the group key, claimed as
  a Prefect Variable the server refuses to create twice; a repeat while it is open joins
  it (no second page), and so does a late copy arriving within RUNBOOK_INCIDENT_QUIET_SECONDS
  of its resolution. An incident whose run ended without resolving it is reopened.
- Severity P1-P4 by the page's table (`runbook.decisions.incidents.triage`); PagerDuty
  Events v2 `trigger` with dedup_key = the incident id (P1 critical, P2 error, P3 warning,
  P4 info), chat, and a status page incident for P1/P2.
- The escalation path from RUNBOOK_ESCALATION_CONTACTS (default: on-call at once, team lead
  at 15 min, engineering manager at 30, VP Engineering at 60 for P1 only): each contact is
  paged (its own routing key and dedup_key) and told in chat when due, until someone
  acknowledges — from the paused run's form in the UI, `POST /api/flow_runs/<id>/resume`,
  or a `complianceagent.incident.acknowledged` event for the incident.
- The response-time target (P1 15 min, P2 1 h, P3 4 h, P4 24 h to acknowledge;
  RUNBOOK_INCIDENT_RESPONSE_TARGETS) is tracked: a breach is told to chat and recorded as a
  `response-target-breached` event when it happens, and the post-mortem says so.
- Evidence before anyone looks: the matching diagnose-* deployment is started (its evidence
  copied into this run's artifact), the health check runs, and the backend's errors of the
  last 15 minutes (the `logs` runbook as a subflow) are excerpted; a failed log search is
  noted in the evidence, never fails the incident.
- Mitigation: the diagnosis runs with `remediate`, so each of its proposals waits behind
  its own approval in the diagnosis run's form (the plan shows exactly what changes: the
  replica count, the pids, the keys); the incident waits for those decisions and records
  the remediation carried out and who approved it (the diagnosis's `mitigated` event).
  Nothing approved there: the incident's own proposals (a rollback for errors or an
  outage of one component), each behind an approval in this run; exactly the approved
  one is started. A rejection changes nothing; a proposal still undecided when the
  incident resolves is withdrawn (refused in its run by incident-response).
- Resolved only when the alert's `complianceagent.alert.resolved` event arrives or an
  operator says so, and the health check then passes; for an alert, with
  RUNBOOK_PROMETHEUS_URL set, the alert rule's own expression (monitoring/rules) is asked
  of Prometheus and the resolution recorded as verified only when it yields nothing (or 0),
  else the post-mortem says it was not; then PagerDuty `resolve` for every
  page sent, status page resolved, chat, and a post-mortem artifact whose timeline comes
  from the recorded events.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any, Literal
from uuid import UUID

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.context import get_run_context
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.logging import get_run_logger
from prefect.runtime import flow_run as this_run
from pydantic import Field

from flows.health_check import health_check
from flows.logs import logs
from runbook.decisions.alert_rules import alert_expression, alert_query_clear
from runbook.decisions.incidents import (
    PAGERDUTY_SEVERITY,
    STATUS_PAGE_PRIORITIES,
    Priority,
    Proposal,
    Triage,
    Verdict,
    dedup_key,
    diagnosis_for,
    durations,
    format_duration,
    incident_id,
    mitigation_proposals,
    on_start,
    response_time,
    triage,
)
from runbook.decisions.logs import LogSearch
from runbook.decisions.refusal import Refused
from runbook.report import markdown_table
from runbook.settings import PlatformSettings, load_settings
from tasks.approval import ApprovalRejected, Plan, request_approval
from tasks.incidents import (
    ALERT_RESOLVED,
    IncidentWatch,
    alert_resource,
    claim_incident,
    emit_step,
    incident_resource,
    read_incident,
    read_incident_events,
    read_mitigation,
    read_run_markdown,
    release_incident,
    update_incident,
    wait_for_run,
    withdraw_approvals,
)
from tasks.notify import announce, page_on_call, update_status_page
from tasks.prometheus import query_prometheus, read_alert_rules

# INVESTIGATE's log excerpt: the backend's errors of the last 15 minutes, a few lines.
LOG_WINDOW_MINUTES = 15
LOG_EXCERPT_LINES = 10

ALERT_NAME = r"^([A-Za-z_:][A-Za-z0-9_:]*)?$"
LABEL_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class Acknowledgement(RunInput):
    """Someone is on it: escalation stops."""

    acknowledged_by: str = Field(
        min_length=1, max_length=100, description="Who is handling the incident; recorded."
    )
    note: str = Field("", max_length=500, description="Anything the timeline should say.")


class Resolution(RunInput):
    """The incident is over: verified by the health check before it is closed."""

    resolved_by: str = Field(
        min_length=1, max_length=100, description="Who declares it resolved; recorded."
    )
    note: str = Field("", max_length=500, description="What fixed it, for the post-mortem.")


def _run_name() -> str:
    parameters = this_run.parameters
    what = parameters.get("alertname") or "manual"
    return (
        f"incident-{what}-{parameters.get('priority') or parameters.get('severity') or ''}".rstrip(
            "-"
        )
    )


@flow(name="incident-response", flow_run_name=_run_name)
def incident_response(
    summary: Annotated[str, Field(max_length=1024)] = "",
    description: Annotated[str, Field(max_length=4000)] = "",
    priority: Priority | None = None,
    reported_by: Annotated[str, Field(max_length=100)] = "",
    alertname: Annotated[str, Field(max_length=200, pattern=ALERT_NAME)] = "",
    severity: Annotated[str, Field(max_length=40)] = "",
    labels: Annotated[dict[str, Annotated[str, Field(max_length=1024)]], Field(max_length=64)] = {},  # noqa: B006
    fingerprint: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-fA-F]*$")] = "",
    group_key: Annotated[str, Field(max_length=2048)] = "",
    status: Literal["firing", "resolved"] = "firing",
    diagnosis_wait_seconds: Annotated[int, Field(ge=0, le=3600)] = 300,
) -> dict[str, Any]:
    """Run an incident from detection to post-mortem: triage, page, escalate, investigate,
    mitigate behind approvals, resolve when verified, and write the timeline.

    Args:
        summary: One line: what is wrong (an alert's summary, or a person's title).
        description: A person's report: what users see, since when (manual start).
        priority: P1 (service down, data breach) to P4 (minor); required for a manual start,
            overrides the alert's triage when given.
        reported_by: Who declares the incident (manual start).
        alertname: The alert's name (set by the alert bridge; empty for a manual start).
        severity: The alert's severity label: critical, warning or info.
        labels: The alert's labels (priority, impact, runbook, deployment… steer the triage).
        fingerprint: The alert's fingerprint (from Alertmanager).
        group_key: Alertmanager's group key: one incident per group. Empty for a manual
            start: each manual start is its own incident unless you give one.
        status: firing opens (or joins) the incident; resolved lets its open run resolve.
        diagnosis_wait_seconds: How long to wait for the diagnosis's evidence.
    """
    logger = get_run_logger()
    settings = load_settings()
    run_id = get_run_context().flow_run.id  # type: ignore[union-attr]

    # 1. DETECT: an alert or a person's report; bad input refused before anything is sent.
    title, group_key = _detect(summary, description, priority, alertname, group_key, run_id)

    # 2. TRIAGE: the page's severity table; the incident id comes from the alert group.
    verdict = triage(alertname, severity, labels, priority)
    incident = incident_id(group_key)
    if status == "resolved":
        return _alert_resolved(incident, group_key)

    # 3. One incident per alert group: claim its record, or join the open one.
    opened = _claim(incident, run_id, verdict, title, settings)
    if opened is not Verdict.OPEN:
        emit_step(incident, "repeated", run_id, verdict=opened.value, alertname=alertname)
        logger.info("incident %s for this alert group is %s: nothing new opened", incident, opened)
        return {"incident": incident, "opened": False, "verdict": opened.value}

    declared_at = time.time()
    emit_step(
        incident,
        "declared",
        run_id,
        title=title,
        priority=verdict.priority,
        why=verdict.reason,
        by=reported_by or "alertmanager",
        alertname=alertname,
    )
    watch = IncidentWatch(
        incident,
        title,
        verdict.priority,
        run_id,
        declared_at,
        group_key if alertname else None,
        settings.escalation_contacts,
        settings.incident_poll_seconds,
        settings.incident_response_targets,
    )
    mitigation: dict[str, Any] = {}
    verified = ""
    try:
        # 4. Notify: page the on-call engineer, tell chat, open a status page incident.
        watch.start()
        announce(
            f":rotating_light: [{verdict.priority}] {title} — incident {incident} "
            f"({verdict.reason})"
        )
        if verdict.priority in STATUS_PAGE_PRIORITIES:
            update_status_page("investigating", f"We are investigating: {title}")
        emit_step(
            incident, "notified", run_id, status_page=verdict.priority in STATUS_PAGE_PRIORITIES
        )

        # 5. INVESTIGATE: the matching diagnosis and the health check, before anyone looks.
        evidence, diagnosis_run = _investigate(
            incident, alertname, labels, run_id, diagnosis_wait_seconds
        )

        # 6. Acknowledgement (form, API or event); the escalation path runs meanwhile.
        _await_acknowledgement(watch, incident, title, verdict, settings, evidence)

        # 7. MITIGATE: the diagnosis's proposals, decided in its run's form; else ours, each
        #    behind an approval here. Exactly the approved one is carried out.
        mitigation = _diagnosis_mitigation(watch, incident, diagnosis_run, settings)
        if not mitigation:
            mitigation = _mitigate(incident, run_id, mitigation_proposals(alertname, labels))

        # 8. RESOLVE: the alert's resolved event or an operator; verified by the health check.
        verified = _await_resolution(watch, incident, alertname, run_id, settings)

        # 9. Close: PagerDuty resolve for every page, status page resolved, chat.
        _close(watch, incident, title, verdict, run_id)
        update_incident(
            incident, {"state": "resolved", "flow_run_id": str(run_id), "resolved_at": time.time()}
        )
    except BaseException as exc:
        # Cancelled, timed out or failed: the record says so, so the next start reopens it.
        update_incident(incident, {"state": "failed", "flow_run_id": str(run_id)})
        announce(
            f":warning: incident {incident} ({title}) is no longer run by this runbook: "
            f"{type(exc).__name__}: {exc}. PagerDuty keeps it open."
        )
        raise
    finally:
        watch.stop()

    # 10. POST-MORTEM: timeline from the recorded events, durations, who did what.
    report = _post_mortem(watch, incident, title, verdict, group_key, mitigation, verified)
    logger.info("incident %s resolved", incident)
    return {"incident": incident, "opened": True, "priority": verdict.priority, **report}


# --- the steps ---------------------------------------------------------------------------


def _detect(
    summary: str,
    description: str,
    priority: Priority | None,
    alertname: str,
    group_key: str,
    run_id: Any,
) -> tuple[str, str]:
    if alertname:
        if not group_key:
            raise Refused("group_key", "an alert must come with its group key")
        return summary or alertname, group_key
    if not (summary or description):
        raise Refused("summary", "a manual incident needs a summary or a description")
    if priority is None:
        raise Refused("priority", "a manual incident needs a priority (P1-P4)")
    title = summary or description.splitlines()[0][:200]
    return title, group_key or f"manual/{run_id}"


def _alert_resolved(incident: str, group_key: str) -> dict[str, Any]:
    """A start for a resolved alert: the open incident's run hears it through the event
    (sent here too, in case the bridge only started this run)."""
    emit_event(
        event=ALERT_RESOLVED,
        resource={"prefect.resource.id": alert_resource(group_key)},
        payload={"source": "incident-response start with status resolved"},
    )
    return {"incident": incident, "opened": False, "verdict": "alert-resolved"}


def _claim(
    incident: str, run_id: Any, verdict: Triage, title: str, settings: PlatformSettings
) -> Verdict:
    record = {
        "state": "open",
        "flow_run_id": str(run_id),
        "priority": verdict.priority,
        "title": title[:200],
        "opened_at": time.time(),
    }
    for _ in range(3):
        if claim_incident(incident, record):
            return Verdict.OPEN
        existing = read_incident(incident)
        if existing is None:
            continue  # released in between: claim again
        state = existing.get("state")
        if state == "open" and existing.get("run_final"):
            state = "failed"  # its run ended without resolving it
        resolved_at = existing.get("resolved_at")
        ago = time.time() - resolved_at if isinstance(resolved_at, (int, float)) else None
        decision = on_start(state, ago, settings.incident_quiet_seconds)
        if decision is not Verdict.OPEN:
            return decision
        release_incident(incident)
    return Verdict.JOIN  # another start keeps winning the claim: it owns the incident


def _investigate(
    incident: str, alertname: str, labels: dict[str, str], run_id: Any, wait_seconds: int
) -> tuple[str, UUID | None]:
    """The evidence, and the diagnosis run (whose proposals wait for approval) if any."""
    logger = get_run_logger()
    sections = []
    diagnosis_run = None
    diagnosis = diagnosis_for(alertname, labels)
    if diagnosis is None:
        sections.append("**Diagnosis:** no diagnosis for this alert.")
    else:
        section, diagnosis_run = _run_diagnosis(diagnosis, incident, wait_seconds)
        sections.append(section)
    health = health_check(notify_on_failure=False, return_state=True)
    health_line = "healthy" if health.is_completed() else f"FAILING — {health.message}"
    sections.append(f"**Health check:** {health_line}")
    sections.append(_log_excerpt())
    evidence = "\n\n".join([f"## Evidence for incident {incident}", *sections])
    create_markdown_artifact(markdown=evidence, key="incident-evidence", description=health_line)
    emit_step(incident, "investigated", run_id, diagnosis=diagnosis or "none", health=health_line)
    logger.info("investigation: diagnosis %s, health %s", diagnosis or "none", health_line)
    return evidence, diagnosis_run


def _run_diagnosis(diagnosis: str, incident: str, wait_seconds: int) -> tuple[str, UUID | None]:
    """Start `<diagnosis>/<diagnosis>` by name, its proposals behind its own approvals;
    copy its evidence artifacts here."""
    try:
        run: FlowRun = run_deployment(  # type: ignore[assignment]
            f"{diagnosis}/{diagnosis}",
            # Only parameters the diagnose-* flows take: an unknown one fails their run.
            parameters={"incident_id": incident, "remediate": True},
            timeout=0,
            idempotency_key=f"{incident}/{diagnosis}",
            tags=["started-by-incident-response"],
        )
    except ObjectNotFound:
        return f"**Diagnosis:** `{diagnosis}` is not deployed here; nothing was diagnosed.", None
    run = wait_for_run(run.id, wait_seconds)
    state = run.state.name if run.state else "unknown"
    parts = [f"**Diagnosis:** `{diagnosis}` run `{run.name}` ({run.id}): {state}"]
    if run.state is not None and run.state.is_paused():
        parts.append(
            f"**Its remediation waits for approval** in run `{run.name}`'s form (Resume): "
            "approve or reject each proposal there."
        )
    parts += [f"### {key}\n\n{markdown}" for key, markdown in read_run_markdown(run.id)]
    return "\n\n".join(parts), run.id


def _log_excerpt() -> str:
    """The backend's errors of the last minutes, from the `logs` runbook (a subflow, so its
    own report is linked to this run). Evidence only: a failed search is noted, never fatal."""
    found = logs(
        component="backend",
        since_minutes=LOG_WINDOW_MINUTES,
        min_level="error",
        max_matches=LOG_EXCERPT_LINES,
        return_state=True,
    )
    if not found.is_completed():
        return f"**Logs:** the log search failed ({found.message}); nothing attached."
    search: LogSearch = found.result()
    if not search.matches:
        return f"**Logs:** no backend error in the last {LOG_WINDOW_MINUTES} minutes."
    return (
        f"**Logs:** {search.matched} backend error line(s) in the last "
        f"{LOG_WINDOW_MINUTES} minutes; the latest {len(search.matches)}:\n\n"
        f"```\n{search.excerpt(LOG_EXCERPT_LINES)}\n```"
    )


def _await_acknowledgement(
    watch: IncidentWatch,
    incident: str,
    title: str,
    verdict: Triage,
    settings: PlatformSettings,
    evidence: str,
) -> None:
    if watch.acknowledged is None and watch.resolution is None:
        form = (
            f"## Acknowledge incident {incident}\n\n**[{verdict.priority}] {title}** — "
            f"{verdict.reason}\n\nUntil someone acknowledges, the escalation path pages "
            f"the next contact when due.\n\n{evidence}"
        )
        try:
            answer = pause_flow_run(
                wait_for_input=Acknowledgement.with_initial_data(description=form[:20000]),
                timeout=settings.incident_wait_seconds,
                poll_interval=settings.approval_poll_seconds,
                key="acknowledge",
            )
        except FlowPauseTimeout:
            raise TimeoutError(
                f"nobody acknowledged incident {incident} within "
                f"{format_duration(settings.incident_wait_seconds)}"
            ) from None
        if watch.acknowledged is None and watch.resolution is None:
            watch.acknowledge(answer.acknowledged_by, answer.note, "form/API")
    ack = watch.acknowledged
    if ack is not None:
        # Tell PagerDuty too, so its own escalation stops.
        _tell_everyone_paged(watch, incident, title, verdict, "acknowledge")
        announce(f":eyes: incident {incident} acknowledged by {ack.by}")
    timing = response_time(
        verdict.priority,
        ack.at - watch.declared_at if ack else None,
        time.time() - watch.declared_at,
        watch.targets,
    )
    if timing.breached:
        create_markdown_artifact(
            markdown=f"## Response target breached\n\n{timing.text(verdict.priority)}",
            key="response-target-breach",
            description=timing.text(verdict.priority),
        )
        if not watch.breach_reported:
            watch.breach_reported = True
            announce(f":alarm_clock: {title}: {timing.text(verdict.priority)}")


def _diagnosis_mitigation(
    watch: IncidentWatch, incident: str, diagnosis_run: UUID | None, settings: PlatformSettings
) -> dict[str, Any]:
    """Wait until the diagnosis run's approvals are decided (or the incident resolves);
    what it carried out and who approved it, as its `mitigated` event says."""
    if diagnosis_run is None:
        return {}
    run = wait_for_run(
        diagnosis_run,
        settings.incident_wait_seconds,
        settings.approval_poll_seconds,
        final_only=True,
        stop=lambda: watch.resolution is not None,
    )
    if run.state is None or not run.state.is_final():
        # Resolved first: a fix for a problem that is gone is withdrawn, not left to be
        # approved later; the refusal is recorded in that run like any other.
        reason = f"incident {incident} resolved before a decision"
        run = withdraw_approvals(diagnosis_run, "incident-response", reason)
        announce(
            f":hourglass: incident {incident}: the remediation proposed by `{run.name}` was "
            "not decided before the resolution; withdrawn."
        )
    if run.state is None or not run.state.is_final():
        return {}
    # Failed: every proposal rejected, or no decision in time; nothing was changed.
    if not run.state.is_completed():
        return {}
    if "remediation-report" not in dict(read_run_markdown(diagnosis_run)):
        return {}  # nothing to propose
    since = dt.datetime.fromtimestamp(watch.declared_at - 1, dt.UTC)
    event = read_mitigation(incident, diagnosis_run, since)
    if event is None:
        return {}
    return {
        "mitigation": str(event.payload.get("proposal")),
        "mitigated_by": str(event.payload.get("by")),
        "mitigation_run": str(diagnosis_run),
        "mitigated_at": event.occurred.timestamp(),
    }


def _mitigate(incident: str, run_id: Any, proposals: list[Proposal]) -> dict[str, Any]:
    for proposal in proposals:
        plan = Plan(
            title=proposal.title,
            target=proposal.deployment,
            steps=(
                f"Start the {proposal.deployment} runbook with {proposal.parameters} "
                "(it shows its own plan before it changes anything)",
            ),
            facts={"incident": incident, "why": proposal.why},
        )
        try:
            decision = request_approval(plan)
        except ApprovalRejected:
            emit_step(incident, "mitigation-rejected", run_id, proposal=proposal.title)
            continue
        started: FlowRun = run_deployment(  # type: ignore[assignment]
            proposal.deployment,
            parameters=dict(proposal.parameters),
            timeout=0,
            idempotency_key=f"{incident}/{plan.key}",
            tags=["started-by-incident-response"],
        )
        emit_step(
            incident,
            "mitigated",
            run_id,
            proposal=proposal.title,
            by=decision.approver,
            reason=decision.reason,
            run=str(started.id),
        )
        return {
            "mitigation": proposal.title,
            "mitigated_by": decision.approver,
            "mitigation_run": str(started.id),
            "mitigated_at": time.time(),
        }
    return {}


def _await_resolution(
    watch: IncidentWatch, incident: str, alertname: str, run_id: Any, settings: PlatformSettings
) -> str:
    """Wait for the resolution, verify it; returns how it was verified."""
    for _attempt in range(3):
        if watch.resolution is None:
            try:
                answer = pause_flow_run(
                    wait_for_input=Resolution.with_initial_data(
                        description=f"## Resolve incident {incident}\n\nThe health check "
                        "runs before it is closed; it stays open if that fails."
                    ),
                    timeout=settings.incident_wait_seconds,
                    poll_interval=settings.approval_poll_seconds,
                    key="resolve",
                )
            except FlowPauseTimeout:
                raise TimeoutError(f"incident {incident} not resolved in time") from None
            watch.resolve(answer.resolved_by, answer.note, "form/API")
        resolution = watch.resolution
        assert resolution is not None
        health = health_check(notify_on_failure=False, return_state=True)
        if health.is_completed():
            verified = "; ".join(["health check passed", _alert_query_verdict(alertname, settings)])
            emit_step(
                incident,
                "resolved",
                run_id,
                by=resolution.by,
                note=resolution.note,
                via=resolution.via,
                verified=verified,
            )
            return verified
        emit_step(incident, "verification-failed", run_id, by=resolution.by, health=health.message)
        announce(f":x: incident {incident} not resolved: the health check fails ({health.message})")
        watch.reopen()
    raise RuntimeError(f"incident {incident}: the health check kept failing; it stays open")


def _alert_query_verdict(alertname: str, settings: PlatformSettings) -> str:
    """The alert's own query, asked of Prometheus: clear only when it yields no series (or
    0). Said, never fatal: the health check already passed and an operator decided."""
    if not alertname:
        return "no alert query (manual incident)"
    if settings.prometheus_url is None:
        return "alert query not checked (RUNBOOK_PROMETHEUS_URL unset)"
    expr = alert_expression(read_alert_rules(), alertname)
    if expr is None:
        return f"alert query not checked (no rule {alertname} in monitoring/rules)"
    value = query_prometheus(expr, return_state=True)
    if not value.is_completed():
        return f"alert query NOT verified: Prometheus did not answer ({value.message})"
    result = value.result()
    if alert_query_clear(result):
        return f"alert query clear (`{expr}` yields nothing)"
    return f"alert query NOT clear: `{expr}` still yields {result:g}"


def _tell_everyone_paged(
    watch: IncidentWatch,
    incident: str,
    title: str,
    verdict: Triage,
    action: Literal["acknowledge", "resolve"],
) -> None:
    """PagerDuty `acknowledge`/`resolve` for each contact paged so far (its own alert,
    by dedup key), so PagerDuty's escalation stops too. Best effort: an outage is noted in
    the task's state, never fails the incident."""
    for contact in list(watch.paged.values()):
        page_on_call(
            title,
            PAGERDUTY_SEVERITY[verdict.priority],
            dedup_key=dedup_key(incident, contact),
            action=action,
            routing_key=contact.routing_key,
            return_state=True,
        )


def _close(watch: IncidentWatch, incident: str, title: str, verdict: Triage, run_id: Any) -> None:
    _tell_everyone_paged(watch, incident, title, verdict, "resolve")
    if verdict.priority in STATUS_PAGE_PRIORITIES:
        update_status_page("resolved", f"Resolved: {title}")
    announce(f":white_check_mark: incident {incident} resolved: {title}")
    emit_step(incident, "closed", run_id, pagerduty_resolved=len(watch.paged))


def _post_mortem(
    watch: IncidentWatch,
    incident: str,
    title: str,
    verdict: Triage,
    group_key: str,
    mitigation: dict[str, Any],
    verified: str,
) -> dict[str, Any]:
    events = _recorded_events(incident, group_key, watch.declared_at)
    start = watch.declared_at
    ack, res = watch.acknowledged, watch.resolution
    times = durations(
        start,
        ack.at if ack else None,
        mitigation.get("mitigated_at"),
        next(
            (
                e.occurred.timestamp()
                for e in events
                if e.event.endswith(".resolved") and e.resource.id == incident_resource(incident)
            ),
            None,
        ),
    )
    timing = response_time(
        verdict.priority, times.to_acknowledge, times.to_resolve or 0, watch.targets
    )
    rows = [
        {
            "time (UTC)": e.occurred.strftime("%Y-%m-%d %H:%M:%S"),
            "+": format_duration(e.occurred.timestamp() - start),
            "event": e.event.removeprefix("complianceagent."),
            "detail": ", ".join(f"{k}={v}" for k, v in (e.payload or {}).items())[:300],
        }
        for e in events
    ]

    def took(seconds: float | None) -> str:
        return format_duration(seconds) if seconds is not None else "-"

    done = [
        f"- Declared {verdict.priority} ({verdict.reason})",
        f"- Response target BREACHED: {timing.text(verdict.priority)}" if timing.breached else "",
        *[f"- Paged {c.role} ({c.name})" for c in watch.paged.values()],
        f"- Acknowledged by {ack.by} via {ack.via}" if ack else "- Never acknowledged",
        (
            f"- Mitigation: {mitigation['mitigation']}, approved by {mitigation['mitigated_by']} "
            f"(run {mitigation['mitigation_run']})"
        )
        if mitigation
        else "- No mitigation carried out",
        *[
            f"- Rejected: {e.payload.get('proposal')}"
            for e in events
            if e.event == "complianceagent.incident.mitigation-rejected"
        ],
        f"- Resolved by {res.by} via {res.via}; verified: {verified}" if res else "",
    ]
    markdown = "\n\n".join(
        [
            f"# Post-mortem: [{verdict.priority}] {title}",
            f"Incident `{incident}`",
            markdown_table(
                [
                    {
                        "time to acknowledge": took(times.to_acknowledge),
                        "time to mitigate": took(times.to_mitigate),
                        "time to resolve": took(times.to_resolve),
                        "response target": timing.text(verdict.priority),
                    }
                ]
            ),
            "## Timeline\n\n" + markdown_table(rows, ("time (UTC)", "+", "event", "detail")),
            "## What was done, and by whom\n\n" + "\n".join(line for line in done if line),
            "## Root cause\n\n_What broke, and why (5 whys)._",
            "## Contributing factors\n\n_What made it worse or slower to find._",
            "## What went well / what went badly\n\n- \n- ",
            "## Follow-ups\n\n| action | owner | due |\n|---|---|---|\n| | | |",
            "## Runbook updates\n\n_Which page of the runbook changes, and how._",
        ]
    )
    create_markdown_artifact(
        markdown=markdown, key="post-mortem", description=f"Post-mortem of {title}"
    )
    return {
        "time_to_acknowledge": times.to_acknowledge,
        "time_to_resolve": times.to_resolve,
        "response_target_breached": timing.breached,
        "timeline": [r["event"] for r in rows],
        "verified": verified,
    }


def _recorded_events(incident: str, group_key: str, declared_at: float) -> list[Any]:
    """The incident's events as the server recorded them, waiting (briefly) until the
    last one sent, `closed`, has arrived."""
    since = dt.datetime.fromtimestamp(declared_at - 1, dt.UTC)
    give_up = time.monotonic() + 15
    while True:
        events = read_incident_events(
            [incident_resource(incident), alert_resource(group_key)], since
        )
        if (
            any(e.event == "complianceagent.incident.closed" for e in events)
            or time.monotonic() > give_up
        ):
            return events
        time.sleep(0.5)
