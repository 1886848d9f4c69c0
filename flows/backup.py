"""Runbook > Database Operations > Database Backup.

    kubectl exec -it statefulset/postgres -- pg_dump -U complianceagent complianceagent > backup.sql

Done so that it can run every night unattended. The guarantees are in the flow's docstring.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from runbook.decisions.backups import (
    Compression,
    Manifest,
    backup_id_for,
    backups_prefix,
    catalogue,
    dated_database_name,
    dump_key,
    human_size,
    manifest_key,
    row_count_problems,
)
from runbook.decisions.locks import retention_fingerprint
from runbook.decisions.retention import (
    DEFAULT_KEEP_DAILY,
    DEFAULT_KEEP_WEEKLY,
    RetentionPlan,
    deleted_beyond_defaults,
    plan_retention,
    retention_approval,
)
from runbook.fault_points import fault_point
from runbook.report import StepTimer, markdown_table
from runbook.settings import database_label, load_settings
from tasks.approval import Plan, RequestedBy, refuse_if_changed, request_approval
from tasks.intent import clear_intent, record_intent
from tasks.locks import exclusive
from tasks.notify import announce
from tasks.postgres import count_rows, create_database, drop_database
from tasks.postgres_streams import pg_dump_to_s3, pg_restore_from_s3
from tasks.s3 import (
    abort_multipart_upload,
    delete_objects,
    list_multipart_uploads,
    list_objects,
    put_object_bytes,
)


class BackupVerificationFailed(RuntimeError):
    """The backup was stored but did not restore to what its manifest says."""


class RetentionNotApplied(RuntimeError):
    """The backup is stored, but its retention was refused or failed: nothing was deleted."""


def _run_name() -> str:
    database = database_label()
    return f"backup-{database}-{flow_run.parameters.get('compression', 'zstd')}"


@flow(name="backup", flow_run_name=_run_name, log_prints=False)
def backup(
    compression: Literal["zstd", "gzip"] = "zstd",
    keep_daily: Annotated[int, Field(ge=1, le=366)] = DEFAULT_KEEP_DAILY,
    keep_weekly: Annotated[int, Field(ge=0, le=520)] = DEFAULT_KEEP_WEEKLY,
    verify_restore: bool = False,
    requested_by: RequestedBy = None,
) -> dict[str, Any]:
    """Back the application database up to S3, streamed and checksummed; apply retention.

    Guarantees:
    - Streamed: `pg_dump -Fc` (an archive pg_restore can restore selectively and in parallel)
      goes straight to S3 by multipart upload, in bounded memory and never to local disk.
    - Verifiable: a manifest `<archive>.manifest.json` is stored only after the archive is
      whole — database, server version, start and end, size, SHA-256, compression and every
      table's row count, counted in the very snapshot pg_dump dumped. No manifest, no backup.
    - Nothing partial: a failed or interrupted backup aborts its upload (and an upload a
      crashed run left behind is aborted by the next run), so the bucket holds complete
      backups only — plus, at worst, an archive without manifest, which nothing restores and
      retention deletes.
    - Retention: the newest backup of each of the last `keep_daily` days and `keep_weekly`
      ISO weeks is kept; everything else of this database is deleted. A retention that would
      delete a backup the defaults (7 daily, 4 weekly: the nightly schedule) keep waits for an
      approval listing what it deletes, after the new backup is stored and the database's lock
      released; rejected or timed out, nothing is deleted. The defaults never pause. The
      deletions take the database's lock again; after an approval the backups must still
      split into kept and deleted as the plan showed, else nothing is deleted ("changed
      since the plan was approved").
    - Never at the same time as a restore or migrations of the same database (its lock).
    - Optionally proven: `verify_restore` restores it into a scratch database and compares
      every table's row count with the manifest (the scratch database is always dropped).
    - A failure notifies chat (best effort: a chat outage never hides the failure).

    Args:
        compression: zstd (pg_dump -Z0, compressed in the stream: several times faster) or
            gzip (pg_dump's own -Fc compression). The manifest records which.
        keep_daily: Keep the newest backup of each of this many most recent days (1-366).
        keep_weekly: Keep the newest backup of each of this many most recent ISO weeks
            (0-520), on top of the daily ones. Fewer than the defaults (7, 4) need an
            approval if they would delete a backup the defaults keep.
        verify_restore: Also restore the new backup into a scratch database and compare
            every table's row count with the manifest (takes as long as a restore).
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    settings = load_settings()
    logger = get_run_logger()
    timer = StepTimer()
    database = settings.database_name
    bucket, prefix = settings.backup_bucket, backups_prefix(settings.backup_prefix, database)
    backup_id = "(not started)"

    try:
        with exclusive(f"database/{database}"):
            # The id is the start time, taken under the lock: ids sort as the dumps ran.
            backup_id = backup_id_for(dt.datetime.now(dt.UTC))
            key = dump_key(settings.backup_prefix, database, backup_id, Compression(compression))

            # 1. Abort uploads a crashed run left behind: we hold the lock, none is live.
            with timer.step("abort stale uploads"):
                stale = _abort_stale_uploads(bucket, prefix)

            # If this process dies mid-upload, reconcile aborts the upload.
            undo = [{"kind": "abort-upload", "bucket": bucket, "key": key}]
            intent = record_intent("backup", [f"database/{database}"], undo)
            # 2. Dump straight into S3, counting rows in pg_dump's own snapshot.
            with timer.step("pg_dump to S3"):
                manifest = pg_dump_to_s3(bucket, key, backup_id, Compression(compression))

            fault_point("backup: archive stored")
            # 3. Store the manifest: from this moment the backup is complete.
            with timer.step("store manifest"):
                _store_manifest(bucket, manifest)

            # 4. Optionally prove that it restores to what the manifest says.
            if verify_restore:
                with timer.step("verify by restoring"):
                    _verify_by_restoring(bucket, manifest, database)

            # 5. Plan retention while no backup of this database can be in progress.
            with timer.step("plan retention"):
                entries = catalogue(list_objects(bucket, prefix), prefix)
                retention = plan_retention(entries, keep_daily, keep_weekly)
                beyond = deleted_beyond_defaults(entries, retention)
            clear_intent(intent)
    except BaseException as exc:
        failure = f"Backup {backup_id} of database {database} failed: {exc}"
        create_markdown_artifact(
            key="backup",
            description=failure,
            markdown=f"## Database backup failed\n\n{failure}\n\n"
            "Without a manifest it is never restored; the next run removes what is left of "
            "it.\n\n### Steps\n\n" + timer.markdown(),
        )
        announce(f":x: {failure}")
        raise

    # 6. Apply retention; deleting what the defaults keep needs an approval first (asked
    #    without the lock; under it the backups must still split as the plan showed).
    try:
        with timer.step("apply retention"):
            plan: Plan | None = None
            if beyond:
                approval = retention_approval(database, retention, beyond, keep_daily, keep_weekly)
                plan = Plan(
                    approval.title,
                    approval.target,
                    approval.steps,
                    approval.facts,
                    fingerprint=_split(retention),
                )
                request_approval(plan)
            if retention.keys_to_delete:
                with exclusive(f"database/{database}"):
                    if plan is not None:
                        entries = catalogue(list_objects(bucket, prefix), prefix)
                        live = plan_retention(entries, keep_daily, keep_weekly)
                        refuse_if_changed(plan, _split(live))
                    delete_objects(
                        bucket, list(retention.keys_to_delete), len(retention.keys_to_delete)
                    )
    except BaseException as exc:
        failure = (
            f"Backup {backup_id} of {database} is stored, but retention was not applied "
            f"(nothing was deleted): {exc}"
        )
        _publish(failure, bucket, manifest, retention, stale, verify_restore, timer, applied=False)
        announce(f":warning: {failure}")
        if isinstance(exc, Exception):  # the run's message must say the backup is stored
            raise RetentionNotApplied(failure) from exc
        raise

    # 7. Report.
    summary = (
        f"Backup {backup_id} of {database}: {human_size(manifest.size_bytes)} "
        f"({compression}) at s3://{bucket}/{key}; kept {len(retention.keep)}, "
        f"deleted {len(retention.delete)}"
    )
    _publish(summary, bucket, manifest, retention, stale, verify_restore, timer)
    logger.info(summary)
    return {
        "backup_id": backup_id,
        "key": key,
        "size_bytes": manifest.size_bytes,
        "sha256": manifest.sha256,
        "kept": [e.backup_id for e in retention.keep],
        "deleted": [e.backup_id for e in retention.delete],
    }


def _split(retention: RetentionPlan) -> dict[str, str]:
    return retention_fingerprint(
        (e.backup_id for e in retention.keep), (e.backup_id for e in retention.delete)
    )


def _abort_stale_uploads(bucket: str, prefix: str) -> list[str]:
    stale = list_multipart_uploads(bucket, prefix)
    for upload in stale:
        abort_multipart_upload(bucket, upload["key"], upload["upload_id"])
    return [u["key"] for u in stale]


def _store_manifest(bucket: str, manifest: Manifest) -> None:
    """Write the manifest; if that fails, delete the archive (no manifest, no backup)."""
    try:
        put_object_bytes(
            bucket,
            manifest_key(manifest.archive_key),
            manifest.to_json().encode(),
            "application/json",
        )
    except BaseException:
        delete_objects(bucket, [manifest.archive_key], 1)
        raise


def _verify_by_restoring(bucket: str, manifest: Manifest, database: str) -> None:
    """Restore into a scratch database, compare row counts, always drop the scratch.

    A backup that fails this loses its manifest: restore skips it, retention removes it.
    """
    scratch = dated_database_name(database, "verify", dt.datetime.now(dt.UTC))
    try:
        create_database(scratch, like=database)
        pg_restore_from_s3(
            bucket, manifest.archive_key, manifest.compression, manifest.sha256, scratch
        )
        problems = row_count_problems(manifest.row_counts, count_rows(scratch))
    finally:
        drop_database(scratch)
    if problems:
        delete_objects(bucket, [manifest_key(manifest.archive_key)], 1)
        raise BackupVerificationFailed(
            f"backup {manifest.backup_id} does not restore to its manifest: "
            + "; ".join(problems[:10])
        )


def _publish(
    summary: str,
    bucket: str,
    manifest: Manifest,
    retention: RetentionPlan,
    stale: list[str],
    verified: bool,
    timer: StepTimer,
    applied: bool = True,
) -> None:
    seconds = (manifest.finished_at - manifest.started_at).total_seconds()
    facts = [
        {"": "archive", " ": f"s3://{bucket}/{manifest.archive_key}"},
        {"": "size", " ": f"{human_size(manifest.size_bytes)} ({manifest.size_bytes} bytes)"},
        {"": "pg_dump output", " ": human_size(manifest.dump_bytes)},
        {"": "compression", " ": manifest.compression.value},
        {"": "SHA-256", " ": manifest.sha256},
        {"": "server", " ": f"PostgreSQL {manifest.server_version}"},
        {
            "": "dump took",
            " ": f"{seconds:.1f} s ({manifest.dump_bytes / max(seconds, 1e-3) / 2**20:.0f} MiB/s)",
        },
        {"": "schema version", " ": manifest.schema_version or "-"},
        {"": "verified by restoring", " ": "yes: row counts match" if verified else "no"},
        {"": "stale uploads aborted", " ": ", ".join(stale) or "none"},
    ]
    counts = [{"table": t, "rows": n} for t, n in sorted(manifest.row_counts.items())]
    retained = [
        {"backup": e.backup_id, "decision": retention.reasons[e.backup_id]}
        for e in sorted(retention.keep + retention.delete, key=lambda e: e.backup_id)
    ]
    create_markdown_artifact(
        key="backup",
        description=summary,
        markdown="\n\n".join(
            [
                f"## Database backup {manifest.backup_id}",
                summary,
                markdown_table(facts),
                "### Rows at dump time (same snapshot)",
                markdown_table(counts),
                "### Retention" + ("" if applied else " (not applied: nothing was deleted)"),
                markdown_table(retained),
                "### Steps",
                timer.markdown(),
            ]
        ),
    )
