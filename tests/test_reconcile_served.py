"""The reconcile automation as prefect.yaml declares it, served as by `make up`: a runbook
run that ends Crashed starts a reconcile run at once (the automation `triggers:` create)."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from tests.helpers import prefect_rest
from tests.test_served_e2e import _wait_final

pytestmark = pytest.mark.slow


def test_a_crashed_runbook_run_starts_reconcile(platform, served_api):
    with prefect_rest(served_api) as api:
        scale = api.get("/deployments/name/scale/scale").raise_for_status().json()
        later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
        # A scale run that no runner picks up (scheduled in an hour), then Crashed.
        run = (
            api.post(
                f"/deployments/{scale['id']}/create_flow_run",
                json={
                    "parameters": {"deployment": "backend", "replicas": 3},
                    "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}},
                },
            )
            .raise_for_status()
            .json()
        )
        crashed_at = dt.datetime.now(dt.UTC)
        api.post(
            f"/flow_runs/{run['id']}/set_state",
            json={"state": {"type": "CRASHED", "name": "Crashed"}, "force": True},
        ).raise_for_status()

        reconcile = api.get("/deployments/name/reconcile/reconcile").raise_for_status().json()
        give_up, started = time.monotonic() + 90, []
        while not started and time.monotonic() < give_up:
            runs = (
                api.post(
                    "/flow_runs/filter",
                    json={"flow_runs": {"deployment_id": {"any_": [reconcile["id"]]}}},
                )
                .raise_for_status()
                .json()
            )
            started = [
                r
                for r in runs
                if (r.get("created_by") or {}).get("type") == "AUTOMATION"
                and dt.datetime.fromisoformat(r["created"]) >= crashed_at
            ]
            time.sleep(1)
        assert started, "no reconcile run was started by the automation"
        final = _wait_final(api, started[0]["id"])
        assert final["state"]["type"] == "COMPLETED", final["state"]["message"]
