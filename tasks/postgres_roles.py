"""Tasks on PostgreSQL roles for secret rotation: set a role's password, log in as it.

Both take the password as a `SecretStr` argument — the one place a value crosses a task
boundary, because the call needs it. Prefect does not store task arguments; these tasks
return nothing, persist nothing and cache nothing (`cache_policy=NONE`), and their errors
never carry the value (the server's messages name the role, not the password).

The password reaches the server already hashed (a SCRAM-SHA-256 verifier, as psql's
`\\password` sends it), so the cleartext is in no server log or `pg_stat_activity`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import psycopg
from prefect import task
from prefect.cache_policies import NONE
from psycopg import sql
from pydantic import SecretStr

from tasks.postgres import connect, conninfo, database_dsn, scrub
from tasks.retry_policy import TRANSIENT_RETRIES, PlatformCallError

SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
LOGIN_TIMEOUT_SECONDS = 5
# A refused login that trying again will not fix.
_REFUSED = ("password authentication failed", "not permitted to log in", "does not exist")


def scram_verifier(password: str, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677)."""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


@task(
    **TRANSIENT_RETRIES,
    persist_result=False,
    cache_policy=NONE,
    task_run_name="ALTER ROLE {role} PASSWORD",
)
def alter_role_password(role: str, password: SecretStr) -> None:
    """setSecret: `ALTER ROLE role PASSWORD …` over the runbook's own connection."""
    value = password.get_secret_value()
    # SASLprep is the identity on ASCII; anything else the server hashes itself.
    stored = scram_verifier(value) if value.isascii() else value
    statement = sql.SQL("ALTER ROLE {} PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(stored)
    )
    with connect(autocommit=True) as conn:
        conn.execute(statement)


@task(
    **TRANSIENT_RETRIES, persist_result=False, cache_policy=NONE, task_run_name="log in as {role}"
)
def log_in_as(role: str, password: SecretStr) -> None:
    """testSecret: a real login as `role` with `password` to the application database.

    A refused login fails at once (no retry); a connection problem is retried.
    """
    dsn = database_dsn()
    info, _ = conninfo(dsn)
    try:
        with psycopg.connect(
            info,
            user=role,
            password=password.get_secret_value(),
            connect_timeout=LOGIN_TIMEOUT_SECONDS,
            application_name="runbook-secret-test",
        ) as conn:
            conn.execute("SELECT 1").fetchone()
    except psycopg.OperationalError as exc:
        text = " ".join(scrub(str(exc), dsn).split())
        refused = any(marker in text for marker in _REFUSED)
        raise PlatformCallError(
            f"login as {role} failed: {text}"[:500], transient=not refused
        ) from None
