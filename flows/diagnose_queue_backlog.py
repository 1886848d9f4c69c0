"""Runbook > Common Issues > Worker Queue Backlog (tasks not processing, queue growing).

    kubectl exec -it deployment/celery-workers -- celery -A app.workers inspect active
    kubectl exec -it deployment/celery-workers -- celery -A app.workers inspect reserved
    kubectl scale deployment/celery-workers --replicas=10

`diagnose-queue-backlog` reads the broker's own Redis instead of asking the workers (a
stuck worker answers `inspect` late or never): `LLEN` of each queue
(`RUNBOOK_CELERY_QUEUES`, default `celery`) and its priority lists (`queue\\x06\\x163`,
`…6`, `…9`), the workers' replica count, and the tasks delivered but not acknowledged for
longer than `stuck_minutes` (kombu's `unacked` hash and `unacked_index` delivery times),
reported with their task name and id. When the backlog is over the page's Queue Depth
warning (1000) and more than `tasks_per_worker` per worker, it proposes scaling the
workers, within their bounds (1-30), through the `scale` runbook after an approval.
Stuck tasks are reported, never deleted.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.diagnosis import INCIDENT_ID, offer, publish_evidence, scale_or_rollback
from runbook.decisions.diagnostics import Diagnosis, human_seconds
from runbook.decisions.diagnostics_redis import (
    backlog_of,
    printable,
    propose_workers,
    stuck_tasks,
)
from runbook.report import markdown_table
from runbook.settings import load_settings
from tasks.kubernetes import read_deployment_scale
from tasks.redis import read_queue_lengths, read_unacked


@flow(name="diagnose-queue-backlog", flow_run_name="diagnose-queue-backlog")
def diagnose_queue_backlog(
    tasks_per_worker: Annotated[int, Field(ge=1, le=100_000)] = 100,
    stuck_minutes: Annotated[float, Field(ge=0.05, le=7 * 24 * 60)] = 30,
    remediate: bool = False,
    incident_id: Annotated[str, Field(max_length=36, pattern=INCIDENT_ID)] = "",
) -> Diagnosis:
    """Diagnose a Celery queue backlog; propose scaling the workers, report stuck tasks.

    Args:
        tasks_per_worker: Waiting tasks one worker is expected to keep up with; the
            proposal scales to backlog / this, within 1-30 workers.
        stuck_minutes: A task a worker took and has not acknowledged for longer than
            this is reported as stuck.
        remediate: After the evidence, offer the proposal for approval and carry it out
            if approved. Off: evidence and proposals only, nothing changes.
        incident_id: The incident this diagnosis serves (set by incident-response): its
            approvals and what was carried out go on that incident's timeline.
    """
    settings = load_settings()
    workers = settings.deployment_name("celery-workers")

    # 1. Evidence: LLEN of every queue list, the workers' replicas, unacknowledged tasks.
    lengths = read_queue_lengths(settings.redis_broker_db, settings.celery_queues)
    replicas = read_deployment_scale(workers)
    unacked = read_unacked(settings.redis_broker_db, stuck_minutes * 60)

    # 2. Judge: backlog vs the Queue Depth thresholds; workers wanted; stuck tasks.
    backlog = backlog_of(lengths)
    stuck = stuck_tasks(
        unacked["messages"], unacked["delivered_at"], unacked["now"], stuck_minutes * 60
    )
    proposal = propose_workers(backlog, replicas, tasks_per_worker, workers)
    diagnosis = Diagnosis(
        issue="queue-backlog",
        level=backlog.level,
        summary=f"{backlog.summary} for {replicas} workers; {len(stuck)} of "
        f"{unacked['total']} unacknowledged tasks older than {human_seconds(stuck_minutes * 60)}",
        evidence={
            "lengths": {printable(k): v for k, v in lengths.items()},
            "backlog": backlog.total,
            "replicas": replicas,
            "unacked": unacked["total"],
            "stuck": [
                {"task": s.task, "id": s.task_id, "queue": s.queue, "age": round(s.age_seconds)}
                for s in stuck
            ],
        },
        proposals=[proposal] if proposal else [],
    )

    # 3. Publish the evidence.
    publish_evidence(
        diagnosis,
        [
            (
                "Queue lengths (LLEN)",
                markdown_table([{"list": printable(k), "waiting": v} for k, v in lengths.items()]),
            ),
            ("Stuck tasks (taken, not acknowledged)", markdown_table(diagnosis.evidence["stuck"])),
        ],
    )

    # 4. With remediate: approval, then the scale runbook (its bounds and lock apply).
    if remediate and diagnosis.proposals:
        diagnosis = replace(
            diagnosis, carried_out=offer(diagnosis.proposals, scale_or_rollback, incident_id)
        )
    return diagnosis
