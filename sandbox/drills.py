"""Drills (sandbox only): cause one of the page's common issues, or a failing deploy, for
real; watch the alert start incident-response; report time to detect and to recover.

    1. Refuse unless RUNBOOK_ENVIRONMENT=sandbox, before any side effect.
    2. Cause the condition (sandbox/conditions.py on the real PostgreSQL / Redis, and on
       the backend stand-in through its sandbox-only `PUT /sandbox/faults`; a `-broken`
       image through the `deploy` runbook, whose rollout the emulator fails).
    3. Wait (bounded) for the incident-response run the alert starts: time to detect.
    4. Hold the condition while the newcomer follows the incident, then remove it.
    5. Wait (bounded) for the incident run to finish: time to recover.
       A failing deploy instead: wait (bounded) for its deploy run and the backend back on
       its previous image, available; both times count from the deploy run's start.
    6. Publish a markdown artifact with both.

Lives under sandbox/ (not flows/): it imports sandbox/conditions.py, which the runbooks'
layers must never reach; prefect.yaml registers it as the `drill` deployment.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from pydantic import Field

from runbook.decisions.deployment import main_container
from runbook.decisions.incidents import format_duration
from runbook.decisions.refusal import Refused
from runbook.decisions.rollout import RolloutPhase, rollout_verdict
from runbook.settings import PlatformSettings, load_settings
from sandbox import conditions
from tasks.kubernetes import read_deployment

Issue = Literal["latency", "connections", "redis-memory", "queue-backlog", "failing-deploy"]

# The alerts each drill's condition fires (monitoring/rules), to recognise its incident.
ALERTS: dict[str, tuple[str, ...]] = {
    "latency": ("HighLatency", "ElevatedLatency"),
    "connections": ("DatabaseConnectionsCritical", "DatabaseConnectionsHigh"),
    "redis-memory": ("RedisMemoryFull", "RedisMemoryHigh"),
    "queue-backlog": ("QueueBacklogCritical", "QueueBacklogHigh"),
    "failing-deploy": (),  # no alert: the deploy's own rollback is the recovery
}
BACKLOG_MESSAGES = 1500  # over QueueBacklogHigh's 1000
SLOW_SECONDS = 2.5  # every answer this late: p99 over HighLatency's 2 s
TRAFFIC_CLIENTS = 4  # users hitting the slow backend, so its latency histogram fills
BROKEN_VERSION = "9.9.9-broken"
IDLE_CONNECTIONS = 18  # of the sandbox's pool of 20: over DatabaseConnectionsHigh's 80 %


class Condition:
    """What a drill caused, with its undo (safe twice); a failing deploy also names the
    deploy run it started and the backend image it must come back to."""

    def __init__(
        self, undo: Any, what: str, deploy_run: Any = None, previous_image: str = ""
    ) -> None:
        self._undo, self.what = undo, what
        self.deploy_run, self.previous_image = deploy_run, previous_image

    def undo(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


def cause(issue: Issue, settings: PlatformSettings) -> Condition:
    """Step 2: produce `issue` for real on the platform the settings name."""
    if issue == "queue-backlog":
        queue = settings.celery_queues[0]
        backlog = conditions.push_celery_backlog(
            settings.redis_url.get_secret_value(),  # type: ignore[union-attr]
            settings.redis_broker_db,
            queue=queue,
            count=BACKLOG_MESSAGES,
        )
        return Condition(backlog.undo, f"{BACKLOG_MESSAGES} messages on the `{queue}` list")
    if issue == "redis-memory":
        filled = conditions.fill_redis(
            settings.redis_url.get_secret_value(),  # type: ignore[union-attr]
            settings.redis_cache_db,
        )
        return Condition(filled.undo, f"Redis db {filled.db} full ({len(filled.keys)} keys)")
    if issue == "connections":
        dsn = settings.database_dsn.get_secret_value()  # type: ignore[union-attr]
        held = conditions.open_idle_connections(dsn, count=IDLE_CONNECTIONS)
        return Condition(held.undo, f"{len(held.pids)} idle PostgreSQL sessions held")
    if issue == "failing-deploy":
        previous = backend_image(settings)
        run: FlowRun = run_deployment(  # type: ignore[assignment]
            "deploy/deploy",
            parameters={"version": BROKEN_VERSION, "components": ["backend"]},
            timeout=0,
            tags=["drill"],
        )
        return Condition(
            None,
            f"deploy of backend {BROKEN_VERSION} started (run {run.name}, from {previous})",
            deploy_run=run.id,
            previous_image=previous,
        )
    if issue == "latency":
        base_url = str(settings.api_base_url).rstrip("/")
        slow = conditions.slow_backend(base_url, latency=SLOW_SECONDS)
        traffic = conditions.send_traffic(base_url, "/health", concurrency=TRAFFIC_CLIENTS)

        def undo() -> None:
            # Fast again first, so the traffic's last requests end at once.
            try:
                slow.undo()
            finally:
                traffic.undo()

        return Condition(
            undo, f"backend answers {SLOW_SECONDS:g} s late, {TRAFFIC_CLIENTS} clients calling"
        )
    raise Refused("issue", f"no drill for {issue!r}")


def backend_image(settings: PlatformSettings) -> str:
    """The image the backend Deployment runs now."""
    live = read_deployment.fn(settings.deployment_name("backend"))
    return str(main_container(live)["image"])


def backend_back_on(image: str, settings: PlatformSettings) -> bool:
    """The backend is on `image` and its rollout is complete (every replica available)."""
    live = read_deployment.fn(settings.deployment_name("backend"))
    return (
        main_container(live)["image"] == image
        and rollout_verdict(live).phase is RolloutPhase.COMPLETE
    )


def _rollback_started(deploy_run: Any) -> float | None:
    """When the deploy run began its rollback (its first `restore_pod_template`): the
    moment it had seen the rollout fail."""
    with get_client(sync_client=True) as prefect_api:
        tasks = prefect_api.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[deploy_run])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="restore_pod_template")),
        )
    starts = [t.start_time.timestamp() for t in tasks if t.start_time is not None]
    return min(starts) if starts else None


def follow_deploy(
    condition: Condition, settings: PlatformSettings, timeout_seconds: float
) -> dict[str, Any]:
    """Steps 3-5 of a failing deploy: wait (bounded) until its run has ended and the
    backend is back on its previous image, available. Times count from the deploy run's
    start: to detect = until its rollback began, to recover = until the backend was back."""
    give_up = time.monotonic() + timeout_seconds
    failure_seen = recovered = None
    run = _read_run(condition.deploy_run)
    while time.monotonic() < give_up:
        run = _read_run(condition.deploy_run)
        if failure_seen is None:
            failure_seen = _rollback_started(condition.deploy_run)
        elif recovered is None and backend_back_on(condition.previous_image, settings):
            recovered = time.time()
        ended = run.state is not None and run.state.is_final()
        if ended and (recovered is not None or failure_seen is None):
            break
        time.sleep(0.5)
    started = run.start_time.timestamp() if run.start_time else None
    return {
        "deploy run": f"{run.name} ({run.id}): {run.state.name if run.state else 'unknown'}",
        "detected": failure_seen - started if failure_seen and started else None,
        "recovered": recovered - started if recovered and started else None,
    }


def _incident_run(alertnames: tuple[str, ...], since: float) -> FlowRun | None:
    """The incident-response run an alert of this drill started after `since`."""
    with get_client(sync_client=True) as prefect_api:
        runs = prefect_api.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["incident-response"])),
            flow_run_filter=FlowRunFilter(),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=50,
        )
    for run in sorted(runs, key=lambda r: r.created.timestamp() if r.created else 0):
        if (
            run.created is not None
            and run.created.timestamp() >= since
            and run.parameters.get("alertname") in alertnames
            and run.parameters.get("status", "firing") == "firing"
        ):
            return run
    return None


def _read_run(run_id: Any) -> FlowRun:
    with get_client(sync_client=True) as prefect_api:
        return prefect_api.read_flow_run(run_id)


@flow(name="drill", flow_run_name="drill-{issue}")
def drill(
    issue: Issue = "queue-backlog",
    detect_timeout_seconds: Annotated[int, Field(ge=10, le=1800)] = 300,
    hold_seconds: Annotated[int, Field(ge=0, le=3600)] = 120,
    recover_timeout_seconds: Annotated[int, Field(ge=10, le=7200)] = 1800,
) -> dict[str, Any]:
    """Sandbox only: cause a common issue (or a failing deploy) for real, watch the alert
    start incident-response, and report time to detect and time to recover.

    Args:
        issue: What to cause: latency, connections, redis-memory, queue-backlog or
            failing-deploy.
        detect_timeout_seconds: How long to wait for the alert's incident run (10 to 1800).
        hold_seconds: How long the condition stays after detection, so the diagnosis finds
            it (0 to 3600); then the drill removes it.
        recover_timeout_seconds: How long to wait for the incident to be resolved, with
            your acknowledgement and resolution in the UI (10 to 7200); for a failing
            deploy, for its run and rollback to end.
    """
    logger = get_run_logger()
    settings = load_settings()

    # 1. Sandbox only, before any side effect.
    if settings.environment != "sandbox":
        raise Refused("issue", f"drills run only in the sandbox, not in {settings.environment}")

    # 2. Cause the condition for real.
    caused_at = time.time()
    condition = cause(issue, settings)
    logger.info("drill %s: %s", issue, condition.what)
    rows: dict[str, str] = {"issue": issue, "caused": condition.what}
    if condition.deploy_run is not None:
        # 3-5. A failing deploy: its own run detects the failed rollout and rolls back.
        followed = follow_deploy(condition, settings, recover_timeout_seconds)
        detected, recovered = followed.pop("detected"), followed.pop("recovered")
        rows |= followed
    else:
        detected, recovered = follow_incident(
            issue,
            condition,
            caused_at,
            rows,
            detect_timeout_seconds,
            hold_seconds,
            recover_timeout_seconds,
        )
    rows["time to detect"] = _took(detected, "not detected")
    rows["time to recover"] = _took(recovered, "not recovered")

    # 6. The drill's report.
    create_markdown_artifact(
        markdown=f"## Drill: {issue}\n\n" + "\n".join(f"- **{k}:** {v}" for k, v in rows.items()),
        key="drill-report",
        description=f"drill {issue}: detect {rows['time to detect']}, "
        f"recover {rows['time to recover']}",
    )
    return {"time_to_detect": detected, "time_to_recover": recovered, **rows}


def _took(seconds: float | None, otherwise: str) -> str:
    """`1m 05s (65.3 s)`: readable, and the exact number for whoever compares drills."""
    return f"{format_duration(seconds)} ({seconds:.1f} s)" if seconds is not None else otherwise


def follow_incident(
    issue: Issue,
    condition: Condition,
    caused_at: float,
    rows: dict[str, str],
    detect_timeout_seconds: float,
    hold_seconds: float,
    recover_timeout_seconds: float,
) -> tuple[float | None, float | None]:
    """Steps 3-5 of an alerting drill: (time to detect, time to recover), counted from
    when the condition was caused; notes what it saw in `rows`."""
    incident = None
    try:
        # 3. Wait for the incident run the alert starts: time to detect.
        give_up = time.monotonic() + detect_timeout_seconds
        while incident is None and time.monotonic() < give_up:
            incident = _incident_run(ALERTS[issue], caused_at - 1)
            if incident is None:
                time.sleep(1)
        if incident is not None:
            rows["incident run"] = f"{incident.name} ({incident.id})"
            # 4. Hold it while the diagnosis looks.
            time.sleep(hold_seconds)
    finally:
        # 4. Remove the condition (also on failure or cancel).
        condition.undo()
    if incident is None or incident.created is None:
        return None, None
    detected = incident.created.timestamp() - caused_at
    # 5. Wait for the incident to end: time to recover (its run's end).
    give_up = time.monotonic() + recover_timeout_seconds
    while time.monotonic() < give_up:
        run = _read_run(incident.id)
        if run.state is not None and run.state.is_final():
            # Named now: at detection the run had not started, so not yet renamed.
            rows["incident run"] = f"{run.name} ({run.id})"
            rows["incident ended"] = run.state.name
            if run.state.is_completed() and run.end_time is not None:
                return detected, run.end_time.timestamp() - caused_at
            break
        time.sleep(1)
    return detected, None
