"""The whole ComplianceAgent platform, locally: what `make up` points the runbooks at and
what the test session runs them against.

It starts real PostgreSQL, Redis and the moto AWS server, the Kubernetes API emulator, the
backend stand-in (whose maintenance mode and availability follow the emulator's `backend`
Deployment, as the real pods would) and a receiver for notifications; seeds them like a
small production; and hands out the `RUNBOOK_*` environment that points the runbooks here.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from contextlib import ExitStack
from typing import Any, Self

import boto3
import psycopg

from sandbox.backend_standin import BackendStandIn
from sandbox.kube_emulator import KubeEmulator
from sandbox.receiver import NotificationReceiver
from sandbox.services import MotoServer, PostgresServer, RedisServer, Service
from sandbox.tls_listener import TLSMaterial

NAMESPACE = "complianceagent"
IMAGE_VERSION = "1.4.2"
API_KEY_SECRET_ID = "complianceagent/api-key"
BACKUP_BUCKET = "complianceagent-backups"
PAGERDUTY_ROUTING_KEY = "sandbox-routing-key"
AWS_REGION = "us-east-1"
# The API's certificate: cert-manager keeps it in TLS_SECRET, the backend serves it (HTTPS).
TLS_CERTIFICATE = "complianceagent-tls"
TLS_SECRET = "tls-secret"

# A small production: what the runbooks find when they start.
SEED_TABLES = {
    "organizations": ("name text NOT NULL", [("Acme",), ("Globex",), ("Initech",)]),
    "users": ("email text NOT NULL", [(f"user{n}@example.com",) for n in range(25)]),
    "compliance_scans": ("status text NOT NULL", [("passed",)] * 40 + [("failed",)] * 7),
}


# What `alembic upgrade head && alembic current` prints in the backend image: the migration
# Job (`backend-migrate-…`, flows/migrations.py) ends with these logs in the sandbox.
MIGRATION_JOB_PREFIX = "backend-migrate-"
MIGRATION_LOGS = (
    "INFO  [alembic.runtime.migration] Context impl PostgresqlImpl.\n"
    "INFO  [alembic.runtime.migration] Will assume transactional DDL.\n"
    "INFO  [alembic.runtime.migration] Running upgrade 3f2a9c1d7e10 -> 8c41d5e2b6a9, "
    "add scan severity index\n"
    "INFO  [alembic.runtime.migration] Running upgrade 8c41d5e2b6a9 -> a7e3f09b12c4, "
    "add organization retention policy\n"
    "INFO  [alembic.runtime.migration] Context impl PostgresqlImpl.\n"
    "INFO  [alembic.runtime.migration] Will assume transactional DDL.\n"
    "a7e3f09b12c4 (head)\n"
)


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
    """The seeded cluster: the runbook's Deployments, StatefulSets and TLS certificate
    (the emulated cert-manager writes a real certificate of its validity to its Secret)."""
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=60)
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        _deployment(
            "backend",
            f"complianceagent/backend:{IMAGE_VERSION}",
            3,
            {"MAINTENANCE_MODE": "false", "LOG_LEVEL": "info"},
        ),
        _deployment("frontend", f"complianceagent/frontend:{IMAGE_VERSION}", 3, {}),
        _deployment(
            "celery-workers",
            f"complianceagent/backend:{IMAGE_VERSION}",
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
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": {"name": TLS_CERTIFICATE, "namespace": NAMESPACE},
            "spec": {
                "secretName": TLS_SECRET,
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
        self.backend: BackendStandIn | None = None

    # --- life cycle -----------------------------------------------------------------

    def start(self) -> Self:
        try:
            for service in (self.postgres, self.redis, self.moto, self.kube, self.receiver):
                self._stack.enter_context(service)
            self.backend = self._stack.enter_context(
                BackendStandIn(
                    database_dsn=self.postgres.dsn,
                    redis_url=self.redis.url,
                    maintenance_mode=self._backend_in_maintenance,
                    replicas=self._backend_replicas,
                    tls_material=self._tls_material,
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
        self.kube.set_job_behaviour(MIGRATION_JOB_PREFIX, succeed=True, logs=MIGRATION_LOGS)
        with psycopg.connect(self.postgres.dsn, autocommit=True) as db:
            for table, (column, rows) in SEED_TABLES.items():
                db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id serial PRIMARY KEY, {column})")
                with db.cursor() as cursor:
                    cursor.executemany(
                        f"INSERT INTO {table} VALUES (DEFAULT, %s)",  # noqa: S608 (fixed names)
                        rows,
                    )
            db.execute("CREATE TABLE IF NOT EXISTS alembic_version (version_num varchar(32))")
            db.execute("INSERT INTO alembic_version VALUES ('3f2a9c1d7e10')")
        # pg_stat_statements for diagnose-latency, in the maintenance database: the view is
        # cluster-wide, and the application database's dumps then carry no extension only a
        # superuser may create (the restore runs as the application role).
        with psycopg.connect(self.postgres.admin_dsn, autocommit=True) as admin:
            admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        # moto keeps its state per process: a second sandbox in one process (the benchmark
        # suites run one after another) must not meet the first one's bucket and secret.
        self.moto.reset()
        self.s3().create_bucket(Bucket=BACKUP_BUCKET)
        self.secretsmanager().create_secret(
            Name=API_KEY_SECRET_ID, SecretString=secrets.token_urlsafe(32)
        )

    def reset(self) -> None:
        """Forget what the previous test did to the fault knobs and recorders."""
        if not self.redis.is_running:
            self.redis.start()
        assert self.backend is not None
        self.backend.reset()
        self.receiver.clear()
        self.kube.clear_rollout_failures()
        self.kube.clear_certificate_failures()
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

    def _tls_material(self) -> TLSMaterial | None:
        """The backend's certificate as its ingress would mount it: the TLS Secret now."""
        secret = self.kube.get("v1", "Secret", NAMESPACE, TLS_SECRET)
        data = (secret or {}).get("data") or {}
        if secret is None or not data.get("tls.crt") or not data.get("tls.key"):
            return None
        return TLSMaterial(
            secret["metadata"]["resourceVersion"],
            base64.b64decode(data["tls.crt"]),
            base64.b64decode(data["tls.key"]),
        )

    @property
    def tls_address(self) -> str:
        """`host:port` where the backend serves HTTPS with the TLS Secret's certificate."""
        assert self.backend is not None and self.backend.tls is not None
        return self.backend.tls.address

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
            # Where each Certificate is served; its first dnsName is what TLS verifies.
            "RUNBOOK_TLS_ENDPOINTS": json.dumps({TLS_CERTIFICATE: self.tls_address}),
            # The cache in its own Redis database; the Celery broker keeps db 0.
            "RUNBOOK_REDIS_CACHE_DB": "1",
            "AWS_ACCESS_KEY_ID": "sandbox",
            "AWS_SECRET_ACCESS_KEY": "sandbox",
            "AWS_DEFAULT_REGION": AWS_REGION,
        }
