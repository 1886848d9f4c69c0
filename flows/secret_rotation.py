"""Runbook > Security > Secret Rotation.

    NEW_SECRET=$(openssl rand -base64 32)
    aws secretsmanager update-secret --secret-id complianceagent/api-key \
        --secret-string "$NEW_SECRET"
    kubectl rollout restart deployment/backend
    kubectl rollout restart deployment/celery-workers
    ./health-check.sh

Safer than the page: AWS Secrets Manager's own four-step protocol, run here (no Lambda):
createSecret (the new value as version AWSPENDING, its id derived from the run so a retry
changes nothing), setSecret (the database password: `ALTER ROLE`), testSecret (a real
login with it), finishSecret (AWSCURRENT moved to it, AWSPREVIOUS kept, AWSPENDING
removed). Then backend and celery-workers are restarted so their pods load it, and the
run checks health *and* that the pods use it (the new API key is accepted, the old one
refused; /health/db logs in with the new password, the old one no longer works).

Undo (also on cancellation):
- before finishSecret: AWSPENDING removed, the role's password put back; nothing else
  changed, nothing restarted;
- after it: AWSCURRENT moved back to the previous version, the role's password put back,
  backend and celery-workers restarted again and verified; the run fails saying so.

Which secrets exist is configuration (`RUNBOOK_API_KEY_SECRET_ID`,
`RUNBOOK_DATABASE_PASSWORD_SECRET_ID` + `RUNBOOK_DATABASE_APP_ROLE`). No value is ever a
parameter, a log line, an artifact, an event, a state message or a task result: tasks
pass version ids, and a value is read from Secrets Manager only by the step that needs it.
Holds `secret/<id>` and the `deployment/<name>` locks of the Deployments it restarts.
In production the approval comes first, with no lock held through the pause; under the
locks the AWSCURRENT version must then still be the one the plan showed, else the run is
refused ("changed since the plan was approved") with nothing written. A lost lock stops
it before its next write step, and the undo runs as for any failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from flows.deploy import verify_health
from flows.restart import restart_deployments
from runbook.decisions.secrets import KeyCheck, SecretName, rotation_token, stages_of
from runbook.fault_points import fault_point
from runbook.report import StepTimer, markdown_table
from runbook.settings import MissingSetting, PlatformSettings, load_settings
from tasks.approval import Plan, RequestedBy, refuse_if_changed, request_approval
from tasks.http import status_with_api_key
from tasks.intent import clear_intent, record_intent
from tasks.locks import exclusive_all
from tasks.notify import announce
from tasks.postgres_roles import alter_role_password, log_in_as
from tasks.secrets_manager import (
    create_pending_version,
    describe_secret_versions,
    move_current_stage,
    read_secret_version,
    remove_pending_stage,
)


class RotationFailed(RuntimeError):
    """The rotation did not go through; the message says why and what was put back."""


@dataclass(frozen=True)
class RotationTarget:
    """A configured secret: its Secrets Manager id, and the role it is the password of."""

    name: SecretName
    secret_id: str
    role: str | None = None


def rotation_target(settings: PlatformSettings, name: SecretName) -> RotationTarget:
    """The configured secret called `name`; refused (naming the setting) if unconfigured."""
    if name == "api-key":
        return RotationTarget(name, settings.api_key_secret_id)
    if settings.database_password_secret_id is None:
        raise MissingSetting("database_password_secret_id")
    return RotationTarget(name, settings.database_password_secret_id, settings.database_app_role)


@dataclass
class Progress:
    """How far the rotation got: what the undo has to take back."""

    old: str
    new: str | None = None
    role_changed: bool = False
    finishing: bool = False
    revisions: dict[str, int] = field(default_factory=dict)


@flow(name="secret-rotation", flow_run_name="secret-rotation-{secret}")
def secret_rotation(
    secret: Annotated[SecretName, Field(examples=["api-key"])] = "api-key",  # noqa: S107 (a name)
    health_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 5.0,
    requested_by: RequestedBy = None,
) -> dict[str, Any]:
    """Rotate a secret with Secrets Manager's four steps, restart backend and workers, and
    verify they use the new value; put the old one back if anything fails.

    Args:
        secret: Which configured secret to rotate: api-key (the API key) or
            database-password (the application role's PostgreSQL password).
        health_timeout_seconds: Timeout of each health endpoint request.
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    settings = load_settings()
    logger = get_run_logger()
    timer = StepTimer()
    target = rotation_target(settings, secret)
    workloads = [settings.backend_deployment, settings.workers_deployment]
    locks = [f"secret/{target.secret_id}", *(f"deployment/{name}" for name in workloads)]

    plan: Plan | None = None
    if settings.environment == "production":
        # 1. Read which version is AWSCURRENT and 2. ask, in production (no lock held
        #    through the pause: a restart or rollback must not wait behind it).
        with timer.step("read current version"):
            current = _current_version(target)
        plan = _plan(target, current, workloads)
        with timer.step("approval"):
            request_approval(plan)

    with exclusive_all(locks) as held:
        # 3. Under the locks, record which version is AWSCURRENT: what an undo goes back
        #    to; an approved plan must still be the truth.
        with timer.step("read current version"):
            current = _current_version(target)
        if plan is not None:
            refuse_if_changed(plan, _fingerprint(target, current))
        progress = Progress(old=current)
        token = rotation_token(str(flow_run.id), target.secret_id)

        # If this process dies, reconcile removes AWSPENDING and puts AWSCURRENT back.
        intent = record_intent(
            "secret-rotation", locks, _intent_undo(target, progress.old, token, workloads)
        )
        try:
            # 4. createSecret: a new value as AWSPENDING, its version id derived from the run.
            with timer.step("createSecret (AWSPENDING)"):
                progress.new = create_pending_version(target.secret_id, token, secret)
            fault_point("secret-rotation: createSecret done")
            # 5. setSecret: the database password is changed on the role (API key: nothing).
            #    Each write step starts only while the locks are still ours.
            if target.role:
                held.ensure_held()
                with timer.step(f"setSecret (ALTER ROLE {target.role})"):
                    progress.role_changed = True  # before the call: an ambiguous failure too
                    alter_role_password(target.role, _value(target, progress.new))
                fault_point("secret-rotation: setSecret done")
            # 6. testSecret: a real login with the new password.
            if target.role:
                with timer.step(f"testSecret (log in as {target.role})"):
                    log_in_as(target.role, _value(target, progress.new))
                fault_point("secret-rotation: testSecret done")
            # 7. finishSecret: AWSCURRENT to the new version, then AWSPENDING off it.
            held.ensure_held()
            with timer.step("finishSecret (AWSCURRENT moved)"):
                progress.finishing = True
                move_current_stage(target.secret_id, progress.new, progress.old)
                remove_pending_stage(target.secret_id, progress.new)
            fault_point("secret-rotation: finishSecret done")
            # 8. Restart backend and celery-workers so their pods load it; wait for both.
            held.ensure_held()
            with timer.step("rollout restart " + ", ".join(workloads)):
                progress.revisions = restart_deployments(workloads)
            # 9. Verify health, and that the restarted pods use the new value.
            with timer.step("verify health and the new value"):
                health = verify_health(health_timeout_seconds)
                _verify_in_use(target, settings, progress.new, progress.old, "new")
        except BaseException as exc:
            # 10. Failed, lock lost or cancelled: put back what was changed, fail saying so.
            why = str(exc).rstrip(". ") or type(exc).__name__
            logger.error("rotation of %s failed, undoing: %s", target.secret_id, why)
            with timer.step("undo"):
                summary = _undo(target, settings, progress, workloads, why, health_timeout_seconds)
            _publish(target, summary, progress, timer)
            announce(f":rotating_light: {summary}")
            if not isinstance(exc, Exception):
                raise  # a cancellation stays a cancellation
            raise RotationFailed(summary) from None

    clear_intent(intent)
    # 11. Report and tell chat.
    summary = (
        f"{target.secret_id} rotated: AWSCURRENT is version {progress.new} (AWSPREVIOUS "
        f"{progress.old}); {' and '.join(workloads)} restarted and use it; {health}"
    )
    _publish(target, summary, progress, timer)
    announce(f":key: {summary}")
    logger.info(summary)
    return {"secret_id": target.secret_id, "current": progress.new, "previous": progress.old}


def _intent_undo(
    target: RotationTarget, old: str, token: str, workloads: list[str]
) -> list[dict[str, Any]]:
    step = {"kind": "secret-stages", "secret_id": target.secret_id, "previous": old}
    return [{**step, "pending": token, "role": target.role, "restart": workloads}]


def _value(target: RotationTarget, version_id: str) -> Any:
    return read_secret_version(target.secret_id, version_id)


def _verify_in_use(
    target: RotationTarget, settings: PlatformSettings, expected: str, other: str, which: str
) -> None:
    """The backend's pods hold version `expected`: its API key is accepted and `other`'s
    refused. (The database password is proven by /health/db: after ALTER ROLE only the
    expected password logs in.)"""
    if target.name != "api-key":
        return
    base, timeout = str(settings.api_base_url), settings.http_timeout_seconds
    check = KeyCheck(
        expected_status=status_with_api_key(base, _value(target, expected), timeout),
        other_status=status_with_api_key(base, _value(target, other), timeout),
    )
    problem = check.problem(which, "old" if which == "new" else "rotated-out")
    if problem:
        raise RuntimeError(f"the restarted pods do not use the {which} API key: {problem}")


def _undo(
    target: RotationTarget,
    settings: PlatformSettings,
    progress: Progress,
    workloads: list[str],
    why: str,
    health_timeout_seconds: float,
) -> str:
    """Put back what the rotation changed; return the run's failure summary."""
    done: list[str] = []
    problems: list[str] = []

    def attempt(what: str, step: Any) -> None:
        try:
            step()
            done.append(what)
        except Exception as exc:
            problems.append(f"{what} FAILED: {exc}")

    new, old = progress.new, progress.old
    if progress.finishing and new is not None:
        attempt(
            f"AWSCURRENT moved back to version {old}",
            lambda: move_current_stage(target.secret_id, old, new),
        )
    if new is not None:
        attempt("AWSPENDING removed", lambda: remove_pending_stage(target.secret_id, new))
    if progress.role_changed and target.role:
        role = target.role
        attempt(
            f"password of role {role} put back",
            lambda: alter_role_password(role, _value(target, old)),
        )
    if progress.finishing:
        attempt(
            f"{' and '.join(workloads)} restarted again",
            lambda: progress.revisions.update(restart_deployments(workloads)),
        )

        def verify() -> None:
            verify_health(health_timeout_seconds)
            _verify_in_use(target, settings, old, new or old, "previous")

        attempt("health and the previous value verified", verify)

    stage = "after finishSecret" if progress.finishing else "before finishSecret"
    outcome = "; ".join(done) or "nothing had changed"
    summary = f"Rotation of {target.secret_id} failed {stage}: {why}. Undo: {outcome}."
    if problems:
        summary += " UNDO INCOMPLETE: " + "; ".join(problems) + "."
    elif not progress.finishing:
        summary += " Nothing else was changed; nothing was restarted."
    return summary


def _plan(target: RotationTarget, current: str, workloads: list[str]) -> Plan:
    steps = [f"createSecret: new version of {target.secret_id} as AWSPENDING"]
    if target.role:
        steps += [
            f"setSecret: ALTER ROLE {target.role} PASSWORD (new value)",
            f"testSecret: log in as {target.role} with it",
        ]
    steps += [
        "finishSecret: AWSCURRENT to the new version, AWSPREVIOUS to the current one",
        "kubectl rollout restart " + " ".join(f"deployment/{n}" for n in workloads),
        "Verify health and that the pods use the new value",
        "On failure: AWSCURRENT back to the current version, restart again, verify",
    ]
    return Plan(
        title=f"Rotate {target.secret_id}",
        target=f"secret/{target.secret_id}",
        steps=tuple(steps),
        facts={
            "secret": target.secret_id,
            "AWSCURRENT version now": current,
            "used by": f"PostgreSQL role {target.role}" if target.role else "API clients",
            "restarts": ", ".join(workloads),
        },
        fingerprint=_fingerprint(target, current),
    )


def _fingerprint(target: RotationTarget, current: str) -> dict[str, str]:
    """What a rotation's plan rests on: the version that is AWSCURRENT."""
    return {f"{target.secret_id} AWSCURRENT version": current}


def _current_version(target: RotationTarget) -> str:
    stages = stages_of(describe_secret_versions(target.secret_id))
    if stages.current is None:
        raise RotationFailed(f"{target.secret_id} has no AWSCURRENT version to rotate")
    return stages.current


def _publish(target: RotationTarget, summary: str, progress: Progress, timer: StepTimer) -> None:
    rows = [
        {
            "secret": target.secret_id,
            "version before": progress.old,
            "new version": progress.new or "-",
            "revisions after restart": ", ".join(
                f"{name} {rev}" for name, rev in progress.revisions.items()
            ),
        }
    ]
    create_markdown_artifact(
        markdown="\n\n".join(
            [
                f"## Rotation of {target.secret_id}",
                summary,
                markdown_table(rows),
                "### Steps",
                timer.markdown(),
            ]
        ),
        key="secret-rotation-report",
        description=summary[:500],
    )
