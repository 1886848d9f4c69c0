"""Runbook > Common Operations > Scaling.

    kubectl scale deployment/backend --replicas=5
    kubectl apply -f backend-hpa.yaml   # autoscaling/v2, min 2, max 20, CPU 70 %

`scale`: the count is checked against the component's floor and ceiling
(`runbook.decisions.scaling.REPLICA_BOUNDS`) before any call; above the ceiling is
refused, below the floor or to zero waits for an approval. The form's own bound
(0-`MAX_REPLICAS`) is enforced by the Prefect server before a run even exists.

`autoscale`: applies the runbook's HorizontalPodAutoscaler. Idempotent: the live HPA is
compared with the wanted one first, and nothing is written when they already agree. In
production, lowering its floor or ceiling (or creating one whose ceiling is below the
replicas running) waits for an approval first (`judge_autoscale`).

Both take an optional `requested_by`: the approver must then be someone else.

Both hold the `deployment/<name>` lock, so they never interleave with a deploy or rollback.
`scale` takes it after an approval, not through the pause, and then refuses if the
replica count is no longer the one the plan showed ("changed since the plan was
approved").
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from pydantic import Field

from runbook.decisions.release import Component
from runbook.decisions.scaling import (
    MAX_REPLICAS,
    REPLICA_BOUNDS,
    check_hpa_bounds,
    hpa_body,
    hpa_drift,
    hpa_name,
    hpa_note,
    judge_autoscale,
    judge_scale,
)
from runbook.fault_points import fault_point
from runbook.report import markdown_table
from runbook.settings import load_settings
from tasks.approval import Plan, RequestedBy, refuse_if_changed, request_approval
from tasks.intent import clear_intent, record_intent
from tasks.kubernetes import (
    apply_horizontal_pod_autoscaler,
    read_deployment_scale,
    read_horizontal_pod_autoscaler,
    scale_deployment,
    wait_for_rollout,
)
from tasks.locks import exclusive

# How long a scale may take to have its replicas available before the run fails.
SCALE_DEADLINE_SECONDS = 600


@flow(name="scale", flow_run_name="scale-{deployment}-to-{replicas}")
def scale(
    deployment: Annotated[Component, Field(examples=["backend"])],
    replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS, examples=[5])],
    wait: bool = True,
    requested_by: RequestedBy = None,
) -> dict[str, Any]:
    """Scale a Deployment to a number of replicas (kubectl scale), within its bounds.

    Args:
        deployment: Deployment to scale: backend (2-20), frontend (2-10) or celery-workers (1-30).
        replicas: Wanted replica count. Above the Deployment's ceiling is refused; below its
            floor, or 0, needs an approval.
        wait: Wait until the new replicas are available.
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    logger = get_run_logger()
    name = load_settings().deployment_name(deployment)

    # 1. Check the count against this component's floor and ceiling, before any call.
    verdict = judge_scale(deployment, replicas)

    # 2. Read the current count, and whether an autoscaler will override ours.
    current = read_deployment_scale(name)
    note = hpa_note(read_horizontal_pod_autoscaler(hpa_name(name)), replicas)

    # 3. Below the floor or to zero: approval first (no lock held through the pause).
    plan: Plan | None = None
    if verdict.needs_approval and current != replicas:
        bounds = REPLICA_BOUNDS[deployment]
        plan = Plan(
            title=f"Scale deployment/{name} to {replicas}",
            target=f"deployment/{name}",
            steps=(f"kubectl scale deployment/{name} --replicas={replicas}",),
            facts={
                "current replicas": str(current),
                "target replicas": str(replicas),
                "why approval": verdict.reason,
                "bounds": f"floor {bounds.floor}, ceiling {bounds.ceiling}",
                "autoscaler": note,
            },
            fingerprint={f"deployment/{name} replicas": str(current)},
        )
        request_approval(plan)

    with exclusive(f"deployment/{name}"):
        # 4. Under the lock: the count now; an approved plan must still be the truth.
        current = read_deployment_scale(name)
        if plan is not None:
            refuse_if_changed(plan, {f"deployment/{name} replicas": str(current)})
        if current == replicas:
            summary = f"deployment/{name} already has {replicas} replicas; nothing to do"
            _publish(name, summary, current, current, note)
            return {"deployment": name, "before": current, "after": current}

        # 5. Scale, and wait for the replicas to be available.
        intent = record_intent("scale", [f"deployment/{name}"], _note(name, current, replicas))
        after = scale_deployment(name, replicas)
        fault_point("scale: scaled")
        if wait:
            outcome = wait_for_rollout(name, 0, SCALE_DEADLINE_SECONDS)
            if not outcome.complete:
                raise RuntimeError(f"scaling deployment/{name} failed: {outcome.reason}")
        clear_intent(intent)

    # 6. Report.
    summary = f"deployment/{name} scaled from {current} to {after} replicas ({verdict.reason})"
    _publish(name, summary, current, after, note)
    logger.info(summary)
    return {"deployment": name, "before": current, "after": after}


_AUTOSCALE_NOTE = {"kind": "note", "text": "HPA applied in one write: kept"}


def _note(name: str, before: int, replicas: int) -> list[dict[str, Any]]:
    # One atomic write, the change asked for: nothing to put back if the run dies after it.
    text = f"deployment/{name} scaled from {before} to {replicas} (one write: kept)"
    return [{"kind": "note", "text": text}]


def _publish(name: str, summary: str, before: int, after: int, note: str) -> None:
    create_markdown_artifact(
        markdown="\n\n".join(
            [
                f"## Scale deployment/{name}",
                summary,
                markdown_table([{"replicas before": before, "replicas after": after}]),
                f"Autoscaler: {note}.",
            ]
        ),
        key="scale-report",
        description=summary,
    )


@flow(name="autoscale", flow_run_name="autoscale-{deployment}-{min_replicas}-{max_replicas}")
def autoscale(
    deployment: Component = "backend",
    min_replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 2,
    max_replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 20,
    cpu_utilization_percent: Annotated[int, Field(ge=10, le=95)] = 70,
    requested_by: RequestedBy = None,
) -> dict[str, Any]:
    """Apply the runbook's HorizontalPodAutoscaler (autoscaling/v2); a second apply is a no-op.

    Args:
        deployment: Deployment the autoscaler scales: backend, frontend or celery-workers.
        min_replicas: Fewest replicas the autoscaler keeps (not below the Deployment's floor).
        max_replicas: Most replicas the autoscaler may add (not above the Deployment's ceiling).
        cpu_utilization_percent: Average CPU utilisation the autoscaler aims for (10-95).
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    logger = get_run_logger()
    settings = load_settings()
    name = settings.deployment_name(deployment)

    # 1. Check the policy against the component's bounds, before any call.
    check_hpa_bounds(deployment, min_replicas, max_replicas)
    desired = hpa_body(name, min_replicas, max_replicas, cpu_utilization_percent)

    with exclusive(f"deployment/{name}"):
        # 2. Compare with the live HPA: apply only what differs (idempotent).
        existing = read_horizontal_pod_autoscaler(desired["metadata"]["name"])
        drift = hpa_drift(desired, existing)
        # 3. In production, a lowered floor or ceiling lets capacity fall: approval first.
        verdict = judge_autoscale(
            settings.environment, existing, min_replicas, max_replicas, read_deployment_scale(name)
        )
        if drift and verdict.needs_approval:
            before = (existing or {}).get("spec") or {}
            request_approval(
                Plan(
                    title=f"Autoscale deployment/{name} at {min_replicas}-{max_replicas}",
                    target=f"hpa/{hpa_name(name)}",
                    steps=(f"kubectl apply -f {hpa_name(name)}.yaml  # autoscaling/v2",),
                    facts={
                        "replicas (min-max) now": f"{before.get('minReplicas', '-')}-"
                        f"{before.get('maxReplicas', '-')}",
                        "replicas (min-max) after": f"{min_replicas}-{max_replicas}",
                        "target CPU": f"{cpu_utilization_percent}%",
                        "why approval": verdict.reason,
                    },
                )
            )
        # 4. Apply it (one write: a dead run leaves the policy asked for).
        if drift:
            intent = record_intent("autoscale", [f"deployment/{name}"], [_AUTOSCALE_NOTE])
            apply_horizontal_pod_autoscaler(desired)
            fault_point("autoscale: HPA applied")
            clear_intent(intent)

    # 5. Report.
    verb = ("created" if existing is None else "updated") if drift else "already up to date"
    summary = (
        f"hpa/{hpa_name(name)} for deployment/{name} {verb}: {min_replicas}-{max_replicas} "
        f"replicas at {cpu_utilization_percent}% CPU"
        + (f" (changed: {', '.join(drift)})" if drift and existing is not None else "")
    )
    before = (existing or {}).get("spec") or {}
    rows = [
        {"field": f, "before": before.get(f, "-"), "after": desired["spec"][f]}
        for f in ("minReplicas", "maxReplicas")
    ]
    create_markdown_artifact(
        markdown=f"## Autoscaling of deployment/{name}\n\n{summary}\n\n{markdown_table(rows)}",
        key="autoscale-report",
        description=summary,
    )
    logger.info(summary)
    return {"hpa": hpa_name(name), "changed": drift}
