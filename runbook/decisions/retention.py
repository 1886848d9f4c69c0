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
