"""Runbook > Common Issues > Database Connection Pool Exhaustion ("too many connections").

    SELECT state, count(*) FROM pg_stat_activity GROUP BY state;
    SELECT pg_terminate_backend(pid) FROM pg_stat_activity
      WHERE state = 'idle' AND query_start < now() - interval '10 minutes';

`diagnose-connections` reads pg_stat_activity (client backends by state vs
max_connections minus the superuser reserve) and, when `RUNBOOK_PROMETHEUS_URL` is set,
the DatabaseConnections alerts' own ratio, `max(db_connections)` over
`max(db_connection_pool_size)` (the application's pool); it publishes both, and its level
is the worse of the two, so it never says "ok" while the alert that started it fires. It
proposes ending only client backends idle — or idle in a transaction, the worst holders,
which the page's query misses — for longer than `idle_minutes` since they went idle
(unset: `RUNBOOK_CONNECTIONS_IDLE_MINUTES`, default the page's 10); never our own
session, a superuser's or a replication role's (`runbook.decisions.diagnostics_connections`).
The plan lists every pid with its user, application, client and idle time. With
`remediate` and an approval it ends exactly those pids, each only if it is still the same
session (same backend_start) and still idle, and reports what was ended and what was left.

No lock is taken: ending a session is checked against its identity in the same statement,
so two runs cannot end anything twice or wrongly, and a lock on the database would make
this emergency remedy wait behind an hour-long backup. Raising `max_connections` (the
page's step 2) needs a restart and is left to the evidence, not proposed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows.diagnosis import INCIDENT_ID, offer, publish_evidence
from runbook.decisions.diagnostics import Diagnosis, Proposal, human_seconds
from runbook.decisions.diagnostics_connections import (
    PoolUsage,
    Session,
    connection_usage,
    connections_level,
    pool_usage,
    propose_terminations,
    sessions_to_end,
)
from runbook.report import markdown_table
from runbook.settings import load_settings
from tasks.approval import ApprovalDecision
from tasks.postgres_diagnostics import read_connection_limits, read_sessions, terminate_sessions
from tasks.prometheus import query_prometheus

# What Prometheus is asked: the two sides of the DatabaseConnections alerts' expression
# (monitoring/rules/complianceagent.yml), so the diagnosis judges what the alert judged.
POOL_CONNECTIONS_QUERY = "max(db_connections)"
POOL_SIZE_QUERY = "max(db_connection_pool_size)"


@flow(name="diagnose-connections", flow_run_name="diagnose-connections")
def diagnose_connections(
    idle_minutes: Annotated[float | None, Field(ge=0.05, le=1440)] = None,
    remediate: bool = False,
    incident_id: Annotated[str, Field(max_length=36, pattern=INCIDENT_ID)] = "",
) -> Diagnosis:
    """Diagnose connection pool exhaustion; propose ending long-idle client sessions.

    Args:
        idle_minutes: A client session idle (or idle in a transaction) for longer than
            this is proposed for termination (0.05-1440 minutes). Empty: the platform's
            setting (RUNBOOK_CONNECTIONS_IDLE_MINUTES, default 10).
        remediate: After the evidence, offer the proposal for approval and carry it out
            if approved. Off: evidence and proposals only, nothing changes.
        incident_id: The incident this diagnosis serves (set by incident-response): its
            approvals and what was carried out go on that incident's timeline.
    """
    settings = load_settings()
    database = settings.database_name
    minutes = settings.connections_idle_minutes if idle_minutes is None else idle_minutes
    threshold = minutes * 60

    # 1. Evidence: every session in pg_stat_activity, and the connection limits.
    sessions = [Session.from_row(row) for row in read_sessions()]
    limits = read_connection_limits()

    # 2. The alert's own numbers: the application's pool, as Prometheus sees it.
    pool = None
    if settings.prometheus_url is not None:
        pool = pool_usage(
            query_prometheus(POOL_CONNECTIONS_QUERY), query_prometheus(POOL_SIZE_QUERY)
        )

    # 3. Judge: the worse of pool and max_connections; which sessions may be ended.
    usage = connection_usage(
        sessions, limits["max_connections"], limits["superuser_reserved_connections"]
    )
    chosen, spared = sessions_to_end(sessions, threshold)
    proposal = propose_terminations(chosen, threshold, database, usage, pool)
    diagnosis = Diagnosis(
        issue="connections",
        level=connections_level(usage, pool),
        summary=(f"{pool.summary}; " if pool else "")
        + f"{usage.summary}; {len(chosen)} client sessions idle over {human_seconds(threshold)}",
        evidence={
            "pool": _pool_row(pool),
            "by_state": usage.by_state,
            "total": usage.total,
            "max_connections": usage.max_connections,
            "reserved": usage.reserved,
            "percent": round(usage.percent, 1),
            "idle_over_threshold": [_row(s) for s in chosen],
            "spared": [{**_row(s), "why": why} for s, why in spared],
        },
        proposals=[proposal] if proposal else [],
    )

    # 4. Publish the evidence.
    publish_evidence(
        diagnosis,
        [
            (
                "The application's pool (what the DatabaseConnections alerts judge)",
                markdown_table([diagnosis.evidence["pool"]])
                if pool
                else "not measured: RUNBOOK_PROMETHEUS_URL is not set",
            ),
            ("Client connections by state", markdown_table([usage.by_state])),
            (
                "Idle longer than the threshold",
                markdown_table(diagnosis.evidence["idle_over_threshold"]),
            ),
            ("Idle but never ended", markdown_table(diagnosis.evidence["spared"])),
        ],
    )

    # 5. With remediate: approval, then end exactly the listed sessions.
    if remediate and diagnosis.proposals:
        diagnosis = replace(
            diagnosis, carried_out=offer(diagnosis.proposals, _end_sessions, incident_id)
        )
    return diagnosis


def _pool_row(pool: PoolUsage | None) -> dict[str, Any] | None:
    if pool is None:
        return None
    return {
        "db_connections": pool.connections,
        "pool size": pool.pool_size,
        "percent": None if pool.percent is None else round(pool.percent, 1),
        "level": pool.level.value,
        "query": f"{POOL_CONNECTIONS_QUERY} / {POOL_SIZE_QUERY}",
    }


def _row(s: Session) -> dict[str, Any]:
    return {
        "pid": s.pid,
        "user": s.user,
        "application": s.application,
        "client": s.client,
        "state": s.state,
        "idle": human_seconds(s.idle_seconds or 0),
        "backend_start": s.backend_start,
    }


def _end_sessions(proposal: Proposal, decision: ApprovalDecision | None) -> dict[str, Any]:
    planned = proposal.action["sessions"]
    result = terminate_sessions(planned, len(planned))
    ended, skipped = result["terminated"], result["skipped"]
    summary = f"ended {len(ended)} of {len(planned)} sessions" + (
        f"; left {', '.join(f'{pid} ({why})' for pid, why in skipped.items())}" if skipped else ""
    )
    return {"summary": summary, "terminated": ended, "skipped": skipped}
