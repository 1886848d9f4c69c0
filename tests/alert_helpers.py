"""Alertmanager-shaped webhooks, the alert bridge run as `python -m bridge`, and the
Prefect events it recorded, read back through Prefect's REST API."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from deployments.catalog import PROJECT_ROOT
from runbook.alert_events import RESOURCE_PREFIX
from sandbox.platform import ALERT_RULES, SANDBOX_RULE_CLOCK, Sandbox
from sandbox.services import AlertmanagerServer, free_port
from sandbox.services.prometheus import PrometheusServer
from tests.helpers import prefect_rest


def webhook_alert(
    alertname: str = "HighErrorRate",
    *,
    status: str = "firing",
    fingerprint: str = "a1b2c3d4e5f60718",
    starts_at: dt.datetime | None = None,
    ends_at: dt.datetime | None = None,
    severity: str = "critical",
) -> dict[str, Any]:
    starts = starts_at or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    return {
        "status": status,
        "labels": {"alertname": alertname, "severity": severity, "runbook": "incident-response"},
        "annotations": {"summary": f"{alertname} summary"},
        "startsAt": starts.isoformat(),
        "endsAt": (ends_at.isoformat() if ends_at else "0001-01-01T00:00:00Z"),
        "generatorURL": "http://prometheus.invalid/graph",
        "fingerprint": fingerprint,
    }


def webhook(group_key: str, *alerts: dict[str, Any]) -> dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "alert-bridge",
        "groupLabels": {"alertname": alerts[0]["labels"]["alertname"]},
        "commonLabels": alerts[0]["labels"],
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.invalid",
        "alerts": list(alerts),
    }


@contextmanager
def running_bridge(prefect_api_url: str, **env: str) -> Iterator[str]:
    """`python -m bridge` on a free port, posting to `prefect_api_url`; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge"],
        env={
            **os.environ,
            "ALERT_BRIDGE_PORT": str(port),
            "ALERT_BRIDGE_PREFECT_API_URL": prefect_api_url,
            **env,
        },
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        give_up = time.monotonic() + 30
        while True:
            assert process.poll() is None, "the bridge exited at start"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < give_up, "the bridge did not answer within 30 s"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def alert_events_of(
    api_url: str, group_key: str, auth: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """The Prefect events recorded for one alert group, oldest first."""
    now = dt.datetime.now(dt.UTC)
    with prefect_rest(api_url, auth) as api:
        response = api.post(
            "/events/filter",
            json={
                "filter": {
                    "occurred": {
                        "since": (now - dt.timedelta(days=1)).isoformat(),
                        "until": (now + dt.timedelta(days=1)).isoformat(),
                    },
                    "resource": {"id": [f"{RESOURCE_PREFIX}{group_key}"]},
                    "order": "ASC",
                },
                "limit": 50,
            },
        )
        response.raise_for_status()
        return list(response.json()["events"])


def wait_for_alert_events(
    api_url: str,
    group_key: str,
    count: int,
    timeout: float = 30,
    auth: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Events are stored asynchronously after `POST /api/events`: wait for `count`."""
    give_up = time.monotonic() + timeout
    while True:
        events = alert_events_of(api_url, group_key, auth)
        if len(events) >= count or time.monotonic() > give_up:
            return events
        time.sleep(0.2)


@contextmanager
def monitoring(platform: Sandbox, bridge: str) -> Iterator[AlertmanagerServer]:
    """A Prometheus scraping the sandbox's backend with the real rules on the sandbox's
    clock, and an Alertmanager delivering to the bridge at `bridge`: a condition caused on
    the backend becomes an alert event in Prefect."""
    assert platform.backend is not None
    with (
        AlertmanagerServer(webhook_url=f"{bridge}/alertmanager") as alertmanager,
        PrometheusServer(
            targets={"backend": [platform.backend.url.removeprefix("http://")]},
            rule_files=sorted(ALERT_RULES.glob("*.yml")),
            alertmanager_url=alertmanager.url,
            rule_clock=SANDBOX_RULE_CLOCK,
        ),
    ):
        yield alertmanager
