"""The release runbooks as an operator meets them: served by one process (as `make up`),
started through the REST API."""

from __future__ import annotations

import json

import pytest

from tests.helpers import prefect_rest
from tests.release_helpers import (
    deployment_writes,
    deployments_restored,
    image_of,
    kinds_of,
    live,
    wait_settled,
    wait_until,
)
from tests.test_served_e2e import _artifact, _start, _wait_final

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"deployment": "backend", "replicas": -1}, "replicas"),
        ({"deployment": "backend", "replicas": 31}, "replicas"),
        ({"deployment": "backend", "replicas": "five"}, "replicas"),
        ({"deployment": "postgres", "replicas": 2}, "deployment"),
        ({"deployment": "backend"}, "replicas"),
    ],
    ids=["negative", "above-bound", "not-a-number", "unknown-deployment", "missing"],
)
def test_bad_scale_is_refused_by_the_server_naming_the_field(
    platform, served_api, parameters, field
):
    with prefect_rest(served_api) as api:
        refused = _start(api, "scale/scale", parameters)
    assert refused.status_code == 409
    assert field in refused.text
    assert platform.kube.writes == []


def test_bad_version_is_refused_by_the_server(platform, served_api):
    with prefect_rest(served_api) as api:
        refused = _start(api, "deploy/deploy", {"version": "1.5.0 && curl evil"})
    assert refused.status_code == 409
    assert "version" in refused.text
    assert platform.kube.writes == []


def test_scale_and_rollout_history_through_the_rest_api(platform, served_api):
    with deployments_restored(platform.kube, ("celery-workers",)):
        target = live(platform.kube, "celery-workers")["spec"]["replicas"] + 1
        with prefect_rest(served_api) as api:
            run = _start(api, "scale/scale", {"deployment": "celery-workers", "replicas": target})
            final = _wait_final(api, run.raise_for_status().json()["id"])
            assert final["state"]["type"] == "COMPLETED", final["state"]["message"]
            assert final["name"] == f"scale-celery-workers-to-{target}"
            assert live(platform.kube, "celery-workers")["spec"]["replicas"] == target
            assert [(w.name, w.subresource) for w in platform.kube.writes] == [
                ("celery-workers", "scale")
            ]

            run = _start(api, "rollout-history/rollout-history", {"deployment": "frontend"})
            final = _wait_final(api, run.raise_for_status().json()["id"])
            assert final["state"]["type"] == "COMPLETED", final["state"]["message"]
            table = json.loads(_artifact(api, final["id"], "rollout-history"))
            assert table[0]["current"] == "✓"


def test_a_deploy_cancelled_mid_rollout_rolls_back_what_it_touched(platform, kube, served_api):
    """Cancel from the UI/API while the rollout is in progress: the runner SIGTERMs the
    run's process; the flow must still write the recorded template back."""
    recorded = image_of(kube, "frontend")
    kube.rollout_delay = 600  # the new frontend's rollout stays in progress

    with prefect_rest(served_api) as api:
        run = _start(api, "deploy/deploy", {"version": "3.0.0", "components": ["frontend"]})
        run_id = run.raise_for_status().json()["id"]
        wait_until(
            lambda: kinds_of(deployment_writes(kube, "frontend")) == ["set-image"],
            "the deploy set the new image",
            timeout=90,
        )
        kube.rollout_delay = 0.05  # the undo's rollout may complete
        cancelled = api.post(
            f"/flow_runs/{run_id}/set_state",
            json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
        )
        assert cancelled.raise_for_status().json()["status"] == "ACCEPT"
        final = _wait_final(api, run_id)

    assert final["state"]["type"] == "CANCELLED", final["state"]["message"]
    writes = deployment_writes(kube, "frontend")
    assert kinds_of(writes) == ["set-image", "restore"]
    assert writes[1].body[0]["value"]["spec"]["containers"][0]["image"] == recorded
    wait_settled(kube, "frontend")
    assert image_of(kube, "frontend") == recorded
    assert {w.name for w in kube.writes} == {"frontend"}
