"""Who requested a run, four eyes, and when an autoscaler needs an approval: literal data."""

from __future__ import annotations

import pytest

from runbook.decisions.approval import Requester, requester_of, same_person
from runbook.decisions.scaling import judge_autoscale


def test_cloud_user_wins_over_a_tag_and_a_parameter():
    found = requester_of({"requested_by": "p"}, ["requested-by:t"], "USER", "cloud-user")
    assert found == Requester("cloud-user", "prefect-cloud")


def test_proxy_tag_wins_over_the_typed_parameter():
    found = requester_of({"requested_by": "mallory"}, ["runbook", "requested-by:alice"])
    assert found == Requester("alice", "proxy tag")


def test_parameter_when_nothing_else_names_one():
    assert requester_of({"requested_by": " bob "}, ["runbook"]) == Requester("bob", "parameter")


@pytest.mark.parametrize(
    ("parameters", "tags", "created_by"),
    [
        ({}, [], (None, None)),
        ({"requested_by": None}, ["requested-by:"], (None, None)),
        ({"requested_by": "  "}, [], ("AUTOMATION", "nightly")),  # an automation is nobody
    ],
)
def test_no_identity_is_unknown(parameters, tags, created_by):
    assert requester_of(parameters, tags, *created_by) is None


@pytest.mark.parametrize("approver", ["alice", "Alice", " @alice ", "ALICE"])
def test_requester_is_the_same_person_whatever_the_spelling(approver):
    assert same_person(Requester("alice", "parameter"), approver)


def test_someone_else_or_an_unknown_requester_may_approve():
    assert not same_person(Requester("alice", "parameter"), "alicia")
    assert not same_person(None, "alice")


HPA_2_20 = {"spec": {"minReplicas": 2, "maxReplicas": 20}}


@pytest.mark.parametrize(
    ("existing", "low", "high", "running", "reason"),
    [
        (HPA_2_20, 2, 8, 3, "lowers the ceiling 20 → 8 in production"),
        ({"spec": {"minReplicas": 4, "maxReplicas": 20}}, 2, 20, 3, "lowers the floor 4 → 2"),
        (None, 2, 5, 9, "lowers the ceiling 5 below the 9 replicas running in production"),
    ],
)
def test_lowering_a_bound_in_production_needs_approval(existing, low, high, running, reason):
    verdict = judge_autoscale("production", existing, low, high, running)
    assert verdict.needs_approval
    assert reason in verdict.reason


@pytest.mark.parametrize(
    ("environment", "existing", "low", "high", "running"),
    [
        ("production", HPA_2_20, 3, 20, 3),  # raising the floor
        ("production", HPA_2_20, 2, 20, 3),  # unchanged
        ("production", None, 2, 20, 3),  # a new one above today's count
        ("staging", HPA_2_20, 2, 8, 3),  # lowering, but not production
        ("sandbox", None, 2, 5, 9),
    ],
)
def test_no_approval_otherwise(environment, existing, low, high, running):
    assert not judge_autoscale(environment, existing, low, high, running).needs_approval
