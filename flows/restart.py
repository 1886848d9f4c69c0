"""Runbook > Quick Reference > Restart.

    kubectl rollout restart deployment/backend
    kubectl rollout status deployment/backend

`restart` replaces a component's pods (backend, frontend or celery-workers) the way
`kubectl rollout restart` does: it stamps the pod template's
`kubectl.kubernetes.io/restartedAt` annotation, so the Deployment rolls out a new
ReplicaSet with the same image; then it waits for that rollout and checks the platform's
health (the `health-check` flow, as a subflow). It holds the `deployment/<name>` lock, so
it never interleaves with a deploy, rollback or scale of the same Deployment.

The restart step itself, `restart_deployments`, is shared with secret rotation (which
restarts backend and celery-workers so their pods load the new secret).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from pydantic import Field

from flows.deploy import rollout_status, verify_health
from runbook.decisions.deployment import deployment_view
from runbook.decisions.release import Component
from runbook.fault_points import fault_point
from runbook.report import StepTimer, markdown_table
from runbook.settings import load_settings
from tasks.intent import clear_intent, record_intent
from tasks.kubernetes import restart_deployment
from tasks.locks import exclusive
from tasks.notify import announce


class RestartFailed(RuntimeError):
    """A restart's rollout failed, or the platform was unhealthy after it."""


def restart_deployments(names: Sequence[str]) -> dict[str, int]:
    """`kubectl rollout restart` each Deployment, then `kubectl rollout status` each.

    All are stamped first so their rollouts run side by side; then each is watched until
    it completes (raises `RolloutFailed` naming the first that does not). Returns the
    revision each Deployment is at afterwards. The caller holds the Deployments' locks.
    """
    stamped = []
    for name in names:
        stamped.append(deployment_view(restart_deployment(name)))
        fault_point(f"restart: restarted {name}")
    return {view.name: rollout_status(view).revision for view in stamped}


@flow(name="restart", flow_run_name="restart-{deployment}")
def restart(
    deployment: Annotated[Component, Field(examples=["backend"])],
    verify: bool = True,
    health_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0,
) -> dict[str, Any]:
    """Restart a component's pods (kubectl rollout restart), wait for them, check health.

    Args:
        deployment: Deployment whose pods to replace: backend, frontend or celery-workers.
        verify: Check the five health endpoints after the rollout.
        health_timeout_seconds: Timeout of each health endpoint request.
    """
    logger = get_run_logger()
    name = load_settings().deployment_name(deployment)
    timer = StepTimer()
    revision: int | None = None

    with exclusive(f"deployment/{name}"):
        # One write (restartedAt): a dead run leaves the rollout to the controller.
        note = f"deployment/{name} restartedAt stamped: the controller finishes the rollout"
        intent = record_intent("restart", [f"deployment/{name}"], [{"kind": "note", "text": note}])
        try:
            # 1. Stamp restartedAt on the pod template and watch the new pods roll out.
            with timer.step(f"rollout restart deployment/{name}"):
                revision = restart_deployments([name])[name]
            # 2. Verify health.
            health = "not checked"
            if verify:
                with timer.step("verify health"):
                    health = verify_health(health_timeout_seconds)
        except Exception as exc:
            problem = f"Restart of deployment/{name} failed: {exc}"
            _publish(name, problem, revision, timer)
            announce(f":rotating_light: {problem}")
            raise RestartFailed(problem) from None

    clear_intent(intent)
    # 3. Report.
    summary = f"deployment/{name} restarted, now revision {revision}; {health}"
    _publish(name, summary, revision, timer)
    announce(f":arrows_counterclockwise: {summary}")
    logger.info(summary)
    return {"deployment": name, "revision": revision}


def _publish(name: str, summary: str, revision: int | None, timer: StepTimer) -> None:
    create_markdown_artifact(
        markdown="\n\n".join(
            [
                f"## Restart of deployment/{name}",
                summary,
                markdown_table([{"deployment": name, "revision after": revision}]),
                "### Steps",
                timer.markdown(),
            ]
        ),
        key="restart-report",
        description=summary[:500],
    )
