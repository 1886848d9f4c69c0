"""Connection pool exhaustion: how full `max_connections` is, how full the application's
pool is (what the DatabaseConnections alerts judge), and which sessions may be ended. Pure,
over rows of `pg_stat_activity` and two Prometheus numbers as plain data.

Two limits, because either runs out first: PostgreSQL refuses the 101st client of
`max_connections = 100`, and the backend's pool (20 in the sandbox) makes requests wait
long before that. The alert divides by the pool, so a diagnosis judging only
`max_connections` would say "ok" while the alert that started it fires; the level is the
worse of the two.

The page's remedy is

    SELECT pg_terminate_backend(pid) FROM pg_stat_activity
    WHERE state = 'idle' AND query_start < now() - interval '10 minutes';

which would also end our own session, superuser and replication sessions, and misses the
worst holders of a pool, `idle in transaction` (they also hold locks). Here only client
backends idle (or idle in transaction) for longer than the threshold — measured from
`state_change`, when they went idle, not from `query_start` — are chosen; never our own
session, a superuser's or a replication role's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from runbook.decisions.diagnostics import (
    DB_CONNECTIONS_PERCENT,
    Level,
    Proposal,
    human_seconds,
    worst,
)

IDLE_STATES = frozenset({"idle", "idle in transaction", "idle in transaction (aborted)"})
CLIENT_BACKEND = "client backend"
# One plan ends at most this many sessions; a second run can take the rest.
MAX_TERMINATIONS = 100


@dataclass(frozen=True)
class Session:
    """A row of pg_stat_activity. `state` is None when the server hides it from us (another
    role's session, without pg_read_all_stats)."""

    pid: int
    user: str | None
    application: str
    client: str | None
    backend_type: str
    state: str | None
    backend_start: str
    idle_seconds: float | None
    superuser: bool = False
    replication: bool = False
    ours: bool = False
    database: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Session:
        return cls(**row)


@dataclass(frozen=True)
class ConnectionUsage:
    by_state: dict[str, int]
    total: int
    max_connections: int
    reserved: int
    percent: float
    level: Level

    @property
    def summary(self) -> str:
        return (
            f"{self.total} of {self.max_connections} connections in use ({self.percent:.0f}%, "
            f"{self.reserved} reserved for superusers)"
        )


@dataclass(frozen=True)
class PoolUsage:
    """The alert's own numbers: `max(db_connections)` over `max(db_connection_pool_size)`
    (None: Prometheus had no sample of one of them)."""

    connections: int | None
    pool_size: int | None
    percent: float | None
    level: Level

    @property
    def summary(self) -> str:
        if self.percent is None:
            return "the application's pool: not measured (no db_connections or pool size)"
        return (
            f"{self.connections} of the application's pool of {self.pool_size} "
            f"({self.percent:.0f}%)"
        )


def pool_usage(connections: float | None, pool_size: float | None) -> PoolUsage:
    """The DatabaseConnections alerts' ratio, judged by the same Key Metrics row (> 80 %
    warning, > 95 % critical). A missing sample, or a pool size of 0, is unknown."""
    if connections is None or pool_size is None or pool_size <= 0:
        return PoolUsage(
            connections=None if connections is None else round(connections),
            pool_size=None if pool_size is None else round(pool_size),
            percent=None,
            level=Level.UNKNOWN,
        )
    percent = 100.0 * connections / pool_size
    return PoolUsage(
        connections=round(connections),
        pool_size=round(pool_size),
        percent=percent,
        level=DB_CONNECTIONS_PERCENT.level(percent),
    )


def connections_level(usage: ConnectionUsage, pool: PoolUsage | None) -> Level:
    """The worse of `max_connections`' and the pool's levels (the pool's is not known
    without Prometheus: then `max_connections`' alone)."""
    return usage.level if pool is None else worst(usage.level, pool.level)


def connection_usage(
    sessions: list[Session], max_connections: int, reserved: int
) -> ConnectionUsage:
    """Sessions by state vs `max_connections`. Only client backends count against the pool
    (background workers, autovacuum and walsenders have their own slots)."""
    clients = [s for s in sessions if s.backend_type == CLIENT_BACKEND]
    by_state = Counter(s.state or "hidden" for s in clients)
    usable = max(1, max_connections - reserved)
    percent = 100.0 * len(clients) / usable
    return ConnectionUsage(
        by_state=dict(sorted(by_state.items())),
        total=len(clients),
        max_connections=max_connections,
        reserved=reserved,
        percent=percent,
        level=DB_CONNECTIONS_PERCENT.level(percent),
    )


def spare_reason(session: Session, threshold_seconds: float) -> str | None:
    """Why `session` must not be ended (None: it may be)."""
    if session.ours:
        return "our own session"
    if session.superuser:
        return "superuser session"
    if session.replication:
        return "replication role"
    if session.state is None:
        return "hidden from us (another role's session; needs pg_read_all_stats)"
    if session.backend_type != CLIENT_BACKEND:
        return f"not a client backend ({session.backend_type})"
    if session.state not in IDLE_STATES:
        return f"{session.state}"
    if session.idle_seconds is None or session.idle_seconds <= threshold_seconds:
        idle = human_seconds(session.idle_seconds or 0)
        return f"{session.state} for only {idle}"
    return None


def sessions_to_end(
    sessions: list[Session], threshold_seconds: float
) -> tuple[list[Session], list[tuple[Session, str]]]:
    """(sessions to end, longest idle first and at most MAX_TERMINATIONS; idle sessions
    spared, with why). Busy sessions are neither: they are simply not candidates."""
    chosen: list[Session] = []
    spared: list[tuple[Session, str]] = []
    for session in sessions:
        reason = spare_reason(session, threshold_seconds)
        if reason is None:
            chosen.append(session)
        elif session.state in IDLE_STATES or session.ours or session.superuser:
            spared.append((session, reason))
    chosen.sort(key=lambda s: -(s.idle_seconds or 0))
    return chosen[:MAX_TERMINATIONS], spared


def session_line(s: Session) -> str:
    return (
        f"pid {s.pid}: {s.user or '?'} / {s.application or '-'} from {s.client or 'local'}, "
        f"{s.state} for {human_seconds(s.idle_seconds or 0)} (started {s.backend_start})"
    )


def propose_terminations(
    chosen: list[Session],
    threshold_seconds: float,
    database: str,
    usage: ConnectionUsage,
    pool: PoolUsage | None = None,
) -> Proposal | None:
    """End exactly the chosen sessions, each only if it is still the same session
    (same pid and backend_start) and still idle when the approval comes."""
    if not chosen:
        return None
    in_transaction = sum(1 for s in chosen if s.state != "idle")
    pool_facts = {"application's pool": pool.summary} if pool is not None else {}
    return Proposal(
        kind="terminate-idle-sessions",
        title=f"End {len(chosen)} sessions idle over {human_seconds(threshold_seconds)} "
        f"on {database}",
        reason=(
            (f"{pool.summary}; " if pool is not None else "")
            + f"{usage.summary}; {len(chosen)} client sessions idle longer than "
            f"{human_seconds(threshold_seconds)} ({in_transaction} of them in a transaction)"
        ),
        target=f"database/{database}",
        steps=tuple(f"pg_terminate_backend — {session_line(s)}" for s in chosen),
        facts={
            **pool_facts,
            "connections": usage.summary,
            "sessions to end": str(len(chosen)),
            "idle threshold": human_seconds(threshold_seconds),
            "what is lost": "their open transactions are rolled back; the clients reconnect",
            "each only if": "same pid and backend_start, and still idle",
        },
        action={"sessions": [{"pid": s.pid, "backend_start": s.backend_start} for s in chosen]},
    )


def termination_check(
    planned: list[dict[str, Any]], live: dict[int, dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """(sessions still as planned, {pid: why it is left alone}) — `live` is what
    pg_stat_activity says now about the planned pids (pid → backend_start, state)."""
    ready, skipped = [], {}
    for item in planned:
        now = live.get(item["pid"])
        if now is None:
            skipped[item["pid"]] = "already gone"
        elif now["backend_start"] != item["backend_start"]:
            skipped[item["pid"]] = "a different session now has this pid"
        elif now["state"] not in IDLE_STATES:
            skipped[item["pid"]] = f"busy now ({now['state']})"
        else:
            ready.append(item)
    return ready, skipped
