"""PostgreSQL reads for the Common Issues diagnoses (pg_stat_activity, pg_stat_statements,
max_connections) and the one write, ending sessions. One SQL call (or one short
transaction) each, over `tasks.postgres.connect` (credentials scrubbed from errors).
"""

from __future__ import annotations

from typing import Any

import psycopg
from prefect import task

from runbook.decisions.diagnostics_connections import IDLE_STATES, termination_check
from runbook.settings import load_settings
from tasks.postgres import connect
from tasks.retry_policy import TRANSIENT_RETRIES

# Every session the server shows us, with whether its role is a superuser or may
# replicate (a walsender is not a client backend anyway). `idle_seconds` counts from
# state_change: when the session went idle, not when its last query started.
_SESSIONS = """
SELECT a.pid, a.usename, coalesce(a.application_name, ''), a.client_addr::text,
       coalesce(a.backend_type, ''), a.state, a.backend_start::text,
       extract(epoch FROM now() - a.state_change)::float8,
       coalesce(r.rolsuper, false), coalesce(r.rolreplication, false),
       a.pid = pg_backend_pid(), a.datname
FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid
ORDER BY a.pid
"""
_FIELDS = (
    "pid",
    "user",
    "application",
    "client",
    "backend_type",
    "state",
    "backend_start",
    "idle_seconds",
    "superuser",
    "replication",
    "ours",
    "database",
)
# Ends a planned session only if it is still that session (pid and backend_start) and
# idle, and never ours: checked again in the same statement that ends it.
_TERMINATE = """
SELECT a.pid, pg_terminate_backend(a.pid, %(wait_ms)s)
FROM pg_stat_activity a
JOIN unnest(%(pids)s::int[], %(starts)s::text[]) AS t(pid, started)
  ON a.pid = t.pid AND a.backend_start::text = t.started
WHERE a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
  AND a.state = ANY(%(idle)s)
"""


@task(**TRANSIENT_RETRIES)
def read_sessions() -> list[dict[str, Any]]:
    """`SELECT … FROM pg_stat_activity`: every session, as `Session` fields."""
    with connect() as conn:
        rows = conn.execute(_SESSIONS).fetchall()
    return [dict(zip(_FIELDS, row, strict=True)) for row in rows]


@task(**TRANSIENT_RETRIES)
def read_connection_limits() -> dict[str, int]:
    """`SHOW max_connections` and `superuser_reserved_connections`."""
    with connect() as conn:
        limits = {
            name: int(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("max_connections", "superuser_reserved_connections")
        }
    return limits


@task(**TRANSIENT_RETRIES)
def read_slow_statements(database: str, limit: int = 10) -> dict[str, Any] | None:
    """The page's slow-query check, fixed for PostgreSQL 13+ (`mean_time` became
    `mean_exec_time`): the `limit` statements of `database` with the highest mean
    execution time. pg_stat_statements is cluster-wide; its view is looked for in
    `database`, then in the maintenance database (where a DBA may have created it so that
    dumps of the application database do not carry a superuser-only extension).
    Returns `{"view_in": db, "statements": [...]}`, or None if neither has it."""
    for where in dict.fromkeys([database, load_settings().postgres_maintenance_database]):
        with connect(where) as conn:
            installed = conn.execute(
                "SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'"
            ).fetchone()
            if installed is None:
                continue
            rows = conn.execute(
                "SELECT query, calls, mean_exec_time, total_exec_time FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)"
                " AND query IS NOT NULL ORDER BY mean_exec_time DESC LIMIT %s",
                (database, limit),
            ).fetchall()
        statements = [
            {"query": q, "calls": int(c), "mean_exec_time": float(m), "total_exec_time": float(t)}
            for q, c, m, t in rows
        ]
        return {"view_in": where, "statements": statements}
    return None


@task(task_run_name="end {count} idle sessions")
def terminate_sessions(
    planned: list[dict[str, Any]], count: int, wait_seconds: float = 5
) -> dict[str, Any]:
    """`pg_terminate_backend` for exactly the planned sessions still as planned.

    Each planned `{pid, backend_start}` is ended only if pg_stat_activity still shows that
    pid with that backend_start (not a new session that reused the pid), idle, and not
    ours. Waits up to `wait_seconds` for each to exit. Not retried: a second attempt
    would find them gone and report that instead of what happened.
    Returns `{"terminated": [pid…], "skipped": {pid: why}}`.
    """
    pids = [p["pid"] for p in planned]
    with connect(autocommit=True) as conn:
        live = {
            pid: {"backend_start": started, "state": state}
            for pid, started, state in conn.execute(
                "SELECT pid, backend_start::text, state FROM pg_stat_activity WHERE pid = ANY(%s)",
                (pids,),
            ).fetchall()
        }
        ready, skipped = termination_check(planned, live)
        ended: list[int] = []
        if ready:
            try:
                rows = conn.execute(
                    _TERMINATE,
                    {
                        "wait_ms": int(wait_seconds * 1000),
                        "pids": [p["pid"] for p in ready],
                        "starts": [p["backend_start"] for p in ready],
                        "idle": sorted(IDLE_STATES),
                    },
                ).fetchall()
            except psycopg.errors.InsufficientPrivilege as exc:
                raise RuntimeError(
                    f"pg_terminate_backend refused: {exc.diag.message_primary}; the runbook's "
                    "role needs pg_signal_backend"
                ) from None
            ended = [int(pid) for pid, done in rows if done]
        for item in ready:
            if item["pid"] not in ended:
                skipped.setdefault(item["pid"], "changed just before the termination")
    return {"terminated": ended, "skipped": {str(k): v for k, v in skipped.items()}}
