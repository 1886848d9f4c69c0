"""Runbook > Database Operations > Database Restore.

    kubectl scale deployment/backend --replicas=0
    kubectl exec -i statefulset/postgres -- psql -U complianceagent complianceagent < backup.sql
    kubectl scale deployment/backend --replicas=3

The runbook's version restores into the live database: a failure half-way leaves it half
old, half restored. Here the backup is restored beside it and swapped in only when whole.
Guarantees:
- Checked before anything changes: the backup exists and is complete, its manifest reads,
  the stored archive has the manifest's size and SHA-256, and pg_restore can read it.
- Approval shows the backup's age, size, source database, schema version, and the target.
- The live database is untouched unless the restore fully succeeded: the backup goes
  into a new scratch database, is checked table by table against the manifest's row
  counts, and only then swapped in by two renames in one transaction. The old database
  is kept as `<name>_pre_restore_<UTC time>` until someone drops it.
- Writers stopped meanwhile: backend and workers are scaled to 0 and always scaled back
  to the replica counts recorded before the run — also when it fails. A failure before
  the swap also drops the scratch database.
- Health is checked after the swap (the health-check flow, as a subflow); chat is told.
- Never at the same time as a backup or migrations of the same database (its lock, held
  from the first check to the last step, so what the approver saw stays true).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from flows.health_check import health_check
from runbook.decisions.backups import (
    BACKUP_ID_PATTERN,
    LATEST,
    BackupEntry,
    Manifest,
    archive_problem,
    backups_prefix,
    catalogue,
    dated_database_name,
    human_age,
    human_size,
    parse_manifest,
    row_count_problems,
    select_backup,
)
from runbook.report import StepTimer, markdown_table
from runbook.settings import database_label, load_settings
from tasks.approval import Plan, request_approval
from tasks.kubernetes import read_deployment_scale, scale_deployment, wait_for_rollout
from tasks.locks import exclusive
from tasks.notify import notify_chat
from tasks.postgres import (
    count_rows,
    create_database,
    describe_database,
    drop_database,
    read_schema_version,
    swap_databases,
)
from tasks.postgres_streams import list_archive, pg_restore_from_s3
from tasks.s3 import get_object_bytes, list_objects
from tasks.s3_streams import hash_object


class BackupRefused(RuntimeError):
    """The backup failed a check before anything was changed."""


class RestoreFailed(RuntimeError):
    """The restore failed; the message says what state the database is in."""


def _run_name() -> str:
    database = database_label()
    return f"restore-{database}-from-{flow_run.parameters.get('backup_id', LATEST)}"


@flow(name="restore", flow_run_name=_run_name, log_prints=False)
def restore(
    backup_id: Annotated[str, Field(pattern=rf"^({LATEST}|{BACKUP_ID_PATTERN})$")] = LATEST,
    jobs: Annotated[int, Field(ge=1, le=16)] = 1,
) -> dict[str, Any]:
    """Restore the application database from a backup, beside it, then swap it in.

    Args:
        backup_id: Which backup: `latest` (the newest complete one) or an id such as
            20261103T020000.482113Z (the backup run's report and the bucket show them).
        jobs: pg_restore --jobs. 1 streams the backup from S3 straight into pg_restore;
            more copies it to a local temporary file first (pg_restore needs one to work
            in parallel): worth it on a server with cores to spare (1-16).
    """
    settings = load_settings()
    logger = get_run_logger()
    timer = StepTimer()
    database = settings.database_name
    bucket, prefix = settings.backup_bucket, backups_prefix(settings.backup_prefix, database)
    workloads = [settings.backend_deployment, settings.workers_deployment]

    with exclusive(f"database/{database}"):
        # 1. Find the backup: the one asked for, or the newest complete one.
        with timer.step("find the backup"):
            entry = select_backup(catalogue(list_objects(bucket, prefix), prefix), backup_id)

        # 2. Check it before anything changes: manifest, size and checksum, readable.
        with timer.step("check the backup"):
            try:
                manifest, tables = _check_backup(bucket, entry)
            except BackupRefused as exc:
                notify_chat(f":x: Restore of {database} refused: {exc}")
                raise

        # 3. Record the replicas to scale back to, and what is live now.
        replicas = {name: read_deployment_scale(name) for name in workloads}
        live_schema = read_schema_version(database)

        # 4. Ask, showing age, size, source and target.
        now = dt.datetime.now(dt.UTC)
        scratch = dated_database_name(database, "restore", now)
        keep_as = dated_database_name(database, "pre_restore", now)
        plan = _plan(database, manifest, tables, replicas, live_schema, scratch, keep_as, now)
        with timer.step("approval"):
            request_approval(plan)

        swapped, failure = False, "interrupted"
        try:
            # 5. Stop the writers: backend and workers to zero.
            with timer.step("scale to 0"):
                for name in workloads:
                    scale_deployment(name, 0)

            # 6. Restore into a scratch database beside the live one.
            with timer.step(f"pg_restore into {scratch}"):
                create_database(scratch, like=database)
                pg_restore_from_s3(
                    bucket,
                    manifest.archive_key,
                    manifest.compression,
                    manifest.sha256,
                    scratch,
                    jobs,
                )

            # 7. Validate it: every table's row count as in the manifest.
            with timer.step("compare row counts"):
                restored = count_rows(scratch)
                problems = row_count_problems(manifest.row_counts, restored)
                if problems:
                    raise RestoreFailed(
                        f"{scratch} does not match the manifest: {'; '.join(problems[:10])}"
                    )

            # 8. Swap it in; the old database stays, renamed.
            with timer.step("swap databases"):
                swap_databases(database, scratch, keep_as)
                swapped = True
        except BaseException as exc:
            failure = (
                f"Restore of {database} from {manifest.backup_id} failed: {exc}. "
                "The live database was not changed."
            )
            logger.error("%s Putting things back.", failure)
            notify_chat(f":x: {failure}")
            raise
        finally:
            # 9. Whatever happened: no scratch database left, replicas as recorded.
            with timer.step("scale back"):
                _put_back(None if swapped else scratch, replicas)
            if not swapped:
                _publish_failure(failure, replicas, timer)

        # 10. Wait for the workloads, then check the platform's health.
        with timer.step("health check"):
            health_problem = _check_health(replicas)

    summary = (
        f"Restored {database} from backup {manifest.backup_id} "
        f"({human_size(manifest.size_bytes)}, taken {manifest.finished_at:%Y-%m-%d %H:%M} UTC); "
        f"the previous database is kept as {keep_as}"
    )
    _publish(summary, manifest, restored, replicas, health_problem, timer)
    if health_problem:
        message = f"{summary}, but the health check failed afterwards: {health_problem}"
        notify_chat(f":warning: {message}")
        raise RestoreFailed(message)
    notify_chat(f":white_check_mark: {summary}")
    logger.info(summary)
    return {"backup_id": manifest.backup_id, "database": database, "previous_database": keep_as}


def _check_backup(bucket: str, entry: BackupEntry) -> tuple[Manifest, list[str]]:
    """The manifest and the archive's tables, or `BackupRefused` saying what is wrong."""
    assert entry.archive_key is not None and entry.manifest_key is not None
    try:
        manifest = parse_manifest(get_object_bytes(bucket, entry.manifest_key), entry.archive_key)
    except ValueError as exc:
        raise BackupRefused(f"backup {entry.backup_id}: {exc}; nothing was changed") from None
    stored = hash_object(bucket, entry.archive_key)
    problem = archive_problem(manifest, stored["size"], stored["sha256"])
    if problem:
        raise BackupRefused(f"backup {entry.backup_id}: {problem}; nothing was changed")
    tables = list_archive(bucket, entry.archive_key, manifest.compression)
    missing = sorted(set(manifest.row_counts) - set(tables))
    if missing:
        raise BackupRefused(
            f"backup {entry.backup_id}: the archive holds no data for {', '.join(missing[:10])}"
            "; nothing was changed"
        )
    return manifest, tables


def _plan(
    database: str,
    manifest: Manifest,
    tables: list[str],
    replicas: dict[str, int],
    live_schema: str | None,
    scratch: str,
    keep_as: str,
    now: dt.datetime,
) -> Plan:
    stop = ", ".join(f"deployment/{n} ({c} → 0)" for n, c in replicas.items())
    back = ", ".join(f"deployment/{n} to {c}" for n, c in replicas.items())
    return Plan(
        title=f"Restore database {database} from backup {manifest.backup_id}",
        target=f"database/{database}",
        steps=(
            f"Scale {stop}",
            f"Create database {scratch} and pg_restore the backup into it",
            f"Check the row count of each of its {len(manifest.row_counts)} tables against "
            "the manifest",
            f"In one transaction: rename {database} → {keep_as}, {scratch} → {database}",
            f"Scale {back}; check health",
            f"If anything fails before the swap: drop {scratch}, scale back; {database} is "
            "not touched",
        ),
        facts={
            "backup": manifest.backup_id,
            "taken": f"{manifest.finished_at:%Y-%m-%d %H:%M:%S} UTC, "
            f"{human_age(now - manifest.finished_at)} ago",
            "size": f"{human_size(manifest.size_bytes)} stored ({manifest.compression}), "
            f"{human_size(manifest.dump_bytes)} archive",
            "source database": f"{manifest.database} (PostgreSQL {manifest.server_version})",
            "target": describe_database(database),
            "rows in the backup": f"{manifest.total_rows} in {len(tables)} tables",
            "schema version": f"backup {manifest.schema_version or '-'}, live {live_schema or '-'}",
            "checksum": f"SHA-256 verified ({manifest.sha256[:16]}…)",
            "previous database kept as": keep_as,
        },
    )


def _put_back(scratch: str | None, replicas: dict[str, int]) -> None:
    """Drop the scratch database (if any) and scale every workload back; try every step
    even if one fails, and raise the first failure afterwards."""
    failures: list[BaseException] = []
    steps: list[Callable[[], object]] = (
        [functools.partial(drop_database, scratch)] if scratch else []
    )
    steps += [functools.partial(scale_deployment, n, c) for n, c in replicas.items()]
    for step in steps:
        try:
            step()
        except Exception as exc:
            get_run_logger().error("could not put things back: %s", exc)
            failures.append(exc)
    if failures:
        raise RestoreFailed(f"putting things back failed: {failures[0]}") from failures[0]


def _check_health(replicas: dict[str, int]) -> str:
    """Wait for the scaled-back workloads, then run the health check; empty if healthy."""
    try:
        for name, count in replicas.items():
            if count > 0:
                wait_for_rollout(name, deadline_seconds=300)
        health_check(notify_on_failure=False)
    except Exception as exc:
        return str(exc)
    return ""


def _publish(
    summary: str,
    manifest: Manifest,
    restored: dict[str, int],
    replicas: dict[str, int],
    health_problem: str,
    timer: StepTimer,
) -> None:
    rows = [
        {"table": t, "manifest": n, "restored": restored.get(t, "-")}
        for t, n in sorted(manifest.row_counts.items())
    ]
    workloads = [{"deployment": n, "replicas": c} for n, c in replicas.items()]
    create_markdown_artifact(
        key="restore",
        description=summary,
        markdown="\n\n".join(
            [
                "## Database restore",
                summary,
                f"**Health afterwards:** {health_problem or 'all checks passed'}",
                "### Row counts",
                markdown_table(rows),
                "### Workloads scaled back",
                markdown_table(workloads),
                "### Steps",
                timer.markdown(),
            ]
        ),
    )


def _publish_failure(failure: str, replicas: dict[str, int], timer: StepTimer) -> None:
    workloads = [{"deployment": n, "replicas": c} for n, c in replicas.items()]
    create_markdown_artifact(
        key="restore",
        description=failure,
        markdown="\n\n".join(
            [
                "## Database restore failed",
                failure,
                "### Workloads scaled back",
                markdown_table(workloads),
                "### Steps",
                timer.markdown(),
            ]
        ),
    )
