"""The rollback and rollout-history runbooks against the Kubernetes emulator."""

from __future__ import annotations

import json

import pytest
from prefect.flow_runs import resume_flow_run

from flows.deploy import deploy
from flows.rollback import rollback, rollout_history
from tasks import kubernetes as k8s
from tests.helpers import read_artifacts, read_flow_run, start_in_thread, wait_for_paused_run
from tests.release_helpers import (
    image_of,
    kinds_of,
    revision_of,
    wait_settled,
)

APPROVE = {"approve": True, "approver": "carol", "reason": "INC-42"}


@pytest.fixture
def two_revisions(kube):
    """The frontend moved to a new image: (revision, image) before and after."""
    before = (revision_of(kube, "frontend"), image_of(kube, "frontend"))
    k8s.set_deployment_image.fn("frontend", "frontend", "complianceagent/frontend:9.0.0")
    wait_settled(kube, "frontend")
    after = (revision_of(kube, "frontend"), image_of(kube, "frontend"))
    kube.clear_writes()
    return before, after


@pytest.mark.slow
def test_rollback_to_the_previous_revision_after_approval(platform, kube, two_revisions):
    (old_revision, old_image), (new_revision, new_image) = two_revisions

    run = start_in_thread(rollback, deployment="frontend")
    paused = wait_for_paused_run("rollback")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert f"| current revision | {new_revision}: {new_image} |" in plan
    assert f"| target revision | {old_revision}: {old_image} |" in plan
    assert kube.writes == []

    resume_flow_run(paused.id, run_input=APPROVE)
    state = run.join()

    assert state.is_completed(), state.message
    assert image_of(kube, "frontend") == old_image
    assert kinds_of(kube.writes) == ["restore"]  # one JSON patch of the template, nothing else
    restore = kube.writes[0].body
    assert restore[0] == {
        "op": "replace",
        "path": "/spec/template",
        "value": restore[0]["value"],
    }
    assert restore[0]["value"]["spec"]["containers"][0]["image"] == old_image
    assert revision_of(kube, "frontend") == new_revision + 1  # as `kubectl rollout undo` does
    history = k8s.list_deployment_revisions.fn("frontend")
    assert history[-1]["change_cause"] == (f"rollback to revision {old_revision} by carol: INC-42")
    report = read_artifacts(state.state_details.flow_run_id)["rollback-report"].data
    assert f"rolled back from revision {new_revision}" in report


@pytest.mark.slow
def test_a_rollback_completes_while_a_deploy_waits_for_approval(platform, kube, two_revisions):
    """An emergency rollback never waits behind a deploy's approval: no lock is held
    through a pause. The deploy, approved afterwards, is refused on its stale plan."""
    (_, old_image), _ = two_revisions
    waiting_deploy = start_in_thread(
        deploy, version="9.9.0", components=["frontend"], require_approval=True
    )
    deploy_paused = wait_for_paused_run("deploy")

    run = start_in_thread(rollback, deployment="frontend")
    resume_flow_run(wait_for_paused_run("rollback").id, run_input=APPROVE)
    state = run.join()

    assert state.is_completed(), state.message
    assert image_of(kube, "frontend") == old_image
    assert kinds_of(kube.writes) == ["restore"]
    assert read_flow_run(deploy_paused.id).state.is_paused()  # still waiting, untouched

    resume_flow_run(deploy_paused.id, run_input=APPROVE)
    refused = waiting_deploy.join()
    assert refused.is_failed()
    assert "changed since the plan was approved" in refused.message
    assert kinds_of(kube.writes) == ["restore"]  # the stale deploy wrote nothing
    assert image_of(kube, "frontend") == old_image


@pytest.mark.slow
def test_rollback_to_a_given_revision(platform, kube, two_revisions):
    (old_revision, old_image), _ = two_revisions
    k8s.set_deployment_image.fn("frontend", "frontend", "complianceagent/frontend:9.1.0")
    wait_settled(kube, "frontend")
    kube.clear_writes()

    run = start_in_thread(rollback, deployment="frontend", to_revision=old_revision)
    resume_flow_run(wait_for_paused_run("rollback").id, run_input=APPROVE)
    state = run.join()

    assert state.is_completed(), state.message
    assert image_of(kube, "frontend") == old_image
    assert kinds_of(kube.writes) == ["restore"]


def test_missing_revision_is_refused_before_any_change(platform, kube):
    existing = [r["revision"] for r in k8s.list_deployment_revisions.fn("backend")]

    state = rollback(deployment="backend", to_revision=999, return_state=True)

    assert state.is_failed()
    assert "to_revision: revision 999 is not in the rollout history of deployment/backend" in (
        state.message
    )
    assert "existing revisions: " + ", ".join(map(str, existing)) in state.message
    assert kube.writes == []
    assert "approval-plan" not in read_artifacts(state.state_details.flow_run_id)


def test_rollback_to_the_current_template_changes_nothing(platform, kube):
    current = revision_of(kube, "backend")

    state = rollback(deployment="backend", to_revision=current, return_state=True)

    assert state.is_completed(), state.message
    assert state.result()["changed"] is False
    assert kube.writes == []


def test_rejected_rollback_writes_nothing(platform, kube, two_revisions):
    _, (_, new_image) = two_revisions

    run = start_in_thread(rollback, deployment="frontend")
    resume_flow_run(
        wait_for_paused_run("rollback").id,
        run_input={"approve": False, "approver": "dave", "reason": "false alarm"},
    )
    state = run.join()

    assert state.is_failed()
    assert "rejected by dave: false alarm" in state.message
    assert kube.writes == []
    assert image_of(kube, "frontend") == new_image


def test_unknown_deployment_fails_at_once_with_no_writes(platform, kube, monkeypatch):
    monkeypatch.setenv("RUNBOOK_WORKERS_DEPLOYMENT", "no-such-workers")

    state = rollback(deployment="celery-workers", return_state=True)

    assert state.is_failed()
    assert "read deployment/no-such-workers in complianceagent: 404" in state.message
    assert kube.writes == []


def test_rollout_history_is_a_read_only_table(platform, kube, two_revisions):
    (old_revision, old_image), (new_revision, new_image) = two_revisions

    state = rollout_history(deployment="frontend", return_state=True)

    assert state.is_completed(), state.message
    table = json.loads(read_artifacts(state.state_details.flow_run_id)["rollout-history"].data)
    by_revision = {row["revision"]: row for row in table}
    assert table[0]["revision"] == new_revision and table[0]["current"] == "✓"
    assert by_revision[new_revision]["images"] == f"frontend={new_image}"
    assert by_revision[old_revision]["images"] == f"frontend={old_image}"
    assert all(row["created"] != "-" for row in table)
    assert kube.writes == []
