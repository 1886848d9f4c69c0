"""Tasks that talk to PostgreSQL through psycopg: one SQL call (or one short transaction)
each. The client programs are in `tasks/postgres_programs.py`, the streams between them
and S3 (backup, restore, `pg_restore --list`) in `tasks/postgres_streams.py`.

Credentials: the DSN (`RUNBOOK_DATABASE_DSN`) is a `SecretStr`. Every parse of it goes
through `dsn_params`, whose error names the setting and never quotes it (libpq's own
message quotes the token it choked on, which may well be the password); connection errors
are scrubbed of it too.

Database names given to these tasks are names, never SQL: they are always quoted as
identifiers. `drop_database` refuses to drop the application database itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from prefect import task
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from runbook.fault_points import fault_point
from runbook.settings import load_settings
from tasks.logs import run_logger
from tasks.retry_policy import TRANSIENT_RETRIES, PlatformCallError

# Every ordinary table pg_dump dumps the data of: not system, temporary or extension-owned.
_TABLES = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""


class InvalidDsn(ValueError):
    """`RUNBOOK_DATABASE_DSN` is not a connection string libpq can read."""


# --- the DSN and connections ---------------------------------------------------------------


def database_dsn() -> str:
    """The secret DSN's value. Never log it, never put it in a message or a result."""
    return load_settings().require("database_dsn").get_secret_value()


def dsn_params(dsn: str) -> dict[str, Any]:
    """`conninfo_to_dict(dsn)`, failing with a message that names the setting, not its text."""
    try:
        return conninfo_to_dict(dsn)
    except psycopg.Error:
        pass
    # Raised outside the `except`, so libpq's message is not even the context of ours.
    raise InvalidDsn(
        "RUNBOOK_DATABASE_DSN is not a valid libpq connection string (a URL or key=value "
        "pairs; check quoting and %-escapes). Its text is not shown: it holds the password."
    )


def scrub(text: str, dsn: str) -> str:
    """`text` without the DSN or its password, whatever quoting they came in."""
    password = str(dsn_params(dsn).get("password") or "")
    for secret in sorted({dsn, password}, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def conninfo(dsn: str, database: str | None = None) -> tuple[str, str | None]:
    """(conninfo without the password, password) for `database` (default: the DSN's)."""
    params = dsn_params(dsn)
    password = params.pop("password", None)
    if database is not None:
        params["dbname"] = database
    return make_conninfo("", **params), str(password) if password is not None else None


def describe_database(database: str | None = None) -> str:
    """`complianceagent on 10.0.0.5:5432` — where a database is, without credentials."""
    params = dsn_params(database_dsn())
    name = database or str(params.get("dbname") or params.get("user"))
    return f"{name} on {params.get('host', 'localhost')}:{params.get('port', '5432')}"


@contextlib.contextmanager
def connect(database: str | None = None, **kwargs: Any) -> Iterator[psycopg.Connection[Any]]:
    """A connection to `database` (default: the application's), errors scrubbed."""
    dsn = database_dsn()
    info, password = conninfo(dsn, database)
    try:
        with psycopg.connect(info, password=password, application_name="runbook", **kwargs) as conn:
            yield conn
    except psycopg.OperationalError as exc:
        raise PlatformCallError(scrub(f"PostgreSQL: {exc}", dsn), transient=True) from None


def _maintenance() -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
    """Autocommit connection to the maintenance database, for CREATE/DROP/ALTER DATABASE."""
    return connect(load_settings().postgres_maintenance_database, autocommit=True)


def server_version() -> dict[str, Any]:
    """`SHOW server_version`: `{"version": "15.18 (Debian …)", "num": 150018}`."""
    with connect() as conn:
        version = conn.execute("SHOW server_version").fetchone()
        number = conn.execute("SHOW server_version_num").fetchone()
    assert version is not None and number is not None
    return {"version": str(version[0]), "num": int(number[0])}


def table_row_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """`SELECT count(*)` of every table pg_dump dumps, on `conn` (in its snapshot)."""
    counts = {}
    for schema, table in conn.execute(_TABLES).fetchall():
        query = sql.SQL("SELECT count(*) FROM ONLY {}.{}").format(
            sql.Identifier(schema), sql.Identifier(table)
        )
        row = conn.execute(query).fetchone()
        counts[f"{schema}.{table}"] = int(row[0]) if row else 0
    return counts


def schema_version(conn: psycopg.Connection[Any]) -> str | None:
    """alembic's version(s) on `conn`, None if the table is not there."""
    found = conn.execute("SELECT to_regclass('public.alembic_version')").fetchone()
    if not found or found[0] is None:
        return None
    rows = conn.execute("SELECT version_num FROM public.alembic_version").fetchall()
    return ",".join(sorted(str(r[0]) for r in rows)) or None


# --- tasks ------------------------------------------------------------------------------------


@task(**TRANSIENT_RETRIES)
def read_server_version() -> dict[str, Any]:
    """`SHOW server_version`: `{"version": "15.18 (Debian …)", "num": 150018}`."""
    return server_version()


@task(**TRANSIENT_RETRIES, task_run_name="count rows in {database}")
def count_rows(database: str) -> dict[str, int]:
    """`SELECT count(*)` of every table of `database`: `{"schema.table": rows}`."""
    with connect(database) as conn:
        return table_row_counts(conn)


@task(**TRANSIENT_RETRIES, task_run_name="read schema version of {database}")
def read_schema_version(database: str) -> str | None:
    """`SELECT version_num FROM alembic_version` (None if the table is not there)."""
    with connect(database) as conn:
        return schema_version(conn)


@task(**TRANSIENT_RETRIES, task_run_name="create database {name}")
def create_database(name: str, like: str) -> str:
    """`CREATE DATABASE name` with the encoding and collation of database `like`.

    From template0, so nothing a template1 may hold gets mixed into a restore.
    """
    with _maintenance() as conn:
        row = conn.execute(
            "SELECT pg_encoding_to_char(encoding), datcollate, datctype"
            " FROM pg_database WHERE datname = %s",
            (like,),
        ).fetchone()
        if row is None:
            raise PlatformCallError(f"create database {name}: there is no database {like}")
        encoding, collate, ctype = row
        conn.execute(
            sql.SQL(
                "CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}"
            ).format(sql.Identifier(name), encoding, collate, ctype)
        )
    return name


@task(**TRANSIENT_RETRIES, task_run_name="drop database {name}")
def drop_database(name: str) -> bool:
    """`DROP DATABASE IF EXISTS name WITH (FORCE)`. Already gone counts as done (False).

    Refuses the application database itself, whatever the caller meant.
    """
    if name == load_settings().database_name:
        raise PlatformCallError(f"drop database {name}: refusing to drop the live database")
    with _maintenance() as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
    return exists is not None


@task(task_run_name="swap in {scratch} as {live}, keep the old one as {keep_as}")
def swap_databases(live: str, scratch: str, keep_as: str, wait_seconds: float = 30) -> None:
    """Make `scratch` the live database and keep the old one as `keep_as`, atomically.

    1. `ALTER DATABASE live ALLOW_CONNECTIONS false`: nobody new gets in;
    2. end every session on `live` and `scratch` (the backend is already scaled to 0);
    3. in one transaction, `live` → `keep_as` and `scratch` → `live`.
    If anything fails, `live` is open again and still the old one. Not retried: the
    restore flow's cleanup must see the failure, not a second attempt.
    """
    logger = run_logger()
    with _maintenance() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(live))
        )
        try:
            # Inside the try: a SIGTERM here (a cancel) must open the live database again.
            fault_point("restore: connections refused")
            give_up_at = time.monotonic() + wait_seconds
            while True:
                ended = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
                    ([live, scratch],),
                ).fetchone()
                if ended and ended[0]:
                    logger.info("ended %d sessions on %s/%s", ended[0], live, scratch)
                try:
                    with conn.transaction():
                        for old, new in ((live, keep_as), (scratch, live)):
                            conn.execute(
                                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                                    sql.Identifier(old), sql.Identifier(new)
                                )
                            )
                        conn.execute(
                            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                                sql.Identifier(keep_as)
                            )
                        )
                    return
                except psycopg.errors.ObjectInUse:
                    # A session was still ending; try again until wait_seconds.
                    if time.monotonic() > give_up_at:
                        raise
                    time.sleep(0.2)
        except BaseException:
            conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(live))
            )
            raise


# --- disk usage (the restore's free-space check) ---------------------------------------


@task(**TRANSIENT_RETRIES)
def read_database_sizes() -> dict[str, int | None]:
    """`pg_database_size` of every database on the server (None where we may not connect)."""
    with connect() as conn:
        rows = conn.execute(
            "SELECT datname, CASE WHEN has_database_privilege(oid, 'CONNECT')"
            " THEN pg_database_size(oid) END FROM pg_database ORDER BY datname"
        ).fetchall()
    return {str(name): None if size is None else int(size) for name, size in rows}


@task(**TRANSIENT_RETRIES)
def read_wal_size() -> int | None:
    """Bytes in the server's WAL directory (`pg_ls_waldir()`); None if we may not read it
    (it needs superuser or pg_monitor)."""
    with connect() as conn:
        try:
            row = conn.execute("SELECT coalesce(sum(size), 0) FROM pg_ls_waldir()").fetchone()
        except psycopg.errors.InsufficientPrivilege:
            return None
    return int(row[0]) if row else None


# --- reconcile (a restore that died between "refuse connections" and the swap) ----------


@task(**TRANSIENT_RETRIES, task_run_name="allow connections to database {name}")
def allow_connections(name: str) -> bool:
    """`ALTER DATABASE name ALLOW_CONNECTIONS true` if it refuses them: True if it did,
    False if it already accepted them or does not exist (safe to run twice)."""
    with _maintenance() as conn:
        row = conn.execute(
            "SELECT datallowconn FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if row is None or row[0]:
            return False
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name))
        )
    return True
