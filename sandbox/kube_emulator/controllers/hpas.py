"""HorizontalPodAutoscalers, status only: nothing autoscales."""

from __future__ import annotations

from ..resources import JSON, find_type
from .base import Controller


class HpaController(Controller):
    """HPAs get a status computed from their target at creation."""

    def status_for(self, hpa: JSON) -> JSON:
        spec = hpa.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        target_rt = find_type(ref.get("apiVersion", "apps/v1"), ref.get("kind", ""))
        target = None
        if target_rt is not None:
            target = self.cluster.get(target_rt, hpa["metadata"]["namespace"], ref.get("name", ""))
        if target is None:
            return {"currentReplicas": 0, "desiredReplicas": 0}
        current = target["spec"].get("replicas", 0)
        low, high = spec.get("minReplicas", 1), spec.get("maxReplicas", current)
        return {"currentReplicas": current, "desiredReplicas": min(max(current, low), high)}
