"""Tasks that talk to Redis (the Celery broker and the application's cache): one command,
or one bounded batch of them, each.

Credentials: `RUNBOOK_REDIS_URL` is a `SecretStr`; connection errors name the server's
database number, never the URL. A database is chosen by number (`db`), whatever the URL
names. Nothing here runs `FLUSHDB`/`FLUSHALL`, and `unlink_keys` refuses any key the Celery
broker owns (see `runbook.decisions.diagnostics_redis`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from prefect import task

from runbook.decisions.diagnostics_redis import is_broker_key, printable, queue_lists
from runbook.settings import load_settings
from tasks.retry_policy import TRANSIENT_RETRIES, PlatformCallError

# How long one command may take before it counts as a (transient) failure.
SOCKET_TIMEOUT_SECONDS = 5


@contextlib.contextmanager
def connect(db: int) -> Iterator[redis.Redis]:
    """A client for database `db` of `RUNBOOK_REDIS_URL`; errors never quote the URL."""
    url = load_settings().require("redis_url").get_secret_value()
    client = redis.Redis.from_url(
        urlunsplit(urlsplit(url)._replace(path=f"/{db}")),
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        decode_responses=False,
    )
    try:
        yield client
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise PlatformCallError(f"Redis db {db}: {type(exc).__name__}", transient=True) from None
    finally:
        client.close()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


@task(**TRANSIENT_RETRIES)
def read_redis_info() -> dict[str, dict[str, Any]]:
    """`INFO memory`, `INFO stats` and `INFO keyspace`."""
    with connect(0) as client:
        return {section: client.info(section) for section in ("memory", "stats", "keyspace")}


@task(**TRANSIENT_RETRIES, task_run_name="scan keys of db {db}")
def scan_key_usage(db: int, max_keys: int, batch: int = 500) -> list[dict[str, Any]]:
    """`SCAN` (at most `max_keys` keys) + `MEMORY USAGE`, `TTL` and `TYPE` of each, in
    pipelined batches: `[{db, key, bytes, ttl, type}]`. Bounded, so a huge keyspace costs
    at most `max_keys` cheap commands, never a `KEYS *`."""
    found: list[dict[str, Any]] = []
    with connect(db) as client:
        names = []
        for name in client.scan_iter(count=batch):
            names.append(name)
            if len(names) >= max_keys:
                break
        for start in range(0, len(names), batch):
            chunk = names[start : start + batch]
            with client.pipeline(transaction=False) as pipe:
                for name in chunk:
                    pipe.memory_usage(name)
                    pipe.ttl(name)
                    pipe.type(name)
                answers = pipe.execute()
            for n, name in enumerate(chunk):
                size, ttl, kind = answers[3 * n : 3 * n + 3]
                if size is None:
                    continue  # expired or deleted since SCAN saw it
                found.append(
                    {
                        "db": db,
                        "key": _text(name),
                        "bytes": int(size),
                        "ttl": int(ttl),
                        "type": _text(kind),
                    }
                )
    return found


@task(**TRANSIENT_RETRIES, task_run_name="count keys of db {db}")
def count_keys(db: int) -> int:
    """`DBSIZE` of database `db`."""
    with connect(db) as client:
        return int(client.dbsize())


@task(task_run_name="unlink {count} keys in db {db}")
def unlink_keys(db: int, keys: list[str], count: int) -> int:
    """`UNLINK` exactly `keys` in database `db`; returns how many existed.

    Refuses before any command if a key belongs to the Celery broker (its queues and
    their priority lists, `unacked*`, `_kombu.*`): those are tasks and routing, not cache.
    Not retried: UNLINK of a gone key is harmless, but the count would then lie.
    """
    queues = load_settings().celery_queues
    broker = [printable(k) for k in keys if is_broker_key(k, queues)]
    if broker:
        raise PlatformCallError(f"refusing to delete Celery broker keys: {', '.join(broker)}")
    removed = 0
    with connect(db) as client:
        for start in range(0, len(keys), 500):
            removed += int(client.unlink(*keys[start : start + 500]))
    return removed


@task(task_run_name="set maxmemory from {expected} to {maxmemory}")
def set_maxmemory(expected: int, maxmemory: int) -> int:
    """`CONFIG SET maxmemory`, only if it is still `expected` (what the approved plan
    showed): someone else changing it since is refused, never overwritten."""
    with connect(0) as client:
        now = _maxmemory(client)
        if now != expected:
            raise PlatformCallError(
                f"maxmemory is {now}, not {expected} as the approved plan showed: "
                "changed since the plan was approved; nothing was changed"
            )
        client.config_set("maxmemory", maxmemory)
        return _maxmemory(client)


def _maxmemory(client: redis.Redis) -> int:
    config: dict[Any, Any] = client.config_get("maxmemory")  # type: ignore[assignment]
    return int(config.get("maxmemory") or config.get(b"maxmemory") or 0)


@task(**TRANSIENT_RETRIES, task_run_name="read queue lengths in db {db}")
def read_queue_lengths(db: int, queues: list[str]) -> dict[str, int]:
    """`LLEN` of each queue's list and its priority lists (kombu's Redis transport)."""
    names = queue_lists(queues)
    with connect(db) as client, client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        lengths = pipe.execute()
    return {name: int(length) for name, length in zip(names, lengths, strict=True)}


@task(**TRANSIENT_RETRIES, task_run_name="read unacknowledged tasks in db {db}")
def read_unacked(db: int, older_than_seconds: float, limit: int = 100) -> dict[str, Any]:
    """Tasks delivered to a worker and not acknowledged for `older_than_seconds`: the
    oldest `limit` of kombu's `unacked_index` (delivery time) with their `unacked`
    messages, plus how many are unacknowledged in all. `now` is Redis' own clock."""
    with connect(db) as client:
        seconds, micros = client.time()
        now = seconds + micros / 1e6
        total = int(client.zcard("unacked_index"))
        old: list[Any] = client.zrangebyscore(  # type: ignore[assignment]
            "unacked_index", "-inf", now - older_than_seconds, start=0, num=limit, withscores=True
        )
        tags = [_text(tag) for tag, _ in old]
        messages = client.hmget("unacked", tags) if tags else []
    return {
        "now": now,
        "total": total,
        "delivered_at": {tag: float(score) for tag, (_, score) in zip(tags, old, strict=True)},
        "messages": {tag: _text(m) for tag, m in zip(tags, messages, strict=True) if m},
    }
