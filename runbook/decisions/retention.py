"""Which backups to keep: the newest one of each of the last N days and M weeks that have
a backup (the rule restic and borg call `--keep-daily N --keep-weekly M`); delete the rest.

Days and ISO weeks are UTC. Only complete backups (with a manifest) are kept; an
incomplete one is the remains of a backup that died, and is deleted — the caller holds
the database's lock, so no backup is in progress while this is applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from runbook.decisions.backups import BackupEntry

# What the nightly schedule keeps. Asking for less deletes backups these would keep,
# and that needs an approval (`deleted_beyond_defaults`).
DEFAULT_KEEP_DAILY = 7
DEFAULT_KEEP_WEEKLY = 4


@dataclass(frozen=True)
class RetentionPlan:
    keep: tuple[BackupEntry, ...]
    delete: tuple[BackupEntry, ...]
    # backup id → why it is kept or deleted, for the run's report
    reasons: dict[str, str]

    @property
    def keys_to_delete(self) -> tuple[str, ...]:
        return tuple(key for entry in self.delete for key in entry.keys)


def plan_retention(
    entries: Iterable[BackupEntry], keep_daily: int, keep_weekly: int
) -> RetentionPlan:
    """Split `entries` into those to keep and those to delete.

    `keep_daily` ≥ 1 so the newest complete backup is always kept, whatever else.
    """
    if keep_daily < 1:
        raise ValueError("keep_daily must be at least 1: the newest backup is always kept")
    if keep_weekly < 0:
        raise ValueError("keep_weekly must not be negative")
    entries = sorted(entries, key=lambda e: e.backup_id, reverse=True)
    reasons: dict[str, list[str]] = {}
    days: list[str] = []
    weeks: list[str] = []
    for entry in (e for e in entries if e.complete):
        day = entry.taken_at.strftime("%Y-%m-%d")
        if day not in days and len(days) < keep_daily:
            days.append(day)
            reasons.setdefault(entry.backup_id, []).append(f"newest of day {day}")
        year, week, _ = entry.taken_at.isocalendar()
        week_name = f"{year}-W{week:02d}"
        if week_name not in weeks and len(weeks) < keep_weekly:
            weeks.append(week_name)
            reasons.setdefault(entry.backup_id, []).append(f"newest of week {week_name}")

    keep = tuple(e for e in entries if e.backup_id in reasons)
    delete = tuple(e for e in entries if e.backup_id not in reasons)
    why = {backup_id: "keep: " + ", ".join(r) for backup_id, r in reasons.items()}
    for entry in delete:
        why[entry.backup_id] = (
            "delete: beyond retention" if entry.complete else f"delete: {entry.state}"
        )
    return RetentionPlan(keep, delete, why)


def deleted_beyond_defaults(
    entries: Iterable[BackupEntry], plan: RetentionPlan
) -> tuple[BackupEntry, ...]:
    """The backups `plan` deletes that the default retention would keep (empty: no
    approval needed). Incomplete backups never count: the defaults delete them too."""
    default = plan_retention(entries, DEFAULT_KEEP_DAILY, DEFAULT_KEEP_WEEKLY)
    kept_by_default = {e.backup_id for e in default.keep}
    return tuple(e for e in plan.delete if e.backup_id in kept_by_default)


@dataclass(frozen=True)
class RetentionApproval:
    """What the approver of an unusually strict retention sees."""

    title: str
    target: str
    steps: tuple[str, ...]
    facts: dict[str, str]


def retention_approval(
    database: str,
    plan: RetentionPlan,
    beyond: tuple[BackupEntry, ...],
    keep_daily: int,
    keep_weekly: int,
) -> RetentionApproval:
    return RetentionApproval(
        title=f"Delete {len(plan.delete)} backups of {database}",
        target=f"backups/{database}",
        steps=(
            *(f"Delete backup {e.backup_id} ({plan.reasons[e.backup_id]})" for e in plan.delete),
            f"Keep {', '.join(e.backup_id for e in plan.keep) or 'nothing'}",
        ),
        facts={
            "asked for": f"keep_daily={keep_daily}, keep_weekly={keep_weekly}",
            "defaults": f"keep_daily={DEFAULT_KEEP_DAILY}, keep_weekly={DEFAULT_KEEP_WEEKLY}",
            "the defaults would keep": ", ".join(e.backup_id for e in beyond),
        },
    )
