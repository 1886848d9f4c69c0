"""Settings: one prefix, bounds that name the field, secrets that never print."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runbook.settings import MissingSetting, PlatformSettings


def test_reads_prefixed_environment(monkeypatch):
    monkeypatch.setenv("RUNBOOK_NAMESPACE", "ca-staging")
    monkeypatch.setenv("RUNBOOK_HTTP_TIMEOUT_SECONDS", "2.5")
    settings = PlatformSettings()
    assert settings.namespace == "ca-staging"
    assert settings.http_timeout_seconds == 2.5


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("RUNBOOK_NAMESPACE", "Not_A_Name", "namespace"),
        ("RUNBOOK_HTTP_TIMEOUT_SECONDS", "0", "http_timeout_seconds"),
        ("RUNBOOK_APPROVAL_TIMEOUT_SECONDS", "99999999", "approval_timeout_seconds"),
        ("RUNBOOK_ENVIRONMENT", "prod", "environment"),
        ("RUNBOOK_API_BASE_URL", "not a url", "api_base_url"),
    ],
)
def test_bad_value_names_the_field(monkeypatch, variable, value, field):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        PlatformSettings()
    assert caught.value.errors()[0]["loc"] == (field,)


def test_secret_never_prints(monkeypatch):
    monkeypatch.setenv("RUNBOOK_DATABASE_DSN", "postgresql://u:hunter2@db/app")
    settings = PlatformSettings()
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())
    assert settings.require("database_dsn").get_secret_value().endswith("@db/app")


def test_missing_credential_names_the_variable(monkeypatch):
    monkeypatch.delenv("RUNBOOK_PAGERDUTY_ROUTING_KEY", raising=False)
    with pytest.raises(MissingSetting, match="RUNBOOK_PAGERDUTY_ROUTING_KEY is not set"):
        PlatformSettings().require("pagerduty_routing_key")


def test_every_field_is_described():
    undocumented = [n for n, f in PlatformSettings.model_fields.items() if not f.description]
    assert undocumented == []


@pytest.mark.parametrize("value", [None, ""])
def test_environment_has_no_default_and_its_absence_names_the_variable(monkeypatch, value):
    """Fail closed: a forgotten RUNBOOK_ENVIRONMENT must not quietly mean sandbox."""
    if value is None:
        monkeypatch.delenv("RUNBOOK_ENVIRONMENT", raising=False)
    else:
        monkeypatch.setenv("RUNBOOK_ENVIRONMENT", value)
    with pytest.raises(MissingSetting, match="RUNBOOK_ENVIRONMENT is not set; say which platform"):
        PlatformSettings()


def test_serving_the_runbooks_refuses_to_start_without_an_environment(monkeypatch):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RUNBOOK_ENVIRONMENT"}
    served = subprocess.run(
        [sys.executable, "-m", "deployments.local", "--serve-only"],
        env={**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"},  # never reached
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert served.returncode != 0
    assert "RUNBOOK_ENVIRONMENT is not set" in served.stderr


def test_response_targets_keep_the_page_for_priorities_left_out(monkeypatch):
    monkeypatch.setenv("RUNBOOK_INCIDENT_RESPONSE_TARGETS", '{"P3": 2}')
    assert PlatformSettings().incident_response_targets == {
        "P1": 900,
        "P2": 3600,
        "P3": 2,
        "P4": 86400,
    }


@pytest.mark.parametrize("value", ['{"P3": 0}', '{"P3": 700000}', '{"P7": 60}'])
def test_response_targets_out_of_bounds_are_refused(monkeypatch, value):
    monkeypatch.setenv("RUNBOOK_INCIDENT_RESPONSE_TARGETS", value)
    with pytest.raises(ValidationError) as caught:
        PlatformSettings()
    assert caught.value.errors()[0]["loc"][0] == "incident_response_targets"
