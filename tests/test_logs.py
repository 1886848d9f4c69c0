"""The logs runbook against the sandbox: real requests to the backend stand-in, logged as
JSON by the pod that served them, read back through the Kubernetes API and filtered."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from prefect.exceptions import ParameterTypeError

from flows.logs import logs
from runbook.decisions.logs import LogSearch
from sandbox.platform import NAMESPACE
from tests.helpers import read_artifacts

HOURS = 3600 * 10**9


@pytest.fixture
def http(platform) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.backend.url, timeout=10) as client:
        yield client


def backend_pods(platform) -> list[str]:
    return platform._backend_pods()


def search(**parameters) -> tuple[LogSearch, dict]:
    state = logs(**parameters, return_state=True)
    assert state.is_completed(), state.message
    found = state.result()
    assert isinstance(found, LogSearch)
    return found, read_artifacts(state.state_details.flow_run_id)


def paths(found: LogSearch) -> list[str]:
    return [dict(kv.split("=", 1) for kv in m.line.split(" ")[:3])["path"] for m in found.matches]


def test_errors_in_the_last_hour_are_exactly_the_failed_requests(platform, http):
    platform.backend.force_status["/api/v1/scans"] = 500
    for _ in range(3):
        http.get("/api/v1/scans")
    http.get("/health")
    http.get("/api/v1/unknown")  # 404: a warning, not an error

    found, artifacts = search(min_level="error", since_minutes=60)

    assert found.matched == 3 and found.counts_by_level == {"error": 3}
    assert paths(found) == ["/api/v1/scans"] * 3
    assert found.lines_scanned == 5
    assert set(found.pods) == set(backend_pods(platform))
    assert all("msg=request failed: injected failure (500)" in m.line for m in found.matches)
    table = json.loads(artifacts["log-matches"].data)
    assert [row["level"] for row in table] == ["error"] * 3
    assert "3 of 5 line(s) from 3 pod(s) (app=backend, last 60 min)" in (
        artifacts["logs-report"].data
    )


def test_a_users_activity_is_their_requests_only(platform, http):
    for path in ("/api/v1/scans", "/api/v1/reports"):
        http.get(path, headers={"X-User-Id": "user123"})
    http.get("/api/v1/scans", headers={"X-User-Id": "user1234"})
    http.get("/health")

    found, _ = search(field_match="user_id=user123")

    assert found.matched == 2
    assert paths(found) == ["/api/v1/scans", "/api/v1/reports"]
    assert all("user_id=user123" in m.line for m in found.matches)


def test_slow_requests_are_those_over_a_second(platform, http):
    platform.backend.delay_seconds["/api/v1/reports"] = 1.1
    http.get("/api/v1/reports")
    for _ in range(3):
        http.get("/health")

    found, _ = search(numeric_condition="duration_ms>1000")

    assert found.matched == 1 and paths(found) == ["/api/v1/reports"]
    duration = float(found.matches[0].line.split("duration_ms=")[1].split(" ")[0])
    assert duration >= 1100


def test_the_time_window_leaves_out_older_lines(platform, http):
    platform.backend.force_status["/old"] = 503
    platform.backend.force_status["/new"] = 503
    platform.backend.log_clock = lambda: time.time_ns() - 2 * HOURS  # written 2 h ago
    http.get("/old")
    http.get("/old")
    platform.backend.log_clock = time.time_ns
    http.get("/new")

    last_hour, _ = search(min_level="error", since_minutes=60)
    last_three_hours, _ = search(min_level="error", since_minutes=180)

    assert paths(last_hour) == ["/new"]
    assert paths(last_three_hours) == ["/old", "/old", "/new"]


def test_tail_lines_is_per_pod_and_max_matches_keeps_the_latest(platform, http):
    pods = backend_pods(platform)
    for n in range(3 * len(pods)):
        http.get(f"/t/{n}")  # a Service spreads them: three lines in every pod

    tail_one, _ = search(tail_lines=1, text="/t/")
    capped, artifacts = search(max_matches=2, text="/t/")

    last = [f"/t/{n}" for n in range(2 * len(pods), 3 * len(pods))]
    assert sorted(paths(tail_one)) == sorted(last) and tail_one.lines_scanned == len(pods)
    assert capped.matched == 3 * len(pods) and capped.truncated
    assert paths(capped) == last[-2:]
    assert len(json.loads(artifacts["log-matches"].data)) == 2


@pytest.mark.parametrize(
    ("parameters", "name"),
    [
        ({"numeric_condition": "duration_ms>fast"}, "numeric_condition"),
        ({"numeric_condition": "duration_ms"}, "numeric_condition"),
        ({"field_match": "user123"}, "field_match"),
        ({"since_minutes": 0}, "since_minutes"),
        ({"tail_lines": 50_001}, "tail_lines"),
        ({"min_level": "loud"}, "min_level"),
    ],
)
def test_bad_filters_are_refused_before_any_call_naming_the_parameter(platform, parameters, name):
    # A permanent fault waits on the first call a search makes: if the refused search had
    # made any call, it would have taken it and the good search below would succeed.
    platform.kube.inject_fault("*", r"/deployments/backend$|/pods$", status=403, times=1)

    with pytest.raises(ParameterTypeError, match=name):
        logs(**parameters)

    state = logs(return_state=True)
    assert state.is_failed() and "403" in state.message


def test_a_label_selector_and_a_wrong_container_fail_at_once_naming_it(platform, http):
    http.get("/health")

    state = logs(label_selector="app=backend", container="sidecar", return_state=True)

    assert state.is_failed()
    assert "container sidecar is not valid for pod backend-" in state.message
    assert "400" in state.message


def test_a_selector_matching_no_pod_finds_nothing_and_says_so(platform):
    found, artifacts = search(label_selector="app=ghost")

    assert (found.pods, found.matched, found.matches) == ((), 0, ())
    assert "none matched the selector" in artifacts["logs-report"].data
    assert "log-matches" not in artifacts


def test_other_components_logs_are_read_by_their_own_selector(platform, kube):
    pods = [p["metadata"]["name"] for p in kube.list("v1", "Pod", NAMESPACE)]
    assert any(p.startswith("celery-workers-") for p in pods)

    found, _ = search(component="celery-workers")

    assert found.pods and all(p.startswith("celery-workers-") for p in found.pods)
    assert found.matched == 0  # the stand-in only writes the backend's logs
