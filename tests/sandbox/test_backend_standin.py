"""The backend stand-in answers its health endpoints from real PostgreSQL and Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from sandbox.backend_standin import BackendStandIn
from sandbox.services import PostgresServer, RedisServer

REDIS_PASSWORD = "redis-secret-do-not-leak"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(password=REDIS_PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def platform_state() -> dict[str, object]:
    """What the sandbox would read from Kubernetes: maintenance flag and replica count."""
    return {"maintenance": False, "replicas": 1}


@pytest.fixture(scope="module")
def module_standin(postgres, redis_server, platform_state) -> Iterator[BackendStandIn]:
    with BackendStandIn(
        database_dsn=postgres.dsn,
        redis_url=redis_server.url,
        maintenance_mode=lambda: bool(platform_state["maintenance"]),
        replicas=lambda: int(platform_state["replicas"]),  # type: ignore[call-overload]
    ) as server:
        yield server


@pytest.fixture
def standin(module_standin, redis_server, postgres, platform_state) -> BackendStandIn:
    # A test that simulated an outage must not leak it into the next one.
    redis_server.start()
    postgres.start()
    platform_state.update(maintenance=False, replicas=1)
    module_standin.reset()
    return module_standin


@pytest.fixture
def http(standin) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=standin.url, timeout=10) as client:
        yield client


def _metrics(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_all_five_health_endpoints_answer_with_postgres_and_redis_up(http, standin):
    expected = {
        "/health": {"status": "healthy"},
        "/health/ready": {"status": "ready"},
        "/health/live": {"status": "alive"},
        "/health/db": {"status": "connected"},
        "/health/redis": {"status": "connected"},
    }
    for path, body in expected.items():
        response = http.get(path)
        assert (response.status_code, response.json()) == (200, body), path
    assert standin.url.startswith("http://127.0.0.1:")
    assert standin.requests == {path: 1 for path in expected}


def test_redis_outage_fails_the_redis_check_until_redis_is_back(http, redis_server):
    redis_server.stop()
    response = http.get("/health/redis")
    assert response.status_code == 503
    assert response.json()["status"] == "disconnected"
    assert "ConnectionError" in response.json()["error"]
    assert REDIS_PASSWORD not in response.text
    assert http.get("/health").status_code == 200  # only the dependency check fails

    redis_server.start()
    response = http.get("/health/redis")
    assert (response.status_code, response.json()) == (200, {"status": "connected"})


def test_postgres_outage_fails_the_db_check_until_postgres_is_back(http, postgres):
    postgres.stop(keep_data=True)
    response = http.get("/health/db")
    assert response.status_code == 503
    assert response.json()["status"] == "disconnected"
    assert "OperationalError" in response.json()["error"]

    postgres.start()
    assert http.get("/health/db").json() == {"status": "connected"}


def test_db_check_error_never_shows_the_dsn_or_password(postgres, redis_server):
    secret = "wrong-password-do-not-leak"
    bad_dsn = f"postgresql://complianceagent:{secret}@127.0.0.1:{postgres.port}/complianceagent"
    with BackendStandIn(bad_dsn, redis_server.url) as standin, httpx.Client() as client:
        response = client.get(f"{standin.url}/health/db", timeout=10)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "disconnected"
    assert "password authentication failed" in body["error"]
    assert secret not in response.text
    assert bad_dsn not in response.text


def test_maintenance_mode(http, platform_state):
    platform_state["maintenance"] = True
    assert (http.get("/health").status_code, http.get("/health").json()) == (
        503,
        {"status": "maintenance"},
    )
    assert http.get("/health/ready").json() == {"status": "maintenance"}
    live = http.get("/health/live")
    assert (live.status_code, live.json()) == (200, {"status": "alive"})
    for path in ("/health/db", "/health/redis", "/api/v1/anything"):
        response = http.get(path)
        assert (response.status_code, response.json()) == (503, {"detail": "maintenance"})

    platform_state["maintenance"] = False
    assert http.get("/health").json() == {"status": "healthy"}


def test_scaled_to_zero_answers_unavailable_everywhere(http, platform_state, standin):
    platform_state["replicas"] = 0
    for path in ("/health", "/health/live", "/health/db", "/metrics", "/nope"):
        response = http.get(path)
        assert (response.status_code, response.json()) == (503, {"status": "unavailable"})
    platform_state["replicas"] = 2
    assert http.get("/health/live").status_code == 200
    assert standin.requests["/health/live"] == 2


def test_fail_next_then_recover_and_force_status(http, standin):
    standin.fail_next("/health", status=500, times=2)
    statuses = [http.get("/health").status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert http.get("/health/ready").status_code == 200  # other paths unaffected

    standin.force_status["/health/db"] = 502
    assert [http.get("/health/db").status_code for _ in range(2)] == [502, 502]
    del standin.force_status["/health/db"]
    assert http.get("/health/db").status_code == 200


def test_delay_is_applied_and_a_client_timeout_does_not_break_the_server(http, standin):
    standin.delay_seconds["/health/db"] = 0.2
    started = time.perf_counter()
    assert http.get("/health/db").status_code == 200
    assert time.perf_counter() - started >= 0.2

    standin.delay_seconds["/health"] = 1.0
    with pytest.raises(httpx.ReadTimeout):
        http.get("/health", timeout=0.1)
    assert http.get("/health/live").status_code == 200


def test_metrics_count_served_requests_and_their_latency(http, standin):
    standin.delay_seconds["/health/ready"] = 0.15
    for _ in range(3):
        http.get("/health")
    http.get("/health/ready")
    standin.fail_next("/health/live", status=503)
    http.get("/health/live")

    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE http_request_duration_seconds histogram" in response.text
    samples = _metrics(response.text)
    assert samples["http_request_duration_seconds_count"] == 5  # the scrape is not counted
    assert samples['http_request_duration_seconds_bucket{le="+Inf"}'] == 5
    assert samples['http_request_duration_seconds_bucket{le="0.1"}'] == 4
    assert samples['http_request_duration_seconds_bucket{le="0.25"}'] == 5
    assert samples["http_request_duration_seconds_sum"] >= 0.15
    assert samples['http_requests_total{status="200"}'] == 4
    assert samples['http_requests_total{status="503"}'] == 1
    buckets = [v for k, v in samples.items() if k.startswith("http_request_duration_seconds_b")]
    assert buckets == sorted(buckets)  # cumulative
    assert standin.requests["/metrics"] == 1


def test_unknown_path_and_wrong_method(http):
    assert (http.get("/nope").status_code, http.get("/nope").json()) == (
        404,
        {"detail": "Not Found"},
    )
    assert http.post("/health", json={"x": 1}).status_code == 405


def test_stop_and_start_again_on_the_same_port(postgres, redis_server):
    standin = BackendStandIn(postgres.dsn, redis_server.url)
    with standin, httpx.Client() as client:
        url = standin.url
        assert client.get(f"{url}/health").status_code == 200
        standin.stop()
        with pytest.raises(httpx.ConnectError):
            client.get(f"{url}/health", timeout=2)
        standin.start()
        assert standin.url == url
        assert client.get(f"{url}/health").status_code == 200
    standin.stop()  # idempotent


def _drained(standin: BackendStandIn, within: float = 40) -> None:
    """Wait until requests an earlier test left sleeping in the server (its client gave up
    on them) have been answered: the gauge counts them until then."""
    give_up = time.monotonic() + within
    while standin.in_flight and time.monotonic() < give_up:
        time.sleep(0.05)


def test_in_flight_gauge_counts_requests_held_open_but_not_the_scrape(http, standin):
    import threading

    _drained(standin)
    standin.delay_seconds["/api/v1/scans"] = 1.0
    held = [
        threading.Thread(target=lambda: httpx.get(f"{standin.url}/api/v1/scans", timeout=10))
        for _ in range(3)
    ]
    for thread in held:
        thread.start()
    give_up = time.monotonic() + 5
    while standin.in_flight < 3 and time.monotonic() < give_up:
        time.sleep(0.01)

    samples = _metrics(http.get("/metrics").text)
    assert samples["http_requests_in_flight"] == 3  # the three held, not this scrape
    for thread in held:
        thread.join()
    assert _metrics(http.get("/metrics").text)["http_requests_in_flight"] == 0


def test_metrics_are_served_in_maintenance_mode(http, platform_state, standin):
    _drained(standin)
    platform_state["maintenance"] = True
    response = http.get("/metrics")
    assert response.status_code == 200
    assert _metrics(response.text)["http_requests_in_flight"] == 0


# --- the sandbox-only control path: /sandbox/faults ---------------------------------------


@pytest.fixture
def controlled(postgres, redis_server, platform_state) -> Iterator[BackendStandIn]:
    """A stand-in started as the sandbox platform starts it: with its control path."""
    platform_state.update(maintenance=False, replicas=1)
    with BackendStandIn(
        postgres.dsn,
        redis_server.url,
        maintenance_mode=lambda: bool(platform_state["maintenance"]),
        replicas=lambda: int(platform_state["replicas"]),  # type: ignore[call-overload]
        sandbox_controls=True,
    ) as server:
        yield server
    platform_state.update(maintenance=False, replicas=1)


def test_the_control_path_exists_only_when_started_with_sandbox_controls(http, standin):
    refused = http.put("/sandbox/faults", json={"latency_seconds": 1, "error_rate": 0})
    assert refused.status_code == 404
    assert http.get("/health").elapsed.total_seconds() < 0.5  # nothing was set


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"latency_seconds": -1, "error_rate": 0}, "latency_seconds"),
        ({"latency_seconds": 31, "error_rate": 0}, "latency_seconds"),
        ({"latency_seconds": 0, "error_rate": 1.5}, "error_rate"),
        ({"latency_seconds": 0}, "error_rate"),
        ({"latency_seconds": 0, "error_rate": 0, "status": 500}, "status"),
        ({"latency_seconds": "slow", "error_rate": 0}, "latency_seconds"),
    ],
)
def test_bad_faults_are_refused_with_400_naming_the_field(controlled, body, field):
    answer = httpx.put(f"{controlled.url}/sandbox/faults", json=body, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["detail"].startswith(f"{field}:")
    assert httpx.get(f"{controlled.url}/sandbox/faults", timeout=10).json() == {
        "latency_seconds": 0.0,
        "error_rate": 0.0,
    }


def test_a_body_that_is_not_json_or_too_big_is_refused(controlled):
    url = f"{controlled.url}/sandbox/faults"
    assert httpx.put(url, content=b"{nope", timeout=10).status_code == 400
    assert httpx.put(url, content=b"x" * 10_000, timeout=10).status_code == 413
    assert httpx.post(url, json={}, timeout=10).status_code == 405


def test_the_control_path_is_not_the_backend_neither_counted_logged_nor_in_metrics(
    controlled, platform_state
):
    with httpx.Client(base_url=controlled.url, timeout=10) as client:
        # Even with no pods or in maintenance: the control is the sandbox's, not the app's.
        platform_state["replicas"] = 0
        assert client.get("/sandbox/faults").status_code == 200
        platform_state.update(replicas=1, maintenance=True)
        set_ = client.put("/sandbox/faults", json={"latency_seconds": 0, "error_rate": 0.5})
        assert set_.json() == {"latency_seconds": 0.0, "error_rate": 0.5}
        platform_state["maintenance"] = False
        samples = _metrics(client.get("/metrics").text)
    assert "/sandbox/faults" not in controlled.requests
    assert samples["http_request_duration_seconds_count"] == 0
    assert controlled.pod_log("backend-standin") is None  # no request log line either


def test_faults_make_every_served_request_slow_and_an_exact_share_500(controlled):
    with httpx.Client(base_url=controlled.url, timeout=10) as client:
        client.put("/sandbox/faults", json={"latency_seconds": 0.2, "error_rate": 0.25})
        started = time.perf_counter()
        statuses = [client.get(path).status_code for path in ("/health", "/health/live") * 4]
        took = time.perf_counter() - started
        scrape_started = time.perf_counter()
        samples = _metrics(client.get("/metrics").text)
        scrape = time.perf_counter() - scrape_started
    assert took >= 8 * 0.2
    assert sorted(statuses) == [200] * 6 + [500] * 2
    assert scrape < 0.2  # a scrape is not slowed: Prometheus must still see it
    assert samples['http_requests_total{status="500"}'] == 2
    assert samples['http_request_duration_seconds_bucket{le="0.1"}'] == 0
    assert samples['http_request_duration_seconds_bucket{le="0.25"}'] == 8
