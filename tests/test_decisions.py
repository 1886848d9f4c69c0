"""Pure decisions, judged on literal data: no servers, no Prefect."""

from __future__ import annotations

from runbook.decisions.health import EndpointCheck, judge_response, summarize
from runbook.decisions.rollout import RolloutPhase, rollout_verdict


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
