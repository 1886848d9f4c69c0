"""Secret rotation's pure decisions, on literal data."""

from __future__ import annotations

from runbook.decisions.secrets import KeyCheck, Stages, rotation_token, stages_of
from tasks.postgres_roles import scram_verifier


def test_stages_of_names_each_holder():
    described = {
        "v1": ["AWSPREVIOUS"],
        "v2": ["AWSCURRENT"],
        "v3": ["AWSPENDING"],
        "v0": [],
    }
    assert stages_of(described) == Stages(current="v2", previous="v1", pending="v3")
    assert stages_of({"v1": ["AWSCURRENT"]}) == Stages("v1", None, None)
    assert stages_of({}) == Stages(None, None, None)


def test_rotation_token_is_stable_per_run_and_secret_and_a_valid_version_id():
    a = rotation_token("run-1", "complianceagent/api-key")
    assert a == rotation_token("run-1", "complianceagent/api-key")
    assert a != rotation_token("run-2", "complianceagent/api-key")
    assert a != rotation_token("run-1", "complianceagent/database-password")
    assert 32 <= len(a) <= 64  # what Secrets Manager accepts as a ClientRequestToken


def test_key_check_wants_the_expected_key_accepted_and_the_other_refused():
    assert KeyCheck(200, 401).problem() is None
    assert KeyCheck(200, 403).problem() is None
    assert KeyCheck(401, 401).problem() == "the new API key was answered with HTTP 401"
    assert KeyCheck(200, 200).problem("previous", "rotated-out") == (
        "the rotated-out API key was answered with HTTP 200, not refused"
    )


def test_scram_verifier_matches_postgresqls_format():
    # Its shape; that PostgreSQL accepts it is proven by a real login (test_secret_rotation).
    verifier = scram_verifier("pencil", salt=b"\x00" * 16)
    assert verifier.startswith("SCRAM-SHA-256$4096:AAAAAAAAAAAAAAAAAAAAAA==$")
    stored, server = verifier.split("$")[2].split(":")
    assert len(stored) == len(server) == 44
