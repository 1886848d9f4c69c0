"""The Kubernetes tasks against the API emulator, through the official client.

Each test asserts what the emulator recorded (its write log and stored objects), so a
task that claims success without the write, or writes more than it should, fails here.
"""

from __future__ import annotations

import pytest
from prefect import flow

from runbook.decisions.migrations import RUN_LABEL
from runbook.decisions.rollout import RolloutPhase
from tasks import kubernetes as k8s
from tasks.retry_policy import PlatformCallError
from tests.faults import FaultyProxy

NS = "complianceagent"


def template_image(kube, name):
    return kube.get("apps/v1", "Deployment", NS, name)["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]


def test_read_unknown_deployment_fails_with_a_clear_message(kube):
    with pytest.raises(PlatformCallError, match=r"read deployment/nope in complianceagent: 404"):
        k8s.read_deployment.fn("nope")
    assert kube.writes == []


def test_set_image_rolls_out_and_history_allows_undo(kube):
    before = k8s.list_deployment_revisions.fn("frontend")
    original = before[-1]
    patched = k8s.set_deployment_image.fn("frontend", "frontend", "complianceagent/frontend:9.9.9")
    outcome = k8s.wait_for_rollout.fn("frontend", patched["metadata"]["generation"], 10)

    assert outcome.phase is RolloutPhase.COMPLETE
    assert outcome.revision == original["revision"] + 1
    assert [(w.method, w.name, w.body) for w in kube.writes] == [
        (
            "PATCH",
            "frontend",
            {
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {"name": "frontend", "image": "complianceagent/frontend:9.9.9"}
                            ]
                        }
                    }
                }
            },
        )
    ]

    # kubectl rollout undo --to-revision=<original>
    restored = k8s.restore_pod_template.fn("frontend", original["template"], "undo to original")
    outcome = k8s.wait_for_rollout.fn("frontend", restored["metadata"]["generation"], 10)
    assert outcome.phase is RolloutPhase.COMPLETE
    assert template_image(kube, "frontend") == original["images"]["frontend"]
    after = k8s.list_deployment_revisions.fn("frontend")
    assert after[-1]["replicaset"] == original["replicaset"]  # the old ReplicaSet came back
    assert after[-1]["change_cause"] == "undo to original"


def test_failed_rollout_is_reported_by_the_watch(kube):
    kube.fail_rollouts_for_image(":broken")
    patched = k8s.set_deployment_image.fn("frontend", "frontend", "complianceagent/frontend:broken")
    outcome = k8s.wait_for_rollout.fn("frontend", patched["metadata"]["generation"], 10)
    assert outcome.phase is RolloutPhase.FAILED
    assert not outcome.complete
    assert "progress deadline exceeded" in outcome.reason


def test_set_env_merges_by_name_and_restart_stamps_the_template(kube):
    k8s.set_deployment_env.fn("backend", "backend", {"MAINTENANCE_MODE": "true"})
    k8s.restart_deployment.fn("backend")
    container = kube.get("apps/v1", "Deployment", NS, "backend")["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["MAINTENANCE_MODE"] == "true"
    assert env["LOG_LEVEL"] == "info"  # the other variables survive
    assert "DATABASE_URL" in env
    annotations = kube.get("apps/v1", "Deployment", NS, "backend")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert k8s.RESTARTED_AT_ANNOTATION in annotations
    k8s.set_deployment_env.fn("backend", "backend", {"MAINTENANCE_MODE": "false"})


def test_scale_through_the_subresource(kube):
    before = k8s.read_deployment_scale.fn("celery-workers")
    assert k8s.scale_deployment.fn("celery-workers", before + 1) == before + 1
    assert kube.get("apps/v1", "Deployment", NS, "celery-workers")["spec"]["replicas"] == before + 1
    assert [(w.subresource, w.body) for w in kube.writes] == [
        ("scale", {"spec": {"replicas": before + 1}})
    ]
    k8s.scale_deployment.fn("celery-workers", before)


def test_job_runs_to_completion_and_cleanup_is_idempotent(kube):
    kube.set_job_behaviour("probe-", succeed=True, logs="INFO  Running upgrade -> 42\n")
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "probe-ok"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "probe", "image": "busybox", "command": ["true"]}],
                }
            },
        },
    }
    k8s.create_job.fn(body)
    outcome = k8s.wait_for_job.fn("probe-ok", 10)
    assert outcome.finished and outcome.succeeded
    assert kube.get("batch/v1", "Job", NS, "probe-ok")["status"]["succeeded"] == 1
    assert "Running upgrade -> 42" in k8s.read_job_logs.fn("probe-ok")
    assert k8s.delete_job.fn("probe-ok") is True
    assert k8s.delete_job.fn("probe-ok") is False  # already gone is done
    assert kube.get("batch/v1", "Job", NS, "probe-ok") is None


def test_hpa_apply_is_idempotent(kube):
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "probe-hpa"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "backend"},
            "minReplicas": 2,
            "maxReplicas": 20,
        },
    }
    first = k8s.apply_horizontal_pod_autoscaler.fn(hpa)
    second = k8s.apply_horizontal_pod_autoscaler.fn(hpa)
    assert first["metadata"]["uid"] == second["metadata"]["uid"]
    assert [w.method for w in kube.writes] == ["POST", "PUT"]
    assert k8s.read_horizontal_pod_autoscaler.fn("probe-hpa")["spec"]["maxReplicas"] == 20
    assert k8s.read_horizontal_pod_autoscaler.fn("absent") is None


def test_certificate_custom_object_read_and_patch(kube):
    certs = k8s.list_custom_objects.fn("cert-manager.io", "v1", "certificates")
    assert [c["metadata"]["name"] for c in certs] == ["complianceagent-tls"]
    k8s.patch_custom_object.fn(
        "cert-manager.io",
        "v1",
        "certificates",
        "complianceagent-tls",
        {"metadata": {"labels": {"team": "platform"}}},
    )
    cert = k8s.read_custom_object.fn("cert-manager.io", "v1", "certificates", "complianceagent-tls")
    assert cert["metadata"]["labels"] == {"team": "platform"}


@flow
def scale_once(replicas: int) -> int:
    return k8s.scale_deployment(name="celery-workers", replicas=replicas)


def test_transient_5xx_is_retried_until_it_succeeds(kube):
    current = k8s.read_deployment_scale.fn("celery-workers")
    kube.inject_fault("PATCH", r".*/deployments/celery-workers/scale$", status=503, times=2)
    state = scale_once(current + 2, return_state=True)
    assert state.is_completed(), state.message
    assert [w.status for w in kube.writes] == [200]  # the faults were answered before any effect
    assert (
        kube.get("apps/v1", "Deployment", NS, "celery-workers")["spec"]["replicas"] == current + 2
    )
    k8s.scale_deployment.fn("celery-workers", current)


def test_404_is_not_retried(kube):
    # One injected 404: a retry would meet the real, existing object and succeed.
    kube.inject_fault("PATCH", r".*/deployments/celery-workers/scale$", status=404, times=1)
    state = scale_once(3, return_state=True)
    assert state.is_failed()
    assert "404" in state.message
    assert kube.writes == []


def test_read_statefulset_reads_without_writing(kube):
    sts = k8s.read_statefulset.fn("postgres")
    assert sts["metadata"]["name"] == "postgres"
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "postgres:15"
    assert kube.writes == []
    with pytest.raises(PlatformCallError, match="read statefulset/nope in complianceagent: 404"):
        k8s.read_statefulset.fn("nope")


def test_certificate_status_patch_goes_to_the_status_subresource(kube):
    k8s.patch_custom_object.fn(
        "cert-manager.io",
        "v1",
        "certificates",
        "complianceagent-tls",
        {"status": {"failedIssuanceAttempts": 0}},
        status=True,
    )
    [write] = kube.writes
    assert (write.method, write.subresource) == ("PATCH", "status")
    cert = k8s.read_custom_object.fn("cert-manager.io", "v1", "certificates", "complianceagent-tls")
    assert cert["status"]["failedIssuanceAttempts"] == 0
    assert any(c["type"] == "Ready" for c in cert["status"]["conditions"])


def job_body(name, labels):
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "probe", "image": "busybox", "command": ["true"]}],
                }
            },
        },
    }


@flow
def create_once(body: dict) -> dict:
    return k8s.create_job(body)


def test_create_job_whose_answer_was_lost_finds_its_own_job(kube, monkeypatch):
    """The first POST commits but its answer never arrives (the connection dies on the way
    back); the retry's 409 is our own Job, so the create succeeded."""
    kube.job_delay = 30  # still running while the task retries
    body = job_body("probe-lost-answer", {RUN_LABEL: "run-1"})
    host, port = kube.url.removeprefix("http://").rsplit(":", 1)
    with FaultyProxy(host, int(port)) as proxy:
        monkeypatch.setenv("RUNBOOK_KUBE_API_URL", proxy.url)
        proxy.drop_connection_after_download = 1  # the POST's answer is the first download

        state = create_once(body, return_state=True)

    assert state.is_completed(), state.message
    assert proxy.dropped == 1
    assert [(w.method, w.name, w.status) for w in kube.writes] == [
        ("POST", "probe-lost-answer", 201),
        ("POST", "probe-lost-answer", 409),
    ]
    assert state.result()["metadata"]["labels"][RUN_LABEL] == "run-1"
    assert (
        len(
            [
                j
                for j in kube.list("batch/v1", "Job", NS)
                if j["metadata"]["name"] == "probe-lost-answer"
            ]
        )
        == 1
    )


def test_create_job_refuses_a_409_on_a_job_that_is_not_ours(kube):
    kube.job_delay = 30
    k8s.create_job.fn(job_body("probe-taken", {RUN_LABEL: "somebody-else"}))
    kube.clear_writes()

    state = create_once(job_body("probe-taken", {RUN_LABEL: "run-2"}), return_state=True)

    assert state.is_failed()
    assert (
        "create job/probe-taken in complianceagent: 409 AlreadyExists, "
        "and job/probe-taken is not ours" in state.message
    )
    assert [(w.method, w.status) for w in kube.writes] == [("POST", 409)]  # not retried
    job = kube.get("batch/v1", "Job", NS, "probe-taken")
    assert job["metadata"]["labels"][RUN_LABEL] == "somebody-else"  # untouched
