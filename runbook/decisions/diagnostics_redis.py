"""Redis memory full and the Celery queue backlog, judged from `INFO`, `SCAN` + `MEMORY
USAGE`/`TTL` and `LLEN` results as plain data. Pure.

What belongs to the Celery broker (kombu's Redis transport) and must never be deleted:
each queue's list (`celery`) and its priority lists (`celery\\x06\\x163`, `…6`, `…9`),
`unacked`, `unacked_index`, `unacked_mutex` (tasks delivered but not acknowledged) and
`_kombu.binding.*` (the routing table: without it kombu cannot route a single message).
That is why the page's `redis-cli FLUSHDB` is never proposed: on the broker's database it
deletes every queued task and the bindings.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from typing import Any

from runbook.decisions.diagnostics import (
    QUEUE_DEPTH,
    REDIS_MEMORY_PERCENT,
    Level,
    Proposal,
    human_bytes,
    human_seconds,
)
from runbook.decisions.scaling import REPLICA_BOUNDS

PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
BROKER_KEYS = frozenset({"unacked", "unacked_index", "unacked_mutex"})
BROKER_PREFIXES = ("_kombu.binding.", "_kombu.")
# After deleting keys, used memory should be below this share of maxmemory.
TARGET_MEMORY_PERCENT = 75.0
MIB = 1024 * 1024


def queue_lists(queues: list[str]) -> list[str]:
    """Every Redis list kombu keeps for `queues`: the queue and its priority lists."""
    return [f"{q}{suffix}" for q in queues for suffix in ("", *priority_suffixes())]


def priority_suffixes() -> list[str]:
    return [f"{PRIORITY_SEPARATOR}{p}" for p in PRIORITY_STEPS]


def is_broker_key(key: str, queues: list[str]) -> bool:
    """True for a key the Celery broker owns (never deleted by a runbook)."""
    return key in BROKER_KEYS or key.startswith(BROKER_PREFIXES) or key in queue_lists(queues)


def printable(key: str) -> str:
    """A key as `redis-cli` prints it (`celery\\x06\\x163`)."""
    return key.encode("unicode_escape").decode("ascii")


# --- memory ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryState:
    used: int
    maxmemory: int
    policy: str
    fragmentation: float | None
    evicted_keys: int
    percent: float | None
    level: Level

    @property
    def summary(self) -> str:
        if not self.maxmemory:
            return f"{human_bytes(self.used)} used, no maxmemory (unlimited)"
        return (
            f"{human_bytes(self.used)} of {human_bytes(self.maxmemory)} maxmemory used "
            f"({self.percent:.0f}%), policy {self.policy}, {self.evicted_keys} keys evicted"
        )


def memory_state(info_memory: dict[str, Any], info_stats: dict[str, Any]) -> MemoryState:
    """`INFO memory` + `INFO stats` → used vs maxmemory. With `noeviction` a full Redis
    refuses writes ("OOM command not allowed"); with an eviction policy it drops keys."""
    used = int(info_memory.get("used_memory", 0))
    maxmemory = int(info_memory.get("maxmemory", 0))
    percent = 100.0 * used / maxmemory if maxmemory else None
    fragmentation = info_memory.get("mem_fragmentation_ratio")
    return MemoryState(
        used=used,
        maxmemory=maxmemory,
        policy=str(info_memory.get("maxmemory_policy", "noeviction")),
        fragmentation=float(fragmentation) if fragmentation is not None else None,
        evicted_keys=int(info_stats.get("evicted_keys", 0)),
        percent=percent,
        level=REDIS_MEMORY_PERCENT.level(percent) if percent is not None else Level.OK,
    )


@dataclass(frozen=True)
class KeyUsage:
    """One key found by SCAN: its database, size (`MEMORY USAGE`) and `TTL` (-1: none)."""

    db: int
    key: str
    bytes: int
    ttl: int
    type: str = ""

    def row(self, queues: list[str]) -> dict[str, Any]:
        return {
            "db": self.db,
            "key": printable(self.key)[:120],
            "type": self.type,
            "size": human_bytes(self.bytes),
            "ttl": "none" if self.ttl < 0 else human_seconds(self.ttl),
            "broker": "yes" if is_broker_key(self.key, queues) else "",
        }


def keys_to_delete(
    keys: list[KeyUsage],
    state: MemoryState,
    cache_db: int,
    queues: list[str],
    pattern: str,
    limit: int,
) -> list[KeyUsage]:
    """The biggest keys of the cache database matching `pattern` (a Redis glob), enough to
    bring used memory under TARGET_MEMORY_PERCENT of maxmemory, at most `limit`. Never a
    broker key — also when the cache and the broker share a database."""
    candidates = sorted(
        (
            k
            for k in keys
            if k.db == cache_db
            and fnmatch.fnmatchcase(k.key, pattern)
            and not is_broker_key(k.key, queues)
        ),
        key=lambda k: -k.bytes,
    )
    need = state.used - int(state.maxmemory * TARGET_MEMORY_PERCENT / 100)
    chosen, freed = [], 0
    for key in candidates[:limit]:
        if freed >= need:
            break
        chosen.append(key)
        freed += key.bytes
    return chosen


def raised_maxmemory(state: MemoryState, ceiling: int) -> int | None:
    """A maxmemory with used at TARGET_MEMORY_PERCENT of it, in whole MiB, not above
    `ceiling` (what the container's memory limit allows); None if that does not help."""
    if not state.maxmemory:
        return None
    wanted = math.ceil(state.used * 100 / TARGET_MEMORY_PERCENT / MIB) * MIB
    new = min(wanted, ceiling)
    return new if new > state.maxmemory else None


def propose_memory(
    state: MemoryState,
    deletable: list[KeyUsage],
    cache_db: int,
    new_maxmemory: int | None,
) -> list[Proposal]:
    """Ranked: delete the biggest cache keys first (frees memory, loses only cached
    values), then raise maxmemory. Nothing when memory is not under pressure."""
    if state.level not in (Level.WARNING, Level.CRITICAL):
        return []
    proposals = []
    if deletable:
        total = sum(k.bytes for k in deletable)
        proposals.append(
            Proposal(
                kind="delete-cache-keys",
                title=f"Delete {len(deletable)} cache keys in Redis db {cache_db}",
                reason=f"{state.summary}; these keys hold about {human_bytes(total)}",
                target=f"redis/db{cache_db}",
                steps=tuple(
                    f"UNLINK {printable(k.key)} (db {k.db}, {human_bytes(k.bytes)}, "
                    f"ttl {'none' if k.ttl < 0 else human_seconds(k.ttl)})"
                    for k in deletable
                ),
                facts={
                    "memory": state.summary,
                    "frees about": human_bytes(total),
                    "what is lost": "these cached values only; they are recomputed on a miss. "
                    "No broker key (queues, unacked, kombu bindings) is touched",
                },
                action={"db": cache_db, "keys": [k.key for k in deletable]},
            )
        )
    if new_maxmemory is not None:
        proposals.append(
            Proposal(
                kind="raise-maxmemory",
                title=f"Raise Redis maxmemory to {human_bytes(new_maxmemory)}",
                reason=f"{state.summary}",
                target="redis/config",
                steps=(
                    f"CONFIG SET maxmemory {new_maxmemory} (only if it is still {state.maxmemory})",
                ),
                facts={
                    "memory": state.summary,
                    "maxmemory now": f"{state.maxmemory} ({human_bytes(state.maxmemory)})",
                    "maxmemory after": f"{new_maxmemory} ({human_bytes(new_maxmemory)})",
                    "note": "not persisted: set it in Redis' configuration too, and keep the "
                    "container's memory limit above it",
                },
                action={"from": state.maxmemory, "to": new_maxmemory},
            )
        )
    return proposals


# --- queue backlog -----------------------------------------------------------------------


@dataclass(frozen=True)
class Backlog:
    lengths: dict[str, int]
    total: int
    level: Level

    @property
    def summary(self) -> str:
        return f"{self.total} tasks waiting ({self.level.value})"


def backlog_of(lengths: dict[str, int]) -> Backlog:
    """Σ LLEN over the queues and their priority lists, judged by the Queue Depth row."""
    total = sum(lengths.values())
    return Backlog(lengths=lengths, total=total, level=QUEUE_DEPTH.level(total))


@dataclass(frozen=True)
class StuckTask:
    delivery_tag: str
    task: str
    task_id: str
    queue: str
    age_seconds: float


def stuck_tasks(
    unacked: dict[str, str], delivered_at: dict[str, float], now: float, threshold_seconds: float
) -> list[StuckTask]:
    """Tasks a worker took (kombu's `unacked` hash, delivery time in `unacked_index`) and
    has not acknowledged for longer than `threshold_seconds`, oldest first."""
    found = []
    for tag, when in delivered_at.items():
        age = now - when
        if age <= threshold_seconds:
            continue
        task, task_id, queue = "?", "?", "?"
        raw = unacked.get(tag)
        if raw is not None:
            try:
                message, _exchange, routing_key = json.loads(raw)
                headers = message.get("headers") or {}
                task, task_id, queue = headers.get("task", "?"), headers.get("id", "?"), routing_key
            except (ValueError, TypeError, AttributeError):
                pass
        found.append(StuckTask(tag, str(task), str(task_id), str(queue), age))
    return sorted(found, key=lambda s: -s.age_seconds)


def workers_wanted(backlog: int, replicas: int, per_worker: int) -> int:
    """Workers to drain `backlog` at `per_worker` waiting tasks each, within the
    celery-workers bounds, never fewer than now."""
    ceiling = REPLICA_BOUNDS["celery-workers"].ceiling
    return max(replicas, min(ceiling, math.ceil(backlog / per_worker)))


def propose_workers(
    backlog: Backlog, replicas: int, per_worker: int, deployment: str
) -> Proposal | None:
    """Scale the workers when the backlog is more than they drain (per_worker each)."""
    wanted = workers_wanted(backlog.total, replicas, per_worker)
    if backlog.level == Level.OK or wanted <= replicas:
        return None
    return Proposal(
        kind="scale",
        title=f"Scale deployment/{deployment} from {replicas} to {wanted} replicas",
        reason=f"{backlog.summary}: about {backlog.total // max(replicas, 1)} per worker now, "
        f"{per_worker} wanted",
        target=f"deployment/{deployment}",
        steps=(f"kubectl scale deployment/{deployment} --replicas={wanted} (the scale runbook)",),
        facts={
            "backlog": backlog.summary,
            "replicas now": str(replicas),
            "replicas after": str(wanted),
            "bounds": f"{REPLICA_BOUNDS['celery-workers'].floor}-"
            f"{REPLICA_BOUNDS['celery-workers'].ceiling}",
        },
        action={"component": "celery-workers", "replicas": wanted},
    )
