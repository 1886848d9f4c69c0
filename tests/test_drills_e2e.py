"""A drill end to end, as a newcomer runs it on `make up`: the served `drill` deployment
started through the REST API puts a real Celery backlog on the broker; a real Prometheus
(the sandbox's rule clock) fires QueueBacklogHigh, a real Alertmanager sends it to the
alert bridge, prefect.yaml's alert trigger starts the served `incident-response`; the
operator acknowledges through the API; the drill removes the backlog, the alert resolves
the same way and closes the incident; the drill reports both times.

The session serves incident-response without its triggers (other tests post alerts);
this test puts prefect.yaml's triggers on it for its own duration, as `make up` has them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from prefect.flow_runs import resume_flow_run

from deployments.catalog import load_catalog, to_runner_deployment
from runbook.alert_events import FIRING, RESOLVED
from runbook.decisions.incidents import incident_id
from sandbox.platform import ALERT_RULES, SANDBOX_RULE_CLOCK, Sandbox
from sandbox.services import AlertmanagerServer
from sandbox.services.prometheus import PrometheusServer
from tests.alert_helpers import running_bridge, wait_for_alert_events
from tests.helpers import prefect_rest, read_artifacts, read_flow_run
from tests.test_incident_response import wait_for_pause
from tests.test_served_e2e import _artifact, _start, _wait_final

pytestmark = pytest.mark.slow

GROUP = '{}:{alertname="QueueBacklogHigh"}'  # Alertmanager groups by alertname


@pytest.fixture
def alerting(platform: Sandbox, served_api: str) -> Iterator[None]:
    """Prometheus → Alertmanager → the bridge → Prefect, and incident-response served
    with prefect.yaml's alert triggers, for this test only. Afterwards the triggers are
    gone again and no incident run it started is left waiting."""
    assert platform.backend is not None
    spec = next(s for s in load_catalog() if s.name == "incident-response")
    started = time.time()
    from tasks.incidents import release_incident

    # An earlier test's incident of this group must not make ours a "late repeat".
    release_incident(incident_id(GROUP))
    with (
        running_bridge(served_api) as bridge,
        AlertmanagerServer(webhook_url=f"{bridge}/alertmanager") as alertmanager,
        PrometheusServer(
            targets={"backend": [platform.backend.url.removeprefix("http://")]},
            rule_files=sorted(ALERT_RULES.glob("*.yml")),
            alertmanager_url=alertmanager.url,
            rule_clock=SANDBOX_RULE_CLOCK,
        ),
    ):
        to_runner_deployment(spec).apply()
        try:
            yield
        finally:
            to_runner_deployment(replace(spec, triggers=())).apply()
            _cancel_unfinished_incidents(served_api, started)
            release_incident(incident_id(GROUP))


def _cancel_unfinished_incidents(api_url: str, since: float) -> None:
    with prefect_rest(api_url) as api:
        runs = api.post(
            "/flow_runs/filter",
            json={"flows": {"name": {"any_": ["incident-response"]}}, "limit": 200},
        ).json()
        for run in runs:
            final = run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            if not final and _created(run) >= since - 1:
                api.post(
                    f"/flow_runs/{run['id']}/set_state",
                    json={"state": {"type": "CANCELLED"}, "force": True},
                )


def _created(run: dict[str, Any]) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(run["created"]).timestamp()


def test_queue_backlog_drill_alert_to_incident_to_resolution(
    platform: Sandbox, served_api: str, alerting: None
) -> None:
    started = time.time()
    with prefect_rest(served_api) as api:
        drill_run = (
            _start(
                api,
                "drill/drill",
                {
                    "issue": "queue-backlog",
                    "detect_timeout_seconds": 60,
                    "hold_seconds": 20,
                    "recover_timeout_seconds": 90,
                },
            )
            .raise_for_status()
            .json()
        )

        # The real alert fired: Alertmanager's webhook reached Prefect through the bridge.
        fired = wait_for_alert_events(served_api, GROUP, 1, timeout=60)
        assert [e["event"] for e in fired][:1] == [FIRING]
        assert fired[0]["payload"]["labels"]["runbook"] == "diagnose-queue-backlog"

        # Its trigger started incident-response, which collected evidence and now waits
        # for someone: the operator acknowledges through the API.
        incident = wait_for_pause("incident-response", "acknowledge", started, timeout=60)
        assert incident.parameters["alertname"] == "QueueBacklogHigh"
        assert incident.parameters["group_key"] == GROUP
        resume_flow_run(incident.id, run_input={"acknowledged_by": "newcomer"})

        # The drill removes the backlog; the alert resolves and closes the incident.
        final = _wait_final(api, drill_run["id"], timeout=120)
        assert final["state"]["type"] == "COMPLETED", final["state"]["message"]
        report = str(_artifact(api, drill_run["id"], "drill-report"))

    took = time.time() - started
    assert redis.Redis.from_url(platform.redis.url).llen("celery") == 0  # backlog removed
    assert RESOLVED in [e["event"] for e in wait_for_alert_events(served_api, GROUP, 2)]
    closed = read_flow_run(incident.id)
    assert closed.state is not None and closed.state.is_completed(), closed.state
    post_mortem = str(read_artifacts(incident.id)["post-mortem"].data)
    assert "Acknowledged by newcomer" in post_mortem
    assert "Resolved by alertmanager" in post_mortem
    assert f"**incident run:** {incident.name} ({incident.id})" in report
    assert "**incident ended:** Completed" in report
    detect = _seconds(report, "time to detect")
    recover = _seconds(report, "time to recover")
    assert 0 < detect < recover, report
    print(
        f"\nqueue-backlog drill: detect {detect:.1f} s, recover {recover:.1f} s, test {took:.0f} s"
    )
    assert took < 120


def _seconds(report: str, row: str) -> float:
    """The number in `- **time to detect:** 23s (23.4 s)`."""
    line = next(line for line in report.splitlines() if f"**{row}:**" in line)
    return float(line.rsplit("(", 1)[1].removesuffix(" s)"))
