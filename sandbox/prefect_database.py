"""A database for the Prefect server itself on the sandbox's real PostgreSQL
(`make up PREFECT_DB=postgres`, the burst bench): its own role and database beside the
platform's, so the runbooks' restores and renames never touch Prefect's state."""

from __future__ import annotations

import secrets
from urllib.parse import quote

import psycopg
from psycopg import sql

from sandbox.services import PostgresServer


def create_prefect_database(postgres: PostgresServer, name: str = "prefect") -> str:
    """Create role and database `name` (owner: that role) and return the
    `postgresql+asyncpg://` URL the Prefect server takes as
    PREFECT_API_DATABASE_CONNECTION_URL."""
    password = secrets.token_hex(16)
    role = sql.Identifier(name)
    with psycopg.connect(postgres.admin_dsn, autocommit=True, connect_timeout=5) as db:
        db.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password)))
        db.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(role, role))
    return (
        f"postgresql+asyncpg://{quote(name, safe='')}:{quote(password, safe='')}"
        f"@{postgres.host}:{postgres.port}/{quote(name, safe='')}"
    )
