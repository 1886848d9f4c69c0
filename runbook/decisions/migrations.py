"""The migration Job, built from the backend Deployment, and what its logs say. Pure.

The runbook execs into a backend pod (`cd /app && alembic upgrade head && alembic
current`). A Job from the same image, env and envFrom does the same without touching a
pod that serves traffic, leaves a record, and can be waited for and cleaned up.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from runbook.decisions.deployment import container_view, deployment_view, main_container

JSON = dict[str, Any]

MIGRATE_COMMAND = "alembic upgrade head && alembic current"
APP_DIRECTORY = "/app"
MAINTENANCE_VARIABLE = "MAINTENANCE_MODE"
# A finished Job the runbook could not delete (its process died) removes itself.
JOB_TTL_SECONDS = 24 * 3600
# Which run created the Job: a create retried after a lost answer finds it by this label.
RUN_LABEL = "runbooks.complianceagent.ai/flow-run"

# Copied from the backend's container: what the application needs to reach its database.
# Not probes: a liveness probe would kill a long migration halfway.
_CONTAINER_FIELDS = ("env", "envFrom", "volumeMounts", "resources", "securityContext")
_POD_FIELDS = (
    "serviceAccountName",
    "imagePullSecrets",
    "securityContext",
    "nodeSelector",
    "tolerations",
)


def migration_job_name(deployment: str, run_id: str) -> str:
    """`backend-migrate-1a2b3c4d`: unique per run, and says what it is in `kubectl get jobs`."""
    suffix = re.sub(r"[^a-z0-9]", "", run_id.lower())[:8] or "manual"
    return f"{deployment}-migrate-{suffix}"


def migration_job_body(
    backend: JSON,
    job_name: str,
    deadline_seconds: int,
    command: str = MIGRATE_COMMAND,
    run_id: str = "manual",
) -> JSON:
    """A `batch/v1` Job running `command` in the backend's image, env and envFrom.

    One attempt (`backoffLimit: 0`): a migration that failed halfway is for a human to
    look at, not to run again blindly. `activeDeadlineSeconds` stops a hung one. The
    `RUN_LABEL` names the run that created it.
    """
    container = main_container(backend)
    pod_spec = backend["spec"]["template"]["spec"]
    job_container: JSON = {
        "name": "migrate",
        "image": container["image"],
        "command": ["/bin/sh", "-c", command],
        "workingDir": container.get("workingDir") or APP_DIRECTORY,
    }
    for key in _CONTAINER_FIELDS:
        if container.get(key):
            job_container[key] = copy.deepcopy(container[key])
    pod: JSON = {"restartPolicy": "Never", "containers": [job_container]}
    for key in _POD_FIELDS:
        if pod_spec.get(key):
            pod[key] = copy.deepcopy(pod_spec[key])
    mounted = {m["name"] for m in job_container.get("volumeMounts", [])}
    volumes = [v for v in pod_spec.get("volumes") or [] if v["name"] in mounted]
    if volumes:
        pod["volumes"] = copy.deepcopy(volumes)
    labels = {
        "app.kubernetes.io/name": f"{backend['metadata']['name']}-migrations",
        "app.kubernetes.io/managed-by": "complianceagent-runbooks",
        RUN_LABEL: re.sub(r"[^A-Za-z0-9_.-]", "", run_id)[:63] or "manual",
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": deadline_seconds,
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
        },
    }


def maintenance_mode_of(deployment: JSON) -> bool:
    """Is the Deployment's `MAINTENANCE_MODE` variable "true"? (What the maintenance-window
    runbook sets, and what the backend honours.)"""
    value = deployment_view(deployment).container.env.get(MAINTENANCE_VARIABLE, "")
    return value.strip().lower() == "true"


@dataclass(frozen=True)
class MigrationJob:
    """The migration Job as its plan and report show it."""

    name: str
    image: str
    working_dir: str
    deadline_seconds: int
    env_names: tuple[str, ...]
    env_from: tuple[str, ...]


def migration_job(body: JSON) -> MigrationJob:
    """Read back what `migration_job_body` built."""
    [container] = body["spec"]["template"]["spec"]["containers"]
    view = container_view(container)
    return MigrationJob(
        name=body["metadata"]["name"],
        image=view.image,
        working_dir=view.working_dir or APP_DIRECTORY,
        deadline_seconds=int(body["spec"]["activeDeadlineSeconds"]),
        env_names=view.env_names,
        env_from=view.env_from,
    )


def created_by(job: JSON, body: JSON) -> bool:
    """Is `job` (found under our name) the one `body` describes, i.e. does it carry all of
    our labels? A 409 on create means "created" only then."""
    ours = body["metadata"].get("labels") or {}
    theirs = job["metadata"].get("labels") or {}
    return bool(ours) and all(theirs.get(k) == v for k, v in ours.items())


@dataclass(frozen=True)
class JobOutcome:
    """A Job's state as `kubectl wait` reads it from its conditions."""

    finished: bool  # a Complete or Failed condition is True
    succeeded: bool
    detail: str  # the deciding condition's message or reason; empty while it runs


def job_outcome(job: JSON) -> JobOutcome:
    status = job.get("status") or {}
    decided = [
        c
        for c in status.get("conditions") or []
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
    ]
    if not decided:
        return JobOutcome(finished=False, succeeded=False, detail="")
    condition = decided[0]
    return JobOutcome(
        finished=True,
        succeeded=condition["type"] == "Complete" and bool(status.get("succeeded")),
        detail=condition.get("message") or condition.get("reason") or condition["type"],
    )


# `alembic current` prints `<revision> (head)`; a merge point or branch point says so.
# Revision ids are word characters with at least one digit (a bare word is not one).
_CURRENT_LINE = re.compile(r"^((?=\w*\d)\w+)((?:\s+\((?:head|mergepoint|branchpoint)\))*)\s*$")
_UPGRADE_LINE = re.compile(r"Running upgrade (.*)$")


def alembic_current(logs: str) -> str | None:
    """The last `alembic current` answer in the Job's logs, e.g. `4b1e0d2c9a7f (head)`."""
    found = None
    for line in logs.splitlines():
        match = _CURRENT_LINE.match(line.strip())
        if match:
            found = match.group(1) + match.group(2)
    return found


def applied_migrations(logs: str) -> list[str]:
    """The `Running upgrade A -> B, message` steps alembic logged, in order."""
    return [m.group(1).strip() for m in map(_UPGRADE_LINE.search, logs.splitlines()) if m]
