"""Tasks that talk to AWS Secrets Manager, one call each, for secret rotation.

Values never cross a task boundary: tasks take and return *version ids*. A new value is
generated inside `create_pending_version` and goes straight to Secrets Manager; whoever
needs a value later reads it by version id with `read_secret_version`, a plain function
(no task run, no result, nothing stored by Prefect) that returns a `SecretStr`.

moto quirk (also correct on AWS): reads name the version or stage explicitly.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

from prefect import task
from pydantic import SecretStr

from runbook.decisions.secrets import CURRENT, PENDING, SecretName, stages_of
from tasks.aws import aws_call, aws_client
from tasks.retry_policy import TRANSIENT_RETRIES, call_with_retries

# `openssl rand -base64 32`: 32 random bytes for an API key.
API_KEY_BYTES = 32
# A database password: 32 random bytes, URL-safe, so no DSN ever needs to quote it.
PASSWORD_BYTES = 32


def secretsmanager_client() -> Any:
    """The shared Secrets Manager client for the configured region and endpoint."""
    return aws_client("secretsmanager")


def new_value(name: SecretName) -> str:
    """A fresh value for secret `name` (kept in this process only)."""
    if name == "api-key":
        return base64.b64encode(secrets.token_bytes(API_KEY_BYTES)).decode()
    return secrets.token_urlsafe(PASSWORD_BYTES)


@task(**TRANSIENT_RETRIES, task_run_name="describe versions of {secret_id}")
def describe_secret_versions(secret_id: str) -> dict[str, list[str]]:
    """`aws secretsmanager describe-secret`: version id → its staging labels."""
    described = aws_call(
        f"describe secret {secret_id}",
        secretsmanager_client().describe_secret,
        SecretId=secret_id,
    )
    return {v: list(s) for v, s in (described.get("VersionIdsToStages") or {}).items()}


@task(**TRANSIENT_RETRIES, task_run_name="createSecret: AWSPENDING version of {secret_id}")
def create_pending_version(secret_id: str, token: str, name: SecretName) -> str:
    """createSecret: store a newly generated value as version `token` with stage AWSPENDING.

    Idempotent on retry: when version `token` already exists nothing is generated or
    written (moto would accept a second value under the same token; AWS would refuse it).
    Returns the version id; the value never leaves this function.
    """
    client = secretsmanager_client()
    versions = describe_secret_versions.fn(secret_id)
    if token in versions:
        return token
    answer = aws_call(
        f"put AWSPENDING version of {secret_id}",
        client.put_secret_value,
        SecretId=secret_id,
        ClientRequestToken=token,
        SecretString=new_value(name),
        VersionStages=[PENDING],
    )
    return str(answer["VersionId"])


def read_secret_version(secret_id: str, version_id: str) -> SecretStr:
    """The value of one version, for the step that must use it (ALTER ROLE, a login, an
    authenticated request). Not a task on purpose: nothing about it is recorded."""
    answer = call_with_retries(
        f"read version {version_id} of {secret_id}",
        lambda: aws_call(
            f"read version {version_id} of {secret_id}",
            secretsmanager_client().get_secret_value,
            SecretId=secret_id,
            VersionId=version_id,
        ),
    )
    return SecretStr(answer["SecretString"])


@task(**TRANSIENT_RETRIES, task_run_name="move AWSCURRENT of {secret_id} to {to_version}")
def move_current_stage(secret_id: str, to_version: str, from_version: str) -> bool:
    """finishSecret (or its undo): AWSCURRENT from `from_version` to `to_version`;
    AWSPREVIOUS follows by itself. Already there is done: returns False then."""
    if stages_of(describe_secret_versions.fn(secret_id)).current == to_version:
        return False
    aws_call(
        f"move AWSCURRENT of {secret_id} to version {to_version}",
        secretsmanager_client().update_secret_version_stage,
        SecretId=secret_id,
        VersionStage=CURRENT,
        MoveToVersionId=to_version,
        RemoveFromVersionId=from_version,
    )
    return True


@task(**TRANSIENT_RETRIES, task_run_name="remove AWSPENDING from {version_id} of {secret_id}")
def remove_pending_stage(secret_id: str, version_id: str) -> bool:
    """Take AWSPENDING off `version_id`. Already off is done: returns False then."""
    if PENDING not in describe_secret_versions.fn(secret_id).get(version_id, []):
        return False
    aws_call(
        f"remove AWSPENDING from version {version_id} of {secret_id}",
        secretsmanager_client().update_secret_version_stage,
        SecretId=secret_id,
        VersionStage=PENDING,
        RemoveFromVersionId=version_id,
    )
    return True
