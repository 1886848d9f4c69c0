"""A limit that is not a lock, and a plan that is no longer the truth: literal data."""

from __future__ import annotations

from runbook.decisions.locks import STALE_PLAN, lock_problem, plan_changes, stale_plan_message


def test_an_active_limit_of_one_is_a_lock():
    assert lock_problem("runbook-lock-deployment-backend", active=True, limit=1) is None


def test_an_inactive_limit_is_not_a_lock():
    problem = lock_problem("runbook-lock-x", active=False, limit=1)
    assert problem is not None
    assert "inactive" in problem and "prefect gcl update runbook-lock-x --enable" in problem


def test_a_limit_of_five_is_not_a_lock():
    problem = lock_problem("runbook-lock-x", active=True, limit=5)
    assert problem is not None
    assert "allows 5 holders" in problem and "--limit 1" in problem


def test_an_unchanged_target_has_no_changes():
    fingerprint = {"deployment/backend generation": "4", "backup": "20261103T020000Z"}
    assert plan_changes(fingerprint, dict(fingerprint)) == ()


def test_every_difference_is_named_planned_then_live():
    planned = {"deployment/backend generation": "4", "deployment/frontend generation": "2"}
    live = {"deployment/backend generation": "5", "deployment/frontend generation": "2"}
    assert plan_changes(planned, live) == ("deployment/backend generation: 4 → 5",)


def test_a_vanished_or_new_key_is_a_change():
    assert plan_changes({"backup": "a"}, {}) == ("backup: a → absent",)
    assert plan_changes({}, {"backup": "a"}) == ("backup: absent → a",)


def test_the_refusal_says_changed_since_approved_and_what():
    message = stale_plan_message("Deploy 1.5.0", ("deployment/backend generation: 4 → 5",))
    assert STALE_PLAN == "changed since the plan was approved"
    assert message.startswith(
        "Deploy 1.5.0: refused, the target changed since the plan was approved"
    )
    assert "deployment/backend generation: 4 → 5" in message
    assert "Nothing was changed" in message
