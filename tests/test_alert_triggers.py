"""Alerts start runbooks: prefect.yaml's alert triggers, as automations on the real Prefect
test server (its subprocess server runs triggers), start one run per alert group with the
alert's labels as parameters and a resolution run when the group resolves; and end to
end, a real Prometheus scraping the backend stand-in with forced 5xx fires HighErrorRate
through a real Alertmanager and the alert bridge into a Prefect event and a run.

The triggers start `alert-probe` (tests/alert_probe_flow.py, incident-response's
parameters) until incident-response is on this branch; the definitions are prefect.yaml's.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from prefect.settings import PREFECT_API_URL

from deployments.catalog import PREFECT_YAML, DeploymentSpec, to_runner_deployment
from runbook.alert_events import FIRING, RESOLVED
from sandbox.platform import Sandbox
from tests.alert_helpers import (
    monitoring,
    running_bridge,
    wait_for_alert_events,
    webhook,
    webhook_alert,
)
from tests.helpers import prefect_rest

pytestmark = pytest.mark.slow


def _alert_triggers() -> list[dict[str, Any]]:
    document = yaml.safe_load(PREFECT_YAML.read_text())
    return list(document["definitions"]["triggers"]["alert_triggers"])


@pytest.fixture(scope="module")
def api_url(prefect_server: None) -> str:
    return str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def probe_deployment(api_url: str) -> str:
    """alert-probe deployed with prefect.yaml's alert triggers; yields its id."""
    spec = DeploymentSpec(
        name="alert-probe",
        entrypoint="tests/alert_probe_flow.py:alert_probe",
        triggers=tuple(_alert_triggers()),
    )
    return str(to_runner_deployment(spec).apply())


@pytest.fixture(scope="module")
def bridge(api_url: str) -> Iterator[str]:
    with running_bridge(api_url) as url:
        yield url


def _runs_for_group(api_url: str, deployment_id: str, group_key: str) -> list[dict[str, Any]]:
    with prefect_rest(api_url) as api:
        response = api.post(
            "/flow_runs/filter",
            json={"deployments": {"id": {"any_": [deployment_id]}}, "limit": 200},
        )
        response.raise_for_status()
    runs = [r for r in response.json() if r["parameters"].get("group_key") == group_key]
    return sorted(runs, key=lambda r: r["created"])


def _wait_for_runs(
    api_url: str, deployment_id: str, group_key: str, statuses: list[str], timeout: float = 60
) -> list[dict[str, Any]]:
    give_up = time.monotonic() + timeout
    runs: list[dict[str, Any]] = []
    while time.monotonic() < give_up:
        runs = _runs_for_group(api_url, deployment_id, group_key)
        if [r["parameters"]["status"] for r in runs] == statuses:
            return runs
        time.sleep(0.5)
    raise AssertionError(f"expected runs {statuses}, got {[r['parameters'] for r in runs]}")


def test_one_run_per_alert_group_and_one_on_resolution(
    bridge: str, api_url: str, probe_deployment: str
) -> None:
    group = f'{{}}:{{alertname="HighLatency", test="{uuid.uuid4().hex}"}}'
    starts = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    pods = [webhook_alert("HighLatency", fingerprint=f"e{n}", starts_at=starts) for n in range(2)]
    post = lambda body: httpx.post(f"{bridge}/alertmanager", json=body, timeout=30)  # noqa: E731

    # Two alerts in the group, then the group's repeat notification, then one more pod.
    assert post(webhook(group, *pods)).status_code == 200
    _wait_for_runs(api_url, probe_deployment, group, ["firing"])
    assert post(webhook(group, *pods)).status_code == 200
    later = webhook_alert(
        "HighLatency", fingerprint="e9", starts_at=starts + dt.timedelta(seconds=5)
    )
    assert post(webhook(group, *pods, later)).status_code == 200
    # Then the group resolves.
    ended = [
        dict(a, status="resolved", endsAt=dt.datetime.now(dt.UTC).isoformat())
        for a in (*pods, later)
    ]
    assert post(webhook(group, *ended)).status_code == 200

    runs = _wait_for_runs(api_url, probe_deployment, group, ["firing", "resolved"])
    assert len(wait_for_alert_events(api_url, group, 6)) == 6  # 3 firing + 3 resolved
    firing = runs[0]["parameters"]
    assert firing["alertname"] == "HighLatency"
    assert firing["severity"] == "critical"
    assert firing["labels"] == {
        "alertname": "HighLatency",
        "severity": "critical",
        "runbook": "incident-response",
    }
    assert firing["summary"] == "HighLatency summary"
    assert firing["group_key"] == group
    # Still one of each after everything was processed.
    assert [
        r["parameters"]["status"] for r in _runs_for_group(api_url, probe_deployment, group)
    ] == [
        "firing",
        "resolved",
    ]


def _traffic(backend_url: str, stop: threading.Event) -> None:
    with httpx.Client(base_url=backend_url, timeout=5) as client:
        while not stop.is_set():
            client.get("/health")
            client.get("/health/live")
            time.sleep(0.05)


def test_forced_5xx_fires_high_error_rate_into_prefect(
    platform: Sandbox, bridge: str, api_url: str, probe_deployment: str
) -> None:
    """Prometheus (1 s scrape, the real rule with a 10 s window and `for: 2s`) → Alertmanager
    (group_wait 1 s) → the bridge → a Prefect event and a run; then the errors stop and the
    resolution arrives the same way."""
    assert platform.backend is not None
    group = '{}:{alertname="HighErrorRate"}'
    stop = threading.Event()
    with monitoring(platform, bridge):
        traffic = threading.Thread(target=_traffic, args=(platform.backend.url, stop))
        traffic.start()
        try:
            started = time.monotonic()
            platform.backend.force_status["/health"] = 500  # half the requests fail
            events = wait_for_alert_events(api_url, group, 1, timeout=90)
            detected = time.monotonic() - started
            assert [e["event"] for e in events] == [FIRING]
            payload = events[0]["payload"]
            assert payload["alertname"] == "HighErrorRate"
            assert payload["labels"]["severity"] == "critical"
            assert payload["runbook"] == "incident-response"
            runs = _wait_for_runs(api_url, probe_deployment, group, ["firing"])
            assert runs[0]["parameters"]["labels"]["alertname"] == "HighErrorRate"
            print(f"\n5xx forced → HighErrorRate event in Prefect: {detected:.1f} s")

            platform.backend.force_status.pop("/health")
            events = wait_for_alert_events(api_url, group, 2, timeout=90)
            assert [e["event"] for e in events] == [FIRING, RESOLVED]
            _wait_for_runs(api_url, probe_deployment, group, ["firing", "resolved"])
        finally:
            stop.set()
            traffic.join(timeout=10)
