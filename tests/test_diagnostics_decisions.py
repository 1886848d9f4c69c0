"""The diagnoses' judgements, on literal data: no server, no Prefect."""

from __future__ import annotations

import datetime as dt
import json

from runbook.decisions.diagnostics import Level
from runbook.decisions.diagnostics_connections import (
    Session,
    connection_usage,
    connections_level,
    pool_usage,
    propose_terminations,
    sessions_to_end,
    termination_check,
)
from runbook.decisions.diagnostics_latency import (
    backend_replicas_wanted,
    histogram_quantile,
    propose_rollback,
    propose_scale,
    window_from_scrapes,
)
from runbook.decisions.diagnostics_redis import (
    KeyUsage,
    backlog_of,
    is_broker_key,
    keys_to_delete,
    memory_state,
    propose_memory,
    propose_workers,
    queue_lists,
    raised_maxmemory,
    stuck_tasks,
)

MIB = 1024 * 1024


def session(pid, state="idle", idle=900.0, **kw):
    base = {
        "pid": pid,
        "user": "app",
        "application": "api",
        "client": "10.0.0.7",
        "backend_type": "client backend",
        "state": state,
        "backend_start": f"2026-11-02 10:00:0{pid % 10}+00",
        "idle_seconds": idle,
    }
    return Session(**{**base, **kw})


# --- connections ------------------------------------------------------------------------


def test_only_long_idle_client_sessions_are_chosen_never_ours_superuser_or_replication():
    sessions = [
        session(1),
        session(2, state="idle in transaction", idle=1200),
        session(3, state="idle in transaction (aborted)", idle=700),
        session(4, idle=30),  # too recent
        session(5, state="active", idle=5000),
        session(6, ours=True),
        session(7, superuser=True),
        session(8, replication=True),
        session(9, backend_type="walsender", state="idle"),
        session(10, state=None, backend_type=""),  # another role's, hidden
    ]
    chosen, spared = sessions_to_end(sessions, threshold_seconds=600)

    assert [s.pid for s in chosen] == [2, 1, 3]  # longest idle first
    reasons = {s.pid: why for s, why in spared}
    assert reasons[4] == "idle for only 30 s"
    assert reasons[6] == "our own session"
    assert reasons[7] == "superuser session"
    assert reasons[8] == "replication role"
    assert reasons[9] == "not a client backend (walsender)"
    assert 5 not in reasons and 10 not in {s.pid for s in chosen}


def test_usage_counts_client_backends_against_max_minus_reserved():
    sessions = [session(n) for n in range(1, 80)] + [session(90, backend_type="autovacuum")]
    usage = connection_usage(sessions, max_connections=100, reserved=3)
    assert usage.total == 79 and usage.by_state == {"idle": 79}
    assert round(usage.percent) == 81 and usage.level == Level.WARNING
    assert connection_usage(sessions[:10], 100, 3).level == Level.OK


def test_the_pool_is_judged_as_the_alert_judges_it():
    # The connections drill: 18 of the pool's 20 (the alert's 90 %), 19 of max_connections.
    pool = pool_usage(18.0, 20.0)
    assert (pool.connections, pool.pool_size, round(pool.percent or 0)) == (18, 20, 90)
    assert pool.level == Level.WARNING
    assert pool.summary == "18 of the application's pool of 20 (90%)"
    assert pool_usage(20, 20).level == Level.CRITICAL  # > 95 %, DatabaseConnectionsCritical
    assert pool_usage(19, 20).level == Level.WARNING  # exactly 95 % is not over it
    assert pool_usage(16, 20).level == Level.OK  # exactly 80 % is not over it either
    for unmeasured in (pool_usage(None, 20), pool_usage(18, None), pool_usage(3, 0)):
        assert unmeasured.level == Level.UNKNOWN and unmeasured.percent is None
        assert "not measured" in unmeasured.summary


def test_the_level_is_the_worse_of_the_pool_and_max_connections():
    few = connection_usage([session(n) for n in range(1, 20)], 100, 3)  # 20 %: ok
    many = connection_usage([session(n) for n in range(1, 95)], 100, 3)  # 97 %: critical
    assert few.level == Level.OK and many.level == Level.CRITICAL
    assert connections_level(few, pool_usage(18, 20)) == Level.WARNING
    assert connections_level(many, pool_usage(5, 20)) == Level.CRITICAL
    assert connections_level(few, pool_usage(5, 20)) == Level.OK
    # Prometheus without the series: what max_connections says, not "unknown".
    assert connections_level(few, pool_usage(None, None)) == Level.OK
    # Without Prometheus: max_connections alone, as before.
    assert connections_level(few, None) == Level.OK


def test_the_plan_names_the_pool_the_alert_judged():
    chosen = [session(1, idle=754), session(2, idle=30)]
    usage = connection_usage(chosen, 100, 3)
    proposal = propose_terminations(chosen, 6, "complianceagent", usage, pool_usage(18, 20))
    assert proposal is not None
    assert proposal.title == "End 2 sessions idle over 6 s on complianceagent"
    assert proposal.reason.startswith("18 of the application's pool of 20 (90%); 2 of 100")
    assert proposal.facts["application's pool"] == "18 of the application's pool of 20 (90%)"
    without = propose_terminations(chosen, 6, "complianceagent", usage)
    assert without is not None and "application's pool" not in without.facts


def test_the_plan_lists_each_session_and_carries_pid_and_backend_start():
    chosen = [session(1, idle=754)]
    usage = connection_usage(chosen, 100, 3)
    proposal = propose_terminations(chosen, 600, "complianceagent", usage)
    assert proposal is not None
    assert "pid 1: app / api from 10.0.0.7, idle for 12 min 34 s" in proposal.steps[0]
    assert proposal.action == {"sessions": [{"pid": 1, "backend_start": "2026-11-02 10:00:01+00"}]}
    assert propose_terminations([], 600, "db", usage) is None


def test_a_planned_session_is_ended_only_if_still_the_same_and_idle():
    planned = [{"pid": p, "backend_start": f"t{p}"} for p in (1, 2, 3, 4)]
    live = {
        1: {"backend_start": "t1", "state": "idle in transaction"},
        2: {"backend_start": "other", "state": "idle"},
        3: {"backend_start": "t3", "state": "active"},
    }
    ready, skipped = termination_check(planned, live)
    assert [p["pid"] for p in ready] == [1]
    assert skipped == {
        2: "a different session now has this pid",
        3: "busy now (active)",
        4: "already gone",
    }


# --- Redis memory -----------------------------------------------------------------------

QUEUES = ["celery"]


def test_broker_keys_are_recognised_including_priority_lists():
    assert queue_lists(QUEUES) == [
        "celery",
        "celery\x06\x163",
        "celery\x06\x166",
        "celery\x06\x169",
    ]
    for key in ("celery", "celery\x06\x166", "unacked", "unacked_index", "_kombu.binding.celery"):
        assert is_broker_key(key, QUEUES)
    assert not is_broker_key("cache:user:1", QUEUES)
    assert not is_broker_key("celery-task-meta-1", QUEUES)  # a result, not the broker


def full(used=97 * MIB, maxmemory=100 * MIB):
    return memory_state(
        {
            "used_memory": used,
            "maxmemory": maxmemory,
            "maxmemory_policy": "noeviction",
            "mem_fragmentation_ratio": "1.4",
        },
        {"evicted_keys": 0},
    )


def test_memory_level_follows_the_memory_usage_row():
    assert full().level == Level.CRITICAL and full(85 * MIB).level == Level.WARNING
    assert full(50 * MIB).level == Level.OK
    assert full(maxmemory=0).level == Level.OK and full(maxmemory=0).percent is None


def test_keys_to_delete_only_cache_db_matching_never_broker_even_in_a_shared_db():
    keys = [
        KeyUsage(0, "celery", 60 * MIB, -1),
        KeyUsage(0, "cache:big", 30 * MIB, -1),
        KeyUsage(1, "cache:a", 10 * MIB, -1),
        KeyUsage(1, "cache:b", 8 * MIB, 60),
        KeyUsage(1, "session:x", 40 * MIB, -1),
        KeyUsage(1, "cache:c", 1 * MIB, -1),
    ]
    # used 97 MiB of 100: 22 MiB must go to reach 75 %.
    chosen = keys_to_delete(keys, full(), cache_db=1, queues=QUEUES, pattern="cache:*", limit=10)
    assert [k.key for k in chosen] == ["cache:a", "cache:b", "cache:c"]  # all it can
    shared = keys_to_delete(keys, full(), cache_db=0, queues=QUEUES, pattern="*", limit=10)
    assert [k.key for k in shared] == ["cache:big"]  # celery is bigger but the broker's
    assert keys_to_delete(keys, full(), 1, QUEUES, "cache:*", limit=1) == [keys[2]]


def test_maxmemory_is_raised_to_put_used_at_75_percent_within_the_ceiling():
    assert raised_maxmemory(full(), ceiling=4096 * MIB) == 130 * MIB
    assert raised_maxmemory(full(), ceiling=110 * MIB) == 110 * MIB
    assert raised_maxmemory(full(), ceiling=90 * MIB) is None  # would lower it
    assert raised_maxmemory(full(maxmemory=0), 4096 * MIB) is None


def test_memory_proposals_are_ranked_and_never_flushdb():
    state = full()
    proposals = propose_memory(state, [KeyUsage(1, "cache:a", 10 * MIB, -1)], 1, 130 * MIB)
    assert [p.kind for p in proposals] == ["delete-cache-keys", "raise-maxmemory"]
    assert proposals[0].action == {"db": 1, "keys": ["cache:a"]}
    assert proposals[1].action == {"from": 100 * MIB, "to": 130 * MIB}
    assert not any("FLUSH" in step for p in proposals for step in p.steps)
    assert propose_memory(full(10 * MIB), [], 1, None) == []


# --- queue backlog ----------------------------------------------------------------------


def test_backlog_sums_the_priority_lists_and_scales_within_bounds():
    backlog = backlog_of({"celery": 1500, "celery\x06\x169": 300})
    assert backlog.total == 1800 and backlog.level == Level.WARNING
    proposal = propose_workers(backlog, replicas=4, per_worker=100, deployment="celery-workers")
    assert proposal is not None and proposal.action == {
        "component": "celery-workers",
        "replicas": 18,
    }
    huge = backlog_of({"celery": 50_000})
    capped = propose_workers(huge, 4, 100, "celery-workers")
    assert capped is not None and capped.action["replicas"] == 30  # the ceiling
    assert propose_workers(backlog_of({"celery": 900}), 4, 100, "w") is None  # under warning
    assert propose_workers(huge, 30, 100, "w") is None  # already at the ceiling


def test_stuck_tasks_are_read_from_unacked_oldest_first():
    message = {"headers": {"task": "app.export", "id": "t-1"}}
    stuck = stuck_tasks(
        {"tag1": json.dumps([message, "", "celery"]), "tag2": "not json"},
        {"tag1": 1000.0, "tag2": 500.0, "tag3": 3500.0},
        now=4000.0,
        threshold_seconds=1800,
    )
    assert [(s.delivery_tag, s.task, s.task_id, s.queue) for s in stuck] == [
        ("tag2", "?", "?", "?"),
        ("tag1", "app.export", "t-1", "celery"),
    ]


# --- latency ----------------------------------------------------------------------------


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == 0.1
    assert abs(histogram_quantile(0.99, buckets) - 0.95) < 1e-9
    assert histogram_quantile(0.99, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 0.0), (float("inf"), 10.0)]) == 0.1


SCRAPE = """# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{{le="0.5"}} {fast}
http_request_duration_seconds_bucket{{le="1.0"}} {total}
http_request_duration_seconds_bucket{{le="+Inf"}} {total}
http_requests_total{{status="200"}} {ok}
http_requests_total{{status="503"}} {errors}
"""


def test_a_window_from_two_scrapes_uses_the_deltas():
    before = SCRAPE.format(fast=100, total=100, ok=100, errors=0)
    after = SCRAPE.format(fast=100, total=200, ok=190, errors=10)
    window = window_from_scrapes(before, after, seconds=5)
    assert window.requests == 100 and window.error_rate == 0.1
    assert 0.5 < window.p99_seconds <= 1.0  # the new requests were all slow
    assert window.cpu_percent is None and window.level == Level.CRITICAL
    assert "no Prometheus" in window.source


def test_scale_when_cpu_over_80_or_slow_with_cpu_unknown_within_bounds():
    slow = window_from_scrapes(
        SCRAPE.format(fast=0, total=0, ok=0, errors=0),
        SCRAPE.format(fast=0, total=10, ok=10, errors=0),
        5,
    )
    proposal = propose_scale(slow, replicas=3, deployment="backend")
    assert proposal is not None and proposal.action == {"component": "backend", "replicas": 5}
    assert "CPU not measured" in proposal.reason
    assert propose_scale(slow, replicas=20, deployment="backend") is None  # at the ceiling
    assert backend_replicas_wanted(2) == 3 and backend_replicas_wanted(19) == 20


def revision(n, created):
    return {"revision": n, "images": {"backend": f"backend:1.{n}"}, "created": created}


def test_rollback_is_proposed_only_for_a_recent_deploy_with_an_older_revision():
    now = dt.datetime(2026, 11, 2, 12, 0, tzinfo=dt.UTC)
    history = [revision(1, "2026-10-01T00:00:00Z"), revision(2, "2026-11-02T11:30:00Z")]
    proposal = propose_rollback("backend", 2, history, now, hours=6)
    assert proposal is not None and proposal.action == {"component": "backend", "to_revision": 1}
    assert "rolled out 30 min 0 s ago" in proposal.reason
    assert propose_rollback("backend", 2, history, now, hours=0.25) is None  # too old
    assert propose_rollback("backend", 1, history[:1], now, hours=10_000) is None  # nothing older
