"""A database restore as plain data: what is live now, the plan the approver sees, whether
the server has room for it, and what the run really left behind.

The restore flow reads the live state through tasks, hands it here, and acts on the
frozen `RestorePlan` it gets back; on every path it reports the `RestoreOutcome` it
recorded, through `outcome_report`, so the message says what is true, not what was meant.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runbook.decisions.backups import Manifest, dated_database_name, human_age, human_size
from runbook.decisions.refusal import Refused

# The restored copy is about as large as the live database; a margin for what grows
# while it is built (WAL of the restore itself, temporary files of the index builds).
SPACE_HEADROOM = 1.2

# Where PostgreSQL images keep PGDATA: the volume mounted there is the one that fills up.
PGDATA_MOUNT = "/var/lib/postgresql"

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(?:e([0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E))?$")
_FACTORS = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


class NotEnoughSpace(RuntimeError):
    """The database server's volume cannot hold a second copy; nothing was changed."""


# --- disk space ----------------------------------------------------------------------------


def parse_quantity(text: str) -> int:
    """A Kubernetes storage quantity in bytes: `10Gi`, `500M`, `1e9`, `1048576`."""
    match = _QUANTITY.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a storage quantity: {text!r:.40}")
    number, exponent, suffix = match.groups()
    factor = 10 ** int(exponent) if exponent else _FACTORS.get(suffix or "", 1)
    return int(float(number) * factor)


def volume_capacity(statefulset: Mapping[str, Any]) -> tuple[int | None, str]:
    """(bytes, where that came from) of the PostgreSQL data volume a StatefulSet claims.

    The claim template mounted under /var/lib/postgresql wins; failing that, the only
    claim template. None when there is no claim template or no storage request.
    """
    spec: Mapping[str, Any] = statefulset.get("spec") or {}
    metadata: Mapping[str, Any] = statefulset.get("metadata") or {}
    name = metadata.get("name", "?")
    templates = [t for t in spec.get("volumeClaimTemplates") or [] if isinstance(t, Mapping)]
    if not templates:
        return None, f"statefulset/{name} has no volumeClaimTemplates"
    mounted = {
        str(mount.get("name"))
        for container in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        for mount in container.get("volumeMounts") or []
        if str(mount.get("mountPath", "")).startswith(PGDATA_MOUNT)
    }
    chosen = [t for t in templates if (t.get("metadata") or {}).get("name") in mounted]
    if not chosen and len(templates) == 1:
        chosen = templates
    if len(chosen) != 1:
        return None, f"statefulset/{name}: no single claim template holds {PGDATA_MOUNT}"
    claim = chosen[0]
    claim_name = (claim.get("metadata") or {}).get("name", "?")
    storage = (((claim.get("spec") or {}).get("resources") or {}).get("requests") or {}).get(
        "storage"
    )
    if storage is None:
        return None, f"statefulset/{name} claim {claim_name} requests no storage"
    return parse_quantity(str(storage)), f"statefulset/{name} claim {claim_name}: {storage}"


@dataclass(frozen=True)
class DiskSpace:
    """Room on the database server's volume for a second copy of the live database.

    available = capacity - every database's size - WAL; needed = the larger of the live
    database and the backup's archive, times SPACE_HEADROOM. Unknown sizes are left out of
    "used" (and said so); an unknown capacity means the check could not be made.
    """

    capacity: int | None
    capacity_source: str
    database_sizes: Mapping[str, int | None]
    wal_bytes: int | None
    live_database: str
    dump_bytes: int
    headroom: float = SPACE_HEADROOM

    @property
    def used(self) -> int:
        return sum(s for s in self.database_sizes.values() if s is not None) + (self.wal_bytes or 0)

    @property
    def needed(self) -> int:
        live = self.database_sizes.get(self.live_database) or 0
        return int(max(live, self.dump_bytes) * self.headroom)

    @property
    def available(self) -> int | None:
        return None if self.capacity is None else self.capacity - self.used

    @property
    def enough(self) -> bool | None:
        """True/False; None when the capacity is unknown (nothing to judge against)."""
        return None if self.available is None else self.available >= self.needed

    def describe(self) -> str:
        unknown = sorted(n for n, s in self.database_sizes.items() if s is None)
        wal = "WAL not readable" if self.wal_bytes is None else f"WAL {human_size(self.wal_bytes)}"
        used = f"{human_size(self.used)} used ({len(self.database_sizes)} databases, {wal}"
        used += f"; size unknown: {', '.join(unknown)})" if unknown else ")"
        needed = (
            f"needs ≈ {human_size(self.needed)} (live {self.live_database} or the archive, "
            f"whichever is larger, x {self.headroom:g})"
        )
        if self.capacity is None:
            return (
                f"not checked: volume capacity unknown ({self.capacity_source}; set "
                f"RUNBOOK_POSTGRES_VOLUME_BYTES); {needed}; {used}"
            )
        assert self.available is not None
        return (
            f"{human_size(self.available)} free of {human_size(self.capacity)} "
            f"({self.capacity_source}); {needed}; {used}"
        )


def space_problem(space: DiskSpace) -> str:
    """Empty if the restore fits (or cannot be judged); else the refusal, with numbers."""
    if space.enough is not False:
        return ""
    assert space.available is not None
    return (
        f"not enough disk for a second copy of {space.live_database}: "
        f"{human_size(max(space.available, 0))} free ({space.available} bytes), "
        f"≈ {human_size(space.needed)} needed ({space.needed} bytes); "
        + space.describe()
        + "; nothing was changed"
    )


# --- schema version ------------------------------------------------------------------------


def schema_problem(backup: str | None, live: str | None, allowed: bool) -> str:
    """Empty unless the backup's alembic version differs from the live one and the
    operator did not tick `allow_schema_change`."""
    if backup == live or allowed:
        return ""
    return (
        f"the backup's schema version is {backup or 'none'}, the live database's is "
        f"{live or 'none'}: the running backend expects the live one. Tick "
        "allow_schema_change to restore it anyway (then run migrations)"
    )


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveState:
    """What is live before a restore, as read from the platform."""

    database: str
    location: str  # `complianceagent on 10.0.0.5:5432`, no credentials
    replicas: Mapping[str, int]  # writer Deployment → replicas to scale back to
    schema_version: str | None
    space: DiskSpace


@dataclass(frozen=True)
class RestorePlan:
    """Exactly what the restore will do; built once, approved, then acted on."""

    database: str
    manifest: Manifest
    tables: int
    live: LiveState
    scratch: str
    keep_as: str
    planned_at: dt.datetime
    schema_change_allowed: bool

    @property
    def replicas(self) -> Mapping[str, int]:
        return self.live.replicas

    @property
    def title(self) -> str:
        return f"Restore database {self.database} from backup {self.manifest.backup_id}"

    @property
    def target(self) -> str:
        return f"database/{self.database}"

    @property
    def steps(self) -> tuple[str, ...]:
        stop = ", ".join(f"deployment/{n} ({c} → 0)" for n, c in self.replicas.items())
        back = ", ".join(f"deployment/{n} to {c}" for n, c in self.replicas.items())
        return (
            f"Create database {self.scratch} and pg_restore the backup into it "
            "(the writers keep running: nothing reads it yet)",
            f"Stop the writers: scale {stop}",
            f"Check the row count of each of its {len(self.manifest.row_counts)} tables "
            "against the manifest",
            f"In one transaction: rename {self.database} → {self.keep_as}, "
            f"{self.scratch} → {self.database}",
            f"Scale {back}; check health",
            f"If anything fails before the swap: drop {self.scratch}, scale back; "
            f"{self.database} is not touched",
        )

    @property
    def facts(self) -> dict[str, str]:
        manifest, live = self.manifest, self.live
        schema = f"backup {manifest.schema_version or '-'}, live {live.schema_version or '-'}"
        if manifest.schema_version != live.schema_version:
            schema += " — DIFFERENT; allowed by the operator (allow_schema_change)"
        return {
            "backup": manifest.backup_id,
            "taken": f"{manifest.finished_at:%Y-%m-%d %H:%M:%S} UTC, "
            f"{human_age(self.planned_at - manifest.finished_at)} ago",
            "size": f"{human_size(manifest.size_bytes)} stored ({manifest.compression}), "
            f"{human_size(manifest.dump_bytes)} archive",
            "source database": f"{manifest.database} (PostgreSQL {manifest.server_version})",
            "target": live.location,
            "rows in the backup": f"{manifest.total_rows} in {self.tables} tables",
            "schema version": schema,
            "disk space": live.space.describe(),
            "checksum": f"SHA-256 verified ({manifest.sha256[:16]}…)",
            "previous database kept as": self.keep_as,
        }


def plan_restore(
    manifest: Manifest, tables: int, live: LiveState, allow_schema_change: bool, now: dt.datetime
) -> RestorePlan:
    """The plan, or a refusal before anything changes: `Refused` for a schema change the
    operator did not allow, `NotEnoughSpace` when the server cannot hold a second copy."""
    problem = schema_problem(manifest.schema_version, live.schema_version, allow_schema_change)
    if problem:
        raise Refused("allow_schema_change", problem)
    problem = space_problem(live.space)
    if problem:
        raise NotEnoughSpace(problem)
    return RestorePlan(
        database=live.database,
        manifest=manifest,
        tables=tables,
        live=live,
        scratch=dated_database_name(live.database, "restore", now),
        keep_as=dated_database_name(live.database, "pre_restore", now),
        planned_at=now,
        schema_change_allowed=allow_schema_change,
    )


# --- what really happened ------------------------------------------------------------------


@dataclass
class RestoreOutcome:
    """What the restore has done so far, recorded as it happens (not what it meant to do)."""

    database: str
    plan: RestorePlan | None = None
    scratch_created: bool = False
    scratch_left: str = ""  # a scratch database that could not be dropped: its error
    stopped: list[str] = field(default_factory=list)
    scaled_back: dict[str, int] = field(default_factory=dict)
    not_scaled_back: dict[str, str] = field(default_factory=dict)
    swapped: bool = False
    restored_rows: dict[str, int] = field(default_factory=dict)
    health: str | None = None  # None: not checked; "": all checks passed; else the problem
    error: str = ""

    @property
    def changed_anything(self) -> bool:
        return self.scratch_created or bool(self.stopped) or self.swapped


@dataclass(frozen=True)
class OutcomeReport:
    headline: str  # one paragraph: the chat message and the artifact's description
    ok: bool
    workloads: tuple[dict[str, str], ...]


def _database_state(outcome: RestoreOutcome) -> str:
    plan = outcome.plan
    if outcome.swapped and plan is not None:
        return (
            f"The database WAS swapped: {outcome.database} is now the restored backup "
            f"{plan.manifest.backup_id}; the previous one is kept as {plan.keep_as}."
        )
    state = "The live database was not changed."
    if plan is not None and outcome.scratch_left:
        state += f" The scratch database {plan.scratch} could not be dropped: drop it by hand."
    return state


def _replica_state(outcome: RestoreOutcome) -> str:
    if not outcome.stopped:
        return "No workload was scaled."
    back = ", ".join(f"{n} to {c}" for n, c in outcome.scaled_back.items())
    if not outcome.not_scaled_back:
        return f"Writers scaled back: {back}."
    wanted = outcome.plan.replicas if outcome.plan else {}
    failed = "; ".join(
        f"deployment/{n} (scale it to {wanted.get(n, '?')} by hand: {why})"
        for n, why in outcome.not_scaled_back.items()
    )
    return f"NOT scaled back: {failed}." + (f" Scaled back: {back}." if back else "")


def outcome_report(outcome: RestoreOutcome) -> OutcomeReport:
    """The true state of the database and the writers, in words, whatever path the run took."""
    plan = outcome.plan
    source = f" from backup {plan.manifest.backup_id}" if plan else ""
    # No error and swapped: done; health is "" (passed) or None (left to the caller).
    ok = not outcome.error and outcome.swapped and not outcome.health
    if ok and plan is not None:
        manifest = plan.manifest
        headline = (
            f"Restored {outcome.database} from backup {manifest.backup_id} "
            f"({human_size(manifest.size_bytes)}, taken {manifest.finished_at:%Y-%m-%d %H:%M} "
            f"UTC); the previous database is kept as {plan.keep_as}. {_replica_state(outcome)}"
        )
        if outcome.health is None:
            headline += " Health not checked here (the caller checks it)."
    elif not outcome.changed_anything:
        headline = f"Restore of {outcome.database}{source} refused: {outcome.error}"
    elif outcome.swapped and outcome.health:
        headline = (
            f"Restore of {outcome.database}{source} swapped in, but the health check failed "
            f"afterwards: {outcome.health}. {_database_state(outcome)} {_replica_state(outcome)}"
        )
    else:
        headline = (
            f"Restore of {outcome.database}{source} failed: {outcome.error}. "
            f"{_database_state(outcome)} {_replica_state(outcome)}"
        )
    wanted = plan.replicas if plan else {}
    workloads = tuple(
        {
            "deployment": name,
            "replicas before": str(count),
            "now": (
                "not scaled"
                if name not in outcome.stopped
                else f"scaled back to {outcome.scaled_back[name]}"
                if name in outcome.scaled_back
                else f"NOT scaled back: {outcome.not_scaled_back.get(name, 'interrupted')}"
            ),
        }
        for name, count in wanted.items()
    )
    return OutcomeReport(headline=headline, ok=ok, workloads=workloads)
