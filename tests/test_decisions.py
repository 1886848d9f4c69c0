"""Pure decisions, judged on literal data: no servers, no Prefect."""

from __future__ import annotations

from runbook.decisions.deployment import deployment_view, env_sources
from runbook.decisions.health import EndpointCheck, judge_response, summarize
from runbook.decisions.migrations import (
    created_by,
    job_outcome,
    migration_job,
    migration_job_body,
)
from runbook.decisions.release import Undone, failed_deploy_summary, rollback_cause
from runbook.decisions.rollout import RolloutPhase, rollout_outcome, rollout_verdict
from runbook.decisions.scaling import hpa_note


def deployment(
    generation=2, observed=2, replicas=3, updated=3, total=3, available=3, conditions=()
):
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "updatedReplicas": updated,
            "replicas": total,
            "availableReplicas": available,
            "conditions": list(conditions),
        },
    }


def test_rollout_complete_when_all_replicas_updated_and_available():
    assert rollout_verdict(deployment()).phase is RolloutPhase.COMPLETE


def test_rollout_progressing_until_new_generation_observed():
    verdict = rollout_verdict(deployment(generation=3, observed=2))
    assert verdict.phase is RolloutPhase.PROGRESSING
    assert "observed" in verdict.detail


def test_rollout_waits_for_our_generation_even_if_status_looks_done():
    assert rollout_verdict(deployment(), min_generation=3).phase is RolloutPhase.PROGRESSING


def test_rollout_progressing_while_old_replicas_terminate():
    verdict = rollout_verdict(deployment(total=4))
    assert verdict.phase is RolloutPhase.PROGRESSING
    assert "1 old replicas" in verdict.detail


def test_rollout_progressing_while_updated_replicas_unavailable():
    assert rollout_verdict(deployment(available=1)).phase is RolloutPhase.PROGRESSING


def test_rollout_failed_on_progress_deadline_exceeded():
    deadline = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "backend-abc" has timed out progressing.',
    }
    verdict = rollout_verdict(deployment(updated=0, available=0, conditions=[deadline]))
    assert verdict.phase is RolloutPhase.FAILED
    assert "timed out progressing" in verdict.detail


def test_health_judges_status_field_and_code():
    assert judge_response("/health", 200, {"status": "healthy"}) == ""
    assert judge_response("/health/db", 200, {"status": "connected"}) == ""
    assert (
        judge_response("/health/db", 503, {"status": "disconnected"}) == "HTTP 503 (disconnected)"
    )
    assert (
        judge_response("/health/live", 200, {"status": "dead"}) == "status 'dead', expected 'alive'"
    )
    assert judge_response("/health", 200, None) == "status None, expected 'healthy'"


def test_health_summary_names_failed_endpoints():
    ok = EndpointCheck("/health", True, 200, 3.0, '{"status":"healthy"}')
    bad = EndpointCheck("/health/redis", False, 503, 2.0, "", "HTTP 503 (disconnected)")
    summary = summarize([ok, bad])
    assert not summary.healthy
    assert summary.failed == ("/health/redis",)
    assert summary.text == (
        "1 of 2 health checks failed: /health/redis (Redis): HTTP 503 (disconnected)"
    )
    assert summarize([ok]).text == "All 1 health checks passed"


# --- release: typed views and outcomes -------------------------------------------------------

BACKEND = {
    "metadata": {
        "name": "backend",
        "generation": 7,
        "annotations": {"deployment.kubernetes.io/revision": "4"},
    },
    "spec": {
        "replicas": 3,
        "progressDeadlineSeconds": 120,
        "template": {
            "spec": {
                "containers": [
                    {"name": "sidecar", "image": "envoy:1"},
                    {
                        "name": "backend",
                        "image": "complianceagent/backend:1.4.2",
                        "env": [
                            {"name": "MAINTENANCE_MODE", "value": "true"},
                            {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {}}},
                        ],
                        "envFrom": [
                            {"secretRef": {"name": "api-key"}},
                            {"configMapRef": {"name": "backend-config"}},
                        ],
                    },
                ]
            }
        },
    },
}


def test_deployment_view_reads_by_name_the_container_named_like_the_deployment():
    view = deployment_view(BACKEND)
    assert (view.name, view.generation, view.revision, view.replicas) == ("backend", 7, 4, 3)
    assert view.progress_deadline_seconds == 120
    assert view.container.image == "complianceagent/backend:1.4.2"
    assert view.container.env_names == ("MAINTENANCE_MODE", "DATABASE_URL")
    assert view.container.env == {"MAINTENANCE_MODE": "true"}  # never a Secret's reference
    assert view.container.env_from == ("secret api-key", "configMap backend-config")


def test_deployment_view_defaults_as_kubernetes_does():
    bare = {
        "metadata": {"name": "web"},
        "spec": {"template": {"spec": {"containers": [{"name": "x", "image": "web:1"}]}}},
    }
    view = deployment_view(bare)
    assert (view.generation, view.revision, view.replicas) == (0, 0, 1)
    assert view.progress_deadline_seconds == 600
    assert view.container.name == "x"  # the only container
    assert env_sources({}) == ()


def test_rollout_outcome_carries_phase_reason_and_revision():
    done = deployment()
    done["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "9"}
    outcome = rollout_outcome(done)
    assert outcome.phase is RolloutPhase.COMPLETE and outcome.complete and outcome.finished
    assert outcome.revision == 9
    stuck = rollout_outcome(
        deployment(
            updated=0,
            conditions=[{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}],
        )
    )
    assert stuck.phase is RolloutPhase.FAILED and stuck.finished and not stuck.complete
    assert "progress deadline exceeded" in stuck.reason and stuck.revision == 0
    assert not rollout_outcome(deployment(), min_generation=3).finished


def test_job_outcome_from_its_conditions():
    assert not job_outcome({"status": {"active": 1}}).finished
    done = job_outcome(
        {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    )
    assert done.finished and done.succeeded and done.detail == "Complete"
    failed = job_outcome(
        {
            "status": {
                "failed": 1,
                "conditions": [
                    {"type": "FailureTarget", "status": "True", "message": "not this one"},
                    {"type": "Failed", "status": "True", "message": "backoff limit reached"},
                ],
            }
        }
    )
    assert failed.finished and not failed.succeeded and failed.detail == "backoff limit reached"
    not_yet = job_outcome({"status": {"conditions": [{"type": "Failed", "status": "False"}]}})
    assert not not_yet.finished


def test_migration_job_is_read_back_for_the_plan_and_names_its_run():
    body = migration_job_body(BACKEND, "backend-migrate-1a2b3c4d", 900, run_id="1a2b3c4d-ffff")
    job = migration_job(body)
    assert (job.name, job.image, job.working_dir) == (
        "backend-migrate-1a2b3c4d",
        "complianceagent/backend:1.4.2",
        "/app",
    )
    assert job.deadline_seconds == 900
    assert job.env_from == ("secret api-key", "configMap backend-config")
    assert created_by({"metadata": {"labels": dict(body["metadata"]["labels"])}}, body)
    other = migration_job_body(BACKEND, "backend-migrate-1a2b3c4d", 900, run_id="another-run")
    assert not created_by({"metadata": {"labels": other["metadata"]["labels"]}}, body)
    assert not created_by({"metadata": {}}, body)


def test_hpa_note_says_what_the_autoscaler_will_do():
    hpa = {"metadata": {"name": "backend-hpa"}, "spec": {"minReplicas": 2, "maxReplicas": 20}}
    assert hpa_note(None, 5) == "no HorizontalPodAutoscaler targets it"
    assert hpa_note(hpa, 5) == "HPA backend-hpa keeps it within 2-20"
    assert hpa_note(hpa, 1) == (
        "HPA backend-hpa keeps it within 2-20; it will move 1 back into that range"
    )


def test_failed_deploy_summary_says_what_failed_what_came_back_and_the_health():
    whole = Undone({"frontend": 5}, (), "all health checks passed")
    assert failed_deploy_summary("2.0.0", "rollout of deployment/frontend failed", whole) == (
        "Deploy of 2.0.0 failed and was rolled back: rollout of deployment/frontend failed. "
        "After the rollback: all health checks passed."
    )
    partial = Undone({}, ("restoring deployment/backend failed: 500.",), "health check failed")
    assert failed_deploy_summary("2.0.0", "boom", partial) == (
        "Deploy of 2.0.0 failed and was only PARTLY rolled back: boom. "
        "restoring deployment/backend failed: 500. After the rollback: health check failed."
    )
    assert len(rollback_cause("2.0.0", "x" * 1000)) == 500
