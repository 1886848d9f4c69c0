"""The one approval gate every destructive runbook goes through.

1. The plan — what will change, from what to what — is published as a markdown artifact
   and shown above the approval form in the UI.
2. The run pauses for a typed `ApprovalDecision`. Every field is required, so an empty
   or malformed resume is refused by the server and the run stays paused.
3. The decision (or the timeout) is recorded: an artifact, a log line and an event,
   each naming who started the run (`runbook.decisions.approval.requester_of`: Prefect
   Cloud's user, an authenticating proxy's `requested-by:<name>` tag, or the flow's
   `requested_by` parameter) and who decided.
4. Four eyes: an approval by the requester is refused and recorded, and the run waits
   for another approver until its deadline. (Names are compared as given: the
   open-source Prefect server verifies no identity; README, "Who approves".)
5. Approved: the flow goes on and acts on exactly the plan it showed. Rejected or timed
   out: an exception ends the run before anything changes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated

from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.logging import get_run_logger
from prefect.states import Failed
from pydantic import Field

from runbook.decisions.approval import Requester, requester_of, same_person
from runbook.decisions.locks import plan_changes, stale_plan_message
from runbook.settings import load_settings
from tasks.notify import notify_chat

# A flow's optional `requested_by` parameter: who asks, kept as a name (never a credential).
# The approver must be someone else (runbook/decisions/approval.py).
RequestedBy = Annotated[str | None, Field(max_length=100, examples=["alice"])]


class ApprovalDecision(RunInput):
    """What the approver answers. No defaults: the form must be filled in."""

    approve: bool = Field(
        description="Tick to carry out the plan above; leave unticked to refuse it."
    )
    approver: str = Field(
        min_length=1, max_length=100, description="Who decides (name or handle); recorded."
    )
    reason: str = Field(
        min_length=1, max_length=500, description="Why (ticket, change request…); recorded."
    )


class ApprovalRejected(RuntimeError):
    """The approver refused the plan; nothing was changed."""


class ApprovalTimedOut(RuntimeError):
    """Nobody decided in time; nothing was changed."""


@dataclass(frozen=True)
class Plan:
    """What a runbook is about to do, shown to the approver and then carried out as shown.

    `facts` are the numbers the approver judges by (current → target image, backup age…).
    """

    title: str
    target: str
    steps: tuple[str, ...]
    facts: dict[str, str] = field(default_factory=dict)
    # What the target must still be when the flow acts (after the approval, under the
    # lock): checked by `refuse_if_changed`, shown to the approver.
    fingerprint: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")[:60] or "plan"

    def markdown(self) -> str:
        lines = [f"## Approval needed: {self.title}", "", f"**Target:** `{self.target}`", ""]
        if self.facts:
            lines += ["| | |", "|---|---|"]
            lines += [f"| {name} | {value} |" for name, value in self.facts.items()]
            lines.append("")
        lines.append("**Steps, in order:**")
        lines += [f"{n}. {step}" for n, step in enumerate(self.steps, 1)]
        if self.fingerprint:
            pinned = ", ".join(f"{name} = {value}" for name, value in self.fingerprint.items())
            lines += ["", f"Carried out only if, when it starts, still: {pinned}."]
        return "\n".join(lines)


def _record(plan: Plan, outcome: str, detail: str, requester: Requester | None) -> None:
    run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    requested_by = requester.describe() if requester else "unknown"
    create_markdown_artifact(
        markdown=f"## Approval {outcome}: {plan.title}\n\n{detail}\n\nTarget: `{plan.target}`"
        f"\n\nRequested by: {requested_by}",
        key=f"approval-{outcome}",
        description=f"Approval decision for {plan.title}",
    )
    emit_event(
        event=f"runbook.approval.{outcome}",
        resource={"prefect.resource.id": f"runbook.approval.{run_id}.{plan.key}"},
        related=[
            {
                "prefect.resource.id": f"prefect.flow-run.{run_id}",
                "prefect.resource.role": "flow-run",
            }
        ],
        payload={
            "plan": plan.title,
            "target": plan.target,
            "detail": detail,
            "requested_by": requester.name if requester else None,
            "requested_by_source": requester.source if requester else None,
        },
    )


def current_requester() -> Requester | None:
    """Who started this run, as far as the run itself says (see `requester_of`)."""
    run = get_run_context().flow_run  # type: ignore[union-attr]
    assert run is not None
    created_by = run.created_by
    return requester_of(
        run.parameters or {},
        run.tags or [],
        str(created_by.type) if created_by and created_by.type else None,
        created_by.display_value if created_by else None,
    )


def _fail_run_with(message: str) -> None:
    """Replace the server's generic "never resumed" failure with our clear message."""
    run_id = get_run_context().flow_run.id  # type: ignore[union-attr]
    with get_client(sync_client=True) as prefect_api:
        prefect_api.set_flow_run_state(run_id, Failed(message=message), force=True)


def request_approval(plan: Plan) -> ApprovalDecision:
    """Show `plan`, wait for a decision by someone other than the requester, and return it
    only if it is an approval.

    Raises `ApprovalRejected` or `ApprovalTimedOut` (after notifying chat) otherwise.
    """
    settings = load_settings()
    logger = get_run_logger()
    requester = current_requester()
    requested_by = requester.describe() if requester else "unknown (no identity on this run)"
    plan = replace(plan, facts={**plan.facts, "requested by": requested_by})
    create_markdown_artifact(markdown=plan.markdown(), key="approval-plan", description=plan.title)
    _record(
        plan,
        "requested",
        f"Waiting up to {settings.approval_timeout_seconds}s for a decision.",
        requester,
    )
    logger.info(
        "Waiting for approval of %r on %s, requested by %s", plan.title, plan.target, requested_by
    )
    deadline = time.monotonic() + settings.approval_timeout_seconds
    attempt = 1
    while True:
        decision = _wait_for_decision(plan, attempt, deadline, requester)
        if not (decision.approve and same_person(requester, decision.approver)):
            break
        # Four eyes: the requester cannot approve their own change; wait for someone else.
        refusal = (
            f"Approval by {decision.approver} refused: {decision.approver} requested this "
            "run; another person must approve. Still waiting."
        )
        logger.warning(refusal)
        _record(plan, "refused-self-approval", refusal, requester)
        attempt += 1

    verdict = "approved" if decision.approve else "rejected"
    detail = f"{verdict.capitalize()} by **{decision.approver}**: {decision.reason}"
    logger.info("%s %s by %s: %s", plan.title, verdict, decision.approver, decision.reason)
    _record(plan, verdict, detail, requester)
    if not decision.approve:
        raise ApprovalRejected(
            f"{plan.title!r} rejected by {decision.approver}: {decision.reason}; "
            "nothing was changed."
        )
    return decision


def _wait_for_decision(
    plan: Plan, attempt: int, deadline: float, requester: Requester | None
) -> ApprovalDecision:
    """One pause for a decision, until the deadline; a timeout fails the run cleanly."""
    settings = load_settings()
    # Each wait needs its own pause key: a key already used would not pause again.
    key = plan.key if attempt == 1 else f"{plan.key}-{attempt}"
    try:
        return pause_flow_run(
            wait_for_input=ApprovalDecision.with_initial_data(description=plan.markdown()),
            timeout=max(1, round(deadline - time.monotonic())),
            poll_interval=settings.approval_poll_seconds,
            key=key,
        )
    except FlowPauseTimeout:
        message = (
            f"No decision on {plan.title!r} within {settings.approval_timeout_seconds}s; "
            "nothing was changed."
        )
        get_run_logger().error(message)
        _fail_run_with(message)
        _record(plan, "timed-out", message, requester)
        notify_chat(f":hourglass: {message}")
        raise ApprovalTimedOut(message) from None


class PlanChanged(RuntimeError):
    """The target changed between the plan and the moment the flow could act: refused."""


def refuse_if_changed(plan: Plan, live: Mapping[str, str]) -> None:
    """Call under the target's lock, after the approval and before the first write: raise
    `PlanChanged` ("changed since the plan was approved") unless the live fingerprint is
    the plan's. The lock is not held through the pause, so this is what keeps what the
    approver saw true."""
    changes = plan_changes(plan.fingerprint, live)
    if changes:
        message = stale_plan_message(plan.title, changes)
        get_run_logger().error(message)
        raise PlanChanged(message)
