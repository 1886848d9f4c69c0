"""Runbook > Database Operations > Run Migrations.

    kubectl exec -it deployment/backend -- /bin/bash
    cd /app && alembic upgrade head
    alembic current

Run as a Kubernetes Job built from the backend Deployment's current image, env and
envFrom (so it reaches the database exactly as the backend does) instead of a shell in a
pod that serves traffic. Guarantees:
- Inside a maintenance window: by default the backend must already be in maintenance mode
  (`MAINTENANCE_MODE=true`, what the maintenance-window runbook sets); otherwise the run is
  refused before anything happens. Untick `require_maintenance_mode` only for migrations
  that are safe under traffic; the approval plan shows which it is.
- Approval first, showing the image, the command and the database.
- The `database/<name>` lock: never at the same time as a backup or restore of that
  database. Taken after the approval, not held through the pause; the backend's revision
  and pod template (image, env, maintenance mode) must then still be as the plan showed,
  else the run is refused ("changed since the plan was approved") before any Job exists.
- The Job's logs and `alembic current` are published; a failed Job fails the run with the
  end of its logs; a finished Job is deleted (already gone counts as deleted).
- A Job still running is never deleted — not when our wait gives up, not when the run is
  cancelled or terminated: killing a migration halfway is worse than letting it finish.
  The run says it left it (`kubectl logs job/<name>` to follow it); it removes itself a
  day after it finishes. A create retried after a lost answer finds its own Job (by the
  run's label) instead of failing and deleting it.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from runbook.decisions.locks import deployment_fingerprint
from runbook.decisions.migrations import (
    MIGRATE_COMMAND,
    JobOutcome,
    MigrationJob,
    alembic_current,
    applied_migrations,
    maintenance_mode_of,
    migration_job,
    migration_job_body,
    migration_job_name,
)
from runbook.decisions.refusal import Refused
from runbook.fault_points import fault_point
from runbook.redaction import redact_output
from runbook.report import StepTimer, markdown_table
from runbook.settings import load_settings
from tasks.approval import Plan, RequestedBy, refuse_if_changed, request_approval
from tasks.intent import clear_intent, record_intent
from tasks.kubernetes import create_job, delete_job, read_deployment, read_job_logs, wait_for_job
from tasks.locks import exclusive
from tasks.notify import announce
from tasks.retry_policy import DeadlineExceeded

# Beyond the Job's own activeDeadlineSeconds, before we stop waiting for it.
WAIT_GRACE_SECONDS = 60
# A migration's log can quote rows (a failed data migration's constraint error): published
# redacted and capped, like every program output (runbook/redaction.py).
ARTIFACT_LOG_LINES = 200
ARTIFACT_LOG_CHARS = 20_000


class MigrationFailed(RuntimeError):
    """The migration Job failed; the message ends with its logs."""


def run_job(body: dict[str, Any], deadline_seconds: int) -> tuple[JobOutcome, str]:
    """Create the Job, wait for it, read its logs; delete it once it has finished.

    Returns its outcome and logs: a failed Job is returned, not raised. A Job that has not
    finished — our wait gave up, or the run is being stopped — is left running and logged.
    """
    name = body["metadata"]["name"]
    logger = get_run_logger()
    create_job(body)
    try:
        fault_point("migrations: job created")
        outcome = wait_for_job(name, deadline_seconds + WAIT_GRACE_SECONDS)
    except DeadlineExceeded as exc:
        outcome = JobOutcome(finished=False, succeeded=False, detail=f"{exc}; left running")
    except BaseException:
        logger.error("job/%s may still be running: left alone, not deleted", name)
        raise
    if outcome.finished:
        fault_point("migrations: job finished")
    try:
        logs = read_job_logs(name)
    except Exception as exc:  # the outcome matters more than the logs
        logs = f"(logs unavailable: {exc})"
    if outcome.finished:
        delete_job(name)
    else:
        logger.error("job/%s is still running: left alone, not deleted", name)
    return outcome, logs


@flow(name="migrations", flow_run_name="migrations-alembic-upgrade-head")
def migrations(
    require_maintenance_mode: bool = True,
    deadline_seconds: Annotated[int, Field(ge=60, le=4 * 3600)] = 1800,
    requested_by: RequestedBy = None,
) -> dict[str, Any]:
    """Run the database migrations (alembic upgrade head) in a Job from the backend's image.

    Args:
        require_maintenance_mode: Refuse unless the backend is in maintenance mode (run the
            maintenance-window runbook first); untick only for migrations safe under traffic.
        deadline_seconds: How long the migration may run before it is stopped (60-14400).
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    settings = load_settings()
    logger = get_run_logger()
    timer = StepTimer()
    backend = settings.backend_deployment
    database = settings.database_name

    # 1. Read the backend Deployment: the Job runs its image with its env and envFrom.
    with timer.step(f"read deployment/{backend}"):
        live = read_deployment(backend)
    in_maintenance = maintenance_mode_of(live)

    # 2. Inside a maintenance window, unless told the migration is safe under traffic.
    if require_maintenance_mode and not in_maintenance:
        raise Refused(
            "require_maintenance_mode",
            f"deployment/{backend} is not in maintenance mode (MAINTENANCE_MODE is not "
            "'true'): start the maintenance-window runbook first, or untick this for a "
            "migration that is safe while the platform serves traffic",
        )

    # 3. Build the Job and ask for approval.
    run_id = str(flow_run.id)
    body = migration_job_body(
        live, migration_job_name(backend, run_id), deadline_seconds, run_id=run_id
    )
    job = migration_job(body)
    plan = _plan(backend, database, job, in_maintenance, deployment_fingerprint(live))
    with timer.step("approval"):
        request_approval(plan)

    # 4. Run it, holding the database's lock (taken after the approval, not through it);
    #    refused if the backend's image, env or maintenance mode changed meanwhile. A
    #    finished Job is deleted.
    with timer.step(f"run job/{job.name}"), exclusive(f"database/{database}"):
        refuse_if_changed(plan, deployment_fingerprint(read_deployment(backend)))
        # If this process dies, reconcile reports the Job (never deletes a running one).
        undo = [{"kind": "report-job", "job": job.name}]
        intent = record_intent("migrations", [f"database/{database}"], undo)
        outcome, logs = run_job(body, deadline_seconds)
    if outcome.finished:
        clear_intent(intent)  # a Job left running stays recorded until reconcile sees it end

    # 5. Report the logs and `alembic current`.
    current = alembic_current(logs) if outcome.succeeded else None
    applied = applied_migrations(logs)
    summary = f"Migrations of database {database} with {job.image}: " + (
        f"done, alembic current is {current or 'unknown'} ({len(applied)} applied)"
        if outcome.succeeded
        else f"job/{job.name} failed: {outcome.detail}"
    )
    _publish(summary, job.name, job.image, current, applied, logs, timer)
    if not outcome.succeeded:
        cause = redact_output(logs, max_lines=15)
        announce(f":rotating_light: {summary}\n```\n{redact_output(logs, max_lines=8)}\n```")
        raise MigrationFailed(f"{summary}\n--- end of the Job's logs:\n{cause}")
    logger.info(summary)
    return {"job": job.name, "image": job.image, "alembic_current": current}


def _plan(
    backend: str,
    database: str,
    job: MigrationJob,
    in_maintenance: bool,
    fingerprint: dict[str, str],
) -> Plan:
    return Plan(
        title=f"Run migrations on database {database}",
        target=f"database/{database}",
        steps=(
            f"Create job/{job.name} from deployment/{backend}'s image, env and envFrom",
            f"It runs: cd {job.working_dir} && {MIGRATE_COMMAND}",
            f"Wait for it (at most {job.deadline_seconds}s), publish its logs, delete it",
        ),
        facts={
            "image": job.image,
            "database": database,
            "maintenance mode": "on"
            if in_maintenance
            else "OFF (migration declared safe under traffic)",
            "env (names only)": ", ".join(job.env_names) or "-",
            "envFrom": ", ".join(job.env_from) or "-",
        },
        fingerprint=fingerprint,
    )


def _publish(
    summary: str,
    job_name: str,
    image: str,
    current: str | None,
    applied: list[str],
    logs: str,
    timer: StepTimer,
) -> None:
    rows = [{"job": job_name, "image": image, "alembic current": current or "-"}]
    published_logs = redact_output(logs, ARTIFACT_LOG_LINES, ARTIFACT_LOG_CHARS) or "(empty)"
    create_markdown_artifact(
        markdown="\n\n".join(
            [
                "## Database migrations",
                summary,
                markdown_table(rows),
                "### Applied",
                "\n".join(f"- {step}" for step in applied) or "_nothing new_",
                "### Job logs",
                f"```\n{published_logs}\n```",
                "### Steps",
                timer.markdown(),
            ]
        ),
        key="migrations-report",
        description=summary[:500],
    )
