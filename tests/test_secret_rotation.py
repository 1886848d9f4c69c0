"""The secret-rotation runbook against moto's Secrets Manager, the real PostgreSQL, the
Kubernetes emulator and the backend stand-in, whose pods load both secrets when they start."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from prefect.exceptions import ParameterTypeError
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL

from flows.secret_rotation import secret_rotation
from sandbox.platform import API_KEY_SECRET_ID, APP_ROLE, DATABASE_PASSWORD_SECRET_ID
from tests.helpers import prefect_rest, read_artifacts, start_in_thread, wait_for_paused_run
from tests.test_restart import restart_stamps


def versions(platform, secret_id):
    described = platform.secretsmanager().describe_secret(SecretId=secret_id)
    return {v: sorted(s) for v, s in described["VersionIdsToStages"].items()}


def holder(platform, secret_id, stage):
    return next((v for v, s in versions(platform, secret_id).items() if stage in s), None)


def value(platform, secret_id, stage="AWSCURRENT"):
    sm = platform.secretsmanager()
    return sm.get_secret_value(SecretId=secret_id, VersionStage=stage)["SecretString"]


def key_status(platform, key):
    response = httpx.get(f"{platform.backend.url}/api/v1/me", headers={"X-API-Key": key})
    return response.status_code


def logs_in(platform, password):
    try:
        with psycopg.connect(platform.postgres.dsn, user=APP_ROLE, password=password):
            return True
    except psycopg.OperationalError:
        return False


def health_db(platform):
    return httpx.get(f"{platform.backend.url}/health/db").status_code


def clear_failures_after_first_failed_rollout(kube):
    """Make the next rollouts fail until the first one has failed, then let them succeed:
    the restart after finishSecret fails, the undo's restart goes through."""
    started = time.time()
    kube.fail_rollouts_for_image("complianceagent/backend")

    def watch():
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            if any(e.at >= started and e.what == "ProgressDeadlineExceeded" for e in kube.history):
                kube.clear_rollout_failures()
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_the_stand_ins_pods_use_the_current_secrets(platform):
    assert key_status(platform, value(platform, API_KEY_SECRET_ID)) == 200
    assert key_status(platform, "not-the-key") == 401
    assert key_status(platform, "") == 401
    assert health_db(platform) == 200
    assert logs_in(platform, value(platform, DATABASE_PASSWORD_SECRET_ID))


def test_api_key_rotation(platform, kube):
    old_version = holder(platform, API_KEY_SECRET_ID, "AWSCURRENT")
    old_key = value(platform, API_KEY_SECRET_ID)

    state = secret_rotation(secret="api-key", return_state=True)

    assert state.is_completed(), state.message
    new_version = holder(platform, API_KEY_SECRET_ID, "AWSCURRENT")
    new_key = value(platform, API_KEY_SECRET_ID)
    assert new_version != old_version and new_key != old_key
    assert holder(platform, API_KEY_SECRET_ID, "AWSPREVIOUS") == old_version
    assert holder(platform, API_KEY_SECRET_ID, "AWSPENDING") is None
    assert len(__import__("base64").b64decode(new_key)) == 32  # openssl rand -base64 32
    # The restarted pods hold the new key and refuse the old one.
    assert key_status(platform, new_key) == 200
    assert key_status(platform, old_key) == 401
    assert len(restart_stamps(kube, "backend")) == 1
    assert len(restart_stamps(kube, "celery-workers")) == 1
    report = read_artifacts(state.state_details.flow_run_id)["secret-rotation-report"].data
    assert new_version in report and old_version in report
    assert new_key not in report and old_key not in report


def test_database_password_rotation(platform, kube):
    old_password = value(platform, DATABASE_PASSWORD_SECRET_ID)
    starts = platform.backend.pod_starts

    state = secret_rotation(secret="database-password", return_state=True)

    assert state.is_completed(), state.message
    new_password = value(platform, DATABASE_PASSWORD_SECRET_ID)
    assert new_password != old_password
    assert value(platform, DATABASE_PASSWORD_SECRET_ID, "AWSPREVIOUS") == old_password
    assert holder(platform, DATABASE_PASSWORD_SECRET_ID, "AWSPENDING") is None
    # The real role: the new password logs in, the old one no longer does.
    assert logs_in(platform, new_password)
    assert not logs_in(platform, old_password)
    # The restarted pods log in with the new one.
    assert platform.backend.pod_starts == starts + 1
    assert health_db(platform) == 200
    assert len(restart_stamps(kube, "celery-workers")) == 1


@pytest.fixture
def app_role_cannot_log_in(platform):
    """The application role refuses logins (NOLOGIN): a real testSecret failure."""
    with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as db:
        db.execute(f"ALTER ROLE {APP_ROLE} NOLOGIN")
    try:
        yield
    finally:
        with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as db:
            db.execute(f"ALTER ROLE {APP_ROLE} LOGIN")


def test_failed_test_secret_removes_pending_and_puts_the_password_back(
    platform, kube, app_role_cannot_log_in
):
    before = versions(platform, DATABASE_PASSWORD_SECRET_ID)
    old_password = value(platform, DATABASE_PASSWORD_SECRET_ID)

    state = secret_rotation(secret="database-password", return_state=True)

    assert state.is_failed()
    assert "failed before finishSecret" in state.message
    assert "not permitted to log in" in state.message
    assert "password of role complianceagent_app put back" in state.message
    assert "nothing was restarted" in state.message
    after = versions(platform, DATABASE_PASSWORD_SECRET_ID)
    assert holder(platform, DATABASE_PASSWORD_SECRET_ID, "AWSPENDING") is None
    # Stages as they were (versions an earlier rotation left without a stage do not count).
    assert {v: s for v, s in after.items() if s} == {v: s for v, s in before.items() if s}
    assert value(platform, DATABASE_PASSWORD_SECRET_ID) == old_password
    assert kube.writes == []  # no restart
    with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as db:
        db.execute(f"ALTER ROLE {APP_ROLE} LOGIN")
    assert logs_in(platform, old_password)  # the role's password is the old one again


def test_rollout_failure_after_finish_moves_current_back_and_restarts_again(platform, kube):
    old_version = holder(platform, API_KEY_SECRET_ID, "AWSCURRENT")
    old_key = value(platform, API_KEY_SECRET_ID)
    watcher = clear_failures_after_first_failed_rollout(kube)

    state = secret_rotation(secret="api-key", return_state=True)
    watcher.join(5)

    assert state.is_failed()
    assert "failed after finishSecret" in state.message
    assert "ProgressDeadlineExceeded" in state.message or "timed out" in state.message
    assert f"AWSCURRENT moved back to version {old_version}" in state.message
    assert "backend and celery-workers restarted again" in state.message
    assert "UNDO INCOMPLETE" not in state.message
    assert holder(platform, API_KEY_SECRET_ID, "AWSCURRENT") == old_version
    assert holder(platform, API_KEY_SECRET_ID, "AWSPENDING") is None
    rotated_out = value(platform, API_KEY_SECRET_ID, "AWSPREVIOUS")
    assert rotated_out != old_key
    # Restarted twice each: after finishSecret, and again by the undo.
    assert len(restart_stamps(kube, "backend")) == 2
    assert len(restart_stamps(kube, "celery-workers")) == 2
    assert key_status(platform, old_key) == 200
    assert key_status(platform, rotated_out) == 401
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "failed after finishSecret" in chat.json["text"]


def test_health_failure_after_finish_puts_the_database_password_back(platform, kube):
    old_version = holder(platform, DATABASE_PASSWORD_SECRET_ID, "AWSCURRENT")
    old_password = value(platform, DATABASE_PASSWORD_SECRET_ID)
    # The first health check after the restart fails, every retry of it included.
    platform.backend.fail_next("/health/ready", 500, times=4)

    state = secret_rotation(secret="database-password", return_state=True)

    assert state.is_failed()
    assert "failed after finishSecret" in state.message and "/health/ready" in state.message
    assert "password of role complianceagent_app put back" in state.message
    assert holder(platform, DATABASE_PASSWORD_SECRET_ID, "AWSCURRENT") == old_version
    assert logs_in(platform, old_password)
    assert not logs_in(platform, value(platform, DATABASE_PASSWORD_SECRET_ID, "AWSPREVIOUS"))
    assert health_db(platform) == 200  # the pods restarted again, with the old password
    assert len(restart_stamps(kube, "backend")) == 2


def test_rejection_in_production_changes_nothing(platform, kube, monkeypatch):
    monkeypatch.setenv("RUNBOOK_ENVIRONMENT", "production")
    before = versions(platform, API_KEY_SECRET_ID)

    run = start_in_thread(secret_rotation, secret="api-key")
    paused = wait_for_paused_run("secret-rotation")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert holder(platform, API_KEY_SECRET_ID, "AWSCURRENT") in plan
    resume_flow_run(paused.id, run_input={"approve": False, "approver": "e", "reason": "no"})
    state = run.join()

    assert state.is_failed()
    assert versions(platform, API_KEY_SECRET_ID) == before
    assert kube.writes == []


def test_a_rotation_approved_after_the_secret_moved_is_refused(platform, kube, monkeypatch):
    monkeypatch.setenv("RUNBOOK_ENVIRONMENT", "production")
    run = start_in_thread(secret_rotation, secret="api-key")
    paused = wait_for_paused_run("secret-rotation")
    # Meanwhile AWSCURRENT moves to another version (another rotation, a console edit);
    # same value, so the platform keeps working.
    sm = platform.secretsmanager()
    planned = holder(platform, API_KEY_SECRET_ID, "AWSCURRENT")
    other = sm.put_secret_value(
        SecretId=API_KEY_SECRET_ID,
        SecretString=value(platform, API_KEY_SECRET_ID),
        VersionStages=["EDITED"],
    )["VersionId"]
    sm.update_secret_version_stage(
        SecretId=API_KEY_SECRET_ID,
        VersionStage="AWSCURRENT",
        MoveToVersionId=other,
        RemoveFromVersionId=planned,
    )
    moved = versions(platform, API_KEY_SECRET_ID)
    assert holder(platform, API_KEY_SECRET_ID, "AWSCURRENT") == other != planned

    resume_flow_run(paused.id, run_input={"approve": True, "approver": "e", "reason": "CHG"})
    state = run.join()

    assert state.is_failed()
    assert "changed since the plan was approved" in state.message
    assert f"{API_KEY_SECRET_ID} AWSCURRENT version: {planned} → {other}" in state.message
    assert versions(platform, API_KEY_SECRET_ID) == moved  # no AWSPENDING, nothing moved
    assert kube.writes == []


@pytest.mark.parametrize("name", ["complianceagent/api-key", "db", ""])
def test_an_unknown_secret_is_refused_before_anything(platform, kube, name):
    before = versions(platform, API_KEY_SECRET_ID)
    with pytest.raises(ParameterTypeError, match="secret"):
        secret_rotation(secret=name)
    assert versions(platform, API_KEY_SECRET_ID) == before
    assert kube.writes == []


def _prefect_storage_files() -> list[Path]:
    database = Path(str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()).split("///", 1)[1])
    files = [p for p in database.parent.glob(database.name + "*") if p.is_file()]
    files += [p for p in Path(PREFECT_HOME.value()).rglob("*") if p.is_file()]
    return files


def _prefect_api_text(since: str) -> str:
    """Every log, artifact, flow run, task run and event the server holds since `since`."""
    with prefect_rest(str(PREFECT_API_URL.value())) as api:
        parts = [
            api.post("/logs/filter", json={"limit": 200}).text,
            api.post("/artifacts/filter", json={"limit": 200}).text,
            api.post("/flow_runs/filter", json={"limit": 200}).text,
            api.post("/task_runs/filter", json={"limit": 200}).text,
            api.post(
                "/events/filter", json={"filter": {"occurred": {"since": since}}, "limit": 50}
            ).text,
        ]
    return "\n".join(parts)


def test_no_value_leaks_into_prefect(platform, kube):
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 5))
    for secret in ("api-key", "database-password"):
        state = secret_rotation(secret=secret, return_state=True)
        assert state.is_completed(), state.message
    # A failed rotation too: failed runs' exceptions are pickled into Prefect's storage.
    watcher = clear_failures_after_first_failed_rollout(kube)
    assert secret_rotation(secret="api-key", return_state=True).is_failed()
    watcher.join(5)
    time.sleep(2)  # let the server write the last logs and events

    values = {
        value(platform, secret_id, stage)
        for secret_id in (API_KEY_SECRET_ID, DATABASE_PASSWORD_SECRET_ID)
        for stage in ("AWSCURRENT", "AWSPREVIOUS")
    }
    values |= {json.dumps(v)[1:-1] for v in values}  # as they would appear escaped in JSON
    assert len(values) >= 4
    files = _prefect_storage_files()
    assert any(f.name.startswith("prefect-test.db") for f in files)
    for path in files:
        content = path.read_bytes()
        for v in values:
            assert v.encode() not in content, f"a secret value is in {path}"
    text = _prefect_api_text(since)
    assert "secret-rotation" in text  # the scan did read this test's runs
    for v in values:
        assert v not in text, "a secret value is in Prefect's API answers"
