"""The approval gate, end to end on the real Prefect server and the Kubernetes emulator:
an approved plan is carried out; a rejected, timed-out or never-decided one writes nothing."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.flow_runs import resume_flow_run

from tasks.approval import Plan, request_approval
from tasks.kubernetes import scale_deployment
from tests.helpers import read_artifacts, read_flow_run, start_in_thread, wait_for_paused_run

pytestmark = pytest.mark.slow


@flow(name="approval-probe")
def scale_workers_with_approval(replicas: int) -> int:
    plan = Plan(
        title=f"Scale celery-workers to {replicas}",
        target="deployment/celery-workers",
        steps=(f"kubectl scale deployment/celery-workers --replicas={replicas}",),
        facts={"current replicas": "4", "target replicas": str(replicas)},
    )
    request_approval(plan)
    return scale_deployment("celery-workers", replicas)


def _scale_writes(platform):
    return [w for w in platform.kube.writes if w.name == "celery-workers"]


@pytest.fixture
def workers_count_restored(platform):
    """`platform.reset()` leaves Deployments alone: put the workers' count back."""
    before = platform.kube.get("apps/v1", "Deployment", "complianceagent", "celery-workers")
    yield
    scale_deployment.fn("celery-workers", before["spec"]["replicas"])


def test_approved_plan_is_carried_out(platform, workers_count_restored):
    run = start_in_thread(scale_workers_with_approval, replicas=3)
    paused = wait_for_paused_run("approval-probe")
    artifacts = read_artifacts(paused.id)
    assert "Scale celery-workers to 3" in artifacts["approval-plan"].data
    assert _scale_writes(platform) == []  # nothing before the decision

    resume_flow_run(paused.id, run_input={"approve": True, "approver": "alice", "reason": "CHG-1"})
    state = run.join()

    assert state.is_completed(), state.message
    writes = _scale_writes(platform)
    assert [(w.method, w.subresource, w.body) for w in writes] == [
        ("PATCH", "scale", {"spec": {"replicas": 3}})
    ]
    decision = read_artifacts(paused.id)["approval-approved"].data
    assert "alice" in decision and "CHG-1" in decision


def test_rejected_plan_writes_nothing(platform):
    run = start_in_thread(scale_workers_with_approval, replicas=0)
    paused = wait_for_paused_run("approval-probe")

    resume_flow_run(paused.id, run_input={"approve": False, "approver": "bob", "reason": "peak"})
    state = run.join()

    assert state.is_failed()
    assert "rejected by bob: peak; nothing was changed" in state.message
    assert platform.kube.writes == []
    assert "bob" in read_artifacts(paused.id)["approval-rejected"].data


def test_timed_out_plan_writes_nothing_and_notifies(platform, monkeypatch):
    monkeypatch.setenv("RUNBOOK_APPROVAL_TIMEOUT_SECONDS", "5")
    state = scale_workers_with_approval(replicas=1, return_state=True)

    assert state.is_failed()
    assert "No decision on 'Scale celery-workers to 1' within 5s" in state.message
    assert "nothing was changed" in read_flow_run(state.state_details.flow_run_id).state.message
    assert platform.kube.writes == []
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"), timeout=10)
    assert "nothing was changed" in chat.json["text"]


@pytest.mark.parametrize(
    "bad_input",
    [
        {},
        {"approve": True},
        {"approve": "maybe", "approver": "eve", "reason": "x"},
        {"approve": True, "approver": "", "reason": "x"},
    ],
    ids=["empty", "missing-fields", "wrong-type", "blank-approver"],
)
def test_malformed_resume_is_refused_and_run_stays_paused(platform, bad_input):
    run = start_in_thread(scale_workers_with_approval, replicas=2)
    paused = wait_for_paused_run("approval-probe")

    with pytest.raises(RuntimeError, match="Cannot resume this run"):
        resume_flow_run(paused.id, run_input=bad_input)
    assert wait_for_paused_run("approval-probe").id == paused.id
    assert platform.kube.writes == []

    # A proper decision still goes through afterwards.
    resume_flow_run(paused.id, run_input={"approve": False, "approver": "eve", "reason": "test"})
    assert run.join().is_failed()
    assert platform.kube.writes == []


@flow(name="approval-by-tag-probe")
def approve_a_probe() -> str:
    decision = request_approval(Plan(title="Probe", target="nothing", steps=("nothing",)))
    return decision.approver


def test_requester_from_a_proxys_tag_cannot_approve_and_is_recorded(platform):
    """An authenticating proxy stamps `requested-by:<user>` on the runs it creates."""
    from prefect import tags

    def started_through_the_proxy(return_state: bool):
        with tags("requested-by:carol"):  # run tags live in the starting thread's context
            return approve_a_probe(return_state=return_state)

    run = start_in_thread(started_through_the_proxy)
    paused = wait_for_paused_run("approval-by-tag-probe")
    assert "carol (from the proxy tag)" in read_artifacts(paused.id)["approval-plan"].data

    resume_flow_run(paused.id, run_input={"approve": True, "approver": "@carol", "reason": "x"})
    assert wait_for_paused_run("approval-by-tag-probe").id == paused.id
    resume_flow_run(paused.id, run_input={"approve": True, "approver": "dave", "reason": "y"})

    state = run.join()
    assert state.is_completed(), state.message
    assert state.result() == "dave"


def test_unknown_requester_is_recorded_as_unknown(platform):
    run = start_in_thread(approve_a_probe)
    paused = wait_for_paused_run("approval-by-tag-probe")
    assert "unknown (no identity on this run)" in read_artifacts(paused.id)["approval-plan"].data
    resume_flow_run(paused.id, run_input={"approve": False, "approver": "erin", "reason": "z"})
    assert run.join().is_failed()
