"""The page's four "Common Issues", produced for real in the sandbox: for the diagnose-*
runbooks' tests, and for drills on `make up`.

- High API latency / errors: the backend stand-in's knobs (`delay_seconds`,
  `force_status` in-process; `slow_backend` over HTTP from any process, through its
  sandbox-only `PUT /sandbox/faults`) plus `send_traffic`, so its /metrics histogram has
  something to show.
- Connection pool exhaustion: `hold_idle_connections` opens real PostgreSQL sessions that
  sit idle, or idle in a transaction.
- Redis memory full: `fill_redis` writes cache keys, then sets maxmemory just above what is
  used with `noeviction`, so writes fail with "OOM command not allowed".
- Worker queue backlog: `push_celery_backlog` puts Celery-shaped (kombu protocol 2)
  messages on the broker's lists, `add_unacked` a task a worker took and never acknowledged.

Each returns an object whose `undo()` puts things back (safe to call twice); the context
manager forms undo on exit.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import redis

PRIORITY_SEPARATOR = "\x06\x16"


# --- PostgreSQL: idle sessions ------------------------------------------------------------


@dataclass
class HeldConnections:
    """Real sessions holding connection slots; `pids` as pg_stat_activity shows them."""

    connections: list[psycopg.Connection[Any]]
    pids: list[int]

    def undo(self) -> None:
        for conn in self.connections:
            with contextlib.suppress(psycopg.Error):
                conn.close()


def open_idle_connections(
    dsn: str, count: int, in_transaction: bool = False, application: str = "held-idle"
) -> HeldConnections:
    """`count` sessions that ran one query and sit idle (or `idle in transaction`)."""
    held = HeldConnections([], [])
    try:
        for _ in range(count):
            conn = psycopg.connect(dsn, application_name=application, autocommit=not in_transaction)
            held.connections.append(conn)
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            held.pids.append(int(row[0]))
            # In a transaction the SELECT left it open: the session is "idle in transaction".
    except BaseException:
        held.undo()
        raise
    return held


@contextlib.contextmanager
def hold_idle_connections(
    dsn: str, count: int, in_transaction: bool = False, application: str = "held-idle"
) -> Iterator[HeldConnections]:
    held = open_idle_connections(dsn, count, in_transaction, application)
    try:
        yield held
    finally:
        held.undo()


# --- Redis: memory full -------------------------------------------------------------------


def redis_client(url: str, db: int) -> redis.Redis:
    """A client for database `db` of the Redis at `url` (whatever db the URL names)."""
    parts = urlsplit(url)
    return redis.Redis.from_url(urlunsplit(parts._replace(path=f"/{db}")))


@dataclass
class FilledRedis:
    url: str
    db: int
    keys: list[str]
    maxmemory_before: int
    policy_before: str
    maxmemory: int = 0

    def undo(self) -> None:
        client = redis_client(self.url, self.db)
        try:
            client.config_set("maxmemory", self.maxmemory_before)
            client.config_set("maxmemory-policy", self.policy_before)
            if self.keys:
                client.delete(*self.keys)
        finally:
            client.close()


def fill_redis(
    url: str, db: int, keys: int = 20, value_bytes: int = 256 * 1024, prefix: str = "cache:report:"
) -> FilledRedis:
    """Write `keys` cache values of `value_bytes` (no TTL) into `db`, then make Redis full:
    maxmemory just above used memory, policy noeviction (writes then fail with OOM)."""
    client = redis_client(url, db)
    try:
        before = client.config_get("maxmemory")["maxmemory"]
        policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
        names = [f"{prefix}{n}" for n in range(keys)]
        with client.pipeline(transaction=False) as pipe:
            for n, name in enumerate(names):
                pipe.set(name, (b"%d" % n) * (value_bytes // len(b"%d" % n)))
            pipe.execute()
        used = int(client.info("memory")["used_memory"])
        maxmemory = used + 64 * 1024
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", maxmemory)
        return FilledRedis(url, db, names, int(before), str(policy), maxmemory)
    finally:
        client.close()


# --- Redis: Celery backlog ---------------------------------------------------------------


def celery_message(task: str, queue: str, args: list[Any] | None = None) -> dict[str, Any]:
    """A message as Celery 5 (protocol 2) puts it on a kombu Redis list."""
    task_id = str(uuid.uuid4())
    body = json.dumps([args or [], {}, {"callbacks": None, "errbacks": None, "chain": None}])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0},
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


@dataclass
class Backlog:
    url: str
    db: int
    lists: dict[str, int] = field(default_factory=dict)
    unacked_tags: list[str] = field(default_factory=list)

    def undo(self) -> None:
        client = redis_client(self.url, self.db)
        try:
            if self.lists:
                client.delete(*self.lists)
            for tag in self.unacked_tags:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
        finally:
            client.close()


def push_celery_backlog(
    url: str,
    db: int,
    queue: str = "celery",
    count: int = 100,
    priority: int | None = None,
    task: str = "app.workers.run_compliance_scan",
    into: Backlog | None = None,
) -> Backlog:
    """LPUSH `count` messages onto `queue` (or its priority list `queue\\x06\\x16<p>`), as
    kombu does, and the queue's binding (`_kombu.binding.<queue>`)."""
    backlog = into or Backlog(url, db)
    name = queue if priority is None else f"{queue}{PRIORITY_SEPARATOR}{priority}"
    client = redis_client(url, db)
    try:
        with client.pipeline(transaction=False) as pipe:
            for _ in range(count):
                pipe.lpush(name, json.dumps(celery_message(task, queue)))
            pipe.sadd(
                f"_kombu.binding.{queue}", f"{queue}{PRIORITY_SEPARATOR}{PRIORITY_SEPARATOR}{queue}"
            )
            pipe.execute()
    finally:
        client.close()
    backlog.lists[name] = backlog.lists.get(name, 0) + count
    return backlog


def add_unacked(
    backlog: Backlog, queue: str = "celery", age_seconds: float = 3600, task: str = "app.x"
) -> str:
    """A task a worker took `age_seconds` ago and never acknowledged (kombu's `unacked`
    hash and `unacked_index` sorted set). Returns its delivery tag."""
    message = celery_message(task, queue)
    tag = message["properties"]["delivery_tag"]
    client = redis_client(backlog.url, backlog.db)
    try:
        client.hset("unacked", tag, json.dumps([message, "", queue]))
        client.zadd("unacked_index", {tag: time.time() - age_seconds})
    finally:
        client.close()
    backlog.unacked_tags.append(tag)
    return tag


# --- the backend: slow responses and 5xx, over HTTP -------------------------------------

FAULTS_PATH = "/sandbox/faults"  # sandbox/backend_standin.py's control path


@dataclass
class SlowBackend:
    """The stand-in's faults as they were (`before`) and as set (`now`)."""

    base_url: str
    before: dict[str, float]
    now: dict[str, float]
    _undone: bool = False

    def undo(self) -> None:
        if not self._undone:
            put_faults(self.base_url, self.before)
            self._undone = True


def put_faults(base_url: str, faults: dict[str, float]) -> dict[str, float]:
    """`PUT /sandbox/faults`; a refusal (400 naming the field) raises with its detail."""
    with httpx.Client(base_url=base_url, timeout=10) as http:
        answer = http.put(FAULTS_PATH, json=faults)
    if answer.status_code != 200:
        raise ValueError(f"{FAULTS_PATH} refused: {answer.status_code} {answer.text}")
    return dict(answer.json())


def slow_backend(base_url: str, latency: float, error_rate: float = 0.0) -> SlowBackend:
    """Make the backend stand-in at `base_url` answer every request `latency` seconds late
    and `error_rate` of them with 500; `undo()` puts back what it had before."""
    with httpx.Client(base_url=base_url, timeout=10) as http:
        found = http.get(FAULTS_PATH)
    if found.status_code != 200:
        raise ValueError(f"{base_url} has no sandbox controls ({found.status_code})")
    now = put_faults(base_url, {"latency_seconds": latency, "error_rate": error_rate})
    return SlowBackend(base_url, dict(found.json()), now)


# --- the backend: traffic for its /metrics -------------------------------------------------


@dataclass
class Traffic:
    """Requests sent to the backend from a thread until `undo()`."""

    stop: threading.Event
    thread: threading.Thread
    sent: int = 0

    def undo(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def send_traffic(base_url: str, path: str = "/health", concurrency: int = 4) -> Traffic:
    """Keep `concurrency` clients requesting `path` until stopped: what users would do."""
    stop = threading.Event()
    traffic = Traffic(stop, threading.Thread())

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=30) as http:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    http.get(path)
                    traffic.sent += 1

    workers = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]

    def run() -> None:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    traffic.thread = threading.Thread(target=run, daemon=True, name="sandbox-traffic")
    traffic.thread.start()
    return traffic
