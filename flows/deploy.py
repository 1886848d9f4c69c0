"""Runbook > Common Operations > Deployment > Deploy New Version.

    kubectl set image deployment/backend backend=complianceagent/backend:${VERSION}
    kubectl set image deployment/frontend frontend=complianceagent/frontend:${VERSION}
    kubectl rollout status deployment/backend
    kubectl rollout status deployment/frontend

Guarantees:
- The version is checked (an image tag) before anything happens; each component keeps its
  own image repository, only the tag changes.
- Each component's revision, image and pod template are recorded first. A rollout that
  fails (`ProgressDeadlineExceeded`, seen by a watch the moment the controller writes it)
  or a failed health check afterwards rolls every component this run touched back to its
  recorded pod template (`kubectl rollout undo`), waits for that rollout, checks health
  again, tells chat, and fails the run with the reason.
- celery-workers run the backend's image and follow it by default (see
  `runbook.decisions.release.deploy_components`).
- Two runs that change the same Deployment (deploy, rollback, scale) never interleave:
  each holds the `deployment/<name>` lock from recording to the end. A lost lock stops the
  run before the next Deployment, and what it touched is rolled back.
- Production always asks for an approval; elsewhere `require_approval` asks for one. The
  locks are not held through the approval pause (a rollback must not wait behind it):
  they are taken after it, and each Deployment must then still be as the plan showed
  (revision and pod template), else the run is refused ("changed since the plan was
  approved") with nothing written.
- A run stopped after its first write — cancelled from the UI or API, or its process sent
  SIGTERM (a node drain, Ctrl-C) — still puts back what it touched. How: on a cancel the
  runner first marks the run Cancelling, then SIGTERMs the process and SIGKILLs it 30 s
  later. Prefect turns the SIGTERM into `TerminationSignal`, a `BaseException` raised in
  the flow wherever it is (e.g. inside the rollout watch), so an `except Exception` never
  sees it. The flow catches `BaseException`, writes the recorded templates back and
  re-raises. Those writes are plain calls (`restore_pod_template_now`), not tasks: the
  server refuses to start a task run once its flow run is no longer Running. Why not an
  `on_cancellation` hook: it runs in the runner's process after this one is dead, without
  the recorded templates, and never for a bare SIGTERM. Only a SIGKILL before the undo
  is written escapes this; that is the reconcile runbook's case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from flows.health_check import health_check
from runbook.decisions.deployment import DeploymentView, deployment_view
from runbook.decisions.locks import deployment_fingerprint
from runbook.decisions.release import (
    TAG_PATTERN,
    Component,
    Deployable,
    ImageChange,
    Recorded,
    Undone,
    deploy_components,
    failed_deploy_summary,
    plan_images,
    record,
    rollback_cause,
)
from runbook.decisions.rollout import RolloutOutcome
from runbook.fault_points import fault_point
from runbook.report import StepTimer, markdown_table
from runbook.settings import load_settings
from tasks.approval import Plan, RequestedBy, refuse_if_changed, request_approval
from tasks.intent import clear_intent, record_intent
from tasks.kubernetes import (
    list_deployment_revisions,
    read_deployment,
    restore_pod_template,
    restore_pod_template_now,
    set_deployment_image,
    wait_for_rollout,
)
from tasks.locks import exclusive_all
from tasks.notify import announce

DEFAULT_COMPONENTS: tuple[Deployable, ...] = ("backend", "frontend")
# The controller marks a stuck rollout at progressDeadlineSeconds; if it never says, we
# give up this much later ourselves (and treat it as failed).
ROLLOUT_GRACE_SECONDS = 30


class RolloutFailed(RuntimeError):
    """A Deployment's rollout did not complete."""


class UnhealthyAfterRollout(RuntimeError):
    """The rollouts completed but the platform's health check failed."""


class DeployFailed(RuntimeError):
    """The deploy did not go through; the message says why and what was rolled back."""


def _run_name() -> str:
    parameters = flow_run.parameters
    components = parameters.get("components") or DEFAULT_COMPONENTS
    return f"deploy-{parameters.get('version', '?')}-{'+'.join(components)}"


def observe(
    components: Sequence[Component], names: dict[Component, str]
) -> tuple[list[Recorded], dict[str, str]]:
    """Each component's current revision, image and pod template, as a rollback needs
    them, and the fingerprint an approved plan rests on."""
    records: list[Recorded] = []
    fingerprint: dict[str, str] = {}
    for component in components:
        live = read_deployment(names[component])
        records.append(record(component, live, list_deployment_revisions(names[component])))
        fingerprint |= deployment_fingerprint(live)
    return records, fingerprint


def rollout_status(changed: DeploymentView) -> RolloutOutcome:
    """`kubectl rollout status` for the change that produced `changed` (the Deployment as
    our write returned it); raises `RolloutFailed` unless it completed (we give up 30 s
    after the controller should have said)."""
    deadline = changed.progress_deadline_seconds + ROLLOUT_GRACE_SECONDS
    outcome = wait_for_rollout(changed.name, changed.generation, deadline)
    if not outcome.complete:
        raise RolloutFailed(f"rollout of deployment/{changed.name} failed: {outcome.reason}")
    return outcome


def roll_out(change: ImageChange) -> RolloutOutcome:
    """`kubectl set image` and `kubectl rollout status`: the new image, rolled out."""
    r = change.recorded
    patched = set_deployment_image(r.deployment, r.container, change.target_image)
    return rollout_status(deployment_view(patched))


def verify_health(timeout_seconds: float) -> str:
    """Run the health-check flow as a subflow; return its summary or raise with it."""
    state = health_check(
        timeout_seconds=timeout_seconds, notify_on_failure=False, return_state=True
    )
    if not state.is_completed():
        raise UnhealthyAfterRollout(f"health check failed: {state.message}")
    return "all health checks passed"


def roll_back(touched: Sequence[ImageChange], cause: str, health_timeout_seconds: float) -> Undone:
    """Put every touched component back on its recorded pod template, then check health.

    Every template is written before any rollout is awaited, so the undo is on the API
    server as early as possible. Safe on a component whose image was never changed
    (restoring the same template changes nothing).
    """
    restored: dict[str, DeploymentView] = {}
    problems: list[str] = []
    for change in reversed(touched):
        r = change.recorded
        try:
            restored[r.deployment] = deployment_view(
                restore_pod_template(r.deployment, r.template, cause)
            )
        except Exception as exc:
            problems.append(f"restoring deployment/{r.deployment} failed: {exc}")
    revisions: dict[str, int] = {}
    for name, view in restored.items():
        try:
            revisions[name] = rollout_status(view).revision
        except Exception as exc:
            problems.append(str(exc))
    try:
        health = verify_health(health_timeout_seconds)
    except UnhealthyAfterRollout as exc:
        health = str(exc)
    return Undone(revisions, tuple(problems), health)


def put_back_while_stopping(touched: Sequence[ImageChange], version: str) -> None:
    """The run is being cancelled or terminated: write every recorded template back with
    plain calls, and log what happened (no waiting: the process has ~30 s left)."""
    logger = get_run_logger()
    cause = rollback_cause(version, "the run was cancelled or terminated")
    for change in reversed(touched):
        r = change.recorded
        try:
            restore_pod_template_now(r.deployment, r.template, cause)
            logger.warning(
                "run stopping: deployment/%s put back on revision %s's template (%s)",
                r.deployment,
                r.revision,
                r.image,
            )
        except Exception as exc:
            logger.error("run stopping: could not put deployment/%s back: %s", r.deployment, exc)


@flow(name="deploy", flow_run_name=_run_name)
def deploy(
    version: Annotated[str, Field(pattern=TAG_PATTERN, examples=["1.5.0"])],
    components: Annotated[tuple[Deployable, ...], Field(min_length=1)] = DEFAULT_COMPONENTS,
    workers_follow_backend: bool = True,
    require_approval: bool = False,
    health_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0,
    requested_by: RequestedBy = None,
) -> list[dict[str, Any]]:
    """Deploy a new version: set the images, watch the rollouts, verify health; roll back
    automatically if a rollout or the health check fails, or the run is stopped.

    Args:
        version: Image tag to deploy, e.g. 1.5.0 (letters, digits, '_', '.', '-'; at most 128).
        components: Which Deployments get the new tag: backend, frontend, or both.
        workers_follow_backend: Also move celery-workers (which run the backend image) to
            the new backend image.
        require_approval: Pause for an approval before changing anything (production
            always does).
        health_timeout_seconds: Timeout of each health endpoint request after the rollout.
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    settings = load_settings()
    logger = get_run_logger()
    timer = StepTimer()
    wanted = deploy_components(components, workers_follow_backend)
    names = {c: settings.deployment_name(c) for c in wanted}

    needs_approval = settings.environment == "production" or require_approval
    plan: Plan | None = None
    if needs_approval:
        # 1. Record each component and plan the change, without the locks: an approval
        #    may wait an hour, and a rollback must not wait behind it.
        with timer.step("record current revisions"):
            records, fingerprint = observe(wanted, names)
            changes = [c for c in plan_images(version, records) if c.changes]
        # 2. Approval: always in production, on request elsewhere.
        if changes:
            plan = _plan(version, changes, fingerprint)
            with timer.step("approval"):
                request_approval(plan)

    with exclusive_all(f"deployment/{name}" for name in names.values()) as locks:
        # 3. Record each component's current revision and image (what a rollback restores),
        #    under the locks; an approved plan must still be exactly what is live.
        with timer.step("record current revisions"):
            records, fingerprint = observe(wanted, names)
            changes = [c for c in plan_images(version, records) if c.changes]
        if plan is not None:
            refuse_if_changed(plan, fingerprint)
        if not changes:
            rows = _rows(plan_images(version, records), {r.deployment: r.revision for r in records})
            _publish(version, "nothing to do: already at this version", rows, timer)
            return rows

        touched: list[ImageChange] = []
        after: dict[str, int] = {}
        # Recorded outside this process before the first write: if it dies, reconcile
        # puts each component back on its recorded revision.
        intent = record_intent(
            "deploy", [f"deployment/{n}" for n in names.values()], _undo(changes)
        )
        try:
            # 4. Set each image and watch its rollout, in order; stop before the next one
            #    if the lock was lost meanwhile (then the except below rolls back).
            for change in changes:
                locks.ensure_held()
                # Counted as touched before the call: an ambiguous failure is undone too.
                touched.append(change)
                with timer.step(f"set image and roll out deployment/{change.recorded.deployment}"):
                    after[change.recorded.deployment] = roll_out(change).revision
                fault_point(f"deploy: rolled out {change.recorded.deployment}")

            # 5. Verify health.
            with timer.step("verify health"):
                verify_health(health_timeout_seconds)
        except Exception as exc:
            # Failed (or lock lost): roll everything touched back to its recorded revision.
            why = str(exc).rstrip(". ")
            logger.error("deploy of %s failed, rolling back: %s", version, why)
            with timer.step("roll back to recorded revisions"):
                undone = roll_back(touched, rollback_cause(version, why), health_timeout_seconds)
            fault_point("deploy: rolled back")
            summary = failed_deploy_summary(version, why, undone)
            _publish(version, summary, _rows(touched, undone.revisions, restored=True), timer)
            announce(f":rotating_light: {summary}")
            raise DeployFailed(summary) from None
        except BaseException:
            # Cancelled or terminated mid-deploy: undo, then let the run stop.
            put_back_while_stopping(touched, version)
            raise
        clear_intent(intent)

    # 6. Done: report before/after and tell chat.
    rows = _rows(changes, after)
    summary = f"Deployed {version} to " + ", ".join(
        f"deployment/{c.recorded.deployment}" for c in changes
    )
    _publish(version, summary, rows, timer)
    announce(f":rocket: {summary}")
    logger.info(summary)
    return rows


def _undo(changes: Sequence[ImageChange]) -> list[dict[str, Any]]:
    return [
        {
            "kind": "revision",
            "deployment": c.recorded.deployment,
            "revision": c.recorded.revision,
            "image": c.recorded.image,
        }
        for c in changes
    ]


def _plan(version: str, changes: Sequence[ImageChange], fingerprint: dict[str, str]) -> Plan:
    steps = [
        f"kubectl set image deployment/{c.recorded.deployment} "
        f"{c.recorded.container}={c.target_image}, then watch its rollout "
        f"(deadline {c.recorded.progress_deadline_seconds}s)"
        for c in changes
    ]
    steps += [
        "Verify the five health endpoints",
        "On a failed rollout or health check: roll every changed Deployment back to its "
        "revision shown above, and verify health again",
    ]
    return Plan(
        title=f"Deploy {version}",
        target=", ".join(f"deployment/{c.recorded.deployment}" for c in changes),
        steps=tuple(steps),
        facts={
            f"deployment/{c.recorded.deployment}": f"{c.recorded.image} (revision "
            f"{c.recorded.revision}) → {c.target_image}"
            for c in changes
        },
        fingerprint=fingerprint,
    )


def _rows(
    changes: Sequence[ImageChange], revisions: dict[str, int], restored: bool = False
) -> list[dict[str, Any]]:
    rows = []
    for c in changes:
        r = c.recorded
        if restored:
            done = r.deployment in revisions
            image_after = r.image if done else "unknown: the rollback did not complete"
        else:
            image_after = c.target_image
        rows.append(
            {
                "component": r.component,
                "deployment": r.deployment,
                "image before": r.image,
                "image after": image_after,
                "revision before": r.revision,
                "revision after": revisions.get(r.deployment, "-"),
            }
        )
    return rows


def _publish(version: str, summary: str, rows: list[dict[str, Any]], timer: StepTimer) -> None:
    create_markdown_artifact(
        markdown="\n\n".join(
            [
                f"## Deploy {version}",
                summary,
                markdown_table(rows),
                "### Steps",
                timer.markdown(),
            ]
        ),
        key="deploy-report",
        description=summary[:500],
    )
