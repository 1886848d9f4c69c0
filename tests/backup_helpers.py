"""What the backup and restore tests look at: the bucket, the server's databases, and
everything the Prefect server stored about a run (to prove a secret never got there)."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import psycopg
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import LogSort

from flows.backup import backup
from sandbox.platform import BACKUP_BUCKET, Sandbox

PREFIX = "postgres/"


def take_backup() -> str:
    """Run the backup flow; the new backup's id."""
    state = backup(return_state=True)
    assert state.is_completed(), state.message
    return str(state.result()["backup_id"])


def objects(platform: Sandbox, database: str = "complianceagent") -> list[str]:
    listed = platform.s3().list_objects_v2(Bucket=BACKUP_BUCKET, Prefix=f"{PREFIX}{database}/")
    return sorted(o["Key"] for o in listed.get("Contents", []))


def uploads(platform: Sandbox, database: str = "complianceagent") -> list[dict[str, Any]]:
    listed = platform.s3().list_multipart_uploads(
        Bucket=BACKUP_BUCKET, Prefix=f"{PREFIX}{database}/"
    )
    return list(listed.get("Uploads", []))


def clear_backups(platform: Sandbox, database: str = "complianceagent") -> None:
    s3 = platform.s3()
    for upload in uploads(platform, database):
        s3.abort_multipart_upload(
            Bucket=BACKUP_BUCKET, Key=upload["Key"], UploadId=upload["UploadId"]
        )
    for key in objects(platform, database):
        s3.delete_object(Bucket=BACKUP_BUCKET, Key=key)


def databases(platform: Sandbox) -> dict[str, int]:
    """Every database on the server, name → oid (an oid changes when a database is swapped)."""
    with psycopg.connect(platform.postgres.admin_dsn) as admin:
        rows = admin.execute("SELECT datname, oid FROM pg_database WHERE NOT datistemplate")
        return {name: int(oid) for name, oid in rows.fetchall()}


def drop_databases_like(platform: Sandbox, pattern: str) -> list[str]:
    with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as admin:
        names = [
            r[0]
            for r in admin.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,)
            ).fetchall()
        ]
        for name in names:
            admin.execute(
                psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                    psycopg.sql.Identifier(name)
                )
            )
    return names


def query(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as db:
        cursor = db.execute(statement)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def replicas(platform: Sandbox, name: str) -> int:
    deployment = platform.kube.get("apps/v1", "Deployment", "complianceagent", name)
    assert deployment is not None
    return int(deployment["spec"]["replicas"])


def scale_writes(platform: Sandbox) -> list[tuple[str, int]]:
    return [
        (w.name, w.body["spec"]["replicas"])
        for w in platform.kube.writes
        if w.subresource == "scale" and w.method == "PATCH"
    ]


def _wait_for_last_log(prefect_api: Any, run_id: UUID, timeout: float = 30.0) -> None:
    """Logs reach the server in batches (PREFECT_LOGGING_TO_API_BATCH_INTERVAL): wait until
    the run's last line, the engine's `Finished in state …`, is there. Its subflows finished
    before it, and their lines went out in the same or an earlier batch."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        logs = prefect_api.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
            sort=LogSort.TIMESTAMP_DESC,
            limit=5,
        )
        if any(log.message.startswith("Finished in state") for log in logs):
            return
        time.sleep(0.1)
    raise AssertionError(f"flow run {run_id}'s last log line never reached the server")


def stored_by_the_server(run_id: UUID) -> str:
    """Everything Prefect keeps about a run and its subflows, as one text: their log lines,
    artifacts, parameters, and the state messages of the runs and their task runs."""
    with get_client(sync_client=True) as prefect_api:
        _wait_for_last_log(prefect_api, run_id)
        runs = [prefect_api.read_flow_run(run_id)]
        runs += prefect_api.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])
            )
        )
        ids = [r.id for r in runs]
        texts = [str(r.parameters) + str(r.state.message if r.state else "") for r in runs]
        logs = prefect_api.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200
        )
        texts += [log.message for log in logs]
        artifacts = prefect_api.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        texts += [str(a.data) + str(a.description) for a in artifacts]
        task_runs = prefect_api.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
        )
        texts += [str(t.state.message) for t in task_runs if t.state]
    assert logs, "the run logged nothing?"
    return "\n".join(texts)
