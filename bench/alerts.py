"""Alert → incident-response Running, measured from the outside, leg by leg.

An alert is posted to a real Alertmanager (the sandbox's group_wait), whose webhook goes to
the alert bridge (`python -m bridge`), which posts a Prefect event; prefect.yaml's alert
trigger (an automation on the real Prefect server) creates an `incident-response` run,
which the runbooks' serving process (`deployments.local --serve-only`, as under `make up`)
picks up and starts. Each leg is read from timestamps the systems themselves record:

    t0        the test's POST to Alertmanager returns
    received  Prefect's `received` on the alert event   (Alertmanager group_wait + bridge)
    created   the flow run's `created`                   (trigger evaluation → automation)
    running   the flow run's `start_time`                (runner poll + run process start)

Also the bridge alone: POST to the bridge → the event's `received`. Between samples the
previous incident is left to settle (paused for its acknowledgement) so each alert
arrives on a quiet machine, as a real one would.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx

from bench.common import platform_and_prefect
from deployments.catalog import PROJECT_ROOT
from deployments.local import FAST_RUNNER, _stop
from sandbox.services import AlertmanagerServer
from tests.alert_helpers import running_bridge, wait_for_alert_events, webhook, webhook_alert
from tests.helpers import prefect_rest

ALERTNAMES = ["HighErrorRate", "HighLatency", "ElevatedLatency", "CpuUsageHigh", "QueueBacklogHigh"]
INCIDENT = "incident-response/incident-response"
TARGET_SECONDS = 5.0


def _at(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp).timestamp()


def _summary(title: str, values: list[float]) -> None:
    print(
        f"   {title}: median {statistics.median(values):.2f} s "
        f"(n={len(values)}, min {min(values):.2f}, max {max(values):.2f})",
        flush=True,
    )


def _serve(api_url: str) -> subprocess.Popen[bytes]:
    """The runbooks served as `make up` serves them, with their alert triggers."""
    return subprocess.Popen(
        [sys.executable, "-m", "deployments.local", "--serve-only", "--schedules-inactive"],
        env={**os.environ, "PREFECT_API_URL": api_url, **FAST_RUNNER},
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_until(what: str, check: Any, timeout: float, every: float = 0.05) -> Any:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise TimeoutError(f"{what} not within {timeout:.0f}s")


def _incident_run(api: httpx.Client, deployment_id: str, group: str) -> dict[str, Any] | None:
    response = api.post(
        "/flow_runs/filter",
        json={"deployments": {"id": {"any_": [deployment_id]}}, "limit": 50},
    )
    response.raise_for_status()
    runs = [r for r in response.json() if r["parameters"].get("group_key") == group]
    return runs[0] if runs else None


def _settle(api: httpx.Client, run_id: str, timeout: float = 60) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if api.get(f"/flow_runs/{run_id}").json()["state_type"] != "RUNNING":
            return
        time.sleep(0.5)


def main(samples: int = 5) -> None:
    from prefect.settings import PREFECT_API_URL

    legs: dict[str, list[float]] = {
        "Alertmanager POST → event received (group_wait + bridge)": [],
        "event received → incident run created (trigger)": [],
        "run created → Running (runner poll + run start)": [],
        "Alertmanager POST → incident-response Running (total)": [],
        "bridge POST → event received (bridge alone)": [],
    }
    names = list(legs)
    with platform_and_prefect():
        api_url = str(PREFECT_API_URL.value())
        served = _serve(api_url)
        try:
            with prefect_rest(api_url) as api:
                deployment = _wait_until(
                    "incident-response served",
                    lambda: (
                        (r := api.get(f"/deployments/name/{INCIDENT}")).status_code == 200
                        and r.json()["id"]
                    ),
                    180,
                    0.5,
                )
                with (
                    running_bridge(api_url) as bridge,
                    AlertmanagerServer(webhook_url=f"{bridge}/alertmanager") as alertmanager,
                ):
                    # One alert rule per sample: Alertmanager groups by alertname, and the
                    # trigger starts one run per group.
                    for alertname in ALERTNAMES[:samples]:
                        group = f'{{}}:{{alertname="{alertname}"}}'
                        t0 = time.time()
                        httpx.post(
                            f"{alertmanager.url}/api/v2/alerts",
                            json=[
                                {
                                    "labels": {"alertname": alertname},
                                    "annotations": {"summary": "b"},
                                }
                            ],
                            timeout=10,
                        ).raise_for_status()
                        event = wait_for_alert_events(api_url, group, 1, timeout=60)[0]
                        run = _wait_until(
                            "the incident's run",
                            lambda group=group: (
                                (r := _incident_run(api, deployment, group))
                                and r["start_time"]
                                and r
                            ),
                            60,
                        )
                        received, created = _at(event["received"]), _at(run["created"])
                        running = _at(run["start_time"])
                        for name, value in zip(
                            names,
                            [received - t0, created - received, running - created, running - t0],
                            strict=False,
                        ):
                            legs[name].append(value)

                        own_group = f"bench-{uuid.uuid4().hex}"
                        body = webhook(own_group, webhook_alert(starts_at=dt.datetime.now(dt.UTC)))
                        t0 = time.time()
                        httpx.post(f"{bridge}/alertmanager", json=body, timeout=10)
                        own = wait_for_alert_events(api_url, own_group, 1, 30)[0]
                        legs[names[4]].append(_at(own["received"]) - t0)

                        print(
                            f"   {alertname}: "
                            + ", ".join(f"{values[-1]:.2f}" for values in legs.values()),
                            flush=True,
                        )
                        # Let the incident settle (its diagnosis started, paused for its
                        # acknowledgement) so the next alert arrives on a quiet machine.
                        _settle(api, run["id"])
        finally:
            _stop(served)
    print("\n== alert → incident-response Running (from the outside, per leg)")
    for name, values in legs.items():
        _summary(name, values)
    total = statistics.median(legs[names[3]])
    verdict = "met" if total <= TARGET_SECONDS else "NOT met"
    print(f"   target: total ≤ {TARGET_SECONDS:.0f} s — {verdict}")


if __name__ == "__main__":
    main()
