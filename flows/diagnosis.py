"""What the four diagnose-* runbooks share: publishing the evidence, and offering the
proposals one at a time, each behind its own approval.

Why one approval per proposal, in rank order: the approval form (approve, approver,
reason) decides one plan, and the plan must show exactly what will happen (the pids, the
keys, the replica count). A rejection moves on to the next proposal; the first approved
is carried out — exactly as shown — and the rest are not offered. A timeout ends the run
with nothing changed. All rejected: the run fails with nothing changed.

Scaling and rolling back are handed to the `scale` and `rollback` runbooks as subflows,
so their bounds, locks, rollout watch and health check apply unchanged. `rollback`
always shows its own plan (current → target revision and image) and asks itself, so
its proposal is not asked twice; `scale` within bounds asks nothing more.

Started by incident-response (`incident_id` set), each rejection and the remediation
carried out — with who approved it — are also `complianceagent.incident.*` events of
that incident: its post-mortem timeline and its MITIGATE step read them from there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.logging import get_run_logger

from flows.rollback import rollback
from flows.scale import scale
from runbook.decisions.diagnostics import Diagnosis, Proposal
from runbook.report import markdown_table
from tasks.approval import ApprovalDecision, ApprovalRejected, Plan, request_approval
from tasks.incidents import emit_step
from tasks.notify import announce

# An incident id as incident-response makes it (a uuid), or empty: run on its own.
INCIDENT_ID = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?$"

CarryOut = Callable[[Proposal, ApprovalDecision | None], dict[str, Any]]


def publish_evidence(diagnosis: Diagnosis, sections: list[tuple[str, str]]) -> None:
    """The evidence artifact (`diagnosis-<issue>`): verdict, numbers, proposals."""
    proposals = [
        {"#": n, "proposal": p.title, "why": p.reason} for n, p in enumerate(diagnosis.proposals, 1)
    ]
    parts = [f"## Diagnosis: {diagnosis.issue} — {diagnosis.level.value}", diagnosis.summary]
    for title, body in sections:
        parts += [f"### {title}", body]
    parts += ["### Proposals (each needs an approval)", markdown_table(proposals)]
    create_markdown_artifact(
        markdown="\n\n".join(parts),
        key=f"diagnosis-{diagnosis.issue}",
        description=diagnosis.summary[:500],
    )


def plan_of(proposal: Proposal) -> Plan:
    return Plan(
        title=proposal.title,
        target=proposal.target,
        steps=proposal.steps,
        facts={"why": proposal.reason, **proposal.facts},
    )


def offer(proposals: list[Proposal], carry_out: CarryOut, incident_id: str = "") -> dict[str, Any]:
    """Each proposal in turn behind an approval; carry out the first approved one. With an
    incident, each rejection and the remediation carried out are told to its timeline."""
    logger = get_run_logger()
    run_id = get_run_context().flow_run.id  # type: ignore[union-attr]
    rejected = []
    for proposal in proposals:
        try:
            # The rollback runbook shows its own plan (current → target) and asks itself.
            needs_ours = proposal.kind != "rollback"
            decision = request_approval(plan_of(proposal)) if needs_ours else None
            outcome = carry_out(proposal, decision)
        except ApprovalRejected as exc:
            logger.info("%s: %s", proposal.title, exc)
            rejected.append(proposal.title)
            if incident_id:
                emit_step(incident_id, "mitigation-rejected", run_id, proposal=proposal.title)
            continue
        who = f" (approved by {decision.approver}: {decision.reason})" if decision else ""
        summary = f"{proposal.title}{who}: {outcome.get('summary', 'done')}"
        create_markdown_artifact(
            markdown=f"## Remediation carried out\n\n{summary}\n\n"
            + markdown_table([{k: v for k, v in outcome.items() if k != "summary"}]),
            key="remediation-report",
            description=summary[:500],
        )
        announce(f":wrench: {summary}")
        approver = decision.approver if decision else "(the rollback runbook's approval)"
        if incident_id:
            emit_step(
                incident_id,
                "mitigated",
                run_id,
                proposal=proposal.title,
                by=approver,
                reason=decision.reason if decision else "",
                run=str(run_id),
                outcome=str(outcome.get("summary", "done")),
            )
        return {
            "proposal": proposal.kind,
            "title": proposal.title,
            "approver": approver,
            **outcome,
        }
    raise ApprovalRejected(
        f"every proposal was rejected ({'; '.join(rejected)}); nothing was changed"
    )


def scale_or_rollback(proposal: Proposal, decision: ApprovalDecision | None) -> dict[str, Any]:
    """Carry out a `scale` or `rollback` proposal through that runbook (a subflow)."""
    action = proposal.action
    if proposal.kind == "scale":
        result = scale(deployment=action["component"], replicas=action["replicas"])
        summary = f"deployment/{result['deployment']} {result['before']} → {result['after']}"
        return {"summary": summary, **result}
    if proposal.kind == "rollback":
        result = rollback(deployment=action["component"], to_revision=action["to_revision"])
        return {"summary": f"now revision {result['revision']}", **result}
    raise ValueError(f"not a scale or rollback proposal: {proposal.kind}")
