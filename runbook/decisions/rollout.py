"""Is a Deployment's rollout complete, still going, or failed? The rules `kubectl rollout
status` applies, over the Deployment as plain JSON (camelCase, as the API returns it)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from runbook.decisions.revisions import REVISION_ANNOTATION


class RolloutPhase(enum.StrEnum):
    PROGRESSING = "progressing"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True)
class RolloutVerdict:
    phase: RolloutPhase
    detail: str

    @property
    def finished(self) -> bool:
        return self.phase is not RolloutPhase.PROGRESSING


@dataclass(frozen=True)
class RolloutOutcome:
    """How a watched rollout ended: what `wait_for_rollout` returns and flows read."""

    phase: RolloutPhase
    reason: str
    revision: int  # the Deployment's revision when the watch decided

    @property
    def complete(self) -> bool:
        return self.phase is RolloutPhase.COMPLETE

    @property
    def finished(self) -> bool:
        return self.phase is not RolloutPhase.PROGRESSING


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def rollout_verdict(deployment: dict[str, Any], min_generation: int = 0) -> RolloutVerdict:
    """Judge a rollout from a Deployment object.

    `min_generation` is the generation our own change produced: until the controller has
    observed it, whatever the status says is about an older spec.
    """
    meta, spec, status = (deployment.get(k) or {} for k in ("metadata", "spec", "status"))
    generation = max(int(meta.get("generation") or 0), min_generation)
    observed = int(status.get("observedGeneration") or 0)
    if observed < generation:
        return RolloutVerdict(RolloutPhase.PROGRESSING, "waiting for the new spec to be observed")

    progressing = _condition(status, "Progressing")
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        return RolloutVerdict(
            RolloutPhase.FAILED,
            f"progress deadline exceeded: {progressing.get('message') or 'no message'}",
        )

    wanted = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < wanted:
        return RolloutVerdict(RolloutPhase.PROGRESSING, f"{updated} of {wanted} replicas updated")
    if total > updated:
        return RolloutVerdict(
            RolloutPhase.PROGRESSING, f"{total - updated} old replicas pending termination"
        )
    if available < updated:
        return RolloutVerdict(
            RolloutPhase.PROGRESSING, f"{available} of {updated} updated replicas available"
        )
    return RolloutVerdict(RolloutPhase.COMPLETE, f"{updated} replicas updated and available")


def rollout_outcome(deployment: dict[str, Any], min_generation: int = 0) -> RolloutOutcome:
    """The verdict on `deployment`, with the revision it is at: the one place that decides."""
    verdict = rollout_verdict(deployment, min_generation)
    annotations = (deployment.get("metadata") or {}).get("annotations") or {}
    revision = int(annotations.get(REVISION_ANNOTATION) or 0)
    return RolloutOutcome(verdict.phase, verdict.detail, revision)
