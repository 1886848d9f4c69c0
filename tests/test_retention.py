"""Retention, judged on literal backup lists: no bucket, no clock."""

from __future__ import annotations

import pytest

from runbook.decisions.backups import BackupEntry
from runbook.decisions.retention import (
    DEFAULT_KEEP_DAILY,
    DEFAULT_KEEP_WEEKLY,
    deleted_beyond_defaults,
    plan_retention,
    retention_approval,
)


def backup(backup_id: str, complete: bool = True) -> BackupEntry:
    key = f"postgres/app/{backup_id}.dump.zst"
    return BackupEntry(backup_id, key, key + ".manifest.json" if complete else None, 100)


# Two a day for ten days: Mon 2 Nov 2026 … Wed 11 Nov 2026 (ISO weeks 45 and 46).
NIGHTLY = [
    backup(f"202611{day:02d}T{hour:02d}0000.000000Z") for day in range(2, 12) for hour in (2, 14)
]


def kept(plan):
    return [e.backup_id for e in plan.keep]


def test_keeps_newest_of_each_recent_day():
    plan = plan_retention(NIGHTLY, keep_daily=3, keep_weekly=0)
    assert kept(plan) == [
        "20261111T140000.000000Z",
        "20261110T140000.000000Z",
        "20261109T140000.000000Z",
    ]
    assert len(plan.delete) == len(NIGHTLY) - 3
    assert plan.reasons["20261111T140000.000000Z"] == "keep: newest of day 2026-11-11"
    assert plan.reasons["20261111T020000.000000Z"] == "delete: beyond retention"


def test_weekly_adds_the_newest_of_older_weeks():
    plan = plan_retention(NIGHTLY, keep_daily=2, keep_weekly=2)
    # Week 46 (9-11 Nov): its newest is already a daily keep; week 45: Sunday 8 Nov 14:00.
    assert kept(plan) == [
        "20261111T140000.000000Z",
        "20261110T140000.000000Z",
        "20261108T140000.000000Z",
    ]
    assert plan.reasons["20261111T140000.000000Z"] == (
        "keep: newest of day 2026-11-11, newest of week 2026-W46"
    )
    assert plan.reasons["20261108T140000.000000Z"] == "keep: newest of week 2026-W45"


def test_days_without_backups_do_not_count():
    # keep_daily counts days that have a backup, not calendar days (as restic does).
    sparse = [backup("20261101T020000.000000Z"), backup("20261120T020000.000000Z")]
    plan = plan_retention(sparse, keep_daily=2, keep_weekly=0)
    assert kept(plan) == ["20261120T020000.000000Z", "20261101T020000.000000Z"]
    assert plan.delete == ()


def test_incomplete_backups_are_deleted_and_never_count_as_kept():
    entries = [
        backup("20261110T020000.000000Z"),
        backup("20261111T020000.000000Z", complete=False),  # died before its manifest
        BackupEntry("20261109T020000.000000Z", None, "postgres/app/x.manifest.json"),
    ]
    plan = plan_retention(entries, keep_daily=7, keep_weekly=4)
    assert kept(plan) == ["20261110T020000.000000Z"]
    assert plan.reasons["20261111T020000.000000Z"] == "delete: incomplete: no manifest"
    assert plan.reasons["20261109T020000.000000Z"] == "delete: incomplete: no archive"
    assert plan.keys_to_delete == (
        "postgres/app/20261111T020000.000000Z.dump.zst",
        "postgres/app/x.manifest.json",
    )


def test_deleting_a_backup_deletes_its_archive_and_its_manifest():
    plan = plan_retention(NIGHTLY[:3], keep_daily=1, keep_weekly=0)
    assert plan.keys_to_delete == (
        "postgres/app/20261102T140000.000000Z.dump.zst",
        "postgres/app/20261102T140000.000000Z.dump.zst.manifest.json",
        "postgres/app/20261102T020000.000000Z.dump.zst",
        "postgres/app/20261102T020000.000000Z.dump.zst.manifest.json",
    )


def test_year_boundary_uses_iso_weeks():
    # 31 Dec 2026 (Thu) and 1 Jan 2027 (Fri) are the same ISO week, 2026-W53.
    entries = [backup("20261231T020000.000000Z"), backup("20270101T020000.000000Z")]
    plan = plan_retention(entries, keep_daily=1, keep_weekly=2)
    assert kept(plan) == ["20270101T020000.000000Z"]
    assert plan.reasons["20270101T020000.000000Z"].endswith("newest of week 2026-W53")


def test_nothing_to_keep_or_delete():
    plan = plan_retention([], keep_daily=7, keep_weekly=4)
    assert plan.keep == () and plan.delete == ()


@pytest.mark.parametrize(("daily", "weekly"), [(0, 4), (1, -1)])
def test_bounds(daily, weekly):
    with pytest.raises(ValueError, match="keep_"):
        plan_retention(NIGHTLY, keep_daily=daily, keep_weekly=weekly)


def test_the_defaults_never_need_an_approval():
    entries = [*NIGHTLY, backup("20261112T020000.000000Z", complete=False)]
    plan = plan_retention(entries, keep_daily=DEFAULT_KEEP_DAILY, keep_weekly=DEFAULT_KEEP_WEEKLY)
    assert plan.delete  # it deletes, and that is what the schedule does every night
    assert deleted_beyond_defaults(entries, plan) == ()


def test_deleting_what_the_defaults_keep_needs_an_approval_listing_it():
    plan = plan_retention(NIGHTLY, keep_daily=1, keep_weekly=0)
    beyond = deleted_beyond_defaults(NIGHTLY, plan)
    # The defaults keep the newest of 7 days and of 2 weeks (W45's newest is 8 Nov 14:00).
    assert [e.backup_id for e in beyond] == [
        f"202611{day:02d}T140000.000000Z" for day in (10, 9, 8, 7, 6, 5)
    ]
    approval = retention_approval("app", plan, beyond, 1, 0)
    assert approval.title == f"Delete {len(NIGHTLY) - 1} backups of app"
    assert approval.steps[0] == "Delete backup 20261111T020000.000000Z (delete: beyond retention)"
    assert approval.steps[-1] == "Keep 20261111T140000.000000Z"
    assert approval.facts["the defaults would keep"].startswith("20261110T140000.000000Z, ")


def test_keeping_more_than_the_defaults_needs_no_approval():
    plan = plan_retention(NIGHTLY, keep_daily=30, keep_weekly=10)
    assert deleted_beyond_defaults(NIGHTLY, plan) == ()
