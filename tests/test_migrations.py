"""The migrations runbook against the Kubernetes emulator, whose Job really runs the
backend's alembic project (sandbox/backend_app) against the sandbox's PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run

from flows.migrations import migrations
from runbook.redaction import REDACTED
from sandbox.backend_app import HEAD_REVISION, SEED_REVISION
from tasks import kubernetes as k8s
from tasks.locks import lock_name
from tests.backup_helpers import stored_by_the_server
from tests.helpers import read_artifacts, start_in_thread, wait_for_paused_run
from tests.release_helpers import NS, live, wait_settled, wait_until
from tests.test_fault_matrix import _job_active, _migration_blocked

APPROVE = {"approve": True, "approver": "grace", "reason": "CHG-11"}


def columns_of(platform, table):
    with psycopg.connect(platform.postgres.dsn) as db:
        rows = db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,)
        ).fetchall()
    return {name for (name,) in rows}


def job_writes(kube):
    return [(w.method, w.kind, w.name) for w in kube.writes]


def run_approved(**parameters):
    run = start_in_thread(migrations, **parameters)
    paused = wait_for_paused_run("migrations")
    resume_flow_run(paused.id, run_input=APPROVE)
    return paused, run.join()


@pytest.mark.slow
def test_migrations_run_as_a_job_from_the_backend_image_and_report_alembic_current(platform, kube):
    backend = live(kube, "backend")["spec"]["template"]["spec"]["containers"][0]

    run = start_in_thread(migrations, require_maintenance_mode=False)
    paused = wait_for_paused_run("migrations")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert backend["image"] in plan and "alembic upgrade head && alembic current" in plan
    assert "OFF (migration declared safe under traffic)" in plan
    assert kube.writes == []  # approval first
    resume_flow_run(paused.id, run_input=APPROVE)
    state = run.join()

    assert state.is_completed(), state.message
    assert state.result()["alembic_current"] == f"{HEAD_REVISION} (head)"
    assert platform.schema_revision() == HEAD_REVISION  # the real schema changed
    assert "severity" in columns_of(platform, "compliance_scans")
    assert "retention_days" in columns_of(platform, "organizations")
    job_name = kube.writes[0].name
    assert job_name.startswith("backend-migrate-")
    assert job_writes(kube) == [("POST", "Job", job_name), ("DELETE", "Job", job_name)]
    job = kube.writes[0].body
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == backend["image"]
    assert container["env"] == backend["env"]  # DATABASE_URL from the Secret, as the backend
    assert container["envFrom"] == backend["envFrom"]
    assert container["command"][-1] == "alembic upgrade head && alembic current"
    assert kube.get("batch/v1", "Job", NS, job_name) is None  # cleaned up
    report = read_artifacts(state.state_details.flow_run_id)["migrations-report"].data
    assert f"{HEAD_REVISION} (head)" in report
    assert f"- {SEED_REVISION} -> 8c41d5e2b6a9, add scan severity index" in report
    assert f"Running upgrade a7e3f09b12c4 -> {HEAD_REVISION}" in report  # alembic's own log


def test_outside_a_maintenance_window_it_is_refused_before_anything(platform, kube):
    state = migrations(return_state=True)

    assert state.is_failed()
    assert "require_maintenance_mode: deployment/backend is not in maintenance mode" in (
        state.message
    )
    assert kube.writes == []
    assert "approval-plan" not in read_artifacts(state.state_details.flow_run_id)


def test_inside_a_maintenance_window_it_runs(platform, kube):
    k8s.set_deployment_env.fn("backend", "backend", {"MAINTENANCE_MODE": "true"})
    wait_settled(kube, "backend")
    kube.clear_writes()

    paused, state = run_approved()

    assert state.is_completed(), state.message
    assert "| maintenance mode | on |" in read_artifacts(paused.id)["approval-plan"].data
    assert [w.method for w in kube.writes] == ["POST", "DELETE"]


def test_failed_job_fails_the_run_with_its_logs_and_is_cleaned_up(platform, kube):
    # Schema drift: someone added the column by hand, so the migration's ADD COLUMN fails.
    with psycopg.connect(platform.postgres.dsn, autocommit=True) as db:
        db.execute("ALTER TABLE compliance_scans ADD COLUMN severity text")
    try:
        _, state = run_approved(require_maintenance_mode=False)
        assert platform.schema_revision() == SEED_REVISION  # transactional DDL: nothing applied
    finally:
        with psycopg.connect(platform.postgres.dsn, autocommit=True) as db:
            db.execute("ALTER TABLE compliance_scans DROP COLUMN IF EXISTS severity")

    assert state.is_failed()
    assert "failed: Job has reached the specified backoff limit" in state.message
    assert 'column "severity" of relation "compliance_scans" already exists' in state.message
    [(post, _, name), (delete, _, deleted)] = job_writes(kube)
    assert (post, delete, deleted) == ("POST", "DELETE", name)
    assert kube.get("batch/v1", "Job", NS, name) is None
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "failed" in chat.json["text"]


@pytest.mark.slow
def test_a_failed_data_migration_publishes_the_cause_but_no_row_data(platform, kube):
    # Two accounts differing only in case: the data migration lower-cases them, its unique
    # constraint then fails, and PostgreSQL quotes the duplicated email in its error.
    email = "ada.lovelace@example.com"
    with psycopg.connect(platform.postgres.dsn, autocommit=True) as db:
        db.execute("INSERT INTO users (email) VALUES (%s), (%s)", (email, email.title()))
    try:
        paused, state = run_approved(require_maintenance_mode=False)
        assert platform.schema_revision() == SEED_REVISION  # one transaction: nothing applied
    finally:
        with psycopg.connect(platform.postgres.dsn, autocommit=True) as db:
            db.execute("DELETE FROM users WHERE lower(email) = %s", (email,))

    assert state.is_failed()
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack")).json["text"]
    report = read_artifacts(paused.id)["migrations-report"].data
    # The cause is readable where people look: the run's state, its report and chat …
    for published in (state.message, report, chat):
        assert 'could not create unique index "uq_users_email"' in published
    for published in (state.message, report):
        assert f"Key (email)=({REDACTED}) is duplicated." in published
    assert "failed" in chat
    # … and the customer's email is in none of them, nor anywhere the server keeps the run.
    for published in (state.message, report, chat, stored_by_the_server(paused.id)):
        assert "lovelace" not in published.lower()


def test_rejected_approval_writes_nothing(platform, kube):
    run = start_in_thread(migrations, require_maintenance_mode=False)
    resume_flow_run(
        wait_for_paused_run("migrations").id,
        run_input={"approve": False, "approver": "h", "reason": "backup first"},
    )
    state = run.join()

    assert state.is_failed()
    assert kube.writes == []


def test_migrations_approved_after_the_backend_changed_are_refused(platform, kube):
    """The Job would run the image the approver saw: a deploy during the pause (no lock
    is held through it) makes the plan stale."""
    run = start_in_thread(migrations, require_maintenance_mode=False)
    paused = wait_for_paused_run("migrations")
    k8s.set_deployment_image.fn("backend", "backend", "complianceagent/backend:7.7.7")
    wait_settled(kube, "backend")
    kube.clear_writes()

    resume_flow_run(paused.id, run_input=APPROVE)
    state = run.join()

    assert state.is_failed()
    assert "changed since the plan was approved" in state.message
    assert "deployment/backend pod template: sha256:" in state.message
    assert job_writes(kube) == [] and kube.writes == []


def test_transient_5xx_on_job_creation_is_retried(platform, kube):
    kube.inject_fault("POST", r"/namespaces/complianceagent/jobs$", status=503, times=1)

    _, state = run_approved(require_maintenance_mode=False)

    assert state.is_completed(), state.message
    assert [(w.method, w.status) for w in kube.writes] == [("POST", 201), ("DELETE", 200)]


def database_lock():
    with get_client(sync_client=True) as prefect_api:
        return prefect_api.read_global_concurrency_limit_by_name(
            lock_name("database/complianceagent")
        )


def test_it_holds_the_database_lock_the_backup_runbooks_share(platform, kube):
    # The migration waits behind a table lock: the lock is looked at while it surely runs.
    with _migration_blocked(platform) as blocked:
        run = start_in_thread(migrations, require_maintenance_mode=False)
        resume_flow_run(wait_for_paused_run("migrations").id, run_input=APPROVE)
        wait_until(lambda: [w.method for w in kube.writes] == ["POST"], "the Job was created")

        held = database_lock()
        assert kube.writes[-1].method == "POST"  # the Job is still running: nothing deleted yet
        blocked["release"]()
        state = run.join()

    assert state.is_completed(), state.message
    assert held.limit == 1 and held.active_slots == 1  # held while the migration ran
    assert database_lock().active_slots == 0  # and released after


def test_a_job_still_running_is_never_deleted(platform, kube):
    kube.inject_fault("GET", r"/jobs/backend-migrate-[a-z0-9]+$", status=404, times=1)

    # The migration waits behind a table lock, so its Job is surely still running when
    # the run's wait fails (however fast the machine runs alembic).
    with _migration_blocked(platform) as blocked:
        _, state = run_approved(require_maintenance_mode=False)

        assert state.is_failed()
        assert "read job/backend-migrate-" in state.message and "404" in state.message
        [(method, _, name)] = job_writes(kube)  # created, never deleted
        assert method == "POST"
        assert _job_active(kube.get("batch/v1", "Job", NS, name))

        blocked["release"]()
        wait_until(lambda: not _job_active(kube.get("batch/v1", "Job", NS, name)), "it ends", 60)
    assert job_writes(kube) == [(method, _, name)]  # still never deleted
