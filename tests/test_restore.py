"""The restore runbook against the sandbox: real PostgreSQL, moto S3, the Kubernetes
emulator, the backend stand-in and the Prefect server.

These tests restore the live `complianceagent` database itself. Each one leaves it as it
found it — same name, same rows — and drops the dated copies it made, so the rest of the
session is not affected.
"""

from __future__ import annotations

import pytest
from prefect.flow_runs import resume_flow_run
from psycopg.conninfo import make_conninfo

from flows.backup import backup
from flows.restore import restore
from sandbox.platform import BACKUP_BUCKET
from tests.backup_helpers import (
    clear_backups,
    databases,
    drop_databases_like,
    objects,
    query,
    replicas,
    scale_writes,
    stored_by_the_server,
)
from tests.helpers import read_artifacts, start_in_thread, wait_for_paused_run

pytestmark = pytest.mark.slow

APPROVE = {"approve": True, "approver": "alice", "reason": "INC-42"}
REJECT = {"approve": False, "approver": "bob", "reason": "wrong backup"}


@pytest.fixture
def live(platform):
    """The sandbox with no backups, and no dated copies of the database left afterwards."""
    clear_backups(platform)
    yield platform
    clear_backups(platform)
    drop_databases_like(platform, r"complianceagent\_%")


def take_backup() -> str:
    state = backup(return_state=True)
    assert state.is_completed(), state.message
    return str(state.result()["backup_id"])


def users(platform) -> list[str]:
    return [r[0] for r in query(platform.postgres.dsn, "SELECT email FROM users ORDER BY id")]


def organizations(platform) -> list[str]:
    return [
        r[0] for r in query(platform.postgres.dsn, "SELECT name FROM organizations ORDER BY id")
    ]


def approve_and_wait(decision=APPROVE):
    paused = wait_for_paused_run("restore")
    plan = read_artifacts(paused.id)["approval-plan"].data
    resume_flow_run(paused.id, run_input=decision)
    return paused, plan


def test_restore_brings_back_exactly_the_backed_up_rows(live):
    platform = live
    backed_up_users, backed_up_orgs = users(platform), organizations(platform)
    backup_id = take_backup()
    before = databases(platform)
    # After the backup, the data changes.
    query(platform.postgres.dsn, "INSERT INTO users (email) VALUES ('late@example.com')")
    query(platform.postgres.dsn, "DELETE FROM organizations WHERE name = 'Globex'")
    platform.kube.clear_writes()

    # jobs=2: the archive goes to a temporary file and pg_restore runs two workers.
    run = start_in_thread(restore, jobs=2)
    paused, plan = approve_and_wait()
    state = run.join(120)

    assert state.is_completed(), state.message
    # The plan showed what the approver needs: backup, age, size, source, target.
    assert f"Restore database complianceagent from backup {backup_id}" in plan
    for fact in ("| taken |", " ago |", "| size |", "| source database | complianceagent (Post"):
        assert fact in plan
    assert f"| target | complianceagent on 127.0.0.1:{platform.postgres.port} |" in plan
    # The rows are those of the backup; the live database kept its name.
    assert users(platform) == backed_up_users
    assert organizations(platform) == backed_up_orgs
    after = databases(platform)
    assert after["complianceagent"] != before["complianceagent"]  # a new database …
    (kept,) = [name for name in after if name.startswith("complianceagent_pre_restore_")]
    assert after[kept] == before["complianceagent"]  # … the old one kept under a dated name
    old_dsn = make_conninfo(platform.postgres.dsn, dbname=kept)
    assert ("late@example.com",) in query(old_dsn, "SELECT email FROM users")
    # Writers were stopped and came back to what they were.
    assert scale_writes(platform) == [
        ("backend", 0),
        ("celery-workers", 0),
        ("backend", 3),
        ("celery-workers", 4),
    ]
    assert (replicas(platform, "backend"), replicas(platform, "celery-workers")) == (3, 4)
    # Health was checked after the swap; chat heard of it; a report was published.
    assert platform.backend.requests["/health/db"] >= 1
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert f"Restored complianceagent from backup {backup_id}" in chat.json["text"]
    assert "all checks passed" in read_artifacts(paused.id)["restore"].data
    # The database password is nowhere in what Prefect stored about the run.
    stored = stored_by_the_server(paused.id)
    assert "pg_restore" in stored
    assert platform.postgres.app_password not in stored


def test_latest_is_the_newest_complete_backup_and_a_rejection_changes_nothing(live):
    platform = live
    take_backup()
    newest_complete = take_backup()
    # A newer backup that never got its manifest (its run died): restore must skip it.
    s3 = platform.s3()
    (archive,) = [k for k in objects(platform) if newest_complete in k and k.endswith(".zst")]
    s3.copy_object(
        Bucket=BACKUP_BUCKET,
        Key=archive.replace(newest_complete, "29991231T235959.999999Z"),
        CopySource={"Bucket": BACKUP_BUCKET, "Key": archive},
    )
    before, rows = databases(platform), users(platform)
    platform.kube.clear_writes()

    run = start_in_thread(restore, backup_id="latest")
    _, plan = approve_and_wait(REJECT)
    state = run.join(60)

    assert f"from backup {newest_complete}" in plan
    assert state.is_failed()
    assert "rejected by bob: wrong backup; nothing was changed" in state.message
    assert platform.kube.writes == []
    assert databases(platform) == before
    assert users(platform) == rows


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "garbled-manifest"])
def test_a_damaged_backup_is_refused_before_any_change(live, damage):
    platform = live
    backup_id = take_backup()
    s3 = platform.s3()
    (archive,) = [k for k in objects(platform) if k.endswith(".zst")]
    stored = s3.get_object(Bucket=BACKUP_BUCKET, Key=archive)["Body"].read()
    if damage == "flipped-byte":
        middle = len(stored) // 2
        damaged = stored[:middle] + bytes([stored[middle] ^ 0xFF]) + stored[middle + 1 :]
        s3.put_object(Bucket=BACKUP_BUCKET, Key=archive, Body=damaged)
    elif damage == "truncated":
        s3.put_object(Bucket=BACKUP_BUCKET, Key=archive, Body=stored[: len(stored) // 2])
    else:
        s3.put_object(Bucket=BACKUP_BUCKET, Key=archive + ".manifest.json", Body=b'{"format": ')
    before, rows = databases(platform), users(platform)
    platform.kube.clear_writes()

    state = restore(backup_id=backup_id, return_state=True)

    assert state.is_failed()
    expected = {
        "flipped-byte": "archive SHA-256 is",
        "truncated": "(truncated); nothing was changed",
        "garbled-manifest": "manifest is not JSON",
    }[damage]
    assert expected in state.message
    assert platform.kube.writes == []
    assert databases(platform) == before
    assert users(platform) == rows
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert f"Restore of complianceagent refused: backup {backup_id}" in chat.json["text"]


@pytest.fixture
def backup_that_breaks_mid_restore(live):
    """A backup pg_dump writes without complaint but pg_restore cannot load: `audit_log`'s
    CHECK calls a function that reads `organizations`, and pg_restore loads audit_log's
    rows (alphabetically first) while organizations is still empty — a real pitfall of
    CHECK constraints that look at other tables."""
    platform = live
    query(
        platform.postgres.dsn,
        """
        CREATE FUNCTION org_exists(org int) RETURNS boolean LANGUAGE sql STABLE
            AS 'SELECT EXISTS (SELECT 1 FROM public.organizations WHERE id = org)';
        CREATE TABLE audit_log (
            id serial PRIMARY KEY,
            organization_id int NOT NULL CHECK (public.org_exists(organization_id))
        );
        INSERT INTO audit_log (organization_id) SELECT id FROM organizations;
        """,
    )
    try:
        yield take_backup()
    finally:
        query(platform.postgres.dsn, "DROP TABLE audit_log; DROP FUNCTION org_exists(int)")


def test_pg_restore_failing_midway_leaves_the_live_database_and_replicas_as_they_were(
    live, backup_that_breaks_mid_restore
):
    platform = live
    before, rows = databases(platform), users(platform)
    platform.kube.clear_writes()

    run = start_in_thread(restore, backup_id=backup_that_breaks_mid_restore)
    paused, _ = approve_and_wait()
    state = run.join(120)

    assert state.is_failed()
    assert "pg_restore exited with 1" in state.message
    assert 'violates check constraint "audit_log_organization_id_check"' in state.message
    # The live database is the same one, with the same rows; no scratch database is left.
    assert databases(platform) == before
    assert users(platform) == rows
    assert query(platform.postgres.dsn, "SELECT count(*) FROM audit_log") == [(3,)]
    # pg_restore runs before the writers are stopped: they were never touched.
    assert scale_writes(platform) == []
    assert (replicas(platform, "backend"), replicas(platform, "celery-workers")) == (3, 4)
    chat = platform.receiver.wait_for(lambda n: "failed" in n.json.get("text", ""))
    assert "The live database was not changed" in chat.json["text"]
    assert "No workload was scaled" in chat.json["text"]
    report = read_artifacts(paused.id)["restore"].data
    assert "Database restore failed" in report and "failed: PostgresToolError" in report
    assert platform.postgres.app_password not in state.message
