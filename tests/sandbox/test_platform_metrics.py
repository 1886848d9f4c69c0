"""The Key Metrics on the backend stand-in's /metrics are measured from the real sandbox
systems, and the sandbox's real Prometheus scrapes them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import redis

from sandbox.platform import Sandbox
from sandbox.platform_metrics import celery_queue_lists


def _sample(platform: Sandbox, series: str) -> float:
    text = httpx.get(f"{platform.backend.url}/metrics", timeout=5).text  # type: ignore[union-attr]
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not on /metrics:\n{text}"
    return float(match.group(1))


def _wait_for_prometheus(platform: Sandbox, expr: str, value: float, timeout: float = 20) -> None:
    assert platform.prometheus is not None
    give_up = time.monotonic() + timeout
    seen: list = []
    while time.monotonic() < give_up:
        seen = platform.prometheus.query(expr)
        if seen and float(seen[0]["value"][1]) == value:
            return
        time.sleep(0.3)
    raise AssertionError(f"Prometheus never saw {expr} == {value}; last {seen}")


@pytest.fixture
def broker(sandbox: Sandbox) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(sandbox.redis.url)
    try:
        yield client
    finally:
        client.delete(*celery_queue_lists("celery"))
        client.close()


def test_database_connections_are_counted_in_pg_stat_activity(sandbox: Sandbox) -> None:
    before = _sample(sandbox, "db_connections")
    held = [psycopg.connect(sandbox.postgres.dsn) for _ in range(5)]
    try:
        assert _sample(sandbox, "db_connections") == before + 5
        assert _sample(sandbox, "db_connection_pool_size") == 20
    finally:
        for conn in held:
            conn.close()
    assert _sample(sandbox, "db_connections") == before


def test_queue_depth_is_llen_of_the_broker_lists_with_priorities(
    sandbox: Sandbox, broker: redis.Redis
) -> None:
    broker.rpush("celery", *[b"{}"] * 7)
    broker.rpush("celery\x06\x169", *[b"{}"] * 3)
    assert _sample(sandbox, 'celery_queue_length{queue="celery"}') == 10
    _wait_for_prometheus(sandbox, 'celery_queue_length{queue="celery"}', 10)


def test_redis_memory_is_read_from_info(sandbox: Sandbox, broker: redis.Redis) -> None:
    info = broker.info("memory")
    assert _sample(sandbox, "redis_memory_max_bytes") == info["maxmemory"]
    assert _sample(sandbox, "redis_memory_used_bytes") > 0


def test_cpu_and_memory_injectable_per_component(sandbox: Sandbox) -> None:
    assert sandbox.metrics is not None
    sandbox.metrics.set_usage("frontend", cpu_ratio=0.93, memory_ratio=0.5)
    try:
        assert _sample(sandbox, 'component_cpu_usage_ratio{component="frontend"}') == 0.93
        assert _sample(sandbox, 'component_memory_usage_ratio{component="frontend"}') == 0.5
        # The backend's are the sandbox process's own, measured.
        assert 0 < _sample(sandbox, 'component_memory_usage_ratio{component="backend"}') < 1
        _wait_for_prometheus(sandbox, 'component_cpu_usage_ratio{component="frontend"}', 0.93)
    finally:
        sandbox.metrics.reset()
    with pytest.raises(ValueError, match="unknown component"):
        sandbox.metrics.set_usage("database", cpu_ratio=1, memory_ratio=1)
