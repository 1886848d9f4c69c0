"""Alert → Prefect, measured from the outside: an alert posted to a real Alertmanager
(group_wait 1 s, webhook to the alert bridge) until (1) its event is visible in Prefect
(`POST /api/events/filter`) and (2) the prefect.yaml alert trigger has created a flow run
(of `alert-probe`, a deployment with incident-response's parameters and the same
triggers, until incident-response lands). Also the bridge alone: POST → event visible."""

from __future__ import annotations

import datetime as dt
import statistics
import time
import uuid

import httpx

from bench.common import platform_and_prefect
from sandbox.services import AlertmanagerServer
from tests.alert_helpers import running_bridge, wait_for_alert_events, webhook, webhook_alert
from tests.test_alert_triggers import _alert_triggers, _runs_for_group

ALERTNAMES = ["HighErrorRate", "HighLatency", "ElevatedLatency", "CpuUsageHigh", "QueueBacklogHigh"]


def _summary(title: str, values: list[float]) -> None:
    print(
        f"   {title}: median {statistics.median(values):.2f} s "
        f"(n={len(values)}, min {min(values):.2f}, max {max(values):.2f})",
        flush=True,
    )


def main(samples: int = 5) -> None:
    from prefect.settings import PREFECT_API_URL

    from deployments.catalog import DeploymentSpec, to_runner_deployment

    with platform_and_prefect():
        api_url = str(PREFECT_API_URL.value())
        probe = str(
            to_runner_deployment(
                DeploymentSpec(
                    name="alert-probe",
                    entrypoint="tests/alert_probe_flow.py:alert_probe",
                    triggers=tuple(_alert_triggers()),
                )
            ).apply()
        )
        with (
            running_bridge(api_url) as bridge,
            AlertmanagerServer(webhook_url=f"{bridge}/alertmanager") as alertmanager,
        ):
            to_event, to_run, bridge_only = [], [], []
            # One alert rule per sample: Alertmanager groups by alertname, and the trigger
            # starts one run per group (a second sample of one group would start none).
            for alertname in ALERTNAMES[:samples]:
                group = f'{{}}:{{alertname="{alertname}"}}'
                started = time.monotonic()
                httpx.post(
                    f"{alertmanager.url}/api/v2/alerts",
                    json=[{"labels": {"alertname": alertname}, "annotations": {"summary": "b"}}],
                    timeout=10,
                ).raise_for_status()
                wait_for_alert_events(api_url, group, 1, timeout=60)
                to_event.append(time.monotonic() - started)
                while not _runs_for_group(api_url, probe, group):
                    time.sleep(0.1)
                to_run.append(time.monotonic() - started)

                own_group = f"bench-{uuid.uuid4().hex}"
                started = time.monotonic()
                body = webhook(own_group, webhook_alert(starts_at=dt.datetime.now(dt.UTC)))
                httpx.post(f"{bridge}/alertmanager", json=body, timeout=10).raise_for_status()
                wait_for_alert_events(api_url, own_group, 1, 30)
                bridge_only.append(time.monotonic() - started)
    print("\n== alert → Prefect (from the outside)")
    _summary("Alertmanager POST → event visible in Prefect", to_event)
    _summary("Alertmanager POST → trigger's flow run created", to_run)
    _summary("bridge POST → event visible in Prefect", bridge_only)


if __name__ == "__main__":
    main()
