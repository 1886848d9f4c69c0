"""alembic environment of the stand-in backend: online migrations against DATABASE_URL,
the variable the backend's pods (and so the migration Job) get from the `database` Secret."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)


def _sqlalchemy_url(dsn: str) -> str:
    # The application's libpq URL, driven by psycopg 3 (what the backend uses).
    for prefix in ("postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn.removeprefix(prefix)
    return dsn


def run_migrations_online() -> None:
    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        raise SystemExit("DATABASE_URL is not set: the backend's pods get it from the Secret")
    engine = create_engine(_sqlalchemy_url(dsn), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported by this project")
run_migrations_online()
