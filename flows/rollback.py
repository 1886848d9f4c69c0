"""Runbook > Common Operations > Deployment > Rollback Deployment.

    kubectl rollout history deployment/backend
    kubectl rollout undo deployment/backend [--to-revision=3]

`rollback` has the semantics of `kubectl rollout undo`: the pod template of the chosen
revision's ReplicaSet becomes the Deployment's again (the controller then gives it a new
revision number, as Kubernetes does). Without `to_revision` it is the revision before the
current one. A revision that does not exist is refused before anything changes, listing
the ones that do. The approval shows the current and target revision and image. The
`deployment/<name>` lock keeps it from interleaving with a deploy or a scale; it is taken
after the approval, not held through the pause, and the Deployment must then still be as
the plan showed (revision and pod template), else the run is refused ("changed since the
plan was approved") with nothing written.

`rollout-history` is the read-only `kubectl rollout history`, as a table.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from flows.deploy import UnhealthyAfterRollout, verify_health
from runbook.decisions.deployment import deployment_view
from runbook.decisions.locks import deployment_fingerprint
from runbook.decisions.release import (
    Component,
    RollbackChoice,
    choose_rollback,
    history_rows,
)
from runbook.fault_points import fault_point
from runbook.report import StepTimer, markdown_table
from runbook.settings import load_settings
from tasks.approval import Plan, RequestedBy, refuse_if_changed, request_approval
from tasks.intent import clear_intent, record_intent
from tasks.kubernetes import (
    list_deployment_revisions,
    read_deployment,
    restore_pod_template,
    wait_for_rollout,
)
from tasks.locks import exclusive
from tasks.notify import announce

# We stop watching this long after the controller should have called the rollout failed.
ROLLOUT_GRACE_SECONDS = 30


class RollbackFailed(RuntimeError):
    """The undo's rollout failed, or the platform is unhealthy after it."""


def _run_name() -> str:
    parameters = flow_run.parameters
    target = parameters.get("to_revision")
    return f"rollback-{parameters.get('deployment', '?')}-to-" + (
        f"revision-{target}" if target else "previous"
    )


def _images(revision: dict[str, Any]) -> str:
    return ", ".join(revision["images"].values())


@flow(name="rollback", flow_run_name=_run_name)
def rollback(
    deployment: Annotated[Component, Field(examples=["backend"])],
    to_revision: Annotated[int | None, Field(ge=1)] = None,
    verify: bool = True,
    health_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0,
    requested_by: RequestedBy = None,
) -> dict[str, Any]:
    """Roll a Deployment back to its previous revision or a given one (kubectl rollout undo).

    Args:
        deployment: Deployment to roll back: backend, frontend or celery-workers.
        to_revision: Revision to bring back (see rollout-history); empty for the previous one.
        verify: Check the five health endpoints after the rollout.
        health_timeout_seconds: Timeout of each health endpoint request.
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    logger = get_run_logger()
    name = load_settings().deployment_name(deployment)
    timer = StepTimer()

    # 1. Read the rollout history and choose the target revision (refused if absent).
    #    No lock yet: reading changes nothing, and the lock is not held through the pause.
    with timer.step("read rollout history"):
        live = read_deployment(name)
        revisions = list_deployment_revisions(name)
        choice = choose_rollback(live, revisions, to_revision)
    current, target = choice.current, choice.target
    if choice.already_there:
        summary = (
            f"deployment/{name} already runs the template of revision {target['revision']} "
            f"({_images(target)}); nothing to do"
        )
        _publish(name, summary, choice, None, timer)
        return {"deployment": name, "revision": current["revision"], "changed": False}

    # 2. Approval, showing current → target revision and image.
    plan = _plan(name, choice, deployment_fingerprint(live))
    with timer.step("approval"):
        decision = request_approval(plan)

    with exclusive(f"deployment/{name}"):
        # 3. Refuse if the Deployment changed since the plan was approved.
        refuse_if_changed(plan, deployment_fingerprint(read_deployment(name)))

        # 4. Make the target revision's pod template the Deployment's, and watch the rollout.
        cause = (
            f"rollback to revision {target['revision']} by {decision.approver}: {decision.reason}"
        )
        # One write (the controller finishes the rollout): a dead run leaves the target.
        note = f"deployment/{name} set to revision {target['revision']}'s template: kept"
        intent = record_intent("rollback", [f"deployment/{name}"], [{"kind": "note", "text": note}])
        with timer.step(f"undo to revision {target['revision']} and roll out"):
            restored = deployment_view(restore_pod_template(name, target["template"], cause[:500]))
            fault_point(f"rollback: rolled back {name}")
            deadline = deployment_view(live).progress_deadline_seconds + ROLLOUT_GRACE_SECONDS
            try:
                outcome = wait_for_rollout(name, restored.generation, deadline)
                problem = "" if outcome.complete else outcome.reason
            except Exception as exc:
                problem = str(exc)
            if problem:
                problem = f"Rollback of deployment/{name} did not complete: {problem}"
                _publish(name, problem, choice, None, timer)
                announce(f":rotating_light: {problem}")
                raise RollbackFailed(problem)

    # 5. Verify health (read-only: the lock is free for the next change already).
    health = "not checked"
    if verify:
        with timer.step("verify health"):
            try:
                health = verify_health(health_timeout_seconds)
            except UnhealthyAfterRollout as exc:
                problem = f"deployment/{name} rolled back, but {exc}"
                _publish(name, problem, choice, outcome.revision, timer)
                announce(f":rotating_light: {problem}")
                raise RollbackFailed(problem) from None

    clear_intent(intent)
    # 6. Report.
    summary = (
        f"deployment/{name} rolled back from revision {current['revision']} "
        f"({_images(current)}) to the template of revision {target['revision']} "
        f"({_images(target)}), now revision {outcome.revision}; {health}"
    )
    _publish(name, summary, choice, outcome.revision, timer)
    announce(f":leftwards_arrow_with_hook: {summary}")
    logger.info(summary)
    return {"deployment": name, "revision": outcome.revision, "changed": True}


def _plan(name: str, choice: RollbackChoice, fingerprint: dict[str, str]) -> Plan:
    current, target = choice.current, choice.target
    return Plan(
        title=f"Roll back deployment/{name} to revision {target['revision']}",
        target=f"deployment/{name}",
        steps=(
            f"kubectl rollout undo deployment/{name} --to-revision={target['revision']}",
            f"kubectl rollout status deployment/{name}",
            "Verify the five health endpoints",
        ),
        facts={
            "current revision": f"{current['revision']}: {_images(current)}",
            "target revision": f"{target['revision']}: {_images(target)}",
            "target change-cause": target["change_cause"] or "-",
            "target created": target["created"] or "-",
        },
        fingerprint=fingerprint,
    )


def _publish(
    name: str, summary: str, choice: RollbackChoice, new_revision: int | None, timer: StepTimer
) -> None:
    rows = [
        {
            "": "before",
            "revision": choice.current["revision"],
            "images": _images(choice.current),
        },
        {
            "": "after",
            "revision": new_revision if new_revision is not None else "-",
            "images": _images(choice.target) if new_revision is not None else "-",
        },
    ]
    create_markdown_artifact(
        markdown="\n\n".join(
            [
                f"## Rollback of deployment/{name}",
                summary,
                markdown_table(rows),
                "### Steps",
                timer.markdown(),
            ]
        ),
        key="rollback-report",
        description=summary[:500],
    )


@flow(name="rollout-history", flow_run_name="rollout-history-{deployment}")
def rollout_history(deployment: Component = "backend") -> list[dict[str, Any]]:
    """List a Deployment's rollout history (kubectl rollout history); changes nothing.

    Args:
        deployment: Deployment whose history to list: backend, frontend or celery-workers.
    """
    name = load_settings().deployment_name(deployment)

    # Read the Deployment and its ReplicaSets' revisions.
    live = read_deployment(name)
    revisions = list_deployment_revisions(name)

    # Publish them newest first, marking the current one.
    rows = history_rows(revisions, deployment_view(live).revision)
    create_table_artifact(
        rows,
        key="rollout-history",
        description=f"Rollout history of deployment/{name} ({len(rows)} revisions)",
    )
    return rows
