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
