"""The foundation's three figures.

(a) approval latency: from the resume call to the next task starting, with our poll
    interval (1 s) against Prefect's default (10 s). Target: median ≤ 1 s.
(b) API launch latency: `POST /api/deployments/{id}/create_flow_run` to the flow body
    starting, on the one-process served deployments, tuned against Prefect's defaults.
    Target: median ≤ 3 s.
(c) the health sweep's wall time against the sum of the five endpoint latencies, each
    endpoint answering in 200 ms. Target: well under 1 (the checks run concurrently).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from prefect import flow, task

from bench.common import platform_and_prefect, report
from tasks.approval import Plan, request_approval
from tests.helpers import prefect_rest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@task
def first_step_after_approval() -> float:
    return time.time()


@flow(name="bench-approval")
def approval_probe() -> float:
    request_approval(Plan("Bench approval", "bench/nothing", ("nothing",)))
    return first_step_after_approval()


def _approval_latency(poll_seconds: int) -> float:
    from prefect.flow_runs import resume_flow_run

    from tests.helpers import start_in_thread, wait_for_paused_run

    os.environ["RUNBOOK_APPROVAL_POLL_SECONDS"] = str(poll_seconds)
    run = start_in_thread(approval_probe)
    paused = wait_for_paused_run("bench-approval")
    time.sleep(0.3)  # the resume lands at a random point of the poll cycle, as in life
    resumed_at = time.time()
    resume_flow_run(paused.id, run_input={"approve": True, "approver": "bench", "reason": "b"})
    state = run.join(120)
    return float(state.result()) - resumed_at


def bench_approval(samples: int = 5, baseline_samples: int = 3) -> None:
    ours = [_approval_latency(1) for _ in range(samples)]
    base = [_approval_latency(10) for _ in range(baseline_samples)]
    report("(a) approval latency: resume → next task starts", ours, base, "s", "median ≤ 1 s")


def _launch_latency(api: httpx.Client, deployment_id: str) -> float:
    posted = time.time()
    run = api.post(f"/deployments/{deployment_id}/create_flow_run", json={}).raise_for_status()
    run_id = run.json()["id"]
    give_up = time.monotonic() + 120
    while time.monotonic() < give_up:
        state = api.get(f"/flow_runs/{run_id}").json()
        if state["start_time"]:
            return datetime.fromisoformat(state["start_time"]).timestamp() - posted
        time.sleep(0.05)
    raise TimeoutError("flow run never started")


def _served(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "deployments.local", "--serve-only"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _measure_launches(api_url: str, extra_env: dict[str, str], samples: int) -> list[float]:
    from deployments.local import _stop

    env = {**os.environ, "PREFECT_API_URL": api_url, **extra_env}
    server = _served(env)
    try:
        with prefect_rest(api_url) as api:
            give_up = time.monotonic() + 120
            while True:
                found = api.get("/deployments/name/health-check/health-check")
                if found.status_code == 200:
                    break
                if time.monotonic() > give_up:
                    raise TimeoutError("served deployments never registered")
                time.sleep(0.5)
            time.sleep(2)  # let the runner finish starting up
            return [_launch_latency(api, found.json()["id"]) for _ in range(samples)]
    finally:
        _stop(server)


def bench_launch(samples: int = 7, baseline_samples: int = 3) -> None:
    from prefect.settings import PREFECT_API_URL

    from deployments.local import FAST_RUNNER

    api_url = str(PREFECT_API_URL.value())
    ours = _measure_launches(api_url, FAST_RUNNER, samples)
    base = _measure_launches(api_url, {"PREFECT_RUNNER_POLL_FREQUENCY": "10"}, baseline_samples)
    report("(b) API launch → flow starts (served)", ours, base, "s", "median ≤ 3 s")


def _sweep_seconds(flow_run_id: Any) -> float:
    """From the first check starting to the last one ending, per the server's task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect_api:
        runs = prefect_api.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    starts = [r.start_time for r in runs if r.start_time]
    ends = [r.end_time for r in runs if r.end_time]
    return (max(ends) - min(starts)).total_seconds()


def bench_health_sweep(platform: Any, samples: int = 5) -> None:
    from flows.health_check import health_check

    assert platform.backend is not None
    for endpoint in ("/health", "/health/ready", "/health/live", "/health/db", "/health/redis"):
        platform.backend.delay_seconds[endpoint] = 0.2
    sweeps, walls, sums = [], [], []
    for _ in range(samples):
        started = time.perf_counter()
        state = health_check(return_state=True)
        walls.append(time.perf_counter() - started)
        sweeps.append(_sweep_seconds(state.state_details.flow_run_id))
        sums.append(sum(float(r["latency_ms"]) for r in state.result()) / 1000)
    platform.backend.delay_seconds.clear()
    report(
        "(c) health sweep (first check starts → last ends) vs the sum of the five latencies",
        sweeps,
        sums,
        "s",
        "ratio well under 1 (checks run concurrently; 0.2 would be perfect)",
    )
    report(
        "(c') whole health-check flow run, Prefect bookkeeping included, vs the same sum",
        walls,
        sums,
        "s",
        "for information",
    )


def main() -> None:
    threading.excepthook = lambda args: None  # a finished probe thread is not news
    with platform_and_prefect() as platform:
        bench_approval()
        bench_launch()
        bench_health_sweep(platform)


if __name__ == "__main__":
    main()
