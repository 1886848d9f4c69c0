"""The diagnose-* runbooks against the sandbox, each condition produced for real
(sandbox/conditions.py): evidence read from the real systems, the proposal, and after an
approval exactly the approved action — after a rejection, nothing."""

from __future__ import annotations

import time

import httpx
import psycopg
import pytest
import redis
from prefect.exceptions import ParameterTypeError
from prefect.flow_runs import resume_flow_run

from flows.diagnose_connections import diagnose_connections
from flows.diagnose_latency import diagnose_latency
from flows.diagnose_queue_backlog import diagnose_queue_backlog
from flows.diagnose_redis_memory import diagnose_redis_memory
from runbook.decisions.diagnostics import Level
from sandbox import conditions
from tasks import kubernetes as k8s
from tests.helpers import read_artifacts, start_in_thread, wait_for_paused_run
from tests.release_helpers import image_of, kinds_of, live, wait_settled

APPROVE = {"approve": True, "approver": "ada", "reason": "INC-42"}
REJECT = {"approve": False, "approver": "ada", "reason": "not now"}
BROKER_DB, CACHE_DB = 0, 1
THRESHOLD_MINUTES = 0.1


def alive(dsn, pids):
    with psycopg.connect(dsn) as db:
        rows = db.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
        return {r[0] for r in rows.fetchall()}


def decide(flow_name, run, answer):
    paused = wait_for_paused_run(flow_name)
    plan = read_artifacts(paused.id)["approval-plan"].data
    resume_flow_run(paused.id, run_input=answer)
    return plan, run.join()


# --- connections ------------------------------------------------------------------------


@pytest.fixture
def idle_sessions(platform):
    """Three sessions idle in a transaction, two idle and a superuser's idle one, all
    older than the 6 s threshold, plus a fresh idle one the threshold must spare."""
    dsn = platform.postgres.dsn
    with (
        conditions.hold_idle_connections(dsn, 3, in_transaction=True) as in_tx,
        conditions.hold_idle_connections(dsn, 2) as idle,
        conditions.hold_idle_connections(platform.postgres.admin_dsn, 1) as admin,
    ):
        time.sleep(THRESHOLD_MINUTES * 60 + 1)
        with conditions.hold_idle_connections(dsn, 1, application="fresh") as fresh:
            yield in_tx.pids, idle.pids, fresh.pids, admin.pids


def test_connections_evidence_and_rejection_ends_nothing(platform, idle_sessions):
    in_tx, idle, fresh, _ = idle_sessions
    run = start_in_thread(diagnose_connections, idle_minutes=THRESHOLD_MINUTES, remediate=True)
    plan, state = decide("diagnose-connections", run, REJECT)

    assert state.is_failed()
    assert "nothing was changed" in state.message
    for pid in in_tx + idle:
        assert f"pid {pid}:" in plan
    assert f"pid {fresh[0]}:" not in plan
    assert alive(platform.postgres.dsn, in_tx + idle + fresh) == set(in_tx + idle + fresh)
    evidence = read_artifacts(state.state_details.flow_run_id)["diagnosis-connections"].data
    assert "idle in transaction" in evidence and "of 100 connections in use" in evidence


def test_connections_approval_ends_exactly_the_listed_sessions(platform, idle_sessions):
    in_tx, idle, fresh, _ = idle_sessions
    dsn = platform.postgres.dsn
    # One planned session goes away by itself before the approval: it must be reported,
    # not confused with another session.
    run = start_in_thread(diagnose_connections, idle_minutes=THRESHOLD_MINUTES, remediate=True)
    paused = wait_for_paused_run("diagnose-connections")
    with psycopg.connect(dsn) as db:
        # Our own session (the test's) is busy, so never a candidate; end one held one.
        db.execute("SELECT pg_terminate_backend(%s)", (idle[0],))
    resume_flow_run(paused.id, run_input=APPROVE)
    state = run.join()

    assert state.is_completed(), state.message
    diagnosis = state.result()
    assert diagnosis.evidence["by_state"]["idle in transaction"] >= 3
    done = diagnosis.carried_out
    assert sorted(done["terminated"]) == sorted(in_tx + idle[1:])
    assert done["skipped"] == {str(idle[0]): "already gone"}
    assert alive(dsn, in_tx + idle) == set()
    assert alive(dsn, fresh) == set(fresh)  # idle for less than the threshold


def test_connections_never_propose_superuser_sessions(platform, idle_sessions):
    *_, admin = idle_sessions
    diagnosis = diagnose_connections(idle_minutes=THRESHOLD_MINUTES)
    proposed = {s["pid"] for s in diagnosis.proposals[0].action["sessions"]}
    assert admin[0] not in proposed
    spared = {s["pid"]: s["why"] for s in diagnosis.evidence["spared"]}
    assert spared[admin[0]] == "superuser session"
    assert diagnosis.carried_out is None  # remediate off: nothing done
    assert alive(platform.postgres.dsn, list(proposed)) == proposed


@pytest.mark.parametrize("minutes", [0, -1, 1441, "ten"])
def test_connections_bad_threshold_refused_before_any_query(platform, minutes):
    with pytest.raises(ParameterTypeError, match="idle_minutes"):
        diagnose_connections(idle_minutes=minutes)


def prometheus_value(platform, query):
    result = httpx.get(
        f"{platform.env['RUNBOOK_PROMETHEUS_URL']}/api/v1/query", params={"query": query}
    ).json()["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture
def pool_nearly_full(platform):
    """The connections drill's condition: 18 idle sessions of the app role, at least 18 of
    the backend's pool of 20 as the sandbox's Prometheus sees them (the alert's own series),
    idle longer than the sandbox's RUNBOOK_CONNECTIONS_IDLE_MINUTES (0.1 min)."""
    with conditions.hold_idle_connections(platform.postgres.dsn, 18) as held:
        idle_since = time.monotonic()
        give_up = idle_since + 60
        while time.monotonic() < give_up and not (
            time.monotonic() - idle_since > 0.1 * 60 + 1
            and prometheus_value(platform, "max(db_connections)") >= 18
        ):
            time.sleep(0.5)
        yield held.pids


def test_connections_judged_against_the_pool_the_alert_divides_by(platform, pool_nearly_full):
    # No idle_minutes, as incident-response starts it: the platform's setting decides.
    state = diagnose_connections(return_state=True)

    assert state.is_completed(), state.message
    diagnosis = state.result()
    pool = diagnosis.evidence["pool"]
    assert pool["pool size"] == 20 and pool["db_connections"] >= 18
    assert pool["query"] == "max(db_connections) / max(db_connection_pool_size)"
    # max_connections alone would say ok; the alert's ratio (> 80 %) says otherwise.
    assert diagnosis.evidence["percent"] < 80
    assert diagnosis.level in (Level.WARNING, Level.CRITICAL)
    assert diagnosis.level.value == pool["level"]
    assert "of the application's pool of 20" in diagnosis.summary
    assert "of 100 connections in use" in diagnosis.summary
    # Idle for seconds, over the sandbox's 6 s: all 18 are proposed, never ours.
    (proposal,) = diagnosis.proposals
    proposed = {s["pid"] for s in proposal.action["sessions"]}
    assert set(pool_nearly_full) <= proposed
    assert proposal.facts["idle threshold"] == "6 s"
    assert proposal.title.startswith(f"End {len(proposed)} sessions idle over 6 s on ")
    ours = [s["pid"] for s in diagnosis.evidence["spared"] if s["why"] == "our own session"]
    assert len(ours) == 1 and ours[0] not in proposed
    assert alive(platform.postgres.dsn, pool_nearly_full) == set(pool_nearly_full)
    evidence = read_artifacts(state.state_details.flow_run_id)["diagnosis-connections"].data
    assert "## Diagnosis: connections — " + diagnosis.level.value in evidence
    assert "The application's pool (what the DatabaseConnections alerts judge)" in evidence


def test_connections_idle_minutes_given_wins_over_the_setting(platform, pool_nearly_full):
    diagnosis = diagnose_connections(idle_minutes=10)

    proposed = {s["pid"] for p in diagnosis.proposals for s in p.action["sessions"]}
    assert not proposed & set(pool_nearly_full)
    spared = {s["pid"]: s["why"] for s in diagnosis.evidence["spared"]}
    assert all(spared[pid].startswith("idle for only") for pid in pool_nearly_full)
    assert diagnosis.level != Level.OK  # the judgement does not depend on the threshold


def test_connections_without_prometheus_judge_max_connections_alone(
    platform, without_prometheus, pool_nearly_full
):
    diagnosis = diagnose_connections()

    assert diagnosis.evidence["pool"] is None
    assert diagnosis.level == Level.OK  # 18 or so of 100: what max_connections says
    assert "pool" not in diagnosis.summary
    assert "of 100 connections in use" in diagnosis.summary


# --- Redis memory -----------------------------------------------------------------------


@pytest.fixture
def full_redis(platform):
    url = platform.redis.url
    backlog = conditions.push_celery_backlog(url, BROKER_DB, count=2000)
    filled = conditions.fill_redis(url, CACHE_DB, keys=20, value_bytes=256 * 1024)
    try:
        yield filled, backlog
    finally:
        filled.undo()
        backlog.undo()


def redis_state(url):
    broker = conditions.redis_client(url, BROKER_DB)
    cache = conditions.redis_client(url, CACHE_DB)
    try:
        return {
            "celery": broker.llen("celery"),
            "binding": broker.smembers("_kombu.binding.celery"),
            "cache_keys": sorted(k.decode() for k in cache.keys("cache:report:*")),
            "maxmemory": int(cache.config_get("maxmemory")["maxmemory"]),
        }
    finally:
        broker.close()
        cache.close()


def test_redis_full_is_diagnosed_and_a_rejection_changes_nothing(platform, full_redis):
    filled, _ = full_redis
    client = conditions.redis_client(platform.redis.url, CACHE_DB)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("cache:new", b"x" * 200_000)  # the condition is real
    client.close()
    before = redis_state(platform.redis.url)

    run = start_in_thread(diagnose_redis_memory, remediate=True)
    first, _ = decide_first("diagnose-redis-memory", REJECT)
    plan, state = decide("diagnose-redis-memory", run, REJECT)

    assert "Delete" in first and "cache:report:" in first
    assert "celery" not in first.replace("Celery broker", "")  # no broker key listed
    assert "Raise Redis maxmemory" in plan and str(filled.maxmemory) in plan
    assert state.is_failed() and "every proposal was rejected" in state.message
    assert redis_state(platform.redis.url) == before
    evidence = read_artifacts(state.state_details.flow_run_id)["diagnosis-redis-memory"].data
    assert "noeviction" in evidence and "critical" in evidence


def decide_first(flow_name, answer):
    paused = wait_for_paused_run(flow_name)
    plan = read_artifacts(paused.id)["approval-plan"].data
    resume_flow_run(paused.id, run_input=answer)
    return plan, paused


def test_redis_approval_deletes_only_the_listed_cache_keys(platform, full_redis):
    before = redis_state(platform.redis.url)
    run = start_in_thread(diagnose_redis_memory, remediate=True)
    _, state = decide("diagnose-redis-memory", run, APPROVE)

    assert state.is_completed(), state.message
    diagnosis = state.result()
    planned = diagnosis.proposals[0].action["keys"]
    assert diagnosis.proposals[0].action["db"] == CACHE_DB
    assert 0 < len(planned) < len(before["cache_keys"])
    assert diagnosis.carried_out["deleted"] == len(planned)
    after = redis_state(platform.redis.url)
    assert after["cache_keys"] == sorted(set(before["cache_keys"]) - set(planned))
    assert after["celery"] == before["celery"] == 2000  # broker queue intact
    assert after["binding"] == before["binding"] and after["binding"]
    assert after["maxmemory"] == before["maxmemory"]  # the other proposal not carried out
    client = conditions.redis_client(platform.redis.url, CACHE_DB)
    assert client.set("cache:new", b"x" * 10_000)  # writes work again
    client.delete("cache:new")
    client.close()


def test_redis_raise_maxmemory_after_rejecting_the_deletion(platform, full_redis):
    filled, _ = full_redis
    before = redis_state(platform.redis.url)
    run = start_in_thread(diagnose_redis_memory, remediate=True)
    decide_first("diagnose-redis-memory", REJECT)
    _, state = decide("diagnose-redis-memory", run, APPROVE)

    assert state.is_completed(), state.message
    raised = state.result().carried_out["maxmemory"]
    assert raised > filled.maxmemory and raised % (1024 * 1024) == 0
    after = redis_state(platform.redis.url)
    assert after["maxmemory"] == raised
    assert after["cache_keys"] == before["cache_keys"]  # nothing deleted


@pytest.mark.parametrize(
    ("parameters", "field"),
    [({"max_keys_scanned": 5}, "max_keys_scanned"), ({"key_pattern": ""}, "key_pattern")],
)
def test_redis_bad_input_refused(platform, parameters, field):
    with pytest.raises(ParameterTypeError, match=field):
        diagnose_redis_memory(**parameters)


# --- queue backlog ----------------------------------------------------------------------


@pytest.fixture
def backlog(platform, kube):
    url = platform.redis.url
    made = conditions.push_celery_backlog(url, BROKER_DB, count=1500)
    conditions.push_celery_backlog(url, BROKER_DB, count=300, priority=9, into=made)
    stuck = conditions.add_unacked(made, age_seconds=7200, task="app.workers.export")
    try:
        yield made, stuck
    finally:
        made.undo()


def test_backlog_evidence_and_approved_scale(platform, kube, backlog):
    _, stuck_tag = backlog
    replicas = live(kube, "celery-workers")["spec"]["replicas"]

    run = start_in_thread(diagnose_queue_backlog, tasks_per_worker=100, remediate=True)
    plan, state = decide("diagnose-queue-backlog", run, APPROVE)

    assert state.is_completed(), state.message
    diagnosis = state.result()
    assert diagnosis.evidence["lengths"]["celery"] == 1500
    assert diagnosis.evidence["lengths"]["celery\\x06\\x169"] == 300
    assert diagnosis.evidence["backlog"] == 1800 and diagnosis.evidence["replicas"] == replicas
    assert [s["task"] for s in diagnosis.evidence["stuck"]] == ["app.workers.export"]
    assert f"from {replicas} to 18 replicas" in plan
    assert live(kube, "celery-workers")["spec"]["replicas"] == 18
    assert [(w.name, w.subresource) for w in kube.writes] == [("celery-workers", "scale")]
    broker = conditions.redis_client(platform.redis.url, BROKER_DB)
    assert broker.hexists("unacked", stuck_tag)  # stuck tasks are reported, never deleted
    assert broker.llen("celery") == 1500
    broker.close()


def test_backlog_rejection_scales_nothing(platform, kube, backlog):
    run = start_in_thread(diagnose_queue_backlog, remediate=True)
    _, state = decide("diagnose-queue-backlog", run, REJECT)

    assert state.is_failed()
    assert kube.writes == []


def test_no_backlog_no_proposal(platform, kube):
    diagnosis = diagnose_queue_backlog(remediate=True)  # nothing to approve: no pause
    assert diagnosis.proposals == [] and diagnosis.carried_out is None
    assert kube.writes == []


# --- latency ----------------------------------------------------------------------------


@pytest.fixture
def slow_api(platform, kube):
    """The backend answering /health in 0.7 s and /health/ready with a 503 in 0.7 s,
    under traffic; and one slow statement in pg_stat_statements."""
    backend = platform.backend
    backend.delay_seconds["/health"] = backend.delay_seconds["/health/ready"] = 0.7
    backend.force_status["/health/ready"] = 503
    with psycopg.connect(platform.postgres.dsn) as db:
        db.execute("SELECT pg_sleep(0.3)")
    traffic = [
        conditions.send_traffic(backend.url, "/health", concurrency=3),
        conditions.send_traffic(backend.url, "/health/ready", concurrency=1),
    ]
    try:
        yield backend
    finally:
        for t in traffic:
            t.undo()
        backend.reset()


@pytest.fixture
def without_prometheus(monkeypatch):
    """The platform as it is without Prometheus: diagnose-latency scrapes /metrics itself."""
    monkeypatch.delenv("RUNBOOK_PROMETHEUS_URL")


def test_latency_from_prometheus_over_the_window(platform, kube, slow_api):
    # Wait until the sandbox's Prometheus (1 s scrapes) has a 10 s window made of the slow
    # traffic: its median request there is slow (earlier tests' quick requests aged out)
    # and the 503s have a rate.
    queries = (
        "histogram_quantile(0.5, sum by (le) (rate(http_request_duration_seconds_bucket[10s])))",
        'sum(rate(http_requests_total{status="503"}[10s]))',
    )

    def value(query: str) -> float:
        result = httpx.get(
            f"{platform.env['RUNBOOK_PROMETHEUS_URL']}/api/v1/query", params={"query": query}
        ).json()["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    give_up = time.monotonic() + 60
    while time.monotonic() < give_up and not (value(queries[0]) > 0.5 and value(queries[1]) > 0):
        time.sleep(0.5)
    state = diagnose_latency(window_seconds=10, return_state=True)

    assert state.is_completed(), state.message
    evidence = state.result().evidence
    assert evidence["source"] == "Prometheus, last 10 s"
    # the 0.7 s answers (a loaded machine adds to them: the next bucket ends at 2.5 s)
    assert 0.5 < evidence["p99_seconds"] <= 2.5
    assert 0.1 < evidence["error_rate"] < 0.5
    assert evidence["cpu_percent"] is not None  # the backend's CPU gauge, measured
    assert kube.writes == []  # evidence only: nothing changed without `remediate`


def test_latency_evidence_and_approved_scale(platform, kube, slow_api, without_prometheus):
    replicas = live(kube, "backend")["spec"]["replicas"]
    # Earlier tests rolled the backend out minutes ago; only a rollout in the last second
    # would be a suspect here, so the one proposal is to scale.
    run = start_in_thread(
        diagnose_latency, sample_seconds=2, deploy_window_hours=0.0003, remediate=True
    )
    plan, state = decide("diagnose-latency", run, APPROVE)

    assert state.is_completed(), state.message
    evidence = state.result().evidence
    # the 0.7 s answers, from the histogram (a loaded machine adds to them; next bucket 2.5 s)
    assert 0.5 < evidence["p99_seconds"] <= 2.5
    assert 0.1 < evidence["error_rate"] < 0.5  # the 503s of /health/ready: 1 client of 4
    assert "no Prometheus" in evidence["source"]
    [sleep] = [s for s in evidence["slow_statements"] if "pg_sleep" in s["query"]]
    assert float(sleep["mean ms"]) >= 300  # mean_exec_time, read from pg_stat_statements
    assert "CPU not measured" in plan
    wanted = replicas + (replicas + 1) // 2
    assert f"from {replicas} to {wanted} replicas" in plan
    assert live(kube, "backend")["spec"]["replicas"] == wanted
    assert kinds_of(kube.writes) == ["scale"]


def test_latency_after_a_recent_deploy_proposes_the_rollback_runbook(
    platform, kube, slow_api, without_prometheus
):
    before = image_of(kube, "backend")
    k8s.set_deployment_image.fn("backend", "backend", "complianceagent/backend:1.5.0-slow")
    wait_settled(kube, "backend")
    kube.clear_writes()

    run = start_in_thread(diagnose_latency, sample_seconds=2, remediate=True)
    # The rollback runbook pauses with its own plan: current → target revision and image.
    paused = wait_for_paused_run("rollback")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert "1.5.0-slow" in plan and before in plan
    slow_api.reset()  # the slowness goes with the rollback: its health check passes
    resume_flow_run(paused.id, run_input=APPROVE)
    state = run.join()

    assert state.is_completed(), state.message
    assert state.result().carried_out["proposal"] == "rollback"
    assert image_of(kube, "backend") == before
    assert "scale" not in kinds_of(kube.writes)  # only the approved proposal


def test_latency_rejected_rollback_then_rejected_scale_changes_nothing(
    platform, kube, slow_api, without_prometheus
):
    k8s.set_deployment_image.fn("backend", "backend", "complianceagent/backend:1.5.0-slow")
    wait_settled(kube, "backend")
    kube.clear_writes()

    run = start_in_thread(diagnose_latency, sample_seconds=2, remediate=True)
    rollback_run = wait_for_paused_run("rollback")
    resume_flow_run(rollback_run.id, run_input=REJECT)
    _, state = decide("diagnose-latency", run, REJECT)

    assert state.is_failed() and "every proposal was rejected" in state.message
    assert kube.writes == []
    assert image_of(kube, "backend") == "complianceagent/backend:1.5.0-slow"


def test_latency_bad_input_refused(platform):
    with pytest.raises(ParameterTypeError, match="sample_seconds"):
        diagnose_latency(sample_seconds=0.1)
