"""The "Key Metrics" the backend exports besides its request counters, measured for real.

- CPU and memory per component: the backend's are the sandbox process's own (CPU time
  over wall time since the previous scrape, resident memory from /proc), against a limit
  like a pod's; the other components' are injectable (`set_usage`), as nothing runs them.
- Database connections vs pool size: the app database's sessions counted in
  `pg_stat_activity` at each scrape (this count's own session left out); the pool size
  is configuration, as in the backend.
- Celery queue depth: `LLEN` of the broker's real Redis lists, each queue with its
  priority lists (`queue + "\\x06\\x16" + p`, p in 3, 6, 9), as kombu stores them.
- Redis memory: `used_memory` and `maxmemory` from the broker's `INFO memory`.

`render()` is the Prometheus text the backend stand-in appends to its `/metrics`.
Metric names are what monitoring/rules use.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

COMPONENTS = ("backend", "frontend", "celery-workers")
CELERY_PRIORITY_SEPARATOR = "\x06\x16"
CELERY_PRIORITIES = (3, 6, 9)
SCRAPE_TIMEOUT_SECONDS = 1

# What each sandbox "pod" may use, like the resources.limits of the real Deployments; the
# backend "pod" is the sandbox process, whose limit is the machine.
DEFAULT_CPU_LIMIT_CORES = float(os.cpu_count() or 1)
DEFAULT_MEMORY_LIMIT_BYTES = 2 * 1024**3


def celery_queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold one Celery queue's messages (kombu's priority lists too)."""
    return [queue] + [f"{queue}{CELERY_PRIORITY_SEPARATOR}{p}" for p in CELERY_PRIORITIES]


class PlatformMetrics:
    """Renders the Key Metrics from the real sandbox systems at each scrape."""

    def __init__(
        self,
        database_dsn: str,
        broker_url: str,
        *,
        pool_size: int = 20,
        celery_queues: Sequence[str] = ("celery",),
        cpu_limit_cores: float = DEFAULT_CPU_LIMIT_CORES,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    ) -> None:
        self.database_dsn = database_dsn
        self.broker_url = broker_url
        self.pool_size = pool_size
        self.celery_queues = tuple(celery_queues)
        self.cpu_limit_cores = cpu_limit_cores
        self.memory_limit_bytes = memory_limit_bytes
        self._lock = threading.Lock()
        self._injected: dict[str, tuple[float, float]] = {}
        self._last_cpu = (time.monotonic(), time.process_time())

    # -- knobs -----------------------------------------------------------------------

    def set_usage(self, component: str, *, cpu_ratio: float, memory_ratio: float) -> None:
        """Make `component` report this CPU and memory use (fractions of its limits)."""
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; one of {COMPONENTS}")
        with self._lock:
            self._injected[component] = (cpu_ratio, memory_ratio)

    def reset(self) -> None:
        """Back to measured values for the backend and idle for the others."""
        with self._lock:
            self._injected.clear()

    # -- rendering -------------------------------------------------------------------

    def render(self) -> str:
        lines: list[str] = []
        lines += self._render_resources()
        lines += self._render_database()
        lines += self._render_broker()
        return "\n".join(lines) + "\n"

    def _render_resources(self) -> list[str]:
        measured_cpu = self._backend_cpu_ratio()
        measured_memory = _resident_bytes() / self.memory_limit_bytes
        lines = [
            "# HELP component_cpu_usage_ratio CPU used over the component's CPU limit.",
            "# TYPE component_cpu_usage_ratio gauge",
        ]
        memory = [
            "# HELP component_memory_usage_ratio Memory used over the component's memory limit.",
            "# TYPE component_memory_usage_ratio gauge",
        ]
        with self._lock:
            injected = dict(self._injected)
        for component in COMPONENTS:
            cpu, mem = injected.get(
                component,
                (measured_cpu, measured_memory) if component == "backend" else (0.05, 0.2),
            )
            lines.append(f'component_cpu_usage_ratio{{component="{component}"}} {cpu!r}')
            memory.append(f'component_memory_usage_ratio{{component="{component}"}} {mem!r}')
        return lines + memory

    def _backend_cpu_ratio(self) -> float:
        """The sandbox process's CPU use since the previous scrape, over the CPU limit."""
        now = (time.monotonic(), time.process_time())
        with self._lock:
            (wall_before, cpu_before), self._last_cpu = self._last_cpu, now
        elapsed = now[0] - wall_before
        if elapsed <= 0:
            return 0.0
        return max(0.0, (now[1] - cpu_before) / elapsed / self.cpu_limit_cores)

    def _render_database(self) -> list[str]:
        lines = [
            "# HELP db_connection_pool_size Connections the backend's pool may open.",
            "# TYPE db_connection_pool_size gauge",
            f"db_connection_pool_size {self.pool_size}",
        ]
        try:
            with psycopg.connect(
                self.database_dsn, connect_timeout=SCRAPE_TIMEOUT_SECONDS, autocommit=True
            ) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
        except psycopg.Error:
            # "too many connections" is itself the symptom: no sample, and the scrape
            # still answers (the alert on the pool then holds its last value or `absent`).
            return lines
        connections = int(row[0]) if row else 0
        return [
            *lines,
            "# HELP db_connections Sessions on the app database (pg_stat_activity).",
            "# TYPE db_connections gauge",
            f"db_connections {connections}",
        ]

    def _render_broker(self) -> list[str]:
        client = redis.Redis.from_url(
            self.broker_url,
            socket_timeout=SCRAPE_TIMEOUT_SECONDS,
            socket_connect_timeout=SCRAPE_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        )
        lines = [
            "# HELP celery_queue_length Messages waiting in a Celery queue (LLEN of its lists).",
            "# TYPE celery_queue_length gauge",
        ]
        try:
            with client.pipeline(transaction=False) as pipe:
                for queue in self.celery_queues:
                    for name in celery_queue_lists(queue):
                        pipe.llen(name)
                lengths = pipe.execute()
            memory = client.info("memory")
        except redis.RedisError:
            return []  # broker down: no sample rather than a made-up zero
        finally:
            client.close()
        per_queue = len(CELERY_PRIORITIES) + 1
        for i, queue in enumerate(self.celery_queues):
            depth = sum(int(n) for n in lengths[i * per_queue : (i + 1) * per_queue])
            lines.append(f'celery_queue_length{{queue="{queue}"}} {depth}')
        return [
            *lines,
            "# HELP redis_memory_used_bytes Redis used_memory (INFO memory).",
            "# TYPE redis_memory_used_bytes gauge",
            f"redis_memory_used_bytes {int(memory['used_memory'])}",
            "# HELP redis_memory_max_bytes Redis maxmemory (0: no limit).",
            "# TYPE redis_memory_max_bytes gauge",
            f"redis_memory_max_bytes {int(memory['maxmemory'])}",
        ]


def _resident_bytes() -> int:
    """This process's resident set size now (peak RSS where /proc is missing)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
