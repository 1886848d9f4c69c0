"""The scale and autoscale runbooks against the Kubernetes emulator."""

from __future__ import annotations

import pytest
from prefect.exceptions import ParameterTypeError
from prefect.flow_runs import resume_flow_run

from flows.scale import autoscale, scale
from tasks import kubernetes as k8s
from tests.helpers import read_artifacts, start_in_thread, wait_for_paused_run
from tests.release_helpers import NS, kinds_of, live


def replicas_of(kube, name):
    return live(kube, name)["spec"]["replicas"]


def hpa(kube, name):
    return kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, name)


def test_scale_within_bounds_needs_no_approval(platform, kube):
    current = replicas_of(kube, "celery-workers")
    target = current + 3

    state = scale(deployment="celery-workers", replicas=target, return_state=True)

    assert state.is_completed(), state.message
    assert replicas_of(kube, "celery-workers") == target
    assert [(w.name, w.subresource, w.body) for w in kube.writes] == [
        ("celery-workers", "scale", {"spec": {"replicas": target}})
    ]
    status = live(kube, "celery-workers")["status"]
    assert status["availableReplicas"] == target  # waited for the new replicas
    report = read_artifacts(state.state_details.flow_run_id)["scale-report"].data
    assert f"scaled from {current} to {target} replicas" in report


def test_scale_to_the_current_count_writes_nothing(platform, kube):
    state = scale(deployment="frontend", replicas=replicas_of(kube, "frontend"), return_state=True)
    assert state.is_completed(), state.message
    assert kube.writes == []


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"deployment": "backend", "replicas": -1}, "replicas"),
        ({"deployment": "backend", "replicas": 31}, "replicas"),
        ({"deployment": "backend", "replicas": "five"}, "replicas"),
        ({"deployment": "postgres", "replicas": 2}, "deployment"),
    ],
)
def test_bad_input_is_refused_before_any_write(platform, kube, parameters, field):
    with pytest.raises(ParameterTypeError, match=field):
        scale(**parameters)
    assert kube.writes == []


@pytest.mark.parametrize(("name", "replicas"), [("backend", 21), ("frontend", 11)])
def test_above_the_components_ceiling_is_refused_naming_replicas(platform, kube, name, replicas):
    state = scale(deployment=name, replicas=replicas, return_state=True)

    assert state.is_failed()
    assert f"replicas: {replicas} is above the ceiling" in state.message
    assert kube.writes == []


def test_below_the_floor_needs_approval_and_a_rejection_writes_nothing(platform, kube):
    run = start_in_thread(scale, deployment="backend", replicas=1)
    paused = wait_for_paused_run("scale")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert "1 is below the floor of 2 for backend" in plan

    resume_flow_run(paused.id, run_input={"approve": False, "approver": "e", "reason": "no"})
    state = run.join()

    assert state.is_failed()
    assert kube.writes == []


def test_scaling_to_zero_is_carried_out_once_approved(platform, kube):
    run = start_in_thread(scale, deployment="frontend", replicas=0)
    paused = wait_for_paused_run("scale")
    assert "scaling frontend to 0 takes it down" in read_artifacts(paused.id)["approval-plan"].data

    resume_flow_run(paused.id, run_input={"approve": True, "approver": "f", "reason": "CHG-9"})
    state = run.join()

    assert state.is_completed(), state.message
    assert replicas_of(kube, "frontend") == 0
    assert kinds_of(kube.writes) == ["scale"]


def test_scaling_to_zero_approved_after_the_count_changed_is_refused(platform, kube):
    before = replicas_of(kube, "frontend")
    run = start_in_thread(scale, deployment="frontend", replicas=0)
    paused = wait_for_paused_run("scale")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert f"deployment/frontend replicas = {before}" in plan
    k8s.scale_deployment.fn("frontend", before + 2)  # scaled up while the plan waits
    kube.clear_writes()

    resume_flow_run(paused.id, run_input={"approve": True, "approver": "f", "reason": "CHG-9"})
    state = run.join()

    assert state.is_failed()
    assert "changed since the plan was approved" in state.message
    assert f"deployment/frontend replicas: {before} → {before + 2}" in state.message
    assert kube.writes == []
    assert replicas_of(kube, "frontend") == before + 2


def test_transient_5xx_on_scale_is_retried(platform, kube):
    current = replicas_of(kube, "celery-workers")
    kube.inject_fault("PATCH", r"/deployments/celery-workers/scale$", status=503, times=2)

    state = scale(deployment="celery-workers", replicas=current + 1, return_state=True)

    assert state.is_completed(), state.message
    assert [w.status for w in kube.writes] == [200]
    assert replicas_of(kube, "celery-workers") == current + 1


def test_unknown_deployment_fails_at_once_with_no_writes(platform, kube, monkeypatch):
    monkeypatch.setenv("RUNBOOK_WORKERS_DEPLOYMENT", "ghost-workers")

    state = scale(deployment="celery-workers", replicas=3, return_state=True)

    assert state.is_failed()
    assert "deployment/ghost-workers" in state.message and "404" in state.message
    assert kube.writes == []


# --- the HorizontalPodAutoscaler -------------------------------------------------------------


def test_hpa_is_created_as_the_runbook_says_and_a_second_apply_changes_nothing(platform, kube):
    # celery-workers has no HPA in the sandbox: this test makes and owns it.
    state = autoscale(deployment="celery-workers", min_replicas=2, max_replicas=20)

    assert state["changed"] == ["scaleTargetRef", "minReplicas", "maxReplicas", "metrics"]
    assert [(w.method, w.kind) for w in kube.writes] == [("POST", "HorizontalPodAutoscaler")]
    created = hpa(kube, "celery-workers-hpa")
    assert created["spec"]["scaleTargetRef"]["name"] == "celery-workers"
    assert (created["spec"]["minReplicas"], created["spec"]["maxReplicas"]) == (2, 20)
    metric = created["spec"]["metrics"][0]["resource"]
    assert metric == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}

    kube.clear_writes()
    again = autoscale(deployment="celery-workers", min_replicas=2, max_replicas=20)

    assert again["changed"] == []
    assert kube.writes == []  # nothing written the second time
    same = hpa(kube, "celery-workers-hpa")
    assert same["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_hpa_change_is_applied_in_place(platform, kube):
    autoscale()  # the runbook's backend HPA, created or already there
    before = hpa(kube, "backend-hpa")
    kube.clear_writes()

    changed = autoscale(max_replicas=12)
    try:
        assert changed["changed"] == ["maxReplicas"]
        assert [w.method for w in kube.writes] == ["PUT"]
        after = hpa(kube, "backend-hpa")
        assert after["metadata"]["uid"] == before["metadata"]["uid"]
        assert after["spec"]["maxReplicas"] == 12
    finally:
        autoscale()  # back to the runbook's 2-20
    assert k8s.read_horizontal_pod_autoscaler.fn("backend-hpa")["spec"]["maxReplicas"] == 20


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"min_replicas": 1}, "min_replicas"),
        ({"max_replicas": 25}, "max_replicas"),
        ({"min_replicas": 10, "max_replicas": 5}, "min_replicas"),
    ],
)
def test_hpa_out_of_bounds_is_refused_before_any_call(platform, kube, parameters, field):
    state = autoscale(**parameters, return_state=True)
    assert state.is_failed()
    assert state.message.split(": ", 1)[1].startswith(f"Refused: {field}:")
    assert kube.writes == []


def test_lowering_an_autoscaler_in_production_waits_for_another_persons_approval(
    platform, kube, monkeypatch
):
    autoscale()  # the runbook's backend HPA, 2-20
    kube.clear_writes()
    monkeypatch.setenv("RUNBOOK_ENVIRONMENT", "production")

    run = start_in_thread(autoscale, max_replicas=8, requested_by="alice")
    paused = wait_for_paused_run("autoscale")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert "lowers the ceiling 20 → 8 in production" in plan
    assert "alice (from the parameter)" in plan
    assert kube.writes == []  # nothing before the decision

    # The requester approving their own change is refused; the run waits for someone else.
    resume_flow_run(paused.id, run_input={"approve": True, "approver": "Alice", "reason": "x"})
    again = wait_for_paused_run("autoscale")
    assert again.id == paused.id
    assert kube.writes == []
    refusal = read_artifacts(paused.id)["approval-refused-self-approval"].data
    assert "Alice requested this run" in refusal

    resume_flow_run(paused.id, run_input={"approve": True, "approver": "bob", "reason": "CHG-7"})
    try:
        state = run.join()
        assert state.is_completed(), state.message
        assert [w.method for w in kube.writes] == ["PUT"]
        assert hpa(kube, "backend-hpa")["spec"]["maxReplicas"] == 8
        decision = read_artifacts(paused.id)["approval-approved"].data
        assert "bob" in decision and "alice (from the parameter)" in decision
    finally:
        monkeypatch.setenv("RUNBOOK_ENVIRONMENT", "sandbox")
        autoscale()  # back to 2-20: raising needs no approval
    assert hpa(kube, "backend-hpa")["spec"]["maxReplicas"] == 20


def test_raising_an_autoscaler_in_production_needs_no_approval(platform, kube, monkeypatch):
    autoscale(max_replicas=12)
    kube.clear_writes()
    monkeypatch.setenv("RUNBOOK_ENVIRONMENT", "production")
    try:
        assert autoscale()["changed"] == ["maxReplicas"]  # 12 -> 20: no pause
        assert [w.method for w in kube.writes] == ["PUT"]
    finally:
        monkeypatch.setenv("RUNBOOK_ENVIRONMENT", "sandbox")
        autoscale()
