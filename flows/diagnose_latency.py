"""Runbook > Common Issues > High API Latency (response times > 500 ms).

    curl https://api.complianceagent.ai/metrics | grep http_request_duration
    psql -c "SELECT count(*) FROM pg_stat_activity;"
    psql -c "SELECT query, calls, mean_time FROM pg_stat_statements
             ORDER BY mean_time DESC LIMIT 10;"

`diagnose-latency` collects, read-only:
1. p99 and 5xx rate: from Prometheus' HTTP API over the last 5 minutes when
   `RUNBOOK_PROMETHEUS_URL` is set; otherwise from two scrapes of the backend's /metrics
   `sample_seconds` apart (the histogram's deltas), and the evidence says which. CPU from
   `component_cpu_usage_ratio` (CPU over its limit) where the metrics have it, else "not measured";
2. database connections (pg_stat_activity) and the slowest statements by
   `mean_exec_time` — the page's `mean_time` column was renamed in PostgreSQL 13 and its
   query fails there;
3. the backend's rollouts of the last `deploy_window_hours` (its rollout history).

It proposes, in this order: rolling back a deploy of the last hours (through the
`rollback` runbook, whose own approval shows current → target revision and image), and
scaling the backend by half again within 2-20 when CPU > 80 % (or p99 is high and CPU
is not measured), through the `scale` runbook after an approval. Slow statements
(missing indexes, the page's step 2) are evidence, not an action.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import replace
from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.diagnosis import INCIDENT_ID, offer, publish_evidence, scale_or_rollback
from runbook.decisions.deployment import deployment_view
from runbook.decisions.diagnostics import Diagnosis, Proposal, worst
from runbook.decisions.diagnostics_connections import Session, connection_usage
from runbook.decisions.diagnostics_latency import (
    TrafficWindow,
    propose_rollback,
    propose_scale,
    recent_revisions,
    slow_statement_rows,
    window_from_scrapes,
)
from runbook.report import markdown_table
from runbook.settings import load_settings
from tasks.kubernetes import list_deployment_revisions, read_deployment
from tasks.postgres_diagnostics import read_connection_limits, read_sessions, read_slow_statements
from tasks.prometheus import query_prometheus, scrape_backend_metrics

# What Prometheus is asked: the page's alert expressions, over the window (`[{w}s]`).
P99_QUERY = (
    "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket[{w}s])))"
)
ERROR_QUERY = (
    'sum(rate(http_requests_total{{status=~"5.."}}[{w}s])) / sum(rate(http_requests_total[{w}s]))'
)
REQUESTS_QUERY = "sum(increase(http_requests_total[{w}s]))"
CPU_QUERY = '100 * max(component_cpu_usage_ratio{{component="backend"}})'


@flow(name="diagnose-latency", flow_run_name="diagnose-latency")
def diagnose_latency(
    sample_seconds: Annotated[float, Field(ge=1, le=60)] = 5,
    window_seconds: Annotated[int, Field(ge=10, le=3600)] = 300,
    deploy_window_hours: Annotated[float, Field(gt=0, le=168)] = 6,
    remediate: bool = False,
    incident_id: Annotated[str, Field(max_length=36, pattern=INCIDENT_ID)] = "",
) -> Diagnosis:
    """Diagnose high API latency; propose rolling back a recent deploy or scaling the backend.

    Args:
        sample_seconds: Without Prometheus: seconds between the two scrapes of the
            backend's /metrics that p99 and the error rate are computed from (1-60).
        window_seconds: With Prometheus: the window p99 and the error rate are computed
            over, as the page's alert rules do (default 5 minutes; 10 s-1 h).
        deploy_window_hours: A backend rollout this recent is a suspect, and rolling it
            back is proposed (hours, up to a week).
        remediate: After the evidence, offer each proposal for approval and carry out the
            first approved one. Off: evidence and proposals only, nothing changes.
        incident_id: The incident this diagnosis serves (set by incident-response): its
            approvals and what was carried out go on that incident's timeline.
    """
    settings = load_settings()
    backend = settings.deployment_name("backend")

    # 1. Traffic: p99, 5xx rate and CPU (Prometheus, else two scrapes of /metrics).
    window = _traffic(settings.prometheus_url is not None, sample_seconds, window_seconds)

    # 2. Database: connections by state, and the slowest statements (mean_exec_time).
    usage = connection_usage(
        [Session.from_row(r) for r in read_sessions()],
        **_limits(),
    )
    slow = read_slow_statements(settings.database_name)

    # 3. Deploys of the last hours: the backend's rollout history.
    live = deployment_view(read_deployment(backend))
    revisions = list_deployment_revisions(backend)
    now = dt.datetime.now(dt.UTC)

    # 4. Judge: roll back a recent deploy first, then scale within the bounds.
    proposals: list[Proposal] = [
        p
        for p in (
            propose_rollback(backend, live.revision, revisions, now, deploy_window_hours),
            propose_scale(window, live.replicas, backend),
        )
        if p is not None
    ]
    recent = recent_revisions(revisions, now, deploy_window_hours)
    diagnosis = Diagnosis(
        issue="latency",
        level=worst(window.level, usage.level),
        summary=f"{window.summary}; {usage.summary}; {len(recent)} backend rollouts in the "
        f"last {deploy_window_hours:g} h",
        evidence={
            "source": window.source,
            "p99_seconds": window.p99_seconds,
            "error_rate": window.error_rate,
            "requests": window.requests,
            "cpu_percent": window.cpu_percent,
            "connections": usage.by_state,
            "connections_percent": round(usage.percent, 1),
            "slow_statements": slow_statement_rows(slow["statements"]) if slow else None,
            "recent_revisions": [
                {"revision": r["revision"], "images": r["images"], "created": r["created"]}
                for r in recent
            ],
            "replicas": live.replicas,
        },
        proposals=proposals,
    )

    # 5. Publish the evidence.
    publish_evidence(
        diagnosis,
        [
            ("Traffic", window.summary),
            ("Database connections by state", markdown_table([usage.by_state])),
            (
                "Slowest statements (pg_stat_statements, mean_exec_time)",
                markdown_table(diagnosis.evidence["slow_statements"])
                if slow
                else "pg_stat_statements is not installed: CREATE EXTENSION pg_stat_statements "
                "(it needs shared_preload_libraries).",
            ),
            (
                f"Backend rollouts in the last {deploy_window_hours:g} h",
                markdown_table(diagnosis.evidence["recent_revisions"]),
            ),
        ],
    )

    # 6. With remediate: each proposal behind an approval, through rollback / scale.
    if remediate and diagnosis.proposals:
        diagnosis = replace(
            diagnosis, carried_out=offer(diagnosis.proposals, scale_or_rollback, incident_id)
        )
    return diagnosis


def _limits() -> dict[str, int]:
    limits = read_connection_limits()
    return {
        "max_connections": limits["max_connections"],
        "reserved": limits["superuser_reserved_connections"],
    }


def _traffic(prometheus: bool, sample_seconds: float, window_seconds: int) -> TrafficWindow:
    """p99, error rate and CPU over a window: Prometheus' last `window_seconds`, or the
    API's own histogram between two scrapes `sample_seconds` apart."""
    if prometheus:
        w = window_seconds
        return TrafficWindow(
            source=f"Prometheus, last {w} s",
            seconds=w,
            requests=query_prometheus(REQUESTS_QUERY.format(w=w)) or 0.0,
            p99_seconds=query_prometheus(P99_QUERY.format(w=w)),
            error_rate=query_prometheus(ERROR_QUERY.format(w=w)),
            cpu_percent=query_prometheus(CPU_QUERY.format(w=w)),
        )
    before = scrape_backend_metrics()
    started = time.monotonic()
    time.sleep(sample_seconds)
    after = scrape_backend_metrics()
    return window_from_scrapes(before, after, time.monotonic() - started)
