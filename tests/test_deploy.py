"""The deploy runbook against the Kubernetes emulator, the backend stand-in and a real
Prefect server: each test asserts the emulator's recorded writes and the final state."""

from __future__ import annotations

import re
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.exceptions import ParameterTypeError
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL

from flows.deploy import deploy
from tasks.locks import lock_name
from tests.helpers import prefect_rest, read_artifacts, start_in_thread, wait_for_paused_run
from tests.release_helpers import (
    deployment_writes,
    image_of,
    kinds_of,
    revision_of,
    wait_until,
)

APPROVE = {"approve": True, "approver": "alice", "reason": "CHG-7"}
REJECT = {"approve": False, "approver": "bob", "reason": "not tonight"}


def repository(kube, name):
    return image_of(kube, name).rsplit(":", 1)[0]


@pytest.mark.slow
def test_deploy_updates_backend_workers_and_frontend_and_reports(platform, kube):
    before = {n: (image_of(kube, n), revision_of(kube, n)) for n in ("backend", "frontend")}

    state = deploy(version="2.0.0", return_state=True)

    assert state.is_completed(), state.message
    for name in ("backend", "celery-workers", "frontend"):
        assert image_of(kube, name).endswith(":2.0.0")
    assert image_of(kube, "celery-workers") == image_of(kube, "backend")  # workers follow
    # One `set image` per Deployment, backend first, frontend last; nothing else.
    assert [(w.name, w.method, w.status) for w in kube.writes] == [
        ("backend", "PATCH", 200),
        ("celery-workers", "PATCH", 200),
        ("frontend", "PATCH", 200),
    ]
    assert kinds_of(kube.writes) == ["set-image"] * 3
    report = read_artifacts(state.state_details.flow_run_id)["deploy-report"].data
    assert f"| backend | backend | {before['backend'][0]} | complianceagent/backend:2.0.0 |" in (
        report
    )
    assert f"| {before['backend'][1]} | {before['backend'][1] + 1} |" in report
    assert "### Steps" in report and "verify health" in report
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "Deployed 2.0.0" in chat.json["text"]


def run_logs(run_name: str) -> str:
    """Everything the named flow run has logged so far."""
    with get_client(sync_client=True) as prefect_api:
        runs = prefect_api.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name]))
        )
        if not runs:
            return ""
        logs = prefect_api.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs]))
        )
    return "\n".join(log.message for log in logs)


def test_a_chat_outage_does_not_fail_a_good_deploy(platform, kube):
    platform.receiver.fail_next(times=10, status=503)  # more than the retries

    state = deploy(version="2.9.0", components=["frontend"], return_state=True)

    assert state.is_completed(), state.message
    assert image_of(kube, "frontend").endswith(":2.9.0")
    assert kinds_of(kube.writes) == ["set-image"]
    chat = [n for n in platform.receiver.received if n.path.startswith("/slack")]
    assert [n.status for n in chat] == [503] * 4  # chat really was down: 1 try + 3 retries
    assert "Deployed 2.9.0" in chat[0].json["text"]


def test_a_chat_outage_does_not_hide_why_a_deploy_failed(platform, kube):
    recorded = image_of(kube, "frontend")
    kube.fail_rollouts_for_image(":bad-again")
    platform.receiver.fail_next(times=10, status=503)

    state = deploy(version="bad-again", components=["frontend"], return_state=True)

    assert state.is_failed()
    assert "Deploy of bad-again failed and was rolled back" in state.message
    assert "progress deadline exceeded" in state.message
    assert "chat" not in state.message and "503" not in state.message
    assert image_of(kube, "frontend") == recorded
    assert kinds_of(kube.writes) == ["set-image", "restore"]
    chat = [n for n in platform.receiver.received if n.path.startswith("/slack")]
    assert chat and {n.status for n in chat} == {503}
    assert "Deploy of bad-again failed" in chat[0].json["text"]


def test_failed_rollout_rolls_back_to_the_recorded_revision(platform, kube):
    recorded = image_of(kube, "frontend")
    kube.fail_rollouts_for_image(":bad")

    state = deploy(version="bad", components=["frontend"], return_state=True)

    assert state.is_failed()
    assert "rollout of deployment/frontend failed: progress deadline exceeded" in state.message
    assert "was rolled back" in state.message
    assert image_of(kube, "frontend") == recorded
    assert kinds_of(deployment_writes(kube, "frontend")) == ["set-image", "restore"]
    assert {w.name for w in kube.writes} == {"frontend"}  # the backend was not touched
    restore = deployment_writes(kube, "frontend")[1].body
    assert restore[0]["value"]["spec"]["containers"][0]["image"] == recorded
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "Deploy of bad failed and was rolled back" in chat.json["text"]


def test_the_sandbox_drill_version_fails_and_is_rolled_back(platform, kube):
    # What the README tells a newcomer to try: a version ending in -broken never gets ready.
    recorded = image_of(kube, "frontend")

    state = deploy(version="1.5.0-broken", components=["frontend"], return_state=True)

    assert state.is_failed()
    assert "progress deadline exceeded" in state.message
    assert image_of(kube, "frontend") == recorded
    assert kinds_of(deployment_writes(kube, "frontend")) == ["set-image", "restore"]


@pytest.mark.slow
def test_a_later_failure_rolls_back_every_component_already_updated(platform, kube):
    recorded = {n: image_of(kube, n) for n in ("backend", "celery-workers", "frontend")}
    kube.fail_rollouts_for_image("frontend:2.1.0")  # backend and workers roll out fine

    state = deploy(version="2.1.0", return_state=True)

    assert state.is_failed()
    assert {n: image_of(kube, n) for n in recorded} == recorded
    # Set in rollout order, undone in reverse.
    writes = kube.writes
    assert list(zip([w.name for w in writes], kinds_of(writes), strict=True)) == [
        ("backend", "set-image"),
        ("celery-workers", "set-image"),
        ("frontend", "set-image"),
        ("frontend", "restore"),
        ("celery-workers", "restore"),
        ("backend", "restore"),
    ]


@pytest.mark.slow
def test_failed_health_after_a_good_rollout_rolls_back_and_health_recovers(platform, kube):
    recorded = image_of(kube, "backend")
    # The new backend image is broken: while it runs, /health and /health/ready say 503.
    platform.backend.maintenance_mode = lambda: image_of(kube, "backend").endswith(":2.2.0")
    try:
        state = deploy(version="2.2.0", components=["backend"], return_state=True)
    finally:
        platform.backend.maintenance_mode = platform._backend_in_maintenance

    assert state.is_failed()
    assert "health check failed" in state.message and "/health (API): HTTP 503" in state.message
    assert "After the rollback: all health checks passed" in state.message
    assert image_of(kube, "backend") == recorded
    assert image_of(kube, "celery-workers") == recorded
    assert kinds_of(deployment_writes(kube, "backend")) == ["set-image", "restore"]
    assert kinds_of(deployment_writes(kube, "celery-workers")) == ["set-image", "restore"]


def test_transient_5xx_is_retried_and_the_deploy_succeeds(platform, kube):
    kube.inject_fault("PATCH", r"/deployments/frontend$", status=503, times=2)

    state = deploy(version="2.3.0", components=["frontend"], return_state=True)

    assert state.is_completed(), state.message
    assert [(w.name, w.status) for w in kube.writes] == [("frontend", 200)]  # faults: no effect
    assert image_of(kube, "frontend") == f"{repository(kube, 'frontend')}:2.3.0"


def test_unknown_deployment_fails_at_once_with_no_writes(platform, kube, monkeypatch):
    monkeypatch.setenv("RUNBOOK_FRONTEND_DEPLOYMENT", "no-such-frontend")
    started = time.monotonic()

    state = deploy(version="2.4.0", components=["frontend"], return_state=True)

    assert state.is_failed()
    assert "read deployment/no-such-frontend in complianceagent: 404" in state.message
    assert time.monotonic() - started < 10  # not retried
    assert kube.writes == []


@pytest.mark.parametrize("bad", ["", "1.5.0; rm -rf /", "-rc1", "x" * 129, "v 1"])
def test_bad_version_is_refused_before_anything(platform, kube, bad):
    with pytest.raises(ParameterTypeError, match="version"):
        deploy(version=bad)
    assert kube.writes == []


def test_same_version_again_changes_nothing(platform, kube):
    current = image_of(kube, "frontend").rsplit(":", 1)[1]

    state = deploy(version=current, components=["frontend"], return_state=True)

    assert state.is_completed(), state.message
    assert kube.writes == []
    report = read_artifacts(state.state_details.flow_run_id)["deploy-report"].data
    assert "nothing to do" in report


@pytest.mark.slow
def test_production_asks_for_approval_and_a_rejection_writes_nothing(platform, kube, monkeypatch):
    monkeypatch.setenv("RUNBOOK_ENVIRONMENT", "production")
    run = start_in_thread(deploy, version="2.5.0", components=["frontend"])
    paused = wait_for_paused_run("deploy")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert f"{image_of(kube, 'frontend')} (revision {revision_of(kube, 'frontend')})" in plan
    assert "complianceagent/frontend:2.5.0" in plan

    resume_flow_run(paused.id, run_input=REJECT)
    state = run.join()

    assert state.is_failed()
    assert "rejected by bob" in state.message
    assert kube.writes == []


@pytest.mark.slow
def test_approved_deploy_is_carried_out(platform, kube):
    run = start_in_thread(deploy, version="2.6.0", components=["frontend"], require_approval=True)
    paused = wait_for_paused_run("deploy")
    assert kube.writes == []

    resume_flow_run(paused.id, run_input=APPROVE)
    state = run.join()

    assert state.is_completed(), state.message
    assert image_of(kube, "frontend").endswith(":2.6.0")
    assert kinds_of(kube.writes) == ["set-image"]


@pytest.mark.slow
def test_the_person_who_asked_for_a_deploy_cannot_approve_it(platform, kube):
    run = start_in_thread(
        deploy,
        version="2.6.1",
        components=["frontend"],
        require_approval=True,
        requested_by="carol",
    )
    paused = wait_for_paused_run("deploy")
    assert "carol (from the parameter)" in read_artifacts(paused.id)["approval-plan"].data

    resume_flow_run(paused.id, run_input={"approve": True, "approver": "Carol", "reason": "x"})
    assert wait_for_paused_run("deploy").id == paused.id  # refused: still waiting
    assert "Carol requested this run" in (
        read_artifacts(paused.id)["approval-refused-self-approval"].data
    )
    assert kube.writes == []

    resume_flow_run(paused.id, run_input=APPROVE)
    state = run.join()
    assert state.is_completed(), state.message
    assert image_of(kube, "frontend").endswith(":2.6.1")


@pytest.mark.slow
def test_two_deploys_of_the_same_component_never_interleave(platform, kube):
    kube.rollout_delay = 3  # the first holds the lock through a rollout that takes a while
    first = start_in_thread(deploy, version="2.7.0", components=["frontend"])
    wait_until(lambda: len(deployment_writes(kube, "frontend")) == 1, "the first run's write")
    second = start_in_thread(deploy, version="2.8.0", components=["frontend"])
    waiting = f"Taking lock {lock_name('deployment/frontend')}"
    wait_until(lambda: waiting in run_logs("deploy-2.8.0-frontend"), "the second run took the lock")
    assert len(deployment_writes(kube, "frontend")) == 1  # the second waits for the first

    assert first.join().is_completed()
    assert second.join().is_completed()

    writes = deployment_writes(kube, "frontend")
    images = [w.body["spec"]["template"]["spec"]["containers"][0]["image"] for w in writes]
    assert [i.rsplit(":", 1)[1] for i in images] == ["2.7.0", "2.8.0"]
    assert image_of(kube, "frontend").endswith(":2.8.0")


@pytest.mark.slow
def test_a_deploy_approved_after_the_deployment_changed_is_refused(platform, kube):
    revision = revision_of(kube, "frontend")
    first = start_in_thread(deploy, version="2.7.0", components=["frontend"], require_approval=True)
    paused = wait_for_paused_run("deploy")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert f"deployment/frontend revision = {revision}" in plan  # what the approver pins

    # The paused run holds no lock: another deploy of the same Deployment goes through.
    second = deploy(version="2.8.0", components=["frontend"], return_state=True)
    assert second.is_completed(), second.message
    kube.clear_writes()

    resume_flow_run(paused.id, run_input=APPROVE)
    state = first.join()

    assert state.is_failed()
    assert "changed since the plan was approved" in state.message
    assert f"deployment/frontend revision: {revision} → {revision + 1}" in state.message
    assert kube.writes == []  # nothing written on a stale plan
    assert image_of(kube, "frontend").endswith(":2.8.0")


@pytest.mark.slow
def test_a_lost_lock_stops_the_deploy_before_the_next_deployment_and_rolls_back(platform, kube):
    recorded = {n: image_of(kube, n) for n in ("backend", "celery-workers", "frontend")}
    kube.rollout_delay = 3  # the backend's rollout is under way while the lease is revoked
    run = start_in_thread(deploy, version="3.0.0")
    wait_until(lambda: len(deployment_writes(kube, "backend")) == 1, "the backend's new image")

    # The server revokes the backend lock's lease mid-rollout (as for an expired lease).
    holding = re.compile(rf"Holding lock {lock_name('deployment/backend')} \(lease ([0-9a-f-]+)\)")
    lease = holding.search(run_logs("deploy-3.0.0-backend+frontend"))
    assert lease, "the run logs the lease it holds"
    with prefect_rest(str(PREFECT_API_URL.value())) as api:
        api.post(
            "/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease[1]}
        ).raise_for_status()
    state = run.join(120)

    # The backend's rollout finished (nothing cut it halfway); the run stopped before the
    # workers, and its undo put the backend back.
    assert state.is_failed()
    assert "lost the lock on deployment/backend" in state.message
    writes = kube.writes
    assert list(zip([w.name for w in writes], kinds_of(writes), strict=True)) == [
        ("backend", "set-image"),
        ("backend", "restore"),
    ]
    assert {n: image_of(kube, n) for n in recorded} == recorded
