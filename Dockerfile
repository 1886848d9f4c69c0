# The runbooks' image: what every flow-run Job of the `runbooks` work pool runs.
# Build:  docker build -t registry.example/complianceagent-runbooks:$(git rev-parse --short HEAD) .
# The code sits at /opt/runbooks, where prefect.yaml's `pull` step expects it; Python
# packages are exactly requirements.lock's pins (the same ones `make test` ran against).
FROM python:3.11-slim-bookworm

# pg_dump/pg_restore of the server's major version (15) for backup and restore; zstd for
# the backup stream's peer tooling; ca-certificates for TLS to AWS, Slack, PagerDuty.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      postgresql-client-15 zstd ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/runbooks

# Dependencies first (their layer is reused while only the code changes), no resolver:
# the lock is the whole truth.
COPY requirements.lock ./
RUN pip install --no-cache-dir --no-deps -r requirements.lock

COPY prefect.yaml ./
COPY flows/ flows/
COPY tasks/ tasks/
COPY runbook/ runbook/
COPY deployments/ deployments/
# The alert bridge (`python -m bridge`, deploy/kubernetes/alert-bridge.yaml) and the alert
# rules it accepts; incident-response also reads the rules for the alert's own query.
COPY bridge/ bridge/
COPY monitoring/rules/ monitoring/rules/
RUN python -m compileall -q flows tasks runbook deployments bridge

# No root at run time; the flow-run Job's securityContext asks for this uid.
RUN useradd --uid 10001 --no-create-home --home-dir /opt/runbooks runbooks
USER 10001
ENV PYTHONPATH=/opt/runbooks \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    RUNBOOK_POSTGRES_BINDIR=/usr/lib/postgresql/15/bin
# The worker supplies the command (`prefect flow-run execute`); RUNBOOK_ENVIRONMENT and
# the rest come from the Job (ConfigMap and Secret, deploy/prefect/base-job-template.json).
