"""Runbook > Common Operations > Planned Maintenance Window.

    # 1. Notify users (update status page)
    kubectl set env deployment/backend MAINTENANCE_MODE=true
    sleep 60
    # 4. Perform maintenance
    kubectl set env deployment/backend MAINTENANCE_MODE=false
    ./health-check.sh
    # 7. Update status page

Safer than the page:
- Approval first, showing the plan; a window already open on the backend is refused.
- The window (who, why, deadline, run) is recorded as an annotation on the backend
  Deployment before anything changes, so anyone looking at the cluster sees it is open and
  when it must end; then the status page says "scheduled" and, when an Alertmanager is
  configured, the platform's alerts are silenced until the deadline.
- Enter: `MAINTENANCE_MODE=true` (kubectl set env), wait for the rollout, then drain by
  measurement — the backend's `http_requests_in_flight` must reach 0 — not `sleep 60`.
- The work runs inside: the `migrations` or `restore` runbook as a subflow (its own
  approval and report stay visible), or a manual window that waits for an operator to say
  what was done. It must end by the deadline.
- Leave, ALWAYS (success, failed or rejected work, cancellation, deadline):
  `MAINTENANCE_MODE=false`, wait for the rollout, health check, status page resolved (or
  "identified" with the reason when health fails), silence expired, annotation removed.
  Each step is tried even if an earlier one failed, and each is safe to run twice.
- The `deployment/<backend>` lock is held for the enter and leave writes only: the work
  inside takes its own locks (restore takes the backend's too) and must not wait for ours.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from flows.migrations import migrations
from flows.restore import restore
from runbook.decisions.backups import BACKUP_ID_PATTERN, LATEST
from runbook.decisions.deployment import deployment_view, main_container
from runbook.decisions.health import EXPECTED_STATUS, EndpointCheck, summarize
from runbook.decisions.locks import deployment_fingerprint
from runbook.decisions.maintenance import (
    WINDOW_ANNOTATION,
    Window,
    closing_update,
    open_window_of,
    silence_body,
)
from runbook.decisions.migrations import MAINTENANCE_VARIABLE, maintenance_mode_of
from runbook.decisions.refusal import Refused
from runbook.fault_points import fault_point
from runbook.report import StepTimer, markdown_table
from runbook.settings import load_settings
from tasks.alertmanager import create_silence, expire_silence
from tasks.approval import Plan, RequestedBy, refuse_if_changed, request_approval
from tasks.http import check_endpoint, wait_until_drained
from tasks.intent import clear_intent, record_intent
from tasks.kubernetes import (
    annotate_deployment,
    read_deployment,
    set_deployment_env,
    wait_for_rollout,
)
from tasks.locks import exclusive
from tasks.notify import announce, update_status_page
from tasks.retry_policy import call_with_retries

Work = Literal["manual", "migrations", "restore"]

ROLLOUT_DEADLINE_SECONDS = 300
# The silence outlives the deadline by this much, so leaving does not page anyone; it is
# expired explicitly as soon as the window is closed.
SILENCE_MARGIN = dt.timedelta(minutes=15)
# Leaving waits this long for the backend's lock (another runbook's short change).
LEAVE_LOCK_WAIT_SECONDS = 120


class WorkDone(RunInput):
    """What the operator answers when the manual work is finished. No defaults."""

    operator: str = Field(min_length=1, max_length=100, description="Who did the work.")
    what_was_done: str = Field(
        min_length=1,
        max_length=2000,
        description="What was done (commands, change ticket); recorded in the report.",
    )


class WindowDeadlinePassed(TimeoutError):
    """The work did not finish by the window's deadline; the window was closed anyway."""


class WindowNotClosedCleanly(RuntimeError):
    """A step of leaving the window failed; the message says which, and what to do."""


def _run_name() -> str:
    return f"maintenance-window-{flow_run.parameters.get('work', 'manual')}"


@flow(name="maintenance-window", flow_run_name=_run_name, log_prints=False)
def maintenance_window(
    reason: Annotated[
        str, Field(min_length=3, max_length=200, examples=["Schema upgrade (CHG-1234)"])
    ],
    duration_seconds: Annotated[int, Field(ge=10, le=8 * 3600)] = 1800,
    work: Work = "manual",
    backup_id: Annotated[str, Field(pattern=rf"^({LATEST}|{BACKUP_ID_PATTERN})$")] = LATEST,
    drain_timeout_seconds: Annotated[int, Field(ge=1, le=900)] = 120,
    requested_by: RequestedBy = None,
) -> dict[str, Any]:
    """Open a planned maintenance window on the backend, do the work, and always close it.

    Args:
        reason: Why (shown on the status page, in the silence and the annotation), e.g.
            "Upgrade the database schema (CHG-1234)".
        duration_seconds: Expected duration; the window ends by itself at this deadline
            after it opens, done or not (10 s - 8 h).
        work: What to do inside: `migrations` (the migrations runbook), `restore` (the
            restore runbook, with backup_id), or `manual` (waits until an operator says
            it is done, who and what).
        backup_id: For `restore` only: `latest` or a backup id.
        drain_timeout_seconds: How long to wait for in-flight requests to finish after
            maintenance mode is on, before giving up and closing the window (1-900).
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    settings = load_settings()
    logger = get_run_logger()
    timer = StepTimer()
    backend = settings.backend_deployment

    # 1. Read the backend; refuse if a window is already open on it.
    live = read_deployment(backend)
    _refuse_if_open(backend, live)
    container = main_container(live)["name"]

    # 2. Approval, showing the plan (no lock held through the pause).
    plan = _plan(backend, reason, duration_seconds, work, backup_id, _fingerprint(backend, live))
    with timer.step("approval"):
        decision = request_approval(plan)
    started = time.perf_counter()
    now = dt.datetime.now(dt.UTC)
    window = Window(
        decision.approver,
        reason,
        work,
        now,
        now + dt.timedelta(seconds=duration_seconds),
        str(flow_run.id),
    )
    leave = Leave(window, backend, container, timer)
    outcome: dict[str, Any] = {}
    # Recorded outside this process first: if it dies, reconcile switches maintenance off
    # (and, as the window goes on, resolves the status page and expires the silence).
    undo: list[dict[str, Any]] = [
        {"kind": "maintenance-off", "deployment": backend, "container": container}
    ]
    intent = record_intent("maintenance-window", [f"deployment/{backend}"], undo)
    try:
        # 3. Record the window on the backend Deployment, before anything changes.
        #    Under the lock, the backend must still be as the plan showed (no window opened,
        #    no deploy meanwhile), else refused with nothing changed.
        with timer.step("record the window"), exclusive(f"deployment/{backend}"):
            refuse_if_changed(plan, _fingerprint(backend, read_deployment(backend)))
            leave.annotated = True  # before the call: an interrupted write is undone too
            annotate_deployment(backend, {WINDOW_ANNOTATION: window.annotation()})

        # 4. Tell users: status page "scheduled".
        with timer.step("status page: scheduled"):
            undo.append({"kind": "status-page-resolved", "reason": reason})
            record_intent("maintenance-window", [f"deployment/{backend}"], undo)
            leave.status_page = True
            update_status_page("scheduled", _announcement(window))
        fault_point("maintenance-window: status page scheduled")

        # 5. Silence the platform's alerts until the deadline (if Alertmanager is configured).
        if settings.alertmanager_url is not None:
            with timer.step("silence alerts"):
                # Found by the run id in its comment: recorded before its id exists.
                undo.append({"kind": "expire-silences", "run_id": window.run_id})
                record_intent("maintenance-window", [f"deployment/{backend}"], undo)
                body = silence_body(
                    {"namespace": settings.namespace}, window, window.deadline + SILENCE_MARGIN
                )
                leave.silence_id = create_silence(body)
            fault_point("maintenance-window: alerts silenced")

        # 6. Enter: MAINTENANCE_MODE=true, wait for the rollout.
        with timer.step("maintenance mode on"), exclusive(f"deployment/{backend}"):
            leave.entered = True
            _set_maintenance_mode(backend, container, True)
        fault_point("maintenance-window: maintenance mode on")

        # 7. Drain: wait until the backend serves no request (measured, not slept).
        with timer.step("drain"):
            budget = min(drain_timeout_seconds, _remaining(window))
            drained = wait_until_drained(str(settings.api_base_url), budget)
        outcome["drain_seconds"] = drained["seconds"]

        # 8. The work, ending by the deadline.
        inside_started = time.perf_counter()
        with timer.step(f"work: {work}"):
            outcome["work"] = _do_work(work, window, backup_id)
        outcome["inside_seconds"] = time.perf_counter() - inside_started
    except BaseException as exc:
        leave.failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        # 9. Leave, whatever happened.
        leave.run()
        outcome["window_seconds"] = time.perf_counter() - started
        _publish(window, leave, outcome, timer)
        logger.info(leave.summary())
        announce(leave.summary())

    if leave.problems:
        raise WindowNotClosedCleanly(leave.summary())
    clear_intent(intent)
    return {
        "opened_by": window.opened_by,
        "deadline": window.deadline.isoformat(),
        "health": leave.health_problem or "healthy",
        **outcome,
    }


# --- the steps ---------------------------------------------------------------------------


def _refuse_if_open(backend: str, live: dict[str, Any]) -> None:
    recorded = open_window_of(live)
    if recorded is not None or maintenance_mode_of(live):
        raise Refused(
            "work",
            f"deployment/{backend} is already in a maintenance window "
            f"({recorded or MAINTENANCE_VARIABLE + '=true'}); close that one first",
        )


def _set_maintenance_mode(backend: str, container: str, on: bool) -> None:
    """`kubectl set env deployment/BACKEND MAINTENANCE_MODE=…`, then wait for the rollout."""
    patched = set_deployment_env(backend, container, {MAINTENANCE_VARIABLE: str(on).lower()})
    outcome = wait_for_rollout(
        backend, deployment_view(patched).generation, ROLLOUT_DEADLINE_SECONDS
    )
    if not outcome.complete:
        raise RuntimeError(f"rollout of deployment/{backend} failed: {outcome.reason}")


def _remaining(window: Window) -> float:
    remaining = window.remaining_seconds(dt.datetime.now(dt.UTC))
    if remaining <= 0:
        raise WindowDeadlinePassed(f"the window's deadline {window.deadline:%H:%M:%S} UTC passed")
    return remaining


def _do_work(work: Work, window: Window, backup_id: str) -> dict[str, Any]:
    """Run the work inside the window, stopped at the deadline."""
    remaining = _remaining(window)
    if work == "migrations":
        result: dict[str, Any] = migrations.with_options(timeout_seconds=remaining)(
            require_maintenance_mode=True, deadline_seconds=max(60, int(remaining))
        )
        return result
    if work == "restore":
        result = restore.with_options(timeout_seconds=remaining)(
            backup_id=backup_id, check_health=False
        )
        return result
    try:
        done = pause_flow_run(
            wait_for_input=WorkDone.with_initial_data(description=_work_form(window)),
            timeout=max(1, int(remaining)),
            poll_interval=load_settings().approval_poll_seconds,
            key="maintenance-work-done",
        )
    except FlowPauseTimeout:
        raise WindowDeadlinePassed(
            f"no one reported the manual work done by the deadline "
            f"{window.deadline:%Y-%m-%d %H:%M:%S} UTC; the window was closed"
        ) from None
    return {"operator": done.operator, "what_was_done": done.what_was_done}


@dataclass
class Leave:
    """What entering did, so leaving undoes exactly that; every step is tried, each is
    safe to run twice, and its outcome is recorded for the report.

    Leaving calls the tasks' functions directly (with the same retry policy): it must
    work while the run is being cancelled or has timed out, when the orchestrator may
    no longer start task runs for it.
    """

    window: Window
    backend: str
    container: str
    timer: StepTimer
    annotated: bool = False
    status_page: bool = False
    silence_id: str | None = None
    entered: bool = False
    failure: str = ""
    health_problem: str = ""
    steps: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def run(self) -> None:
        lock = f"deployment/{self.backend}"
        if self.entered:
            self._step(
                "maintenance mode off",
                lambda: self._locked(lock, lambda: self._maintenance_off()),
            )
            self._step("health check", self._check_health)
        if self.status_page:
            closing = closing_update(self.window.reason, self.health_problem, self.failure)
            self._step(
                f"status page: {closing.status}",
                lambda: update_status_page.fn(closing.status, closing.message),  # type: ignore[arg-type]
            )
        if self.silence_id is not None:
            silence_id = self.silence_id
            self._step(f"expire silence {silence_id}", lambda: expire_silence.fn(silence_id))
        if self.annotated:
            self._step(
                "remove the window annotation",
                lambda: self._locked(
                    lock,
                    lambda: annotate_deployment.fn(self.backend, {WINDOW_ANNOTATION: None}),
                ),
            )

    def _step(self, name: str, call: Callable[[], object]) -> None:
        with self.timer.step(f"leave: {name}"):
            try:
                call_with_retries(name, call)
            except Exception as exc:
                get_run_logger().error("leaving the window: %s failed: %s", name, exc)
                self.problems.append(f"{name} failed: {exc}")
                self.steps.append({"step": name, "outcome": f"FAILED: {exc}"})
                return
        self.steps.append({"step": name, "outcome": "done"})

    @staticmethod
    def _locked(target: str, call: Callable[[], object]) -> object:
        with exclusive(target, wait_seconds=LEAVE_LOCK_WAIT_SECONDS):
            return call()

    def _maintenance_off(self) -> None:
        patched = set_deployment_env.fn(
            self.backend, self.container, {MAINTENANCE_VARIABLE: "false"}
        )
        generation = deployment_view(patched).generation
        outcome = wait_for_rollout.fn(self.backend, generation, ROLLOUT_DEADLINE_SECONDS)
        if not outcome.complete:
            raise RuntimeError(f"rollout of deployment/{self.backend} failed: {outcome.reason}")

    def _check_health(self) -> None:
        """The health-check runbook's five checks; a failure is recorded, not raised (the
        status page says "degraded" then)."""
        settings = load_settings()
        checks = []
        for endpoint in EXPECTED_STATUS:
            try:
                checks.append(
                    call_with_retries(
                        f"check {endpoint}",
                        lambda e=endpoint: check_endpoint.fn(  # type: ignore[misc]
                            str(settings.api_base_url), e, settings.http_timeout_seconds
                        ),
                    )
                )
            except Exception as exc:
                checks.append(EndpointCheck(endpoint, False, None, None, "", str(exc)))
        summary = summarize(checks)
        self.health_problem = "" if summary.healthy else summary.text
        if self.health_problem:
            self.problems.append(f"health check after the window: {self.health_problem}")

    def summary(self) -> str:
        head = (
            f"Maintenance window on deployment/{self.backend} ({self.window.reason}, opened by "
            f"{self.window.opened_by})"
        )
        if self.failure:
            head += f": the work did not complete ({self.failure})"
        else:
            head += ": the work completed"
        if self.problems:
            return f"{head}; closing it had problems: {'; '.join(self.problems)}"
        return f"{head}; the window is closed and the platform is healthy"


# --- what people see ---------------------------------------------------------------------


def _plan(
    backend: str,
    reason: str,
    duration: int,
    work: Work,
    backup_id: str,
    fingerprint: dict[str, str],
) -> Plan:
    inside = {
        "migrations": "Run the migrations runbook (its own approval) as a subflow",
        "restore": f"Run the restore runbook from backup {backup_id} (its own approval)",
        "manual": "Wait for an operator to report the manual work done (who, what)",
    }[work]
    settings = load_settings()
    return Plan(
        title=f"Maintenance window on deployment/{backend}: {work}",
        target=f"deployment/{backend}",
        steps=(
            f"Annotate deployment/{backend} with the window (who, why, deadline)",
            'Status page: "scheduled maintenance"',
            "Silence the platform's alerts in Alertmanager until the deadline"
            if settings.alertmanager_url
            else "No Alertmanager configured: alerts are not silenced",
            f"kubectl set env deployment/{backend} {MAINTENANCE_VARIABLE}=true; wait for the "
            "rollout; wait until no request is in flight",
            inside,
            f"ALWAYS: {MAINTENANCE_VARIABLE}=false, wait for the rollout, health check, status "
            "page resolved (or degraded), silence expired, annotation removed",
        ),
        facts={
            "reason": reason,
            "work": work,
            "duration": f"{duration} s (the window closes itself at this deadline)",
            "environment": settings.environment,
        },
        fingerprint=fingerprint,
    )


def _fingerprint(backend: str, live: dict[str, Any]) -> dict[str, str]:
    """What the window's plan rests on: the backend's revision and pod template, and that
    no other window is open on it."""
    return deployment_fingerprint(live) | {
        f"deployment/{backend} open window": "yes" if open_window_of(live) else "none"
    }


def _announcement(window: Window) -> str:
    return (
        f"Scheduled maintenance: {window.reason}. The service is unavailable until "
        f"{window.deadline:%Y-%m-%d %H:%M} UTC at the latest."
    )


def _work_form(window: Window) -> str:
    return (
        f"## Maintenance window open: {window.reason}\n\n"
        f"The backend is in maintenance mode and drained. Do the work, then fill in who did "
        f"it and what was done. The window closes itself at "
        f"**{window.deadline:%Y-%m-%d %H:%M:%S} UTC**."
    )


def _publish(window: Window, leave: Leave, outcome: dict[str, Any], timer: StepTimer) -> None:
    facts = [
        {"": "opened by", " ": window.opened_by},
        {"": "reason", " ": window.reason},
        {"": "work", " ": window.work},
        {"": "deadline", " ": f"{window.deadline:%Y-%m-%d %H:%M:%S} UTC"},
        {
            "": "drain",
            " ": f"{outcome['drain_seconds']:.2f} s" if "drain_seconds" in outcome else "-",
        },
        {
            "": "health afterwards",
            " ": leave.health_problem or ("healthy" if leave.entered else "-"),
        },
    ]
    done = outcome.get("work")
    create_markdown_artifact(
        key="maintenance-window",
        description=leave.summary()[:500],
        markdown="\n\n".join(
            [
                "## Maintenance window",
                leave.summary(),
                markdown_table(facts),
                "### Work done",
                markdown_table([done]) if isinstance(done, dict) and done else "_not completed_",
                "### Leaving",
                markdown_table(leave.steps) if leave.steps else "_nothing to undo_",
                "### Steps",
                timer.markdown(),
            ]
        ),
    )
