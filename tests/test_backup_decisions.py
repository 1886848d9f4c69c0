"""Backup names, selection, manifests and row-count checks, judged on literal data."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from runbook.decisions.backups import (
    BackupNotFound,
    Compression,
    InvalidManifest,
    Manifest,
    archive_problem,
    backup_id_for,
    catalogue,
    dated_database_name,
    dump_key,
    human_age,
    human_size,
    parse_manifest,
    row_count_problems,
    select_backup,
)
from runbook.decisions.refusal import Refused
from runbook.decisions.restore import (
    DiskSpace,
    LiveState,
    NotEnoughSpace,
    RestoreOutcome,
    outcome_report,
    parse_quantity,
    plan_restore,
    schema_problem,
    space_problem,
    volume_capacity,
)

PREFIX = "postgres/complianceagent/"
A = "20261101T020000.000001Z"
B = "20261102T020000.000001Z"
C = "20261103T020000.000001Z"


def listing(*keys: str) -> list[dict]:
    return [{"key": PREFIX + k, "size": 1000} for k in keys]


def test_names():
    at = dt.datetime(2026, 11, 3, 2, 0, 0, 482113, tzinfo=dt.UTC)
    assert backup_id_for(at) == "20261103T020000.482113Z"
    assert (
        dump_key("postgres/", "complianceagent", "20261103T020000.482113Z", Compression.ZSTD)
        == "postgres/complianceagent/20261103T020000.482113Z.dump.zst"
    )
    assert (
        dated_database_name("complianceagent", "pre_restore", at)
        == "complianceagent_pre_restore_20261103t020000z"
    )
    long = dated_database_name("x" * 80, "pre_restore", at)
    assert len(long) == 63 and long.endswith("_pre_restore_20261103t020000z")


def test_catalogue_pairs_archives_with_their_manifests():
    entries = catalogue(
        [
            *listing(
                f"{A}.dump.zst",
                f"{A}.dump.zst.manifest.json",
                f"{B}.dump",  # gzip, complete
                f"{B}.dump.manifest.json",
                f"{C}.dump.zst",  # no manifest: died before it
                "notes.txt",  # not ours: ignored, never deleted
                "other/20261101T020000.000001Z.dump",  # a deeper folder: not this database
            ),
            {"key": "elsewhere/x.dump", "size": 1},
        ],
        PREFIX,
    )
    assert [(e.backup_id, e.complete) for e in entries] == [(A, True), (B, True), (C, False)]
    assert entries[2].state == "incomplete: no manifest"


def test_a_manifest_counts_only_for_the_archive_it_is_named_after():
    (entry,) = catalogue(listing(f"{A}.dump.zst", f"{A}.dump.manifest.json"), PREFIX)
    assert not entry.complete


def test_latest_is_the_newest_complete_backup():
    entries = catalogue(
        listing(
            f"{A}.dump.zst",
            f"{A}.dump.zst.manifest.json",
            f"{B}.dump.zst",
            f"{B}.dump.zst.manifest.json",
            f"{C}.dump.zst",
        ),
        PREFIX,
    )
    assert select_backup(entries, "latest").backup_id == B
    assert select_backup(entries, A).backup_id == A


@pytest.mark.parametrize(
    ("keys", "wanted", "message"),
    [
        ((), "latest", "there is no complete backup to restore"),
        ((f"{C}.dump.zst",), "latest", r"no complete backup to restore \(1 incomplete"),
        ((f"{C}.dump.zst",), C, "is incomplete: no manifest; it cannot be restored"),
        ((f"{A}.dump", f"{A}.dump.manifest.json"), B, f"no backup {B}; newest complete ones: {A}"),
    ],
)
def test_what_cannot_be_restored_is_named(keys, wanted, message):
    with pytest.raises(BackupNotFound, match=message):
        select_backup(catalogue(listing(*keys), PREFIX), wanted)


def manifest(**overrides) -> Manifest:
    fields = {
        "backup_id": A,
        "database": "complianceagent",
        "archive_key": PREFIX + f"{A}.dump.zst",
        "compression": Compression.ZSTD,
        "size_bytes": 1234,
        "dump_bytes": 5678,
        "sha256": "ab" * 32,
        "started_at": dt.datetime(2026, 11, 1, 2, 0, tzinfo=dt.UTC),
        "finished_at": dt.datetime(2026, 11, 1, 2, 5, tzinfo=dt.UTC),
        "server_version": "15.18",
        "server_version_num": 150018,
        "pg_dump_version": "pg_dump (PostgreSQL) 15.18",
        "snapshot": "00000003-0000001B-1",
        "row_counts": {"public.users": 25, "public.organizations": 3},
        "schema_version": "3f2a9c1d7e10",
    }
    return Manifest(**{**fields, **overrides})


def test_manifest_round_trip():
    original = manifest()
    assert parse_manifest(original.to_json(), original.archive_key) == original
    assert original.total_rows == 28


def document(**changes) -> str:
    data = json.loads(manifest().to_json())
    for name, value in changes.items():
        if value is None:
            data.pop(name)
        else:
            data[name] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "manifest is not JSON"),
        ("[]", "not a JSON object"),
        (document(format="other/2"), "unknown manifest format"),
        (document(sha256=None), "manifest has no 'sha256'"),
        (document(sha256="xyz"), "not a SHA-256 digest"),
        (document(size_bytes="12"), "'size_bytes' has a wrong type"),
        (document(size_bytes=0), "the archive is empty"),
        (document(compression="lz4"), "unknown compression 'lz4'"),
        (document(archive_key="postgres/other/x.dump"), "manifest describes"),
        (document(row_counts={"public.users": -1}), "is not a count"),
        (document(started_at="yesterday"), "is not a time"),
        (document(finished_at="2026-10-01T00:00:00+00:00"), "finished_at is before started_at"),
    ],
)
def test_bad_manifests_are_refused_naming_what_is_wrong(text, message):
    with pytest.raises(InvalidManifest, match=message):
        parse_manifest(text, manifest().archive_key)


def test_archive_problem():
    m = manifest()
    assert archive_problem(m, 1234, "ab" * 32) == ""
    assert archive_problem(m, 1000, "ab" * 32) == (
        "archive is 1000 bytes, the manifest says 1234 (truncated)"
    )
    assert "archive SHA-256 is cdcdcdcdcdcdcdcd…" in archive_problem(m, 1234, "cd" * 32)


def test_row_count_problems():
    expected = {"public.a": 3, "public.b": 5, "public.c": 0}
    assert row_count_problems(expected, dict(expected)) == []
    assert row_count_problems(expected, {"public.a": 3, "public.b": 4, "public.d": 1}) == [
        "public.b: 4 rows, manifest says 5",
        "public.c: missing (manifest: 0 rows)",
        "public.d: not in the backup (1 rows)",
    ]


def test_for_people():
    assert human_size(512) == "512 B"
    assert human_size(5 * 1024 * 1024) == "5.0 MiB"
    assert human_size(3 * 1024**4) == "3072.0 GiB"
    assert human_age(dt.timedelta(days=2, hours=3, minutes=4)) == "2 d 3 h"
    assert human_age(dt.timedelta(hours=3, minutes=12)) == "3 h 12 min"
    assert human_age(dt.timedelta(seconds=40)) == "40 s"


# --- restore: disk space, schema version, plan, and the true outcome --------------------

GiB = 2**30


def statefulset(storage: str | None = "10Gi", mount: str = "/var/lib/postgresql/data") -> dict:
    claim: dict = {"metadata": {"name": "data"}, "spec": {"resources": {"requests": {}}}}
    if storage is not None:
        claim["spec"]["resources"]["requests"]["storage"] = storage
    return {
        "metadata": {"name": "postgres"},
        "spec": {
            "template": {
                "spec": {"containers": [{"volumeMounts": [{"name": "data", "mountPath": mount}]}]}
            },
            "volumeClaimTemplates": [claim, {"metadata": {"name": "logs"}}],
        },
    }


@pytest.mark.parametrize(
    ("text", "size"),
    [("10Gi", 10 * GiB), ("500M", 500 * 10**6), ("1e9", 10**9), ("1048576", 2**20),
     ("1.5Gi", 3 * GiB // 2)],
)  # fmt: skip
def test_storage_quantities(text, size):
    assert parse_quantity(text) == size


def test_a_storage_quantity_that_is_none_is_refused():
    with pytest.raises(ValueError, match="not a storage quantity"):
        parse_quantity("10 gigs")


def test_volume_capacity_is_the_claim_mounted_as_pgdata():
    assert volume_capacity(statefulset("10Gi")) == (
        10 * GiB,
        "statefulset/postgres claim data: 10Gi",
    )
    # Two claims, neither mounted where PGDATA lives: no guessing.
    assert volume_capacity(statefulset("10Gi", mount="/srv"))[0] is None
    assert volume_capacity(statefulset(None)) == (
        None,
        "statefulset/postgres claim data requests no storage",
    )
    assert volume_capacity({"metadata": {"name": "postgres"}, "spec": {}}) == (
        None,
        "statefulset/postgres has no volumeClaimTemplates",
    )


def space(capacity: int | None, wal: int | None = 1 * GiB, **sizes: int | None) -> DiskSpace:
    return DiskSpace(
        capacity=capacity,
        capacity_source="statefulset/postgres claim data: 10Gi",
        database_sizes=sizes or {"app": 3 * GiB, "postgres": 8 * 2**20},
        wal_bytes=wal,
        live_database="app",
        dump_bytes=1 * GiB,
    )


def test_free_space_is_capacity_minus_every_database_and_wal():
    fits = space(10 * GiB)
    assert fits.used == 4 * GiB + 8 * 2**20
    assert fits.needed == int(3 * GiB * 1.2)
    assert fits.available == 6 * GiB - 8 * 2**20
    assert fits.enough and space_problem(fits) == ""


def test_not_enough_space_is_refused_with_the_numbers():
    tight = space(7 * GiB)  # 7 - 4 GiB used = ~3 GiB free, 3.6 GiB needed
    assert tight.enough is False
    problem = space_problem(tight)
    assert problem.startswith("not enough disk for a second copy of app: 3.0 GiB free")
    assert f"({tight.available} bytes), ≈ 3.6 GiB needed ({tight.needed} bytes)" in problem
    assert problem.endswith("nothing was changed")


def test_the_archive_counts_when_it_is_larger_than_the_live_database():
    # A live database emptied by accident is what one restores; the archive is the size.
    assert space(10 * GiB, app=1, postgres=1).needed == int(1 * GiB * 1.2)


def test_unknown_capacity_or_sizes_are_said_not_guessed():
    unknown = space(None, wal=None, app=3 * GiB, other=None)
    assert unknown.enough is None and space_problem(unknown) == ""
    text = unknown.describe()
    assert text.startswith("not checked: volume capacity unknown")
    assert "RUNBOOK_POSTGRES_VOLUME_BYTES" in text
    assert "WAL not readable; size unknown: other" in text


@pytest.mark.parametrize(
    ("backup", "live", "allowed", "refused"),
    [("a1", "a1", False, False), ("a1", "b2", False, True), ("a1", "b2", True, False),
     (None, "b2", False, True), (None, None, False, False)],
)  # fmt: skip
def test_a_schema_change_needs_the_operators_tick(backup, live, allowed, refused):
    assert bool(schema_problem(backup, live, allowed)) is refused


AT = dt.datetime(2026, 11, 5, 9, 30, tzinfo=dt.UTC)


def live_state(schema: str | None = "3f2a9c1d7e10", capacity: int | None = 10 * GiB) -> LiveState:
    return LiveState(
        database="complianceagent",
        location="complianceagent on 10.0.0.5:5432",
        replicas={"backend": 3, "celery-workers": 4},
        schema_version=schema,
        space=space(capacity),
    )


def test_the_plan_shows_what_the_approver_judges_by():
    plan = plan_restore(manifest(), 2, live_state(), False, AT)
    assert plan.title == f"Restore database complianceagent from backup {A}"
    assert plan.scratch == "complianceagent_restore_20261105t093000z"
    assert plan.keep_as == "complianceagent_pre_restore_20261105t093000z"
    assert plan.facts["schema version"] == "backup 3f2a9c1d7e10, live 3f2a9c1d7e10"
    assert plan.facts["disk space"].startswith("6.0 GiB free of 10.0 GiB")
    # pg_restore first, with the writers running; then stop them for the check and swap.
    assert plan.steps[0].startswith(f"Create database {plan.scratch} and pg_restore")
    assert plan.steps[1] == "Stop the writers: scale deployment/backend (3 → 0), " + (
        "deployment/celery-workers (4 → 0)"
    )


def test_the_plan_refuses_a_schema_change_unless_allowed():
    with pytest.raises(Refused, match=r"^allow_schema_change: the backup's schema version"):
        plan_restore(manifest(), 2, live_state(schema="a7e3f09b12c4"), False, AT)
    allowed = plan_restore(manifest(), 2, live_state(schema="a7e3f09b12c4"), True, AT)
    assert allowed.facts["schema version"] == (
        "backup 3f2a9c1d7e10, live a7e3f09b12c4 — DIFFERENT; allowed by the operator "
        "(allow_schema_change)"
    )


def test_the_plan_refuses_a_copy_the_disk_cannot_hold():
    with pytest.raises(NotEnoughSpace, match="not enough disk"):
        plan_restore(manifest(), 2, live_state(capacity=5 * GiB), False, AT)


def outcome(**changes) -> RestoreOutcome:
    done = RestoreOutcome(
        "complianceagent", plan=plan_restore(manifest(), 2, live_state(), False, AT)
    )
    for name, value in changes.items():
        setattr(done, name, value)
    return done


def test_outcome_refused_before_any_change():
    report = outcome_report(
        RestoreOutcome("complianceagent", error="backup X: manifest is not JSON")
    )
    assert report.headline == "Restore of complianceagent refused: backup X: manifest is not JSON"
    assert not report.ok


def test_outcome_success_says_where_the_old_database_is():
    report = outcome_report(
        outcome(
            scratch_created=True,
            stopped=["backend", "celery-workers"],
            scaled_back={"backend": 3, "celery-workers": 4},
            swapped=True,
            health="",
        )
    )
    assert report.ok
    assert report.headline.startswith(f"Restored complianceagent from backup {A} (")
    assert "kept as complianceagent_pre_restore_20261105t093000z" in report.headline
    assert report.headline.endswith("Writers scaled back: backend to 3, celery-workers to 4.")


def test_outcome_failure_before_the_swap_with_a_writer_not_scaled_back():
    report = outcome_report(
        outcome(
            scratch_created=True,
            stopped=["backend", "celery-workers"],
            scaled_back={"celery-workers": 4},
            not_scaled_back={"backend": "HTTP 403"},
            error="rows differ",
        )
    )
    assert report.headline == (
        f"Restore of complianceagent from backup {A} failed: rows differ. The live database "
        "was not changed. NOT scaled back: deployment/backend (scale it to 3 by hand: "
        "HTTP 403). Scaled back: celery-workers to 4."
    )
    assert [w["now"] for w in report.workloads] == [
        "NOT scaled back: HTTP 403",
        "scaled back to 4",
    ]


def test_outcome_failure_after_the_swap_says_it_was_swapped():
    report = outcome_report(
        outcome(
            scratch_created=True,
            stopped=["backend", "celery-workers"],
            scaled_back={"backend": 3, "celery-workers": 4},
            swapped=True,
            health="/health/db: 503",
            error="the health check failed afterwards: /health/db: 503",
        )
    )
    assert "swapped in, but the health check failed afterwards: /health/db: 503" in (
        report.headline
    )
    assert "The database WAS swapped: complianceagent is now the restored backup" in (
        report.headline
    )


def test_outcome_names_a_scratch_database_left_behind():
    report = outcome_report(outcome(scratch_created=True, scratch_left="gone away", error="x"))
    assert "The live database was not changed. The scratch database " in report.headline
    assert "could not be dropped: drop it by hand. No workload was scaled." in report.headline
