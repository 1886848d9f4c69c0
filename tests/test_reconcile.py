"""Reconcile against the sandbox: a runbook run SIGKILLed at a step boundary leaves its
intent recorded; reconcile puts the real systems back from it, a second reconcile does
nothing, and a live run's intent is left alone."""

from __future__ import annotations

import psycopg
import pytest
from prefect.flow_runs import resume_flow_run

from flows.backup import backup
from flows.maintenance_window import maintenance_window
from runbook.decisions.maintenance import WINDOW_ANNOTATION
from tests.backup_helpers import clear_backups, databases, drop_databases_like, query, replicas
from tests.helpers import start_in_thread, wait_for_paused_run
from tests.reconcile_helpers import (
    APPROVE,
    clear_all_intents,
    free_leaked_locks,
    reconciled,
    recorded_intent_of,
    run_until_killed,
)
from tests.release_helpers import image_of, live, wait_settled

pytestmark = pytest.mark.slow

WRITERS = ("backend", "celery-workers")


@pytest.fixture
def clean(platform, kube):
    clear_all_intents()
    yield platform
    clear_all_intents()


def maintenance_env(kube) -> str:
    container = live(kube, "backend")["spec"]["template"]["spec"]["containers"][0]
    return next(v["value"] for v in container.get("env") or [] if v["name"] == "MAINTENANCE_MODE")


def test_a_restore_killed_with_the_writers_at_zero_is_put_back(clean, kube):
    platform = clean
    clear_backups(platform)
    assert backup(return_state=True).is_completed()
    recorded = {name: replicas(platform, name) for name in WRITERS}
    before = databases(platform)
    platform.kube.clear_writes()
    try:
        run_id = run_until_killed(
            "flows.restore",
            "restore",
            "restore",
            "restore: writers stopped",
            {},
            approve=("restore",),
        )
        # The fault really happened: writers at 0, the scratch copy beside the live one.
        assert {name: replicas(platform, name) for name in WRITERS} == dict.fromkeys(WRITERS, 0)
        [_scratch] = set(databases(platform)) - set(before)
        assert recorded_intent_of(run_id).runbook == "restore"

        outcome = reconciled()

        assert outcome["reconciled"] == [str(run_id)]
        assert {name: replicas(platform, name) for name in WRITERS} == recorded
        assert databases(platform) == before  # scratch dropped, live one untouched (same oid)
        assert query(platform.postgres.dsn, "SELECT count(*) FROM users")[0][0] > 0
        assert recorded_intent_of(run_id) is None

        # Twice: nothing more is written.
        platform.kube.clear_writes()
        again = reconciled()
        assert again["changed"] == {} and again["reconciled"] == []
        assert platform.kube.writes == []
    finally:
        free_leaked_locks("database/complianceagent", *(f"deployment/{n}" for n in WRITERS))
        drop_databases_like(platform, r"complianceagent\_restore\_%")
        clear_backups(platform)


def test_a_restore_killed_while_the_live_database_refuses_connections_reopens_it(clean, kube):
    platform = clean
    clear_backups(platform)
    assert backup(return_state=True).is_completed()
    recorded = {name: replicas(platform, name) for name in WRITERS}
    before = databases(platform)
    try:
        run_until_killed(
            "flows.restore",
            "restore",
            "restore",
            "restore: connections refused",
            {},
            approve=("restore",),
        )
        with pytest.raises(psycopg.OperationalError, match="not currently accepting"):
            query(platform.postgres.dsn, "SELECT 1")

        reconciled()

        assert query(platform.postgres.dsn, "SELECT count(*) FROM users")[0][0] > 0
        assert databases(platform) == before  # no swap committed: the old database is live
        assert {name: replicas(platform, name) for name in WRITERS} == recorded
    finally:
        free_leaked_locks("database/complianceagent", *(f"deployment/{n}" for n in WRITERS))
        drop_databases_like(platform, r"complianceagent\_restore\_%")
        clear_backups(platform)


def test_a_deploy_killed_between_components_goes_back_to_its_recorded_revisions(clean, kube):
    recorded = {name: image_of(kube, name) for name in ("backend", "celery-workers", "frontend")}
    try:
        run_id = run_until_killed(
            "flows.deploy",
            "deploy",
            "deploy",
            "deploy: rolled out backend",
            {"version": "9.9.9", "components": ("backend", "frontend")},
        )
        # Half-done: the backend on the new version, the workers and frontend not.
        assert image_of(kube, "backend").endswith(":9.9.9")
        assert image_of(kube, "frontend") == recorded["frontend"]

        outcome = reconciled()

        assert outcome["reconciled"] == [str(run_id)]
        for name in recorded:
            wait_settled(kube, name)
        assert {name: image_of(kube, name) for name in recorded} == recorded
        kube.clear_writes()
        assert reconciled()["changed"] == {}
        assert kube.writes == []
    finally:
        free_leaked_locks(*(f"deployment/{n}" for n in recorded))


def test_a_maintenance_window_killed_open_is_closed(clean, kube):
    platform = clean
    try:
        run_id = run_until_killed(
            "flows.maintenance_window",
            "maintenance_window",
            "maintenance-window",
            "maintenance-window: maintenance mode on",
            {"reason": "killed mid-window", "duration_seconds": 600},
            approve=("maintenance-window",),
        )
        assert maintenance_env(kube) == "true"

        outcome = reconciled()

        assert outcome["reconciled"] == [str(run_id)]
        assert maintenance_env(kube) == "false"
        assert WINDOW_ANNOTATION not in (live(kube, "backend")["metadata"].get("annotations") or {})
        chat = [n.json["text"] for n in platform.receiver.received if n.path.startswith("/slack")]
        assert any(str(run_id) in text and "MAINTENANCE_MODE=false" in text for text in chat)
    finally:
        free_leaked_locks("deployment/backend")


def test_a_live_runs_intent_is_left_alone(clean, kube):
    # A manual window, approved: it recorded its intent and waits (Paused) for the operator.
    run = start_in_thread(maintenance_window, reason="live window", duration_seconds=120)
    resume_flow_run(wait_for_paused_run("maintenance-window").id, run_input=APPROVE)
    paused = wait_for_paused_run("maintenance-window")
    assert recorded_intent_of(paused.id) is not None
    kube.clear_writes()

    outcome = reconciled()

    assert (
        "Paused" in outcome["left"][str(paused.id)] or "PAUSED" in outcome["left"][str(paused.id)]
    )
    assert kube.writes == [] and maintenance_env(kube) == "true"

    resume_flow_run(paused.id, run_input={"operator": "linus", "what_was_done": "nothing"})
    assert run.join(120).is_completed()
    assert recorded_intent_of(paused.id) is None  # cleared by the run itself
    assert maintenance_env(kube) == "false"
