"""The whole ComplianceAgent platform, locally: what `make up` points the runbooks at and
what the test session runs them against.

It starts real PostgreSQL, Redis, Alertmanager and the moto AWS server, the Kubernetes API
emulator, the backend stand-in (whose maintenance mode and availability follow the
emulator's `backend` Deployment, as the real pods would) and a receiver for notifications;
seeds them like a small production (the database by the backend's own migrations); and
hands out the `RUNBOOK_*` environment that points the runbooks here.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import subprocess
import sys
from contextlib import ExitStack
from typing import Any, Self

import boto3
import psycopg

from sandbox.backend_app import APP_DIRECTORY, SEED_REVISION
from sandbox.backend_standin import BackendStandIn
from sandbox.kube_emulator import KubeEmulator
from sandbox.receiver import NotificationReceiver
from sandbox.services import (
    AlertmanagerServer,
    MotoServer,
    PostgresServer,
    RedisServer,
    Service,
)

NAMESPACE = "complianceagent"
IMAGE_VERSION = "1.4.2"
BACKEND_IMAGE = "complianceagent/backend"
API_KEY_SECRET_ID = "complianceagent/api-key"
BACKUP_BUCKET = "complianceagent-backups"
PAGERDUTY_ROUTING_KEY = "sandbox-routing-key"
AWS_REGION = "us-east-1"

# A small production: what the runbooks find when they start (the tables come from the
# backend's first migration, sandbox/backend_app; here is their one text column's data).
SEED_TABLES = {
    "organizations": ("name", [("Acme",), ("Globex",), ("Initech",)]),
    "users": ("email", [(f"user{n}@example.com",) for n in range(25)]),
    "compliance_scans": ("status", [("passed",)] * 40 + [("failed",)] * 7),
}


def _timestamp(at: dt.datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _deployment(name: str, image: str, replicas: int, env: dict[str, str]) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "replicas": replicas,
            "progressDeadlineSeconds": 120,
            "revisionHistoryLimit": 10,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": name,
                            "image": image,
                            "env": [{"name": k, "value": v} for k, v in env.items()]
                            + [
                                {
                                    "name": "DATABASE_URL",
                                    "valueFrom": {
                                        "secretKeyRef": {"name": "database", "key": "url"}
                                    },
                                }
                            ],
                            "envFrom": [{"secretRef": {"name": "api-key"}}],
                        }
                    ]
                },
            },
        },
    }


def kubernetes_objects() -> list[dict[str, Any]]:
    """The seeded cluster: the runbook's Deployments, StatefulSets and TLS certificate."""
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=60)
    tls = base64.b64encode(b"sandbox").decode()
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        _deployment(
            "backend",
            f"{BACKEND_IMAGE}:{IMAGE_VERSION}",
            3,
            {"MAINTENANCE_MODE": "false", "LOG_LEVEL": "info"},
        ),
        _deployment("frontend", f"complianceagent/frontend:{IMAGE_VERSION}", 3, {}),
        _deployment(
            "celery-workers",
            f"{BACKEND_IMAGE}:{IMAGE_VERSION}",
            4,
            {"CELERY_QUEUES": "default,scans"},
        ),
        *(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {
                    "replicas": 1,
                    "serviceName": name,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {
                        "metadata": {"labels": {"app": name}},
                        "spec": {"containers": [{"name": name, "image": image}]},
                    },
                },
            }
            for name, image in (("postgres", "postgres:15"), ("redis", "redis:7"))
        ),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": "tls-secret", "namespace": NAMESPACE},
            "data": {"tls.crt": tls, "tls.key": tls},
        },
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": {"name": "complianceagent-tls", "namespace": NAMESPACE},
            "spec": {
                "secretName": "tls-secret",
                "dnsNames": ["api.complianceagent.ai", "app.complianceagent.ai"],
                "duration": "2160h",
                "renewBefore": "720h",
                "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"},
            },
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "Ready",
                        "message": "Certificate is up to date and has not expired",
                        "lastTransitionTime": _timestamp(now),
                    }
                ],
                "notBefore": _timestamp(not_after - dt.timedelta(days=90)),
                "notAfter": _timestamp(not_after),
                "renewalTime": _timestamp(not_after - dt.timedelta(days=30)),
                "revision": 1,
            },
        },
    ]


class Sandbox(Service):
    """Start with `with Sandbox() as platform:`; `platform.env` points the runbooks here."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.postgres = PostgresServer()
        self.redis = RedisServer()
        self.moto = MotoServer()
        self.kube = KubeEmulator()
        self.receiver = NotificationReceiver()
        self.alertmanager = AlertmanagerServer()
        self.backend: BackendStandIn | None = None

    # --- life cycle -----------------------------------------------------------------

    def start(self) -> Self:
        try:
            for service in (
                self.postgres,
                self.redis,
                self.moto,
                self.kube,
                self.receiver,
                self.alertmanager,
            ):
                self._stack.enter_context(service)
            self.backend = self._stack.enter_context(
                BackendStandIn(
                    database_dsn=self.postgres.dsn,
                    redis_url=self.redis.url,
                    maintenance_mode=self._backend_in_maintenance,
                    replicas=self._backend_replicas,
                )
            )
            self.seed()
        except BaseException:
            self._stack.close()
            raise
        return self

    def stop(self) -> None:
        self._stack.close()

    # --- seeding --------------------------------------------------------------------

    def seed(self) -> None:
        for obj in kubernetes_objects():
            self.kube.seed(obj)
        self._seed_app_secrets()
        # The backend's image runs for real: its migration Jobs run its alembic project.
        self.kube.run_jobs_of_image(f"{BACKEND_IMAGE}:", APP_DIRECTORY)
        # The schema at an older revision, by the backend's own migrations: `migrations`
        # has real work to do.
        self.migrate_database(SEED_REVISION)
        with psycopg.connect(self.postgres.dsn, autocommit=True) as db:
            for table, (column, rows) in SEED_TABLES.items():
                with db.cursor() as cursor:
                    cursor.executemany(
                        f"INSERT INTO {table} ({column}) VALUES (%s)",  # noqa: S608 (fixed names)
                        rows,
                    )
        # moto keeps its state per process: a second sandbox in one process (the benchmark
        # suites run one after another) must not meet the first one's bucket and secret.
        self.moto.reset()
        self.s3().create_bucket(Bucket=BACKUP_BUCKET)
        self.secretsmanager().create_secret(
            Name=API_KEY_SECRET_ID, SecretString=secrets.token_urlsafe(32)
        )

    # --- the backend's schema (its alembic project, sandbox/backend_app) --------------

    def _seed_app_secrets(self) -> None:
        """The Secrets the backend's pods (and so its migration Jobs) take their env from."""
        for name, data in (
            ("database", {"url": self.postgres.dsn}),
            ("api-key", {"API_KEY": secrets.token_urlsafe(32)}),
        ):
            encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            self.kube.seed(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": NAMESPACE},
                    "type": "Opaque",
                    "data": encoded,
                }
            )

    def migrate_database(self, revision: str) -> str:
        """`alembic upgrade|downgrade REVISION` of the backend's project; returns its output."""
        current = self.schema_revision()
        if current == revision:
            return ""
        verb = "upgrade" if current is None or revision == "head" else "downgrade"
        done = subprocess.run(
            [sys.executable, "-m", "alembic", verb, revision],
            cwd=APP_DIRECTORY,
            env={"DATABASE_URL": self.postgres.dsn, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"alembic {verb} {revision} failed:\n{done.stderr[-2000:]}")
        return done.stderr

    def schema_revision(self) -> str | None:
        """What `alembic_version` holds (None before the first migration)."""
        with psycopg.connect(self.postgres.dsn, autocommit=True) as db:
            if db.execute("SELECT to_regclass('public.alembic_version')").fetchone() == (None,):
                return None
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None

    def reset(self) -> None:
        """Forget what the previous test did to the fault knobs and recorders."""
        if not self.redis.is_running:
            self.redis.start()
        if self.schema_revision() != SEED_REVISION:  # a test ran the migrations
            self.migrate_database(SEED_REVISION)
        assert self.backend is not None
        self.backend.reset()
        self.receiver.clear()
        self.kube.clear_rollout_failures()
        self.kube.clear_writes()

    # --- views the runbooks' effects are checked against -----------------------------

    def _backend_deployment(self) -> dict[str, Any] | None:
        return self.kube.get("apps/v1", "Deployment", NAMESPACE, "backend")

    def _backend_in_maintenance(self) -> bool:
        deployment = self._backend_deployment()
        if deployment is None:
            return False
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for variable in container.get("env") or []:
                if variable["name"] == "MAINTENANCE_MODE":
                    return str(variable.get("value", "")).lower() == "true"
        return False

    def _backend_replicas(self) -> int:
        deployment = self._backend_deployment()
        return int(deployment["spec"].get("replicas", 1)) if deployment else 0

    def s3(self) -> Any:
        return boto3.client("s3", **self.moto.boto3_kwargs(AWS_REGION))

    def secretsmanager(self) -> Any:
        return boto3.client("secretsmanager", **self.moto.boto3_kwargs(AWS_REGION))

    @property
    def env(self) -> dict[str, str]:
        """`RUNBOOK_*` (and AWS) variables that point the runbooks at this sandbox."""
        assert self.backend is not None
        receiver = self.receiver.url
        return {
            "RUNBOOK_ENVIRONMENT": "sandbox",
            "RUNBOOK_NAMESPACE": NAMESPACE,
            "RUNBOOK_KUBE_API_URL": self.kube.url,
            "RUNBOOK_API_BASE_URL": self.backend.url,
            "RUNBOOK_DATABASE_DSN": self.postgres.dsn,
            "RUNBOOK_REDIS_URL": self.redis.url,
            "RUNBOOK_AWS_REGION": AWS_REGION,
            "RUNBOOK_AWS_ENDPOINT_URL": self.moto.endpoint_url,
            "RUNBOOK_API_KEY_SECRET_ID": API_KEY_SECRET_ID,
            "RUNBOOK_BACKUP_BUCKET": BACKUP_BUCKET,
            "RUNBOOK_SLACK_WEBHOOK_URL": f"{receiver}/slack/T000/B000/sandbox",
            "RUNBOOK_PAGERDUTY_EVENTS_URL": f"{receiver}/v2/enqueue",
            "RUNBOOK_PAGERDUTY_ROUTING_KEY": PAGERDUTY_ROUTING_KEY,
            "RUNBOOK_STATUSPAGE_URL": f"{receiver}/statuspage/incidents",
            "RUNBOOK_ALERTMANAGER_URL": self.alertmanager.url,
            "AWS_ACCESS_KEY_ID": "sandbox",
            "AWS_SECRET_ACCESS_KEY": "sandbox",
            "AWS_DEFAULT_REGION": AWS_REGION,
        }
