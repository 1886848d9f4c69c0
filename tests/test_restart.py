"""The restart runbook (kubectl rollout restart) against the Kubernetes emulator and the
backend stand-in, whose pods really restart (and reload their secrets) on a new revision."""

from __future__ import annotations

import pytest
from prefect.exceptions import ParameterTypeError

from flows.restart import restart
from tasks.kubernetes import RESTARTED_AT_ANNOTATION
from tests.helpers import read_artifacts
from tests.release_helpers import deployment_writes, live, revision_of


def restart_stamps(kube, name):
    """The restartedAt values the runbook wrote to `name`'s pod template, in order."""
    stamps = []
    for w in deployment_writes(kube, name):
        template = (w.body or {}).get("spec", {}).get("template", {}) if w.body else {}
        stamp = (template.get("metadata") or {}).get("annotations", {}).get(RESTARTED_AT_ANNOTATION)
        if isinstance(w.body, dict) and stamp:
            stamps.append(stamp)
    return stamps


def test_restart_rolls_out_new_pods_and_checks_health(platform, kube):
    before = revision_of(kube, "backend")
    starts = platform.backend.pod_starts

    state = restart(deployment="backend", return_state=True)

    assert state.is_completed(), state.message
    # One write: the restartedAt stamp on the pod template; the image is unchanged.
    assert len(deployment_writes(kube, "backend")) == 1
    stamp = restart_stamps(kube, "backend")[0]
    annotations = live(kube, "backend")["spec"]["template"]["metadata"]["annotations"]
    assert annotations[RESTARTED_AT_ANNOTATION] == stamp
    assert revision_of(kube, "backend") == before + 1
    assert live(kube, "backend")["status"]["updatedReplicas"] == 3  # waited for the rollout
    assert platform.backend.pod_starts == starts + 1  # the stand-in's pods restarted
    assert platform.backend.requests["/health/db"] >= 1  # health checked afterwards
    report = read_artifacts(state.state_details.flow_run_id)["restart-report"].data
    assert f"now revision {before + 1}" in report and "all health checks passed" in report


def test_restart_of_workers_does_not_touch_the_backend(platform, kube):
    starts = platform.backend.pod_starts

    state = restart(deployment="celery-workers", verify=False, return_state=True)

    assert state.is_completed(), state.message
    assert {w.name for w in kube.writes if w.kind == "Deployment"} == {"celery-workers"}
    assert len(restart_stamps(kube, "celery-workers")) == 1
    assert platform.backend.pod_starts == starts


def test_failed_rollout_fails_the_run_and_tells_chat(platform, kube):
    kube.fail_rollouts_for_image("complianceagent/frontend")

    state = restart(deployment="frontend", return_state=True)

    assert state.is_failed()
    assert "Restart of deployment/frontend failed" in state.message
    assert "ProgressDeadlineExceeded" in state.message or "timed out" in state.message
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "Restart of deployment/frontend failed" in chat.json["text"]


def test_unknown_component_is_refused_before_any_write(platform, kube):
    with pytest.raises(ParameterTypeError, match="deployment"):
        restart(deployment="postgres")
    assert kube.writes == []
