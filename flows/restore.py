"""Runbook > Database Operations > Database Restore.

    kubectl scale deployment/backend --replicas=0
    kubectl exec -i statefulset/postgres -- psql -U complianceagent complianceagent < backup.sql
    kubectl scale deployment/backend --replicas=3

The runbook's version restores into the live database: a failure half-way leaves it half
old, half restored. Here the backup is restored beside it and swapped in only when whole.
The guarantees are in the flow's docstring.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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
    parse_manifest,
    row_count_problems,
    select_backup,
)
from runbook.decisions.locks import restore_fingerprint
from runbook.decisions.restore import (
    DiskSpace,
    LiveState,
    RestoreOutcome,
    RestorePlan,
    outcome_report,
    plan_restore,
    volume_capacity,
)
from runbook.fault_points import fault_point
from runbook.report import StepTimer, markdown_table
from runbook.settings import database_label, load_settings
from tasks.approval import Plan, RequestedBy, refuse_if_changed, request_approval
from tasks.intent import recorded_intent
from tasks.kubernetes import (
    read_deployment_scale,
    read_statefulset,
    scale_deployment,
    wait_for_rollout,
)
from tasks.locks import HeldLocks, exclusive_all
from tasks.notify import announce
from tasks.postgres import (
    count_rows,
    create_database,
    describe_database,
    drop_database,
    read_database_sizes,
    read_schema_version,
    read_wal_size,
    swap_databases,
)
from tasks.postgres_streams import list_archive, pg_restore_from_s3
from tasks.retry_policy import done_if_gone, is_gone
from tasks.s3 import get_object_bytes, list_objects
from tasks.s3_streams import hash_object


class BackupRefused(RuntimeError):
    """The backup failed a check before anything was changed."""


class RestoreFailed(RuntimeError):
    """The restore failed; the run's report says what state the database is in."""


def _run_name() -> str:
    database = database_label()
    return f"restore-{database}-from-{flow_run.parameters.get('backup_id', LATEST)}"


@flow(name="restore", flow_run_name=_run_name, log_prints=False)
def restore(
    backup_id: Annotated[str, Field(pattern=rf"^({LATEST}|{BACKUP_ID_PATTERN})$")] = LATEST,
    jobs: Annotated[int, Field(ge=1, le=16)] = 1,
    allow_schema_change: bool = False,
    check_health: bool = True,
    requested_by: RequestedBy = None,
) -> dict[str, Any]:
    """Restore the application database from a backup, beside it, then swap it in.

    Guarantees:
    - Checked before anything changes: the backup exists and is complete, its manifest
      reads, the stored archive has the manifest's size and SHA-256, pg_restore can read
      it; its schema (alembic) version is the live one unless `allow_schema_change` is
      ticked; the database server's volume has room for a second copy (capacity -
      every database - WAL >= the live database x 1.2), else refused with the numbers.
    - Approval shows the backup's age, size, source database, both schema versions, the
      disk space and the target.
    - The live database is untouched unless the restore fully succeeded: the backup goes
      into a new scratch database, is checked table by table against the manifest's row
      counts, and only then swapped in by two renames in one transaction. The old database
      is kept as `<name>_pre_restore_<UTC time>` until someone drops it; a failure before
      the swap drops the scratch database.
    - Downtime covers the row-count check and the swap only: pg_restore runs while the
      writers (backend and workers) keep running, as nothing reads the scratch database.
      Then they are scaled to 0 and always scaled back to the replica counts recorded
      before the run — also when it fails.
    - Every path ends with a report artifact and a chat message saying what is true: the
      database swapped or not (and the kept previous one), the writers scaled back or which
      were not. A chat failure never changes the outcome nor hides the cause.
    - Health is checked after the swap (the health-check flow, as a subflow).
    - Holds the locks of the database and of the backend and workers Deployments from the
      approval to the swap: no backup or migrations of the database meanwhile, no `scale`
      bringing writers back mid-restore. They are not held through the approval pause
      (a rollback or scale must not wait behind it); what the approver saw stays true by
      a check under the locks: the backup (still there, same SHA-256), the writers'
      replica counts and the live schema version must be as the plan showed, else the run
      is refused ("changed since the plan was approved") before anything is created. A
      lost lock stops the run before the writers stop and before the swap; the scratch
      database is dropped and the writers scaled back as on any failure.

    Args:
        backup_id: Which backup: `latest` (the newest complete one) or an id such as
            20261103T020000.482113Z (the backup run's report and the bucket show them).
        jobs: pg_restore --jobs. 1 streams the backup from S3 straight into pg_restore;
            more copies it to a local temporary file first (pg_restore needs one to work
            in parallel): worth it on a server with cores to spare (1-16).
        allow_schema_change: Restore even if the backup's schema (alembic) version differs
            from the live database's; the backend must then be migrated to match.
        check_health: Run the health check after the swap. A maintenance window unticks
            it: its backend answers 503 until maintenance mode is off, and the window
            checks health itself then.
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    settings = load_settings()
    timer = StepTimer()
    database = settings.database_name
    bucket, prefix = settings.backup_bucket, backups_prefix(settings.backup_prefix, database)
    writers = [settings.backend_deployment, settings.workers_deployment]
    locks = [f"database/{database}", *(f"deployment/{name}" for name in writers)]
    outcome = RestoreOutcome(database)

    with reported(outcome, timer):
        # 1. Find the backup: the one asked for, or the newest complete one.
        #    No lock yet: steps 1-5 only read, and no lock is held through the approval.
        with timer.step("find the backup"):
            entry = select_backup(catalogue(list_objects(bucket, prefix), prefix), backup_id)

        # 2. Check it before anything changes: manifest, size and checksum, readable.
        with timer.step("check the backup"):
            manifest, tables = _check_backup(bucket, entry)

        # 3. Record what is live: replicas to scale back to, schema version, disk space.
        live = _read_live_state(database, writers, manifest)

        # 4. Plan it; refuse a schema change not allowed, or a copy the disk cannot hold.
        plan = plan_restore(manifest, len(tables), live, allow_schema_change, _now())
        outcome.plan = plan
        approved = Plan(
            plan.title,
            plan.target,
            plan.steps,
            plan.facts,
            fingerprint=restore_fingerprint(
                manifest.backup_id, manifest.sha256, live.replicas, live.schema_version
            ),
        )

        # 5. Ask, showing age, size, source, schema versions, disk space and target.
        with timer.step("approval"):
            request_approval(approved)

        with exclusive_all(locks) as held:
            # 6. Under the locks: refuse if the backup, the writers or the schema changed
            #    since the plan was approved.
            refuse_if_changed(approved, _live_fingerprint(bucket, entry, database, writers))
            # Recorded outside this process before the first write: if it dies, reconcile
            # lets the live database accept connections, drops the scratch copy and
            # scales the writers back.
            with recorded_intent("restore", locks, _undo(plan, database)):
                _restore_and_swap(plan, jobs, bucket, outcome, timer, held)

        # 11. Wait for the writers, then check the platform's health.
        with timer.step("health check"):
            outcome.health = _check_health(plan.replicas, check_health)
        if outcome.health:
            raise RestoreFailed(f"the health check failed afterwards: {outcome.health}")

    return {
        "backup_id": manifest.backup_id,
        "database": database,
        "previous_database": plan.keep_as,
    }


def _restore_and_swap(
    plan: RestorePlan,
    jobs: int,
    bucket: str,
    outcome: RestoreOutcome,
    timer: StepTimer,
    held: HeldLocks,
) -> None:
    """Steps 7-9, under the locks; a lost lock stops it before the writers stop and before
    the swap (the scratch database is dropped and the writers scaled back, as on any
    failure)."""
    database, manifest = plan.database, plan.manifest
    # 7. Restore into a scratch database beside the live one; writers keep running.
    with scratch_database(plan.scratch, database, outcome):
        with timer.step(f"pg_restore into {plan.scratch}"):
            pg_restore_from_s3(
                bucket,
                manifest.archive_key,
                manifest.compression,
                manifest.sha256,
                plan.scratch,
                jobs,
            )
        fault_point("restore: scratch restored")

        # 8. Stop the writers, for the last check and the swap only (still our locks?).
        held.ensure_held()
        with writers_stopped(plan.replicas, outcome, timer):
            # 9. Every table's row count as in the manifest, or no swap.
            with timer.step("compare row counts"):
                _compare_row_counts(plan, outcome)

            # 10. Swap it in; the old database stays, renamed (still our locks?).
            held.ensure_held()
            with timer.step("swap databases"):
                swap_databases(database, plan.scratch, plan.keep_as)
                outcome.swapped = True
            fault_point("restore: swap committed")
        fault_point("restore: writers back")


def _live_fingerprint(
    bucket: str, entry: BackupEntry, database: str, writers: list[str]
) -> dict[str, str]:
    """The restore's fingerprint as the platform is now (see `restore_fingerprint`)."""
    assert entry.manifest_key is not None and entry.archive_key is not None
    sha256: str | None = None
    try:
        manifest = parse_manifest(get_object_bytes(bucket, entry.manifest_key), entry.archive_key)
        sha256 = manifest.sha256
    except Exception as exc:
        if not is_gone(exc):
            raise
    return restore_fingerprint(
        entry.backup_id,
        sha256,
        {name: read_deployment_scale(name) for name in writers},
        read_schema_version(database),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _undo(plan: RestorePlan, database: str) -> list[dict[str, Any]]:
    """What reconcile puts back if this run dies: the live database accepting connections,
    the scratch copy dropped (gone once swapped in), the writers at their counts."""
    return [
        {"kind": "allow-connections", "database": database},
        {"kind": "drop-database", "database": plan.scratch},
        *({"kind": "scale", "deployment": n, "replicas": r} for n, r in plan.replicas.items()),
    ]


# --- what undoes itself ---------------------------------------------------------------------


@contextmanager
def scratch_database(name: str, like: str, outcome: RestoreOutcome) -> Iterator[str]:
    """`CREATE DATABASE name` for the block; dropped afterwards unless it was swapped in.

    The drop is `DROP … IF EXISTS`: safe to run twice, and a no-op once the name is gone.
    A failed drop is reported; it only fails the run if nothing else already did.
    """
    outcome.scratch_created = True  # before the call: a lost answer may hide a creation
    try:
        create_database(name, like=like)
        yield name
    except BaseException:
        _drop_scratch(name, outcome)
        raise
    _drop_scratch(name, outcome)
    if outcome.scratch_left:
        raise RestoreFailed(f"could not drop {name}: {outcome.scratch_left}")


def _drop_scratch(name: str, outcome: RestoreOutcome) -> None:
    if outcome.swapped:
        return  # the scratch database is the live one now, under the live name
    try:
        drop_database(name)
    except Exception as exc:
        get_run_logger().error("could not drop %s: %s", name, exc)
        outcome.scratch_left = str(exc)


@contextmanager
def writers_stopped(
    replicas: Mapping[str, int], outcome: RestoreOutcome, timer: StepTimer
) -> Iterator[None]:
    """Scale the writers to 0 for the block, then back to `replicas`, whatever happens.

    Each one is tried even if another fails; the outcome records which came back. A
    failure to scale back fails the run only if nothing else already did (the first
    cause stays the run's error; the report names both).
    """
    try:
        with timer.step("scale writers to 0"):
            for name in replicas:
                outcome.stopped.append(name)  # before the call: it may apply and still fail
                scale_deployment(name, 0)
        fault_point("restore: writers stopped")
        yield
    except BaseException:
        _scale_back(replicas, outcome, timer)
        raise
    _scale_back(replicas, outcome, timer)
    if outcome.not_scaled_back:
        failed = ", ".join(f"deployment/{n}" for n in outcome.not_scaled_back)
        raise RestoreFailed(f"could not scale {failed} back")


def _scale_back(replicas: Mapping[str, int], outcome: RestoreOutcome, timer: StepTimer) -> None:
    """Scale every stopped writer back; safe to run twice (a scale is idempotent)."""
    logger = get_run_logger()
    with timer.step("scale writers back"):
        for name in outcome.stopped:
            try:
                if not done_if_gone(functools.partial(scale_deployment, name, replicas[name])):
                    logger.warning("deployment/%s is gone; nothing to scale back", name)
            except Exception as exc:
                logger.error(
                    "could not scale deployment/%s back to %d: %s", name, replicas[name], exc
                )
                outcome.not_scaled_back[name] = str(exc)
            else:
                outcome.scaled_back[name] = replicas[name]
                outcome.not_scaled_back.pop(name, None)


@contextmanager
def reported(outcome: RestoreOutcome, timer: StepTimer) -> Iterator[None]:
    """Publish the report and tell chat when the block ends, however it ends."""
    try:
        yield
    except BaseException as exc:
        outcome.error = str(exc) or type(exc).__name__
        raise
    finally:
        _publish(outcome, timer)


# --- steps -----------------------------------------------------------------------------------


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


def _read_live_state(database: str, writers: list[str], manifest: Manifest) -> LiveState:
    """Replica counts, schema version and disk usage of the live platform."""
    settings = load_settings()
    capacity: int | None = settings.postgres_volume_bytes
    if capacity is not None:
        source = "RUNBOOK_POSTGRES_VOLUME_BYTES"
    else:
        capacity, source = volume_capacity(read_statefulset(settings.postgres_statefulset))
    space = DiskSpace(
        capacity=capacity,
        capacity_source=source,
        database_sizes=read_database_sizes(),
        wal_bytes=read_wal_size(),
        live_database=database,
        dump_bytes=manifest.dump_bytes,
    )
    return LiveState(
        database=database,
        location=describe_database(database),
        replicas={name: read_deployment_scale(name) for name in writers},
        schema_version=read_schema_version(database),
        space=space,
    )


def _compare_row_counts(plan: RestorePlan, outcome: RestoreOutcome) -> None:
    outcome.restored_rows = count_rows(plan.scratch)
    problems = row_count_problems(plan.manifest.row_counts, outcome.restored_rows)
    if problems:
        raise RestoreFailed(
            f"{plan.scratch} does not match the manifest: {'; '.join(problems[:10])}"
        )


def _check_health(replicas: Mapping[str, int], run_health_check: bool) -> str | None:
    """Wait for the scaled-back workloads, then run the health check: empty if healthy,
    the problem if not, None if the workloads came back and the check was not asked for."""
    try:
        for name, count in replicas.items():
            if count > 0:
                rollout = wait_for_rollout(name, deadline_seconds=300)
                if not rollout.complete:
                    return f"deployment/{name} did not come back: {rollout.reason}"
        if not run_health_check:
            return None
        health_check(notify_on_failure=False)
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return ""


# --- the report --------------------------------------------------------------------------------


def _publish(outcome: RestoreOutcome, timer: StepTimer) -> None:
    """The run's report and chat message; neither may hide the run's own error."""
    report = outcome_report(outcome)
    logger = get_run_logger()
    (logger.info if report.ok else logger.error)("%s", report.headline)
    heading = (
        "## Database restored"
        if report.ok
        else "## Database restore refused"
        if not outcome.changed_anything
        else "## Database restore failed"
    )
    health = {None: "not checked", "": "all checks passed"}.get(outcome.health, outcome.health)
    manifest_rows = outcome.plan.manifest.row_counts if outcome.plan else {}
    rows = [
        {"table": t, "manifest": n, "restored": outcome.restored_rows.get(t, "-")}
        for t, n in sorted(manifest_rows.items())
    ]
    facts = outcome.plan.facts if outcome.plan else {}
    sections = [
        heading,
        report.headline,
        f"**Database swapped:** {'yes' if outcome.swapped else 'no'}",
        f"**Health afterwards:** {health}",
        "### Writers",
        markdown_table(list(report.workloads)),
        "### Plan",
        markdown_table([{"": k, " ": v} for k, v in facts.items()]),
        "### Row counts",
        markdown_table(rows),
        "### Steps",
        timer.markdown(),
    ]
    try:
        create_markdown_artifact(
            key="restore", description=report.headline[:500], markdown="\n\n".join(sections)
        )
    except Exception as exc:
        logger.error("could not publish the restore report: %s", exc)
    announce((":white_check_mark: " if report.ok else ":x: ") + report.headline)
