"""How many replicas each component may run, whether a manual scale needs an approval,
and the runbook's HorizontalPodAutoscaler. Pure, over plain values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runbook.decisions.refusal import Refused

JSON = dict[str, Any]


@dataclass(frozen=True)
class ReplicaBounds:
    """`floor`: fewer replicas than this is a capacity risk, allowed only with an approval.
    `ceiling`: more than this is refused (cost, database connections)."""

    floor: int
    ceiling: int


# The runbook's HPA keeps the backend within 2-20. The frontend serves static pages (two
# for availability is plenty; ten is already generous); workers scale with the queue
# (the runbook's example is 10) and one keeps the queue moving.
REPLICA_BOUNDS: dict[str, ReplicaBounds] = {
    "backend": ReplicaBounds(floor=2, ceiling=20),
    "frontend": ReplicaBounds(floor=2, ceiling=10),
    "celery-workers": ReplicaBounds(floor=1, ceiling=30),
}
# The bound every form shares (the server refuses anything above it outright).
MAX_REPLICAS = max(b.ceiling for b in REPLICA_BOUNDS.values())


@dataclass(frozen=True)
class ScaleVerdict:
    needs_approval: bool
    reason: str


def judge_scale(component: str, replicas: int) -> ScaleVerdict:
    """Refuse a count outside what this component may run; ask for an approval below its
    floor (and always for zero, which takes the component down)."""
    bounds = REPLICA_BOUNDS.get(component)
    if bounds is None:
        raise Refused("deployment", f"{component!r} is not one of {', '.join(REPLICA_BOUNDS)}")
    if replicas < 0:
        raise Refused("replicas", f"{replicas} is negative")
    if replicas > bounds.ceiling:
        raise Refused(
            "replicas", f"{replicas} is above the ceiling of {bounds.ceiling} for {component}"
        )
    if replicas == 0:
        return ScaleVerdict(True, f"scaling {component} to 0 takes it down")
    if replicas < bounds.floor:
        return ScaleVerdict(
            True, f"{replicas} is below the floor of {bounds.floor} for {component}"
        )
    return ScaleVerdict(False, f"within {bounds.floor}-{bounds.ceiling} for {component}")


# --- the runbook's HorizontalPodAutoscaler ----------------------------------------------------


def hpa_name(deployment: str) -> str:
    """The runbook names it `backend-hpa`."""
    return f"{deployment}-hpa"


def hpa_note(hpa: JSON | None, replicas: int) -> str:
    """What the autoscaler will do to a manual count: the plan and report say it."""
    if hpa is None:
        return "no HorizontalPodAutoscaler targets it"
    spec = hpa["spec"]
    low, high = spec.get("minReplicas", 1), spec["maxReplicas"]
    note = f"HPA {hpa['metadata']['name']} keeps it within {low}-{high}"
    if not low <= replicas <= high:
        note += f"; it will move {replicas} back into that range"
    return note


def check_hpa_bounds(component: str, min_replicas: int, max_replicas: int) -> None:
    """A standing autoscaling policy stays within the component's floor and ceiling."""
    bounds = REPLICA_BOUNDS.get(component)
    if bounds is None:
        raise Refused("deployment", f"{component!r} is not one of {', '.join(REPLICA_BOUNDS)}")
    if min_replicas < bounds.floor:
        raise Refused(
            "min_replicas", f"{min_replicas} is below the floor of {bounds.floor} for {component}"
        )
    if max_replicas > bounds.ceiling:
        raise Refused(
            "max_replicas",
            f"{max_replicas} is above the ceiling of {bounds.ceiling} for {component}",
        )
    if min_replicas > max_replicas:
        raise Refused("min_replicas", f"{min_replicas} is above max_replicas ({max_replicas})")


def hpa_body(deployment: str, min_replicas: int, max_replicas: int, cpu_percent: int) -> JSON:
    """The runbook's `autoscaling/v2` HorizontalPodAutoscaler, for `deployment`."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": hpa_name(deployment),
            "labels": {"app.kubernetes.io/managed-by": "complianceagent-runbooks"},
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": cpu_percent},
                    },
                }
            ],
        },
    }


def hpa_drift(desired: JSON, existing: JSON | None) -> list[str]:
    """The spec fields an existing HPA would have to change to match `desired`; every
    field when there is none. Fields the API server fills in (behavior, status) don't count,
    so applying the same policy twice finds nothing to do."""
    fields = ("scaleTargetRef", "minReplicas", "maxReplicas", "metrics")
    if existing is None:
        return list(fields)
    have = existing.get("spec") or {}
    return [f for f in fields if desired["spec"].get(f) != have.get(f)]


def judge_autoscale(
    environment: str,
    existing: JSON | None,
    min_replicas: int,
    max_replicas: int,
    current_replicas: int,
) -> ScaleVerdict:
    """In production, an autoscaler that lowers its floor or ceiling needs an approval:
    it lets capacity fall (a lower ceiling scales down at once). Without an autoscaler yet,
    a ceiling below today's replica count is such a lowering. Elsewhere: no approval."""
    spec = (existing or {}).get("spec") or {}
    lowered = []
    if existing is not None:
        if min_replicas < int(spec.get("minReplicas", 1)):
            lowered.append(f"floor {spec.get('minReplicas', 1)} → {min_replicas}")
        if max_replicas < int(spec.get("maxReplicas", max_replicas)):
            lowered.append(f"ceiling {spec['maxReplicas']} → {max_replicas}")
    elif max_replicas < current_replicas:
        lowered.append(f"ceiling {max_replicas} below the {current_replicas} replicas running")
    if not lowered:
        return ScaleVerdict(False, "no bound lowered")
    if environment != "production":
        return ScaleVerdict(False, f"lowers the {'; '.join(lowered)} (approval only in production)")
    return ScaleVerdict(True, f"lowers the {'; '.join(lowered)} in production")
