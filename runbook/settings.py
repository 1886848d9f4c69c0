"""The platform a runbook operates on, read from `RUNBOOK_*` environment variables.

The same code targets the local sandbox and a real cluster: only these settings differ.
Credentials are `SecretStr` so they never print; a missing credential is `None` and the
runbook that needs it fails with a message naming the variable, rather than silently
using an empty string.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runbook.decisions.incidents import (
    DEFAULT_CONTACTS,
    RESPONSE_TARGET_SECONDS,
    Contact,
    Priority,
)

ENV_PREFIX = "RUNBOOK_"

# A Kubernetes object name (RFC 1123 label): what `kubectl` would accept.
K8S_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class MissingSetting(RuntimeError):
    """A runbook needs a setting (usually a credential) that is not configured."""

    def __init__(self, field: str, why: str = "this runbook needs it") -> None:
        super().__init__(f"{ENV_PREFIX}{field.upper()} is not set; {why}")
        self.field = field


ENVIRONMENTS = ("sandbox", "staging", "production")


class PlatformSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # No default, on purpose: a forgotten variable must not quietly mean "sandbox" and
    # switch production's approvals off. The sandbox and the tests set it themselves.
    environment: Literal["sandbox", "staging", "production"] = Field(
        description="Which platform this is (required, no default); production turns on "
        "approvals that are optional elsewhere (a deploy, an autoscaler lowered).",
    )

    # --- Kubernetes -------------------------------------------------------------------
    namespace: str = Field(
        "complianceagent", pattern=K8S_NAME, description="Namespace of the platform."
    )
    backend_deployment: str = Field("backend", pattern=K8S_NAME, description="API Deployment.")
    frontend_deployment: str = Field("frontend", pattern=K8S_NAME, description="Web Deployment.")
    workers_deployment: str = Field(
        "celery-workers", pattern=K8S_NAME, description="Celery workers Deployment."
    )
    postgres_statefulset: str = Field(
        "postgres", pattern=K8S_NAME, description="PostgreSQL StatefulSet."
    )
    kube_api_url: AnyHttpUrl | None = Field(
        None,
        description="Talk to this API server without credentials (the local sandbox). "
        "Unset: in-cluster config, else kubeconfig.",
    )
    kube_context: str | None = Field(None, description="kubeconfig context to use, if any.")
    kube_request_timeout_seconds: float = Field(
        10.0, gt=0, le=120, description="Timeout of one Kubernetes API request."
    )

    # --- HTTP (health) ----------------------------------------------------------------
    api_base_url: AnyHttpUrl = Field(
        AnyHttpUrl("https://api.complianceagent.ai"),
        description="Base URL of the backend API whose /health endpoints are checked.",
    )
    http_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="Timeout of one HTTP request to the platform."
    )

    # --- Data -------------------------------------------------------------------------
    database_dsn: SecretStr | None = Field(
        None, description="libpq URL of the application database (holds a password)."
    )
    redis_url: SecretStr | None = Field(
        None, description="URL of the Redis broker/cache (may hold a password)."
    )
    postgres_bindir: Path | None = Field(
        None,
        description="Directory of pg_dump/pg_restore. Unset: /usr/lib/postgresql/<server "
        "major>/bin, else PATH (the programs must match the server's major version).",
    )
    postgres_volume_bytes: int | None = Field(
        None,
        ge=2**20,
        le=2**60,
        description="Capacity of the PostgreSQL data volume in bytes, for the restore's "
        "free-space check. Unset: the StatefulSet's volumeClaimTemplate storage request.",
    )
    postgres_maintenance_database: str = Field(
        "postgres",
        min_length=1,
        max_length=63,
        description="Database to connect to for CREATE/DROP/ALTER DATABASE (a database "
        "cannot be renamed while connected to it).",
    )

    # --- AWS --------------------------------------------------------------------------
    aws_region: str = Field(
        "us-east-1", pattern=r"^[a-z]{2}(-[a-z]+)+-\d$", description="AWS region."
    )
    aws_endpoint_url: AnyHttpUrl | None = Field(
        None, description="Override the AWS endpoint (the local moto server); unset on AWS."
    )
    api_key_secret_id: str = Field(
        "complianceagent/api-key",
        min_length=1,
        max_length=512,
        description="Secrets Manager id of the API key that secret rotation renews.",
    )
    database_password_secret_id: str | None = Field(
        "complianceagent/database-password",
        min_length=1,
        max_length=512,
        description="Secrets Manager id of the application role's database password "
        "(a plain string) that secret rotation renews; unset: not rotated here.",
    )
    database_app_role: str = Field(
        "complianceagent_app",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL role whose password that secret holds (the pods log in "
        "as it); secret rotation runs ALTER ROLE on it.",
    )
    backup_bucket: str = Field(
        "complianceagent-backups",
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="S3 bucket holding database backups.",
    )
    backup_prefix: str = Field(
        "postgres/", max_length=200, description="Key prefix of backups in the bucket."
    )

    # --- Notifications ----------------------------------------------------------------
    slack_webhook_url: SecretStr | None = Field(
        None, description="Slack-style incoming webhook (the URL is the credential)."
    )
    pagerduty_events_url: AnyHttpUrl = Field(
        AnyHttpUrl("https://events.pagerduty.com/v2/enqueue"),
        description="PagerDuty Events API v2 endpoint.",
    )
    pagerduty_routing_key: SecretStr | None = Field(
        None, description="PagerDuty integration (routing) key."
    )
    statuspage_url: AnyHttpUrl | None = Field(
        None, description="Status page API endpoint that receives incident updates."
    )
    statuspage_api_key: SecretStr | None = Field(None, description="Status page API key.")
    alertmanager_url: AnyHttpUrl | None = Field(
        None,
        description="Alertmanager base URL; a maintenance window silences the platform's "
        "alerts there. Unset: no silence.",
    )

    # --- TLS (certificate renewal) ----------------------------------------------------
    tls_endpoints: dict[str, str] = Field(
        default_factory=dict,
        description='Where each Certificate is served, as JSON {"<certificate>": "host:port"}. '
        "The handshake verifies the Certificate's first dnsName either way; a Certificate "
        "not listed is checked at <first dnsName>:443.",
    )
    tls_ca_bundle: Path | None = Field(
        None,
        description="PEM bundle of the CAs to trust when checking a served certificate. "
        "Unset: the CA the issuer returned with the certificate (CertificateRequest "
        "status.ca, the Secret's ca.crt), else the system's trust store.",
    )

    # --- Approvals --------------------------------------------------------------------
    approval_timeout_seconds: int = Field(
        3600, ge=5, le=7 * 24 * 3600, description="How long a plan waits for a decision."
    )
    approval_poll_seconds: int = Field(
        1, ge=1, le=30, description="How often a paused run checks for a decision."
    )

    # --- Incident response ------------------------------------------------------------
    escalation_contacts: tuple[Contact, ...] = Field(
        DEFAULT_CONTACTS,
        min_length=1,
        max_length=20,
        description='The escalation path as JSON [{"role", "name", "after_minutes", '
        '"routing_key"?, "priorities"?}]: each contact is paged (PagerDuty + chat) '
        "after_minutes after an incident is declared unless someone acknowledged it. "
        "Default: the runbook page's on-call (at once), team lead (15), engineering "
        "manager (30), VP Engineering (60, P1 only), all on the default routing key.",
    )
    incident_poll_seconds: float = Field(
        5.0,
        ge=0.2,
        le=60,
        description="How often an open incident checks for acknowledgements, the alert's "
        "resolution and escalations that are due.",
    )
    incident_wait_seconds: int = Field(
        7 * 24 * 3600,
        ge=10,
        le=30 * 24 * 3600,
        description="How long an incident waits for an acknowledgement, and then for its "
        "resolution, before its run gives up (the PagerDuty incident stays open).",
    )
    incident_response_targets: dict[Priority, Annotated[int, Field(ge=1, le=7 * 24 * 3600)]] = (
        Field(
            default_factory=lambda: dict(RESPONSE_TARGET_SECONDS),
            description="Seconds within which an incident must be acknowledged, per priority, "
            'as JSON {"P1": 900, …} (1 s to 7 days); a priority left out keeps the page\'s '
            "target (P1 15 min, P2 1 h, P3 4 h, P4 24 h). Past it unacknowledged, the breach "
            "is told to chat, recorded as an event and in the post-mortem.",
        )
    )
    incident_quiet_seconds: int = Field(
        600,
        ge=0,
        le=24 * 3600,
        description="A firing for an alert group whose incident resolved less than this "
        "ago is a late copy of the old notification and opens nothing.",
    )

    # --- Diagnostics (Common Issues) ------------------------------------------------
    prometheus_url: AnyHttpUrl | None = Field(
        None,
        description="Prometheus server (its HTTP API) for p99 and error rate. Unset: "
        "diagnose-latency scrapes the backend's /metrics twice and says so.",
    )
    connections_idle_minutes: float = Field(
        10,
        ge=0.05,
        le=1440,
        description="diagnose-connections proposes ending client sessions idle (or idle in "
        "a transaction) longer than this many minutes when its run does not say otherwise "
        "(as when incident-response starts it). The runbook page's 10 minutes; the sandbox "
        "sets a few seconds so that a drill's freshly held sessions are proposed.",
    )
    redis_broker_db: int = Field(
        0, ge=0, le=15, description="Redis database of the Celery broker (never flushed)."
    )
    redis_cache_db: int = Field(
        0,
        ge=0,
        le=15,
        description="Redis database of the application's cache, where diagnose-redis-memory "
        "may delete keys (broker keys are never deleted, even when it is the broker's).",
    )
    celery_queues: list[str] = Field(
        default_factory=lambda: ["celery"],
        min_length=1,
        max_length=50,
        description='Celery queue names as JSON (["celery"]); their priority lists '
        "(queue + \\x06\\x16 + 3/6/9) are counted too.",
    )

    @field_validator("incident_response_targets", mode="after")
    @classmethod
    def _page_targets_for_the_rest(cls, targets: dict[Priority, int]) -> dict[Priority, int]:
        return {**RESPONSE_TARGET_SECONDS, **targets}

    # --- Crash recovery (reconcile) -----------------------------------------------------
    heartbeat_timeout_seconds: int = Field(
        90,
        ge=31,
        le=3600,
        description="A run Prefect shows Running, Paused or Cancelling whose last heartbeat "
        "is older than this is dead (its process or node is gone): reconcile marks it "
        "Crashed and puts back what it recorded. At least PREFECT_FLOWS_HEARTBEAT_FREQUENCY "
        "(30 s, Prefect's minimum) plus a margin, and at most the `within` of the "
        "reconcile's heartbeat trigger in prefect.yaml.",
    )
    lock_lease_seconds: int = Field(
        300,
        ge=60,
        le=86400,
        description="A run's lock lease (a Prefect global concurrency lease) lasts this "
        "long without a renewal; the run renews it every fifth of it. A killed run's locks "
        "stay held this long at most unless reconcile frees or renews them. Prefect's "
        "server accepts 60 s to 1 day.",
    )
    reconcile_lease_seconds: int = Field(
        600,
        ge=180,
        le=86400,
        description="Reconcile renews a dead run's locks while its change is still under "
        "way (a migration Job running) for this long each time it runs; longer than "
        "reconcile's period (2 min) plus a margin, so one late or failed reconcile does "
        "not unlock a database a migration is still changing.",
    )

    @model_validator(mode="before")
    @classmethod
    def _environment_is_explicit(cls, values: Any) -> Any:
        # A MissingSetting rather than pydantic's "Field required": the message names the
        # variable to set and why it has no default.
        if isinstance(values, dict) and values.get("environment") in (None, ""):
            raise MissingSetting(
                "environment",
                f"say which platform this is ({', '.join(ENVIRONMENTS)}); it has no default "
                "so that a forgotten variable cannot switch production's approvals off",
            )
        return values

    def deployment_name(self, component: str) -> str:
        """The Deployment of a component as the runbook names it (`backend`, `frontend`,
        `celery-workers`) on this platform."""
        names = {
            "backend": self.backend_deployment,
            "frontend": self.frontend_deployment,
            "celery-workers": self.workers_deployment,
        }
        if component not in names:
            raise ValueError(f"unknown component {component!r}; known: {', '.join(names)}")
        return names[component]

    @property
    def database_name(self) -> str:
        """The application database's name, from `RUNBOOK_DATABASE_DSN` (never the secret).

        Runbooks that touch the database lock `database/<this name>`, so migrations,
        backups and restores of one database never overlap.
        """
        return database_name_of(self.require("database_dsn").get_secret_value())

    def require(self, field: str) -> SecretStr:
        """The value of a credential setting, or a `MissingSetting` naming it."""
        value = getattr(self, field)
        if value is None:
            raise MissingSetting(field)
        return value


def database_name_of(dsn: str) -> str:
    """The database a libpq DSN names: a URL's path, or `dbname=` of a key/value string;
    failing both, the user name (libpq's own default). Raises ValueError if none."""
    if "://" in dsn:
        url = urlsplit(dsn)
        name = unquote(url.path.lstrip("/")) or unquote(url.username or "")
    else:
        pairs = dict(re.findall(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn))
        name = (pairs.get("dbname") or pairs.get("user") or "").strip("'")
    if not name:
        raise ValueError("RUNBOOK_DATABASE_DSN names no database")
    return name


def database_label() -> str:
    """The application database's name for run names and titles; a placeholder when it
    cannot be read (the run itself then reports the missing or bad setting)."""
    try:
        return load_settings().database_name
    except Exception:
        return "database"


def load_settings() -> PlatformSettings:
    """Settings as the environment says now (cheap; not cached so tests and runs agree)."""
    return PlatformSettings()
