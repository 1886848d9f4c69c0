"""The maintenance-window runbook against the sandbox: the emulator's writes to the backend
Deployment, the receiver's status page messages, Alertmanager's silences, the real schema
and the run's final state — for every way a window can end."""

from __future__ import annotations

import json
import threading
import time
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.flow_runs import resume_flow_run
from psycopg.conninfo import make_conninfo

from flows.maintenance_window import maintenance_window
from runbook.decisions.maintenance import WINDOW_ANNOTATION
from sandbox.backend_app import HEAD_REVISION, SEED_REVISION
from tests.backup_helpers import (
    clear_backups,
    databases,
    drop_databases_like,
    query,
    take_backup,
)
from tests.helpers import prefect_rest, read_artifacts, read_flow_run, start_in_thread
from tests.helpers import wait_for_paused_run as paused_run_of
from tests.release_helpers import live

pytestmark = pytest.mark.slow

APPROVE = {"approve": True, "approver": "ada", "reason": "CHG-77"}
REJECT = {"approve": False, "approver": "ada", "reason": "not tonight"}
DONE = {"operator": "linus", "what_was_done": "VACUUM FULL audit_log"}


# --- reading the systems -----------------------------------------------------------------


def backend_writes(kube) -> list[str]:
    """The backend Deployment's writes, as `annotate`/`unannotate`/`env MAINTENANCE_MODE=…`
    and `scale N` (the scale subresource)."""
    out = []
    for w in kube.writes:
        if w.kind != "Deployment" or w.name != "backend":
            continue
        if w.subresource == "scale":
            out.append(f"scale {w.body['spec']['replicas']}")
            continue
        annotations = (w.body.get("metadata") or {}).get("annotations") or {}
        if WINDOW_ANNOTATION in annotations:
            out.append("annotate" if annotations[WINDOW_ANNOTATION] else "unannotate")
            continue
        for c in w.body["spec"]["template"]["spec"]["containers"]:
            out += [f"env {v['name']}={v['value']}" for v in c.get("env") or []]
    return out


def status_page(platform) -> list[dict[str, str]]:
    return [
        n.json["incident"] for n in platform.receiver.received if n.path.startswith("/statuspage")
    ]


def silences_of(platform, run_id: UUID) -> list[dict[str, Any]]:
    return [s for s in platform.alertmanager.silences() if str(run_id) in str(s["comment"])]


def maintenance_env(kube) -> str:
    container = live(kube, "backend")["spec"]["template"]["spec"]["containers"][0]
    return next(v["value"] for v in container["env"] if v["name"] == "MAINTENANCE_MODE")


def assert_window_closed(
    platform, kube, run_id: UUID, closing: str = "resolved", inside: tuple[str, ...] = ()
) -> None:
    """Everything entering did is undone, in order, and the world says so. `inside`: the
    backend writes the work made, between entering and leaving."""
    assert backend_writes(kube) == [
        "annotate",
        "env MAINTENANCE_MODE=true",
        *inside,
        "env MAINTENANCE_MODE=false",
        "unannotate",
    ]
    assert maintenance_env(kube) == "false"
    assert WINDOW_ANNOTATION not in (live(kube, "backend")["metadata"].get("annotations") or {})
    assert [m["status"] for m in status_page(platform)] == ["scheduled", closing]
    [silence] = silences_of(platform, run_id)
    assert silence["status"]["state"] == "expired"
    assert [m["name"] for m in silence["matchers"]] == ["namespace"]


def users(platform) -> list[str]:
    return [r[0] for r in query(platform.postgres.dsn, "SELECT email FROM users ORDER BY id")]


def child_runs(run_id: UUID) -> list[str]:
    """The names of the flows a run started as subflows."""
    with get_client(sync_client=True) as prefect_api:
        runs = prefect_api.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])
            )
        )
        return [prefect_api.read_flow(r.flow_id).name for r in runs]


# --- driving a run -----------------------------------------------------------------------


def wait_paused_for(run_id: UUID, key: str, timeout: float = 60) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        state = read_flow_run(run_id).state
        if state is not None and state.is_paused() and state.state_details.pause_key == key:
            return
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} never paused for {key}")


def open_window(**parameters: Any):
    """Start a window in a thread and approve it; returns (run id, background run)."""
    run = start_in_thread(maintenance_window, **parameters)
    paused = paused_run_of("maintenance-window")
    resume_flow_run(paused.id, run_input=APPROVE)
    return paused.id, run


@pytest.fixture
def window_kube(kube):
    kube.job_delay = 0.05
    return kube


# --- the paths ---------------------------------------------------------------------------


def test_manual_window_drains_held_requests_then_closes_when_the_operator_says_done(
    platform, window_kube
):
    kube = window_kube
    run = start_in_thread(maintenance_window, reason="Vacuum the audit log", work="manual")
    paused = paused_run_of("maintenance-window")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert "MAINTENANCE_MODE=true" in plan and "Vacuum the audit log" in plan
    assert kube.writes == [] and status_page(platform) == []  # approval first

    # Two slow requests are being served when the window opens: the drain must wait them out.
    # 20 s: the window's steps before its drain once took 11 s on a loaded machine.
    platform.backend.delay_seconds["/api/v1/reports"] = 20.0
    held = [
        threading.Thread(
            target=httpx.get,
            args=(f"{platform.backend.url}/api/v1/reports",),
            kwargs={"timeout": 60},
        )
        for _ in range(2)
    ]
    for thread in held:
        thread.start()
    while platform.backend.in_flight < 2:
        time.sleep(0.01)
    resume_flow_run(paused.id, run_input=APPROVE)

    wait_paused_for(paused.id, "maintenance-work-done")
    assert platform.backend.in_flight == 0  # drained before the work starts
    annotation = json.loads(live(kube, "backend")["metadata"]["annotations"][WINDOW_ANNOTATION])
    assert annotation["openedBy"] == "ada" and annotation["reason"] == "Vacuum the audit log"
    assert annotation["flowRunId"] == str(paused.id) and annotation["deadline"].endswith("Z")
    assert maintenance_env(kube) == "true"
    [silence] = silences_of(platform, paused.id)
    assert silence["status"]["state"] == "active"
    assert httpx.get(f"{platform.backend.url}/health/ready").status_code == 503  # maintenance

    # The operator says it is done, through the API (what the UI form posts).
    with prefect_rest(_api_url()) as api:
        api.post(f"/flow_runs/{paused.id}/resume", json={"run_input": DONE}).raise_for_status()
    state = run.join()

    assert state.is_completed(), state.message
    result = state.result()
    assert result["work"] == DONE and result["health"] == "healthy"
    assert 0.5 < result["drain_seconds"] < 20  # measured: what the held requests had left
    assert_window_closed(platform, kube, paused.id)
    report = read_artifacts(paused.id)["maintenance-window"].data
    assert "VACUUM FULL audit_log" in report and "leave: remove the window annotation" in report


def test_migrations_inside_change_the_real_schema(platform, window_kube):
    run_id, run = open_window(reason="Schema upgrade", work="migrations")
    migration_run = paused_run_of("migrations")  # its own approval, as a subflow
    assert maintenance_env(window_kube) == "true"  # so `migrations` agrees to run
    resume_flow_run(migration_run.id, run_input=APPROVE)
    state = run.join()

    assert state.is_completed(), state.message
    assert state.result()["work"]["alembic_current"] == f"{HEAD_REVISION} (head)"
    assert platform.schema_revision() == HEAD_REVISION
    assert_window_closed(platform, window_kube, run_id)


def test_restore_inside_swaps_the_database_and_leaves_health_to_the_window(platform, window_kube):
    clear_backups(platform)
    try:
        backed_up = users(platform)
        backup_id = take_backup()
        before = databases(platform)
        # After the backup, the data changes: the restore must bring the backup's rows back.
        query(platform.postgres.dsn, "INSERT INTO users (email) VALUES ('late@example.com')")
        window_kube.clear_writes()
        platform.receiver.clear()

        run_id, run = open_window(reason="Restore after bad import", work="restore")
        restore_run = paused_run_of("restore")  # its own approval, as a subflow
        assert maintenance_env(window_kube) == "true"
        resume_flow_run(restore_run.id, run_input=APPROVE)
        state = run.join(180)

        assert state.is_completed(), state.message
        # The live database really was swapped: a new one with the backup's rows, the old
        # one kept under a dated name with the row added after the backup.
        assert users(platform) == backed_up
        after = databases(platform)
        assert after["complianceagent"] != before["complianceagent"]
        (kept,) = [name for name in after if name.startswith("complianceagent_pre_restore_")]
        assert after[kept] == before["complianceagent"]
        kept_dsn = make_conninfo(platform.postgres.dsn, dbname=kept)
        assert ("late@example.com",) in query(kept_dsn, "SELECT email FROM users")
        # Inside the window: the writers stopped for the swap only, and came back.
        assert_window_closed(platform, window_kube, run_id, inside=("scale 0", "scale 3"))
        # The restore completed and left health to the window: no health-check subflow of
        # its own (the backend answers 503 in maintenance), and its report says so.
        restored = read_flow_run(restore_run.id)
        assert restored.state is not None and restored.state.is_completed()
        assert child_runs(run_id) == ["restore"]  # a subflow of the window …
        assert child_runs(restore_run.id) == []  # … which started no health-check
        restore_report = read_artifacts(restore_run.id)["restore"].data
        assert f"from backup {backup_id}" in restore_report
        assert "Health not checked here (the caller checks it)." in restore_report
        assert "**Health afterwards:** not checked" in restore_report
        # The window checked health itself, after maintenance mode was off, and it passed.
        result = state.result()
        assert result["health"] == "healthy"
        assert result["work"]["previous_database"] == kept
        window_report = read_artifacts(run_id)["maintenance-window"].data
        assert "| health afterwards | healthy |" in window_report
        assert "| health check | done |" in window_report
    finally:
        clear_backups(platform)
        drop_databases_like(platform, r"complianceagent\_%")


def test_failing_inside_step_still_closes_the_window(platform, window_kube):
    with psycopg.connect(platform.postgres.dsn, autocommit=True) as db:
        db.execute("ALTER TABLE compliance_scans ADD COLUMN severity text")  # schema drift
    try:
        run_id, run = open_window(reason="Schema upgrade", work="migrations")
        resume_flow_run(paused_run_of("migrations").id, run_input=APPROVE)
        state = run.join()
    finally:
        with psycopg.connect(platform.postgres.dsn, autocommit=True) as db:
            db.execute("ALTER TABLE compliance_scans DROP COLUMN IF EXISTS severity")

    assert state.is_failed()
    assert "already exists" in state.message
    assert platform.schema_revision() == SEED_REVISION
    assert_window_closed(platform, window_kube, run_id)
    assert "not completed" in status_page(platform)[-1]["body"]


def test_rejected_inside_approval_still_closes_the_window(platform, window_kube):
    run_id, run = open_window(reason="Schema upgrade", work="migrations")
    resume_flow_run(paused_run_of("migrations").id, run_input=REJECT)
    state = run.join()

    assert state.is_failed()
    assert "rejected by ada" in state.message
    assert platform.schema_revision() == SEED_REVISION
    assert_window_closed(platform, window_kube, run_id)


def test_rejected_window_changes_nothing(platform, window_kube):
    run = start_in_thread(maintenance_window, reason="Vacuum", work="manual")
    resume_flow_run(paused_run_of("maintenance-window").id, run_input=REJECT)
    state = run.join()

    assert state.is_failed()
    assert window_kube.writes == []
    assert status_page(platform) == []


def test_the_deadline_closes_the_window_by_itself(platform, window_kube):
    run_id, run = open_window(reason="Vacuum", work="manual", duration_seconds=10)
    wait_paused_for(run_id, "maintenance-work-done")
    state = run.join(timeout=60)  # nobody answers

    assert state.is_failed()
    assert_window_closed(platform, window_kube, run_id)
    report = read_artifacts(run_id)["maintenance-window"].data
    assert "WindowDeadlinePassed" in report


def test_a_second_window_is_refused_while_one_is_open(platform, window_kube):
    run_id, run = open_window(reason="Vacuum", work="manual")
    wait_paused_for(run_id, "maintenance-work-done")
    window_kube.clear_writes()
    try:
        second = maintenance_window(reason="Another", work="manual", return_state=True)
        assert second.is_failed()
        assert "work: deployment/backend is already in a maintenance window" in second.message
        assert window_kube.writes == []
    finally:
        resume_flow_run(run_id, run_input=DONE)
        assert run.join().is_completed()


def test_a_window_approved_after_another_opened_is_refused(platform, window_kube):
    """Both ask at once (no lock is held through an approval); the one approved second
    finds the backend no longer as its plan showed and changes nothing."""
    second = start_in_thread(maintenance_window, reason="Another", work="manual")
    second_id = paused_run_of("maintenance-window").id
    first = start_in_thread(maintenance_window, reason="Vacuum", work="manual")
    give_up = time.monotonic() + 60
    while (first_id := paused_run_of("maintenance-window").id) == second_id:
        assert time.monotonic() < give_up, "the first window never asked"
        time.sleep(0.2)
    resume_flow_run(first_id, run_input=APPROVE)
    wait_paused_for(first_id, "maintenance-work-done")
    writes = len(window_kube.writes)
    try:
        resume_flow_run(second_id, run_input=APPROVE)
        state = second.join()
        assert state.is_failed()
        assert "changed since the plan was approved" in state.message
        assert "deployment/backend open window: none → yes" in state.message
        assert len(window_kube.writes) == writes  # the refused window wrote nothing
    finally:
        resume_flow_run(first_id, run_input=DONE)
    assert first.join().is_completed()
    assert_window_closed(platform, window_kube, first_id)


def test_cancelled_from_the_api_the_served_run_closes_the_window(platform, kube, served_api):
    with prefect_rest(served_api) as api:
        found = api.get("/deployments/name/maintenance-window/maintenance-window").json()
        run = (
            api.post(
                f"/deployments/{found['id']}/create_flow_run",
                json={"parameters": {"reason": "Vacuum", "work": "manual"}},
            )
            .raise_for_status()
            .json()
        )
        run_id = UUID(run["id"])
        wait_paused_for(run_id, _approval_key(), timeout=120)
        api.post(f"/flow_runs/{run_id}/resume", json={"run_input": APPROVE}).raise_for_status()
        wait_paused_for(run_id, "maintenance-work-done")

        # Cancel, as the UI's Cancel button does.
        api.post(
            f"/flow_runs/{run_id}/set_state",
            json={"state": {"type": "CANCELLING"}, "force": True},
        ).raise_for_status()
        give_up = time.monotonic() + 90
        while time.monotonic() < give_up:
            final = api.get(f"/flow_runs/{run_id}").json()["state"]
            if final["type"] in ("CANCELLED", "FAILED", "CRASHED", "COMPLETED"):
                break
            time.sleep(0.3)

    assert final["type"] == "CANCELLED", final
    assert_window_closed(platform, kube, run_id)


def _approval_key() -> str:
    from flows.maintenance_window import _plan

    return _plan("backend", "Vacuum", 1800, "manual", "latest", {}).key  # the key is the title


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())
