"""Secret rotation's decisions over plain data: which version holds which stage, the
idempotency token of a run, and whether the restarted pods use the new value.

AWS Secrets Manager's four-step protocol (createSecret → setSecret → testSecret →
finishSecret) moves *staging labels* between versions: AWSPENDING marks the version being
rotated in, AWSCURRENT the one clients read, AWSPREVIOUS the one before (moved there by
Secrets Manager itself when AWSCURRENT moves).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

CURRENT, PENDING, PREVIOUS = "AWSCURRENT", "AWSPENDING", "AWSPREVIOUS"

# The secrets this runbook knows how to rotate; which secret id each one is, is configuration.
SecretName = Literal["api-key", "database-password"]

# A fixed namespace, so one run's token for one secret is the same on every retry.
_TOKEN_NAMESPACE = uuid.UUID("6f1d3f0e-2b7a-4c55-9a51-3d0f1f8a9c21")


@dataclass(frozen=True)
class Stages:
    """The version ids that hold AWSCURRENT, AWSPREVIOUS and AWSPENDING (None: nobody)."""

    current: str | None
    previous: str | None
    pending: str | None


def stages_of(version_ids_to_stages: Mapping[str, Sequence[str]]) -> Stages:
    """`describe_secret()["VersionIdsToStages"]` → who holds which stage."""

    def holder(stage: str) -> str | None:
        return next((v for v, stages in version_ids_to_stages.items() if stage in stages), None)

    return Stages(holder(CURRENT), holder(PREVIOUS), holder(PENDING))


def rotation_token(flow_run_id: str, secret_id: str) -> str:
    """The `ClientRequestToken` (= VersionId) of this run's new version of `secret_id`:
    the same on a retry of the same run, so a repeated createSecret is a no-op."""
    return str(uuid.uuid5(_TOKEN_NAMESPACE, f"{flow_run_id}:{secret_id}"))


@dataclass(frozen=True)
class KeyCheck:
    """What the backend answered an authenticated request with the key its pods should hold
    (`expected`) and with the key they should no longer accept (`other`)."""

    expected_status: int
    other_status: int

    def problem(self, expected: str = "new", other: str = "old") -> str | None:
        """None when the expected key is accepted and the other refused; else why not."""
        problems = []
        if self.expected_status != 200:
            problems.append(f"the {expected} API key was answered with HTTP {self.expected_status}")
        if self.other_status not in (401, 403):
            problems.append(
                f"the {other} API key was answered with HTTP {self.other_status}, not refused"
            )
        return "; ".join(problems) or None
