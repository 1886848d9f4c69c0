"""The restore runbook against the sandbox: real PostgreSQL, moto S3, the Kubernetes
emulator, the backend stand-in and the Prefect server.

These tests restore the live `complianceagent` database itself. Each one leaves it as it
found it — same name, same rows — and drops the dated copies it made, so the rest of the
session is not affected.
"""

from __future__ import annotations

import re
import threading
import time

import psycopg
import pytest
from kubernetes import client as k8s
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.flow_runs import resume_flow_run
from psycopg.conninfo import make_conninfo

from flows.restore import restore
from sandbox.platform import BACKUP_BUCKET, NAMESPACE
from tasks.kubernetes import scale_deployment
from tasks.locks import exclusive, lock_name
from tests.backup_helpers import (
    clear_backups,
    databases,
    drop_databases_like,
    objects,
    query,
    replicas,
    scale_writes,
    stored_by_the_server,
    take_backup,
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


def users(platform) -> list[str]:
    return [r[0] for r in query(platform.postgres.dsn, "SELECT email FROM users ORDER BY id")]


def organizations(platform) -> list[str]:
    return [
        r[0] for r in query(platform.postgres.dsn, "SELECT name FROM organizations ORDER BY id")
    ]


LOCKS = ("database/complianceagent", "deployment/backend", "deployment/celery-workers")


def held_slots(*targets: str) -> dict[str, int]:
    """Who holds each target's lock now (a lock never taken yet is held by nobody)."""
    held = {}
    with get_client(sync_client=True) as prefect_api:
        for t in targets:
            try:
                limit = prefect_api.read_global_concurrency_limit_by_name(lock_name(t))
                held[t] = limit.active_slots
            except ObjectNotFound:
                held[t] = 0
    return held


def task_run_end(run_id, name_prefix: str) -> float:
    """When the run's task whose name starts with `name_prefix` finished (epoch seconds)."""
    with get_client(sync_client=True) as prefect_api:
        task_runs = prefect_api.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    (found,) = [t for t in task_runs if t.name.startswith(name_prefix)]
    assert found.end_time is not None
    return found.end_time.timestamp()


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
    paused = wait_for_paused_run("restore")
    # While it waits for approval it holds none of the locks: a scale or rollback of the
    # writers need not wait an hour behind it (what the approver saw is checked after).
    assert held_slots(*LOCKS) == {target: 0 for target in LOCKS}
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
    # The writers were stopped only after pg_restore had finished, and came back.
    restored_at = task_run_end(paused.id, "pg_restore s3://")
    assert platform.kube.writes and all(w.at > restored_at for w in platform.kube.writes)
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


# --- refusals before any change: schema version, disk space --------------------------------


@pytest.fixture
def newer_live_schema(live):
    """The live database migrated past the backup (as after `flows/migrations.py`)."""
    backup_id = take_backup()
    query(live.postgres.dsn, "UPDATE alembic_version SET version_num = 'a7e3f09b12c4'")
    try:
        yield backup_id
    finally:
        query(live.postgres.dsn, "UPDATE alembic_version SET version_num = '3f2a9c1d7e10'")


def test_a_schema_change_is_refused_unless_the_operator_allows_it(live, newer_live_schema):
    platform = live
    before, rows = databases(platform), users(platform)
    platform.kube.clear_writes()

    refused = restore(backup_id=newer_live_schema, return_state=True)

    assert refused.is_failed()
    assert refused.message.startswith(
        "Flow run encountered an exception: Refused: allow_schema_change: the backup's schema "
        "version is 3f2a9c1d7e10, the live database's is a7e3f09b12c4"
    )
    assert platform.kube.writes == []
    assert databases(platform) == before and users(platform) == rows
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "Restore of complianceagent refused: allow_schema_change:" in chat.json["text"]

    # Ticked: the approver sees both versions and that the change was allowed.
    run = start_in_thread(restore, backup_id=newer_live_schema, allow_schema_change=True)
    _, plan = approve_and_wait(REJECT)
    assert run.join(60).is_failed()
    assert "| schema version | backup 3f2a9c1d7e10, live a7e3f09b12c4 — DIFFERENT;" in plan
    assert platform.kube.writes == []
    assert databases(platform) == before


@pytest.fixture
def tiny_volume(live):
    """The postgres StatefulSet claims a 2 MiB data volume, as a real manifest would say."""
    # The test's own client, not the runbooks': this setup is no runbook's request.
    apps = k8s.AppsV1Api(k8s.ApiClient(k8s.Configuration(host=live.kube.url)))
    original = apps.read_namespaced_stateful_set("postgres", NAMESPACE).to_dict()
    body = apps.api_client.sanitize_for_serialization(
        apps.read_namespaced_stateful_set("postgres", NAMESPACE)
    )
    body["spec"]["volumeClaimTemplates"] = [
        {
            "metadata": {"name": "data"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "2Mi"}},
            },
        }
    ]
    body["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "data", "mountPath": "/var/lib/postgresql/data"}
    ]
    apps.delete_namespaced_stateful_set("postgres", NAMESPACE, propagation_policy="Orphan")
    for managed in ("resourceVersion", "uid", "creationTimestamp", "generation"):
        body["metadata"].pop(managed, None)
    apps.create_namespaced_stateful_set(NAMESPACE, body)
    try:
        yield live
    finally:
        apps.delete_namespaced_stateful_set("postgres", NAMESPACE, propagation_policy="Orphan")
        restored = apps.api_client.sanitize_for_serialization(original)
        restored["metadata"] = {"name": "postgres", "namespace": NAMESPACE}
        apps.create_namespaced_stateful_set(NAMESPACE, restored)


def test_a_restore_the_disk_cannot_hold_is_refused_with_the_numbers(tiny_volume):
    platform = tiny_volume
    backup_id = take_backup()
    before = databases(platform)
    platform.kube.clear_writes()

    state = restore(backup_id=backup_id, return_state=True)

    assert state.is_failed()
    assert "NotEnoughSpace: not enough disk for a second copy of complianceagent: " in (
        state.message
    )
    assert re.search(r"free \(-?\d+ bytes\), ≈ [\d.]+ MiB needed \(\d+ bytes\)", state.message)
    assert "statefulset/postgres claim data: 2Mi" in state.message
    assert platform.kube.writes == []
    assert databases(platform) == before  # no scratch database was created


# --- locks -----------------------------------------------------------------------------------

HELD = threading.Event()
RELEASE = threading.Event()


@flow
def scale_holding_the_lock(target: str) -> None:
    with exclusive(target):
        HELD.set()
        RELEASE.wait(120)


def test_an_approved_restore_waits_for_a_scale_that_holds_a_writers_lock(live):
    platform = live
    take_backup()
    before = databases(platform)
    platform.kube.clear_writes()
    HELD.clear()
    RELEASE.clear()
    holder = threading.Thread(
        target=scale_holding_the_lock, args=("deployment/celery-workers",), daemon=True
    )
    holder.start()
    try:
        assert HELD.wait(120), "the holder never got the lock"
        run = start_in_thread(restore)
        # The checks and the approval need no lock: it asks at once.
        approve_and_wait()
        # Approved, it takes its locks in name order: database, backend, then waits for
        # the workers'; nothing is created or scaled meanwhile.
        give_up = time.monotonic() + 60
        while held_slots("deployment/backend")["deployment/backend"] != 1:
            assert time.monotonic() < give_up, "restore never took deployment/backend"
            time.sleep(0.1)
        assert held_slots(*LOCKS) == {target: 1 for target in LOCKS}  # 1 is the holder's
        assert _running_restores()
        assert platform.kube.writes == []
        assert databases(platform).keys() == before.keys()
    finally:
        RELEASE.set()
        holder.join(120)
    state = run.join(120)
    assert state.is_completed(), state.message
    assert held_slots(*LOCKS) == {target: 0 for target in LOCKS}


def test_a_restore_approved_after_the_writers_changed_is_refused(live):
    """What the approver saw stays true: the replica counts the writers go back to were
    shown in the plan; a scale during the pause makes the plan stale."""
    platform = live
    take_backup()
    before = databases(platform)
    run = start_in_thread(restore)
    paused = wait_for_paused_run("restore")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert "deployment/backend replicas = 3" in plan
    scale_deployment.fn("backend", 5)  # someone scales the backend meanwhile
    platform.kube.clear_writes()

    resume_flow_run(paused.id, run_input=APPROVE)
    state = run.join(60)

    assert state.is_failed()
    assert "changed since the plan was approved" in state.message
    assert "deployment/backend replicas: 3 → 5" in state.message
    assert platform.kube.writes == []  # no writer stopped
    assert databases(platform) == before  # no scratch database, nothing swapped
    scale_deployment.fn("backend", 3)


def _running_restores():
    with get_client(sync_client=True) as prefect_api:
        runs = prefect_api.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            )
        )
        return [r.id for r in runs if prefect_api.read_flow(r.flow_id).name == "restore"]


# --- the report tells the truth, and chat cannot change it ---------------------------------


@pytest.fixture
def gated_backup(live):
    """A backup whose last table, `zz_gate`, a test can lock in the scratch database once
    pg_restore has loaded it: the row-count check then waits, with the writers stopped,
    until the test lets go. (No index or constraint: pg_restore never comes back to it.)"""
    query(live.postgres.dsn, "CREATE TABLE zz_gate (n int); INSERT INTO zz_gate VALUES (1)")
    try:
        yield take_backup()
    finally:
        query(live.postgres.dsn, "DROP TABLE IF EXISTS zz_gate")
        scale_deployment.fn("backend", 3)


def _lock_gate(platform, scratch: str) -> psycopg.Connection:
    dsn = make_conninfo(platform.postgres.admin_dsn, dbname=scratch)
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        try:
            gate = psycopg.connect(dsn)
            if gate.execute("SELECT count(*) FROM zz_gate").fetchone() == (1,):
                gate.execute("LOCK TABLE zz_gate IN ACCESS EXCLUSIVE MODE")
                return gate
            gate.close()
        except psycopg.Error:
            pass
        time.sleep(0.05)
    raise AssertionError(f"zz_gate never got its row in {scratch}")


def test_scaling_back_failing_after_the_swap_is_reported_as_it_is(live, gated_backup):
    platform = live
    rows = users(platform)
    platform.kube.clear_writes()

    run = start_in_thread(restore, backup_id=gated_backup)
    paused, plan = approve_and_wait()
    (scratch,) = set(re.findall(r"complianceagent_restore_\d{8}t\d{6}z", plan))
    gate = _lock_gate(platform, scratch)
    # The row-count check now waits on the gate; wait for both writers to be stopped, then
    # make the API refuse the backend's scale-back.
    give_up = time.monotonic() + 60
    while ("celery-workers", 0) not in scale_writes(platform):
        assert time.monotonic() < give_up, "the writers were never stopped"
        time.sleep(0.05)
    platform.kube.inject_fault("PATCH", r"/deployments/backend/scale$", status=403)
    gate.close()
    state = run.join(120)

    assert state.is_failed()
    assert "could not scale deployment/backend back" in state.message
    # The database was swapped: same rows, the old one kept.
    assert users(platform) == rows
    assert any(n.startswith("complianceagent_pre_restore_") for n in databases(platform))
    assert (replicas(platform, "backend"), replicas(platform, "celery-workers")) == (0, 4)
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    for text in (chat.json["text"], read_artifacts(paused.id)["restore"].data):
        assert "The database WAS swapped: complianceagent is now the restored backup" in text
        assert "NOT scaled back: deployment/backend (scale it to 3 by hand:" in text
        assert "Scaled back: celery-workers to 4." in text
    assert "**Database swapped:** yes" in read_artifacts(paused.id)["restore"].data


def test_a_chat_outage_does_not_fail_a_good_restore(live):
    platform = live
    backup_id = take_backup()
    platform.receiver.fail_next(times=1, status=403)

    run = start_in_thread(restore, backup_id=backup_id)
    paused, _ = approve_and_wait()
    state = run.join(120)

    assert state.is_completed(), state.message
    (sent,) = [n for n in platform.receiver.received if n.path.startswith("/slack")]
    assert (
        sent.status == 403
        and f"Restored complianceagent from backup {backup_id}" in (sent.json["text"])
    )
    assert "## Database restored" in read_artifacts(paused.id)["restore"].data
