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
