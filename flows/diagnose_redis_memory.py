"""Runbook > Common Issues > Redis Memory Full (OOM errors, cache misses).

    redis-cli INFO memory
    redis-cli FLUSHDB        # the page's "clear expired keys" — NOT done here

`diagnose-redis-memory` reads `INFO memory` and `INFO stats` (used vs maxmemory, policy,
evictions, fragmentation) and finds the biggest keys of the broker's and the cache's
databases by `SCAN` + `MEMORY USAGE` (at most `max_keys_scanned` keys, never `KEYS *`),
with their TTLs. Under memory pressure it proposes, in this order:
1. deleting the biggest keys of the cache database (`RUNBOOK_REDIS_CACHE_DB`) matching
   `key_pattern`, enough to get under 75 % of maxmemory — the plan lists every key;
2. raising maxmemory so that used is 75 % of it, at most `maxmemory_ceiling_mb`, and only
   if it is still what the plan showed when the approval comes.

Why not the page's `FLUSHDB`: expired keys are already removed by Redis itself, and on
the Celery broker's database FLUSHDB deletes every queued task, the `unacked` tasks and
kombu's `_kombu.binding.*` routing table, after which no task can be routed. No key the
broker owns is ever proposed or deleted, even when the cache shares its database.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows.diagnosis import INCIDENT_ID, offer, publish_evidence
from runbook.decisions.diagnostics import Diagnosis, Proposal, human_bytes
from runbook.decisions.diagnostics_redis import (
    MIB,
    KeyUsage,
    keys_to_delete,
    memory_state,
    propose_memory,
    raised_maxmemory,
)
from runbook.report import markdown_table
from runbook.settings import load_settings
from tasks.approval import ApprovalDecision
from tasks.redis import read_redis_info, scan_key_usage, set_maxmemory, unlink_keys

# Rows of the biggest-keys table in the evidence.
TOP_KEYS = 20


@flow(name="diagnose-redis-memory", flow_run_name="diagnose-redis-memory")
def diagnose_redis_memory(
    key_pattern: Annotated[str, Field(min_length=1, max_length=200)] = "*",
    max_keys_scanned: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000,
    max_keys_deleted: Annotated[int, Field(ge=1, le=1000)] = 100,
    maxmemory_ceiling_mb: Annotated[int, Field(ge=1, le=1_048_576)] = 4096,
    remediate: bool = False,
    incident_id: Annotated[str, Field(max_length=36, pattern=INCIDENT_ID)] = "",
) -> Diagnosis:
    """Diagnose a full Redis; propose deleting big cache keys or raising maxmemory.

    Args:
        key_pattern: Only cache-database keys matching this Redis glob may be proposed for
            deletion (e.g. cache:*). Broker keys never are.
        max_keys_scanned: Most keys SCAN examines per database (bounds the cost).
        max_keys_deleted: Most keys one deletion plan lists.
        maxmemory_ceiling_mb: Highest maxmemory ever proposed, in MiB: keep it below the
            Redis container's memory limit.
        remediate: After the evidence, offer each proposal for approval and carry out the
            first approved one. Off: evidence and proposals only, nothing changes.
        incident_id: The incident this diagnosis serves (set by incident-response): its
            approvals and what was carried out go on that incident's timeline.
    """
    settings = load_settings()
    broker_db, cache_db, queues = (
        settings.redis_broker_db,
        settings.redis_cache_db,
        settings.celery_queues,
    )

    # 1. Evidence: INFO memory/stats/keyspace, and the biggest keys of both databases.
    info = read_redis_info()
    keys = [
        KeyUsage(**row)
        for db in sorted({broker_db, cache_db})
        for row in scan_key_usage(db, max_keys_scanned)
    ]
    state = memory_state(info["memory"], info["stats"])

    # 2. Judge: deletable cache keys, a higher maxmemory.
    deletable = keys_to_delete(keys, state, cache_db, queues, key_pattern, max_keys_deleted)
    new_max = raised_maxmemory(state, maxmemory_ceiling_mb * MIB)
    biggest = sorted(keys, key=lambda k: -k.bytes)[:TOP_KEYS]
    no_ttl = [k for k in keys if k.db == cache_db and k.ttl < 0]
    diagnosis = Diagnosis(
        issue="redis-memory",
        level=state.level,
        summary=state.summary,
        evidence={
            "used_memory": state.used,
            "maxmemory": state.maxmemory,
            "policy": state.policy,
            "percent": round(state.percent, 1) if state.percent is not None else None,
            "evicted_keys": state.evicted_keys,
            "fragmentation": state.fragmentation,
            "keyspace": info["keyspace"],
            "biggest_keys": [k.row(queues) for k in biggest],
            "cache_keys_without_ttl": len(no_ttl),
            "broker_db": broker_db,
            "cache_db": cache_db,
        },
        proposals=propose_memory(state, deletable, cache_db, new_max),
    )

    # 3. Publish the evidence.
    memory_row = {
        "used": human_bytes(state.used),
        "maxmemory": human_bytes(state.maxmemory) if state.maxmemory else "unlimited",
        "policy": state.policy,
        "evicted keys": state.evicted_keys,
        "fragmentation": state.fragmentation,
    }
    publish_evidence(
        diagnosis,
        [
            ("Memory (INFO memory, INFO stats)", markdown_table([memory_row])),
            (
                f"Biggest keys (broker db {broker_db}, cache db {cache_db})",
                markdown_table(diagnosis.evidence["biggest_keys"]),
            ),
            (
                "TTLs",
                f"{len(no_ttl)} keys of the cache database have no TTL: they stay until "
                "deleted (review the TTL settings of cached data, the page's step 3).",
            ),
        ],
    )

    # 4. With remediate: each proposal behind an approval; carry out the approved one.
    if remediate and diagnosis.proposals:
        diagnosis = replace(
            diagnosis, carried_out=offer(diagnosis.proposals, _carry_out, incident_id)
        )
    return diagnosis


def _carry_out(proposal: Proposal, decision: ApprovalDecision | None) -> dict[str, Any]:
    action = proposal.action
    if proposal.kind == "delete-cache-keys":
        removed = unlink_keys(action["db"], action["keys"], len(action["keys"]))
        summary = f"deleted {removed} of {len(action['keys'])} keys in db {action['db']}"
        return {"summary": summary, "deleted": removed, "db": action["db"]}
    if proposal.kind == "raise-maxmemory":
        now = set_maxmemory(action["from"], action["to"])
        return {"summary": f"maxmemory {action['from']} → {now}", "maxmemory": now}
    raise ValueError(f"unknown proposal {proposal.kind}")
