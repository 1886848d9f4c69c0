"""A lost node: a runbook run whose process vanished without anyone marking it Crashed
stays Running; its heartbeats stop. Reconcile marks it Crashed through the API (saying
why) and puts the platform back; a live run that keeps sending heartbeats is left alone.
A dead run's locks are free as soon as reconcile has put its targets back; a live run's
lock stays held.

The runs send heartbeats every 30 s (Prefect's minimum) as served runs do; reconcile
judges with a 40 s timeout, so a live run's last heartbeat is always younger and a dead
run's becomes older 40 s after its last one.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import Posture
from prefect.flow_runs import resume_flow_run

from deployments.catalog import deployment_triggers, load_catalog
from runbook.settings import PlatformSettings
from tasks.intent import read_last_heartbeats
from tasks.locks import exclusive, list_lease_records
from tests.helpers import read_flow_run, start_in_thread, wait_for_paused_run
from tests.reconcile_helpers import (
    APPROVE,
    HEARTBEATS,
    clear_all_intents,
    free_leaked_locks,
    held_locks,
    reconciled,
    recorded_intent_of,
    run_until_killed,
    start_in_process,
)
from tests.release_helpers import image_of, wait_settled

pytestmark = pytest.mark.slow

TIMEOUT_SECONDS = 40
COMPONENTS = ("backend", "celery-workers", "frontend")


@pytest.fixture
def clean(platform, kube, monkeypatch):
    monkeypatch.setenv("RUNBOOK_HEARTBEAT_TIMEOUT_SECONDS", str(TIMEOUT_SECONDS))
    clear_all_intents()
    yield platform
    clear_all_intents()


def last_heartbeat(run_id: UUID, timeout: float = 60) -> dt.datetime:
    """The run's last heartbeat, once the server has stored one (events land
    asynchronously)."""
    give_up = time.monotonic() + timeout
    while (beat := read_last_heartbeats.fn([str(run_id)])[str(run_id)]) is None:
        assert time.monotonic() < give_up, f"run {run_id} never sent a heartbeat"
        time.sleep(0.5)
    return beat


def wait_until_silent_for(run_id: UUID, seconds: float) -> None:
    """Wait until the run's last stored heartbeat is `seconds` old (the condition reconcile
    judges; a dead run sends no newer one)."""
    give_up = time.monotonic() + seconds + 60
    while dt.datetime.now(dt.UTC) - last_heartbeat(run_id) < dt.timedelta(seconds=seconds):
        assert time.monotonic() < give_up, f"run {run_id} kept sending heartbeats"
        time.sleep(0.5)


def lock_taken_at_once(*targets: str) -> bool:
    """Each target's lock can be taken within seconds (a held lease would make us wait for
    its expiry, minutes away; a busy machine can take more than one to answer)."""
    try:
        for target in targets:
            with exclusive(target, wait_seconds=10):
                pass
    except TimeoutError:
        return False
    return True


def test_a_run_whose_node_was_lost_is_marked_crashed_and_put_back(clean, kube):
    recorded = {name: image_of(kube, name) for name in COMPONENTS}
    locks = tuple(f"deployment/{n}" for n in COMPONENTS)
    try:
        run_id = run_until_killed(
            "flows.deploy",
            "deploy",
            "deploy",
            "deploy: rolled out backend",
            {"version": "9.9.9", "components": ("backend", "frontend")},
            crashed=False,
            **HEARTBEATS,
        )
        # The process is gone, yet Prefect still shows the run Running, half-done.
        assert read_flow_run(run_id).state.type.value == "RUNNING"
        assert image_of(kube, "backend").endswith(":9.9.9")
        wait_until_silent_for(run_id, TIMEOUT_SECONDS)

        outcome = reconciled()

        assert list(outcome["marked_crashed"]) == [str(run_id)]
        state = read_flow_run(run_id).state
        assert state.type.value == "CRASHED"
        assert "no heartbeat for" in state.message
        assert "Marked Crashed by reconcile" in state.message
        assert outcome["reconciled"] == [str(run_id)]
        for name in COMPONENTS:
            wait_settled(kube, name)
        assert {name: image_of(kube, name) for name in COMPONENTS} == recorded
        assert recorded_intent_of(run_id) is None
        chat = [n.json["text"] for n in clean.receiver.received if n.path.startswith("/slack")]
        assert any(f"run {run_id} marked Crashed" in text for text in chat)
        # Its locks were freed by that same reconcile: the next deploy need not wait.
        assert "deployment/backend (run " + str(run_id) + ")" in outcome["freed_locks"]
        assert lock_taken_at_once(*locks)
        assert [r for r in list_lease_records.fn() if r.run_id == str(run_id)] == []
    finally:
        free_leaked_locks(*locks)


def test_a_sigkilled_runs_lock_is_free_after_one_reconcile(clean, kube):
    try:
        run_id = run_until_killed(
            "flows.scale",
            "scale",
            "scale",
            "scale: scaled",
            {"deployment": "backend", "replicas": 4},
        )
        assert not lock_taken_at_once("deployment/backend")  # the dead run's lease holds it

        outcome = reconciled()

        assert outcome["freed_locks"] == [f"deployment/backend (run {run_id})"]
        assert lock_taken_at_once("deployment/backend")
    finally:
        free_leaked_locks("deployment/backend")


HOLDING = threading.Event()
LET_GO = threading.Event()


@flow(name="holds-a-lock")
def holds_a_lock() -> None:
    with exclusive("deployment/lock-probe"):
        HOLDING.set()
        LET_GO.wait(60)


def test_a_live_runs_lock_is_never_freed(clean):
    HOLDING.clear()
    LET_GO.clear()
    run = start_in_thread(holds_a_lock)
    try:
        assert HOLDING.wait(60)
        [held] = [r for r in list_lease_records.fn() if r.target == "deployment/lock-probe"]

        outcome = reconciled()

        assert outcome["freed_locks"] == []
        assert held_locks(("deployment/lock-probe",)) == ["deployment/lock-probe"]
        assert held in list_lease_records.fn()
    finally:
        LET_GO.set()
    assert run.join(60).is_completed()
    # Released by its run, the record goes with it.
    assert held not in list_lease_records.fn()
    assert lock_taken_at_once("deployment/lock-probe")


def test_a_live_run_with_fresh_heartbeats_is_left_alone(clean, kube):
    # A manual window, approved, waiting (Paused) for the operator: its process is alive.
    process = start_in_process(
        "flows.maintenance_window",
        "maintenance_window",
        {"reason": "live window", "duration_seconds": 300},
        **HEARTBEATS,
    )
    try:
        resume_flow_run(wait_for_paused_run("maintenance-window", 120).id, run_input=APPROVE)
        paused = wait_for_paused_run("maintenance-window", 120)
        assert recorded_intent_of(paused.id) is not None
        last_heartbeat(paused.id)  # it does send heartbeats: their absence is not why
        kube.clear_writes()

        outcome = reconciled()

        assert outcome["marked_crashed"] == {}
        assert str(paused.id) in outcome["left"]
        assert read_flow_run(paused.id).state.type.value == "PAUSED"
        assert kube.writes == []

        resume_flow_run(paused.id, run_input={"operator": "linus", "what_was_done": "nothing"})
        assert process.wait(timeout=120) == 0
        assert read_flow_run(paused.id).state.type.value == "COMPLETED"
    finally:
        if process.poll() is None:
            process.kill()
            free_leaked_locks("deployment/backend")


def _heartbeat_trigger():
    [spec] = [s for s in load_catalog() if s.name == "reconcile"]
    [trigger] = [t for t in deployment_triggers(spec) if t.posture == Posture.Proactive]
    return trigger


def test_prefect_yaml_starts_reconcile_when_a_runbook_run_stops_sending_heartbeats():
    trigger = _heartbeat_trigger()
    # Prefect's zombie-run pattern: after a heartbeat, expect another or a final state.
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {
        "prefect.flow-run.heartbeat",
        *(f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Crashed", "Cancelled")),
    }
    assert trigger.for_each == {"prefect.resource.id"}  # one watch per run
    assert trigger.match.root["prefect.resource.id"] == "prefect.flow-run.*"
    assert trigger.match_related.root["prefect.resource.id"] == "prefect.tag.runbook"
    # Longer than a heartbeat's period, and not shorter than reconcile's own verdict:
    # else reconcile would start, find the run not yet silent enough, and not come back.
    within = trigger.within.total_seconds()
    assert within > 2 * int(HEARTBEATS["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    default = PlatformSettings.model_fields["heartbeat_timeout_seconds"].default
    assert default <= within


def test_the_heartbeat_trigger_is_a_valid_proactive_automation_on_the_server(prefect_server):
    trigger = _heartbeat_trigger()
    with get_client(sync_client=True) as prefect_api:
        flow_id = prefect_api.create_flow_from_name("reconcile")
        deployment_id = prefect_api.create_deployment(flow_id=flow_id, name="trigger-check")
        trigger.set_deployment_id(deployment_id)
        automation_id = prefect_api.create_automation(trigger.as_automation())
        try:
            stored = prefect_api.read_automation(automation_id)
            assert stored.trigger.posture == Posture.Proactive
            assert stored.trigger.within == dt.timedelta(seconds=90)
            [action] = stored.actions
            assert action.type == "run-deployment" and action.deployment_id == deployment_id
        finally:
            prefect_api.delete_automation(automation_id)
            prefect_api.delete_deployment(deployment_id)
