"""The drill: refused outside the sandbox before any side effect; its condition is real."""

from __future__ import annotations

import time
from uuid import UUID

import httpx
import pytest
import redis

from runbook.decisions.incidents import format_duration
from runbook.settings import load_settings
from sandbox.conditions import slow_backend
from sandbox.drills import BACKLOG_MESSAGES, SLOW_SECONDS, TRAFFIC_CLIENTS, cause, drill
from tests.helpers import read_artifacts, read_flow_run
from tests.release_helpers import deployment_writes, image_of, kinds_of


def broker(platform) -> redis.Redis:
    return redis.Redis.from_url(platform.redis.url)


def test_a_drill_outside_the_sandbox_is_refused_before_any_side_effect(platform, monkeypatch):
    monkeypatch.setenv("RUNBOOK_ENVIRONMENT", "staging")
    state = drill(issue="queue-backlog", return_state=True)
    assert state.is_failed()
    assert "only in the sandbox" in str(state.message)
    assert broker(platform).llen("celery") == 0


def test_the_queue_backlog_drill_puts_real_messages_on_the_broker_and_takes_them_back(platform):
    condition = cause("queue-backlog", load_settings())
    try:
        assert broker(platform).llen("celery") == BACKLOG_MESSAGES
    finally:
        condition.undo()
    assert broker(platform).llen("celery") == 0
    condition.undo()  # twice is harmless


def _timed_get(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    status = httpx.get(url, timeout=30).status_code
    return status, time.perf_counter() - started


def test_slow_backend_makes_the_standin_really_slow_and_5xx_and_undo_restores_it(platform):
    url = str(load_settings().api_base_url).rstrip("/")
    assert _timed_get(f"{url}/health")[1] < 0.5

    slow = slow_backend(url, latency=0.4, error_rate=0.5)
    try:
        answers = [_timed_get(f"{url}/health/live") for _ in range(6)]
    finally:
        slow.undo()
    assert all(seconds >= 0.4 for _, seconds in answers), answers
    assert sorted(status for status, _ in answers) == [200] * 3 + [500] * 3

    after = [_timed_get(f"{url}/health/live") for _ in range(4)]
    assert all(status == 200 and seconds < 0.4 for status, seconds in after), after
    slow.undo()  # twice is harmless


def test_a_bad_fault_is_refused_by_the_standin_naming_the_field(platform):
    url = str(load_settings().api_base_url).rstrip("/")
    with pytest.raises(ValueError, match="error_rate"):
        slow_backend(url, latency=1, error_rate=2)
    assert _timed_get(f"{url}/health")[0] == 200


def test_the_latency_drill_slows_every_answer_under_real_traffic_until_undone(platform):
    """What HighLatency sees: the stand-in's own histogram, filled by the drill's clients."""
    assert platform.backend is not None
    condition = cause("latency", load_settings())
    try:
        give_up = time.monotonic() + 20
        samples = platform.backend.metrics_text()
        # Two answers per client, each one SLOW_SECONDS late, as the histogram records them.
        while _sample(samples, "http_request_duration_seconds_count") < 2 * TRAFFIC_CLIENTS:
            assert time.monotonic() < give_up, "the drill's traffic never arrived"
            time.sleep(0.2)
            samples = platform.backend.metrics_text()
    finally:
        condition.undo()
    assert _sample(samples, 'http_request_duration_seconds_bucket{le="1.0"}') == 0
    assert _timed_get(f"{platform.backend.url}/health")[1] < SLOW_SECONDS
    sent = platform.backend.requests["/health"]
    time.sleep(1)  # undo joined the clients: no request may arrive any more
    assert platform.backend.requests["/health"] == sent


def _sample(text: str, name: str) -> float:
    return next(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
    )


@pytest.mark.slow
def test_the_failing_deploy_drill_waits_for_the_rollback_and_reports_both_times(
    platform, kube, served_api
):
    """The served `deploy` run (as under `make up`) sets the broken image, sees its rollout
    fail and rolls back; the drill waits for that and times it from the deploy's start."""
    recorded = image_of(kube, "backend")

    state = drill(issue="failing-deploy", recover_timeout_seconds=90, return_state=True)

    assert state.is_completed(), state.message
    report = state.result()
    deploy_run = read_flow_run(UUID(report["deploy run"].split("(")[1].split(")")[0]))
    assert deploy_run.state is not None and deploy_run.state.is_failed()
    assert "progress deadline exceeded" in str(deploy_run.state.message)
    # Really rolled back: the broken image was set, then the recorded template restored.
    assert image_of(kube, "backend") == recorded
    assert kinds_of(deployment_writes(kube, "backend")) == ["set-image", "restore"]
    detect, recover = report["time_to_detect"], report["time_to_recover"]
    assert 0 < detect < recover < 90, report
    drill_run = state.state_details.flow_run_id
    artifact = str(read_artifacts(drill_run)["drill-report"].data)
    assert f"**time to detect:** {format_duration(detect)} ({detect:.1f} s)" in artifact
    assert f"**time to recover:** {format_duration(recover)} ({recover:.1f} s)" in artifact
    print(f"\nfailing deploy: detected in {detect:.1f} s, recovered in {recover:.1f} s")
