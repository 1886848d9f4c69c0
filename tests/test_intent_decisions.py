"""The intent record and reconcile's decisions, with literal data."""

from __future__ import annotations

import datetime as dt

import pytest

from runbook.decisions.intent import (
    BadIntent,
    judge,
    lease_actions,
    new_intent,
    parse_intent,
    pre_restore_age,
    pre_restore_to_drop,
    run_is_dead,
    secret_repair,
    silent_run,
    variable_name,
)
from runbook.decisions.locks import LeaseRecord, parse_lease_record

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
SCALE_BACK = {"kind": "scale", "deployment": "backend", "replicas": 3}


def intent(run_id: str, *targets: str):
    return new_intent(run_id, "restore", targets, [SCALE_BACK], NOW)


def test_the_record_round_trips_through_its_json():
    recorded = intent("5f0c-AB", "deployment/backend", "database/complianceagent")
    assert parse_intent(recorded.value()) == recorded
    assert recorded.targets == ("database/complianceagent", "deployment/backend")
    assert recorded.variable == variable_name("5f0c-AB") == "runbook-intent-5f0c-ab"


@pytest.mark.parametrize(
    "value",
    [
        "not an object",
        {"runbook": "restore"},
        {"run_id": "1", "runbook": "restore", "undo": [{"kind": "format-disk"}]},
    ],
)
def test_an_unreadable_record_is_refused_saying_why(value):
    with pytest.raises(BadIntent):
        parse_intent(value)


def test_an_unknown_undo_step_is_refused_when_recorded():
    with pytest.raises(BadIntent, match="unknown undo step"):
        new_intent("1", "deploy", [], [{"kind": "revison"}], NOW)


@pytest.mark.parametrize(
    ("state", "dead"),
    [
        ("CRASHED", True),
        ("CANCELLED", True),
        ("FAILED", True),
        ("COMPLETED", True),
        (None, True),  # the server has no such run
        ("RUNNING", False),
        ("PAUSED", False),
        ("CANCELLING", False),
        ("PENDING", False),
    ],
)
def test_only_a_terminal_or_missing_run_is_dead(state, dead):
    assert run_is_dead(state) is dead


def test_a_dead_runs_intent_is_reconciled_and_a_live_ones_left():
    dead, alive = intent("dead", "deployment/backend"), intent("alive", "deployment/frontend")
    judgement = judge([dead, alive], {"dead": "CRASHED", "alive": "PAUSED"})
    assert judgement.to_reconcile == [dead]
    [left] = judgement.left
    assert left.intent == alive and "PAUSED" in left.why


def test_a_dead_runs_targets_now_owned_by_a_live_run_are_left_to_it():
    dead = intent("dead", "deployment/backend", "database/complianceagent")
    newer = intent("newer", "database/complianceagent")
    judgement = judge([dead, newer], {"dead": "CRASHED", "newer": "RUNNING"})
    assert judgement.to_reconcile == []
    assert "live run newer now owns database/complianceagent" in judgement.left[0].why


@pytest.mark.parametrize("state", ["RUNNING", "PAUSED", "CANCELLING"])
def test_a_live_looking_run_silent_past_the_timeout_is_dead_and_says_why(state):
    why = silent_run(state, NOW - dt.timedelta(seconds=91), NOW, 90)
    assert why is not None
    assert "no heartbeat for 91 s (limit 90 s)" in why and state.title() in why


def test_a_run_with_a_fresh_heartbeat_is_alive():
    assert silent_run("RUNNING", NOW - dt.timedelta(seconds=89), NOW, 90) is None
    assert silent_run("RUNNING", NOW, NOW, 90) is None


def test_a_run_that_never_sent_a_heartbeat_is_never_guessed_dead():
    assert silent_run("RUNNING", None, NOW, 90) is None


@pytest.mark.parametrize("state", ["SCHEDULED", "PENDING", "COMPLETED", "CRASHED", None])
def test_silence_is_judged_only_where_a_process_sends_heartbeats(state):
    # No process yet (Scheduled, Pending), or already final: not silent_run's business.
    assert silent_run(state, NOW - dt.timedelta(hours=5), NOW, 90) is None


def lease(run_id: str, target: str = "deployment/backend") -> LeaseRecord:
    return LeaseRecord(f"lease-of-{run_id}", run_id, target)


def test_a_dead_runs_leases_are_freed_and_a_live_runs_never():
    leases = [lease("crashed"), lease("gone"), lease("running"), lease("paused")]
    states = {"crashed": "CRASHED", "gone": None, "running": "RUNNING", "paused": "PAUSED"}
    plan = lease_actions(leases, states, under_way=(), unfinished=())
    assert [r.run_id for r in plan.free] == ["crashed", "gone"]
    assert plan.renew == ()
    assert [(r.run_id, why) for r, why in plan.leave] == [
        ("running", "run is RUNNING: it holds its lock"),
        ("paused", "run is PAUSED: it holds its lock"),
    ]


def test_a_dead_runs_leases_are_renewed_while_its_change_is_under_way():
    # A migration Job outlives its run: the database stays locked until the Job ends,
    # however long past the lease's expiry that is.
    leases = [lease("migrating", "database/complianceagent"), lease("done")]
    states = {"migrating": "CRASHED", "done": "CRASHED"}
    plan = lease_actions(leases, states, under_way={"migrating"}, unfinished={"migrating"})
    assert [r.run_id for r in plan.renew] == ["migrating"]
    assert [r.run_id for r in plan.free] == ["done"]
    assert plan.leave == ()


def test_a_live_run_is_never_renewed_for_even_if_named_under_way():
    plan = lease_actions([lease("running")], {"running": "RUNNING"}, {"running"}, {"running"})
    assert plan.renew == () and plan.free == ()
    assert [r.run_id for r, _ in plan.leave] == ["running"]


def test_a_dead_runs_leases_wait_until_its_intent_is_put_back():
    # A step that failed, or a live run now owning a target: not renewed (a repair that
    # keeps failing must not lock the target for good), not freed (another run could
    # change what reconcile still has to put back): the lease expires by itself.
    plan = lease_actions([lease("crashed")], {"crashed": "CRASHED"}, (), {"crashed"})
    assert plan.free == () and plan.renew == ()
    assert "not put back yet" in plan.leave[0][1]


def test_a_lease_record_round_trips_and_anything_else_is_ignored():
    record = LeaseRecord("0b5e", "run-1", "database/complianceagent")
    assert parse_lease_record(record.value()) == record
    assert record.variable == "runbook-lease-0b5e"
    assert parse_lease_record({"lease_id": "0b5e"}) is None
    assert parse_lease_record("0b5e") is None


def test_secret_repair_after_finish_secret_moves_current_back():
    stages = {"old": ["AWSPREVIOUS"], "new": ["AWSCURRENT", "AWSPENDING"]}
    repair = secret_repair(stages, previous="old", pending="new")
    assert repair.move_current_back and repair.remove_pending


def test_secret_repair_before_finish_secret_only_removes_pending():
    stages = {"old": ["AWSCURRENT"], "new": ["AWSPENDING"]}
    repair = secret_repair(stages, previous="old", pending="new")
    assert repair.remove_pending and not repair.move_current_back


def test_secret_repair_when_already_consistent_does_nothing():
    stages = {"old": ["AWSCURRENT"], "new": []}
    repair = secret_repair(stages, previous="old", pending="new")
    assert not repair.remove_pending and not repair.move_current_back


def test_previous_databases_by_age():
    names = [
        "complianceagent",
        "complianceagent_pre_restore_20261101t000000z",
        "complianceagent_pre_restore_20261119t120000z",
        "complianceagent_restore_20261119t120000z",
    ]
    assert pre_restore_age(names[2], NOW) == dt.timedelta(days=1)
    assert pre_restore_age(names[0], NOW) is None
    assert pre_restore_to_drop(names, NOW, keep_days=7) == ([names[1]], [names[2]])
