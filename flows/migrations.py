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
  database.
- The Job's logs and `alembic current` are published; a failed Job fails the run with the
  end of its logs; the Job is always deleted (already gone counts as deleted).
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from runbook.decisions.migrations import (
    MIGRATE_COMMAND,
    alembic_current,
    applied_migrations,
    logs_tail,
    maintenance_mode_of,
    migration_job_body,
    migration_job_name,
)
from runbook.decisions.refusal import Refused
from runbook.report import StepTimer, markdown_table
from runbook.settings import load_settings
from tasks.approval import Plan, request_approval
from tasks.kubernetes import create_job, delete_job, read_deployment, read_job_logs, wait_for_job
from tasks.locks import exclusive
from tasks.notify import notify_chat
from tasks.retry_policy import DeadlineExceeded

# Beyond the Job's own activeDeadlineSeconds, before we stop waiting for it.
WAIT_GRACE_SECONDS = 60


class MigrationFailed(RuntimeError):
    """The migration Job failed; the message ends with its logs."""


def run_job(body: dict[str, Any], deadline_seconds: int) -> tuple[bool, str, str]:
    """Create the Job, wait for it, read its logs; always delete it.

    Returns (succeeded, detail, logs). A failed Job is returned, not raised, with its logs.
    """
    name = body["metadata"]["name"]
    try:
        create_job(body)
        try:
            job = wait_for_job(name, deadline_seconds + WAIT_GRACE_SECONDS)
            status = job.get("status") or {}
            succeeded = bool(status.get("succeeded"))
            detail = next(
                (
                    c.get("message") or c.get("reason") or c["type"]
                    for c in status.get("conditions") or []
                    if c.get("status") == "True"
                ),
                "",
            )
        except DeadlineExceeded as exc:
            succeeded, detail = False, str(exc)
        try:
            logs = read_job_logs(name)
        except Exception as exc:  # the outcome matters more than the logs
            logs = f"(logs unavailable: {exc})"
        return succeeded, detail, logs
    finally:
        delete_job(name)


@flow(name="migrations", flow_run_name="migrations-alembic-upgrade-head")
def migrations(
    require_maintenance_mode: bool = True,
    deadline_seconds: Annotated[int, Field(ge=60, le=4 * 3600)] = 1800,
) -> dict[str, Any]:
    """Run the database migrations (alembic upgrade head) in a Job from the backend's image.

    Args:
        require_maintenance_mode: Refuse unless the backend is in maintenance mode (run the
            maintenance-window runbook first); untick only for migrations safe under traffic.
        deadline_seconds: How long the migration may run before it is stopped (60-14400).
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
    job_name = migration_job_name(backend, str(flow_run.id))
    body = migration_job_body(live, job_name, deadline_seconds)
    container = body["spec"]["template"]["spec"]["containers"][0]
    with timer.step("approval"):
        request_approval(_plan(backend, database, body, in_maintenance))

    # 4. Run it, holding the database's lock; the Job is deleted whatever happens.
    with timer.step(f"run job/{job_name}"), exclusive(f"database/{database}"):
        succeeded, detail, logs = run_job(body, deadline_seconds)

    # 5. Report the logs and `alembic current`.
    current = alembic_current(logs) if succeeded else None
    applied = applied_migrations(logs)
    summary = f"Migrations of database {database} with {container['image']}: " + (
        f"done, alembic current is {current or 'unknown'} ({len(applied)} applied)"
        if succeeded
        else f"job/{job_name} failed: {detail}"
    )
    _publish(summary, job_name, container["image"], current, applied, logs, timer)
    if not succeeded:
        notify_chat(f":rotating_light: {summary}")
        raise MigrationFailed(f"{summary}\n--- end of the Job's logs:\n{logs_tail(logs)}")
    logger.info(summary)
    return {"job": job_name, "image": container["image"], "alembic_current": current}


def _plan(backend: str, database: str, body: dict[str, Any], in_maintenance: bool) -> Plan:
    container = body["spec"]["template"]["spec"]["containers"][0]
    env_names = [v["name"] for v in container.get("env") or []]
    env_from = [
        f"{kind.removesuffix('Ref')} {ref['name']}"
        for source in container.get("envFrom") or []
        for kind, ref in source.items()
        if isinstance(ref, dict) and "name" in ref
    ]
    return Plan(
        title=f"Run migrations on database {database}",
        target=f"database/{database}",
        steps=(
            f"Create job/{body['metadata']['name']} from deployment/{backend}'s image, env "
            "and envFrom",
            f"It runs: cd {container['workingDir']} && {MIGRATE_COMMAND}",
            "Wait for it (at most "
            f"{body['spec']['activeDeadlineSeconds']}s), publish its logs, delete it",
        ),
        facts={
            "image": container["image"],
            "database": database,
            "maintenance mode": "on"
            if in_maintenance
            else "OFF (migration declared safe under traffic)",
            "env (names only)": ", ".join(env_names) or "-",
            "envFrom": ", ".join(env_from) or "-",
        },
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
    create_markdown_artifact(
        markdown="\n\n".join(
            [
                "## Database migrations",
                summary,
                markdown_table(rows),
                "### Applied",
                "\n".join(f"- {step}" for step in applied) or "_nothing new_",
                "### Job logs",
                f"```\n{logs.strip() or '(empty)'}\n```",
                "### Steps",
                timer.markdown(),
            ]
        ),
        key="migrations-report",
        description=summary[:500],
    )
