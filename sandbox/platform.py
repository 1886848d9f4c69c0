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
import json
import secrets
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import boto3
import psycopg
from psycopg import sql

from sandbox.backend_app import APP_DIRECTORY, SEED_REVISION
from sandbox.backend_standin import BackendStandIn, PodSecrets
from sandbox.kube_emulator import KubeEmulator
from sandbox.platform_metrics import PlatformMetrics
from sandbox.receiver import NotificationReceiver
from sandbox.services import (
    AlertmanagerServer,
    MotoServer,
    PostgresServer,
    RedisServer,
    Service,
)
from sandbox.services.prometheus import PrometheusServer
from sandbox.tls_listener import TLSMaterial

NAMESPACE = "complianceagent"
IMAGE_VERSION = "1.4.2"
BACKEND_IMAGE = "complianceagent/backend"
# A drill: deploying a version ending in this never becomes ready (ProgressDeadlineExceeded),
# so a newcomer can watch `deploy` roll itself back from the UI.
BROKEN_IMAGE_SUFFIX = "-broken"
API_KEY_SECRET_ID = "complianceagent/api-key"
# The application role the backend's pods log in as; its password lives in Secrets Manager.
DATABASE_PASSWORD_SECRET_ID = "complianceagent/database-password"
APP_ROLE = "complianceagent_app"
BACKUP_BUCKET = "complianceagent-backups"
PAGERDUTY_ROUTING_KEY = "sandbox-routing-key"
AWS_REGION = "us-east-1"
# The API's certificate: cert-manager keeps it in TLS_SECRET, the backend serves it (HTTPS).
TLS_CERTIFICATE = "complianceagent-tls"
TLS_SECRET = "tls-secret"
# The platform's alert rules, run by the sandbox's Prometheus on a compressed clock: scrape
# and evaluation every second, 5-minute windows made 10 s and `for: 5m` made 2 s, so a
# drill's alert fires within seconds (the real durations are unit-tested by promtool).
ALERT_RULES = Path(__file__).resolve().parent.parent / "monitoring" / "rules"
SANDBOX_RULE_CLOCK = ("10s", "2s")

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
    """The seeded cluster: the runbook's Deployments, StatefulSets and TLS certificate
    (the emulated cert-manager writes a real certificate of its validity to its Secret)."""
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=60)
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


def _serving_revision(deployment: dict[str, Any]) -> str | None:
    """The revision whose pods serve: the Deployment's, once its rollout has completed."""
    status = deployment.get("status") or {}
    if status.get("observedGeneration") != deployment["metadata"].get("generation"):
        return None
    progressing: dict[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), {}
    )
    if progressing.get("reason") != "NewReplicaSetAvailable":
        return None
    return str(
        (deployment["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision")
    )


class Sandbox(Service):
    """Start with `with Sandbox() as platform:`; `platform.env` points the runbooks here."""

    def __init__(self, alert_webhook_url: str | None = None) -> None:
        """`alert_webhook_url`: where the sandbox's Alertmanager delivers alerts (the alert
        bridge, as `make up` runs it); None: Prometheus still fires them, nobody is told."""
        self._stack = ExitStack()
        self.postgres = PostgresServer()
        self.redis = RedisServer()
        self.moto = MotoServer()
        self.kube = KubeEmulator()
        self.receiver = NotificationReceiver()
        self.alertmanager = AlertmanagerServer(webhook_url=alert_webhook_url)
        self.backend: BackendStandIn | None = None
        self._pods_secretsmanager: Any = None
        self._backend_pod_revision: str | None = None
        self.metrics: PlatformMetrics | None = None
        self.prometheus: PrometheusServer | None = None

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
                    tls_material=self._tls_material,
                    load_secrets=self._pod_secrets_now,
                    pods=self._backend_pods,
                    # Drills run in another process than `make up`: they reach the
                    # stand-in's latency and 5xx knobs over HTTP (sandbox/conditions.py).
                    sandbox_controls=True,
                )
            )
            self.kube.add_pod_log_source(self._backend_pod_log)
            self._start_monitoring(alertmanager_url=self.alertmanager.url)
            self.seed()
            self.kube.fail_rollouts_for_image(BROKEN_IMAGE_SUFFIX)
            self._start_backend_pods()
        except BaseException:
            self._stack.close()
            raise
        return self

    def stop(self) -> None:
        self._stack.close()

    def _start_monitoring(self, alertmanager_url: str | None) -> None:
        """The Key Metrics on the backend's /metrics and a real Prometheus scraping it
        with the platform's alert rules, sending alerts to `alertmanager_url` if given."""
        assert self.backend is not None
        self.metrics = PlatformMetrics(self.postgres.dsn, self.redis.url)
        self.backend.exporters.append(self.metrics.render)
        self.prometheus = self._stack.enter_context(
            PrometheusServer(
                targets={"backend": [urlsplit(self.backend.url).netloc]},
                rule_files=sorted(ALERT_RULES.glob("*.yml")),
                alertmanager_url=alertmanager_url,
                rule_clock=SANDBOX_RULE_CLOCK,
            )
        )

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
        # pg_stat_statements for diagnose-latency, in the maintenance database: the view is
        # cluster-wide, and the application database's dumps then carry no extension only a
        # superuser may create (the restore runs as the application role).
        with psycopg.connect(self.postgres.admin_dsn, autocommit=True) as admin:
            admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.s3().create_bucket(Bucket=BACKUP_BUCKET)
        self.secretsmanager().create_secret(
            Name=API_KEY_SECRET_ID, SecretString=secrets.token_urlsafe(32)
        )
        self._seed_app_role()

    # --- the backend's pods load their secrets when they start (secret rotation) ---------

    def _seed_app_role(self) -> None:
        """The role the backend's pods log in as, with a random password that is also the
        database-password secret; the runbooks' own role may set its password."""
        password = secrets.token_urlsafe(32)
        role = sql.Identifier(APP_ROLE)
        with psycopg.connect(self.postgres.admin_dsn, autocommit=True) as db:
            found = db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone()
            verb = sql.SQL("ALTER" if found else "CREATE")
            db.execute(
                sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(verb, role, sql.Literal(password))
            )
            # Secret rotation's setSecret is `ALTER ROLE ... PASSWORD` by the runbooks' role.
            runbooks = sql.Identifier(self.postgres.app_user)
            db.execute(sql.SQL("ALTER ROLE {} CREATEROLE").format(runbooks))
            db.execute(sql.SQL("GRANT {} TO {} WITH ADMIN OPTION").format(role, runbooks))
        self.secretsmanager().create_secret(Name=DATABASE_PASSWORD_SECRET_ID, SecretString=password)

    def _pod_secrets_now(self) -> PodSecrets:
        """What an ExternalSecret would deliver to a starting pod: AWSCURRENT of each."""
        if self._pods_secretsmanager is None:
            self._pods_secretsmanager = self.secretsmanager()
        sm = self._pods_secretsmanager

        def current(secret_id: str) -> str:
            # moto quirk (and right on AWS): name the stage, or an old value may come back.
            answer = sm.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")
            return str(answer["SecretString"])

        return PodSecrets(
            api_key=current(API_KEY_SECRET_ID),
            database_user=APP_ROLE,
            database_password=current(DATABASE_PASSWORD_SECRET_ID),
        )

    def _start_backend_pods(self) -> None:
        """Start the backend's pods now, and again whenever a new revision of the backend
        Deployment has rolled out (a restart, a deploy, a rollback): the new pods load
        the secrets as they are at that moment. A failed rollout keeps the old pods."""
        assert self.backend is not None
        deployment = self._backend_deployment()
        self._backend_pod_revision = _serving_revision(deployment) if deployment else None
        self.backend.restart_pods()
        self.kube.on_change(self._follow_backend_rollouts)

    def _follow_backend_rollouts(
        self, rt: Any, old: dict[str, Any] | None, new: dict[str, Any] | None, seeded: bool
    ) -> None:
        if rt.kind != "Deployment" or new is None or new["metadata"]["name"] != "backend":
            return
        serving = _serving_revision(new)
        if serving is not None and serving != self._backend_pod_revision:
            self._backend_pod_revision = serving
            assert self.backend is not None
            self.backend.restart_pods()

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
        if self.metrics is not None:
            self.metrics.reset()
        self.receiver.clear()
        self.kube.clear_rollout_failures()
        self.kube.fail_rollouts_for_image(BROKEN_IMAGE_SUFFIX)
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

    def _backend_pods(self) -> list[str]:
        """The running pods of the backend's ReplicaSets: where a Service sends requests."""
        names = []
        for pod in self.kube.list("v1", "Pod", NAMESPACE):
            meta = pod["metadata"]
            owners = {r.get("kind") for r in meta.get("ownerReferences") or []}
            running = (pod.get("status") or {}).get("phase") == "Running"
            if (meta.get("labels") or {}).get("app") == "backend" and "ReplicaSet" in owners:
                names += [meta["name"]] if running else []
        return sorted(names)

    def _backend_pod_log(self, namespace: str, pod: str, _: str) -> list[tuple[int, str]] | None:
        """A backend pod's log: the stand-in's request logs of the requests it served."""
        assert self.backend is not None
        return self.backend.pod_log(pod) if namespace == NAMESPACE else None

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
        assert self.backend is not None and self.prometheus is not None
        receiver = self.receiver.url
        return {
            "RUNBOOK_ENVIRONMENT": "sandbox",
            "RUNBOOK_NAMESPACE": NAMESPACE,
            "RUNBOOK_KUBE_API_URL": self.kube.url,
            "RUNBOOK_API_BASE_URL": self.backend.url,
            "RUNBOOK_DATABASE_DSN": self.postgres.dsn,
            "RUNBOOK_REDIS_URL": self.redis.url,
            "RUNBOOK_PROMETHEUS_URL": self.prometheus.url,
            "RUNBOOK_AWS_REGION": AWS_REGION,
            "RUNBOOK_AWS_ENDPOINT_URL": self.moto.endpoint_url,
            "RUNBOOK_API_KEY_SECRET_ID": API_KEY_SECRET_ID,
            "RUNBOOK_DATABASE_PASSWORD_SECRET_ID": DATABASE_PASSWORD_SECRET_ID,
            "RUNBOOK_DATABASE_APP_ROLE": APP_ROLE,
            "RUNBOOK_BACKUP_BUCKET": BACKUP_BUCKET,
            "RUNBOOK_SLACK_WEBHOOK_URL": f"{receiver}/slack/T000/B000/sandbox",
            "RUNBOOK_PAGERDUTY_EVENTS_URL": f"{receiver}/v2/enqueue",
            "RUNBOOK_PAGERDUTY_ROUTING_KEY": PAGERDUTY_ROUTING_KEY,
            "RUNBOOK_STATUSPAGE_URL": f"{receiver}/statuspage/incidents",
            # Where each Certificate is served; its first dnsName is what TLS verifies.
            "RUNBOOK_TLS_ENDPOINTS": json.dumps({TLS_CERTIFICATE: self.tls_address}),
            "RUNBOOK_ALERTMANAGER_URL": self.alertmanager.url,
            # The cache in its own Redis database; the Celery broker keeps db 0.
            "RUNBOOK_REDIS_CACHE_DB": "1",
            # A drill's sessions are idle for seconds when its incident's diagnosis looks:
            # 6 s, not the page's 10 min, so the connections drill shows a real proposal.
            "RUNBOOK_CONNECTIONS_IDLE_MINUTES": "0.1",
            "AWS_ACCESS_KEY_ID": "sandbox",
            "AWS_SECRET_ACCESS_KEY": "sandbox",
            "AWS_DEFAULT_REGION": AWS_REGION,
        }
