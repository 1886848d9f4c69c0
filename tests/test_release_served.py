"""The release runbooks as an operator meets them: served by one process (as `make up`),
started through the REST API."""

from __future__ import annotations

import json

import pytest

from tests.helpers import prefect_rest
from tests.release_helpers import deployments_restored, live
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
