"""The backup runbook against the sandbox's real PostgreSQL and the moto S3 server.

The failure tests back up a database of their own (`backup_probe`, ~40 MB of random
bytes, several upload parts) so a fault can strike mid-stream; the S3 faults come from a
real TCP proxy between boto3 and moto (`tests/faults.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
import zstandard
from prefect.flow_runs import resume_flow_run
from psycopg.conninfo import make_conninfo

from flows.backup import backup
from runbook.decisions.backups import parse_manifest
from sandbox.platform import BACKUP_BUCKET
from tests.backup_helpers import (
    clear_backups,
    databases,
    objects,
    query,
    stored_by_the_server,
    uploads,
)
from tests.faults import FaultyProxy
from tests.helpers import (
    prefect_rest,
    read_artifacts,
    start_in_thread,
    wait_for_paused_run,
)

pytestmark = pytest.mark.slow

PROBE = "backup_probe"
APPROVE = {"approve": True, "approver": "alice", "reason": "CHG-7"}
REJECT = {"approve": False, "approver": "bob", "reason": "keep them"}


def put_old_backups(platform, old: dict[str, bool]) -> list[str]:
    """Backups as earlier runs left them (complete = with a manifest); returns their keys."""
    s3, keys = platform.s3(), []
    for backup_id, complete in old.items():
        key = f"postgres/complianceagent/{backup_id}.dump.zst"
        s3.put_object(Bucket=BACKUP_BUCKET, Key=key, Body=b"old")
        keys.append(key)
        if complete:
            s3.put_object(Bucket=BACKUP_BUCKET, Key=key + ".manifest.json", Body=b"{}")
            keys.append(key + ".manifest.json")
    return keys


@pytest.fixture
def live(platform):
    clear_backups(platform)
    yield platform
    clear_backups(platform)


@pytest.fixture(scope="module")
def probe_database(sandbox):
    """A database of ~40 MB of incompressible rows: 5+ parts of 8 MiB once compressed."""
    with psycopg.connect(sandbox.postgres.admin_dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {PROBE}")
        admin.execute(f"CREATE DATABASE {PROBE} OWNER {sandbox.postgres.app_user}")
    dsn = make_conninfo(sandbox.postgres.dsn, dbname=PROBE)
    random_hex = " || ".join(["md5(random()::text)"] * 10)
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("CREATE TABLE blobs (id int PRIMARY KEY, payload bytea NOT NULL)")
        db.execute(
            f"INSERT INTO blobs SELECT g, decode({random_hex}, 'hex')"
            " FROM generate_series(1, 125000) g"
        )
    yield dsn
    with psycopg.connect(sandbox.postgres.admin_dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {PROBE} WITH (FORCE)")


@pytest.fixture
def probe(platform, probe_database, monkeypatch):
    """Backups of the probe database, through a faulty proxy in front of moto."""
    monkeypatch.setenv("RUNBOOK_DATABASE_DSN", probe_database)
    clear_backups(platform, PROBE)
    with FaultyProxy(platform.moto.host, platform.moto.port) as proxy:
        monkeypatch.setenv("RUNBOOK_AWS_ENDPOINT_URL", proxy.url)
        yield proxy
    clear_backups(platform, PROBE)


def _download(platform, key: str) -> bytes:
    return platform.s3().get_object(Bucket=BACKUP_BUCKET, Key=key)["Body"].read()


def _pg_restore_list(platform, archive: bytes) -> str:
    return subprocess.run(
        [platform.postgres.bin("pg_restore"), "--list"],
        input=archive,
        capture_output=True,
        check=True,
    ).stdout.decode()


def test_backup_streams_a_verifiable_archive_and_manifest(live):
    platform = live
    counts = {
        f"public.{t}": query(platform.postgres.dsn, f"SELECT count(*) FROM {t}")[0][0]
        for t in ("organizations", "users", "compliance_scans", "alembic_version")
    }

    state = backup(return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    key = result["key"]
    assert objects(platform) == [key, key + ".manifest.json"]
    assert key.startswith("postgres/complianceagent/") and key.endswith(".dump.zst")
    manifest = parse_manifest(_download(platform, key + ".manifest.json"), key)
    stored = _download(platform, key)
    assert manifest.size_bytes == len(stored)
    assert manifest.sha256 == hashlib.sha256(stored).hexdigest()
    assert manifest.database == "complianceagent"
    assert manifest.server_version.startswith("15.")
    assert manifest.row_counts == counts
    assert manifest.schema_version == "3f2a9c1d7e10"
    assert manifest.compression == "zstd"
    # It is a pg_dump custom-format archive once the zstd layer is undone.
    archive = zstandard.ZstdDecompressor().decompressobj().decompress(stored)
    assert archive.startswith(b"PGDMP") and len(archive) == manifest.dump_bytes
    toc = _pg_restore_list(platform, archive)
    assert "TABLE DATA public users" in toc and "TABLE DATA public organizations" in toc
    report = read_artifacts(state.state_details.flow_run_id)["backup"].data
    assert manifest.sha256 in report and "public.compliance_scans" in report
    assert uploads(platform) == []
    assert platform.receiver.received == []  # success is not news


def test_gzip_backup_verified_by_restoring_into_a_scratch_database(live):
    platform = live
    before = databases(platform)

    state = backup(compression="gzip", verify_restore=True, return_state=True)

    assert state.is_completed(), state.message
    key = state.result()["key"]
    assert key.endswith(".dump")
    manifest = parse_manifest(_download(platform, key + ".manifest.json"), key)
    assert manifest.compression == "gzip" and manifest.size_bytes == manifest.dump_bytes
    assert _download(platform, key).startswith(b"PGDMP")  # pg_dump's own compression
    assert "yes: row counts match" in read_artifacts(state.state_details.flow_run_id)["backup"].data
    assert databases(platform) == before  # the scratch database is gone again


def test_retention_keeps_daily_and_weekly_and_removes_incomplete(live):
    platform = live
    s3 = platform.s3()
    old = {
        "20250101T020000.000000Z": True,  # a year ago: beyond any retention
        "20261020T020000.000000Z": True,
        "20261021T020000.000000Z": True,  # same ISO week as the 20th, newer: weekly keep
        "20261022T020000.000000Z": False,  # died before its manifest
    }
    for backup_id, complete in old.items():
        key = f"postgres/complianceagent/{backup_id}.dump.zst"
        s3.put_object(Bucket=BACKUP_BUCKET, Key=key, Body=b"old")
        if complete:
            s3.put_object(Bucket=BACKUP_BUCKET, Key=key + ".manifest.json", Body=b"{}")
    s3.put_object(Bucket=BACKUP_BUCKET, Key="postgres/complianceagent/README", Body=b"mine")

    # Stricter than the defaults (7 daily would keep them all): it asks first.
    run = start_in_thread(backup, keep_daily=1, keep_weekly=2)
    paused = wait_for_paused_run("backup")
    plan = read_artifacts(paused.id)["approval-plan"].data
    assert "Delete 3 backups of complianceagent" in plan
    assert "| the defaults would keep | 20261020T020000.000000Z, 20250101T020000.000000Z |" in plan
    resume_flow_run(paused.id, run_input=APPROVE)
    state = run.join(120)

    assert state.is_completed(), state.message
    result = state.result()
    assert result["kept"] == [result["backup_id"], "20261021T020000.000000Z"]
    assert sorted(result["deleted"]) == [
        "20250101T020000.000000Z",
        "20261020T020000.000000Z",
        "20261022T020000.000000Z",
    ]
    assert objects(platform) == sorted(
        [
            result["key"],
            result["key"] + ".manifest.json",
            "postgres/complianceagent/20261021T020000.000000Z.dump.zst",
            "postgres/complianceagent/20261021T020000.000000Z.dump.zst.manifest.json",
            "postgres/complianceagent/README",  # not a backup: never touched
        ]
    )


def test_an_upload_left_by_a_crashed_run_is_aborted_by_the_next_one(live):
    # A worker killed mid-backup never runs its cleanup: its upload stays open.
    platform = live
    s3 = platform.s3()
    key = "postgres/complianceagent/20261101T020000.000000Z.dump.zst"
    upload = s3.create_multipart_upload(Bucket=BACKUP_BUCKET, Key=key)["UploadId"]
    s3.upload_part(Bucket=BACKUP_BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 100)

    state = backup(return_state=True)

    assert state.is_completed(), state.message
    assert uploads(platform) == []
    assert key in read_artifacts(state.state_details.flow_run_id)["backup"].data


def test_s3_failing_mid_upload_leaves_no_object_and_no_upload(platform, probe):
    # After the first 8 MiB part, S3 becomes unreachable for 8 s: the managed transfer's
    # part retries give up, the backup fails, and the abort goes through once S3 is back.
    probe.cut_after(uploaded_bytes=12 * 2**20, outage_seconds=8)

    state = backup(return_state=True)

    assert state.is_failed()
    assert "upload s3://" in state.message and "partNumber=" in state.message  # a part failed
    assert probe.uploaded > 8 * 2**20  # it really was mid-upload
    assert uploads(platform, PROBE) == []
    assert objects(platform, PROBE) == []
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "of database backup_probe failed" in chat.json["text"]


def _pg_dump_processes() -> dict[int, list[str]]:
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"/pg_dump"):
            found[int(proc.name)] = [a.decode() for a in argv if a]
    return found


def test_pg_dump_dying_mid_stream_leaves_nothing_and_no_password_on_its_command_line(
    platform, probe, probe_database, monkeypatch
):
    # pg_dump reaches PostgreSQL through a proxy that drops its session after 24 MB of
    # COPY data (of ~42 MB), slowly enough to watch pg_dump's command line meanwhile.
    password = platform.postgres.app_password
    with FaultyProxy(platform.postgres.host, platform.postgres.port) as database_link:
        host, port = database_link.url.removeprefix("http://").split(":")
        monkeypatch.setenv(
            "RUNBOOK_DATABASE_DSN", make_conninfo(probe_database, host=host, port=port)
        )
        database_link.down_rate = 30 * 2**20
        database_link.drop_connection_after_download = 24 * 2**20
        outcome: dict[str, object] = {}
        run = threading.Thread(target=lambda: outcome.update(state=backup(return_state=True)))
        run.start()
        seen: dict[int, list[str]] = {}
        while run.is_alive():
            seen.update(_pg_dump_processes())
            time.sleep(0.02)

    state = outcome["state"]
    assert state.is_failed()
    assert database_link.dropped == 1
    assert "pg_dump exited with 1" in state.message
    assert probe.uploaded > 0  # the upload had begun
    assert uploads(platform, PROBE) == []
    assert objects(platform, PROBE) == []
    # The password went through pg_dump's environment, never its command line.
    assert seen, "never saw pg_dump running"
    for argv in seen.values():
        assert not any(password in arg for arg in argv), argv
        assert any(arg.startswith("--snapshot=") for arg in argv)
    assert password not in state.message


def test_the_password_is_never_stored_by_prefect(live):
    platform = live
    password = platform.postgres.app_password
    assert password in os.environ["RUNBOOK_DATABASE_DSN"]

    state = backup(return_state=True)

    assert state.is_completed(), state.message
    stored = stored_by_the_server(state.state_details.flow_run_id)
    assert "pg_dump" in stored  # the logs are there …
    assert password not in stored  # … the password is not
    manifest = json.loads(_download(platform, state.result()["key"] + ".manifest.json"))
    assert password not in json.dumps(manifest)


def test_backup_through_the_rest_api(live, served_api):
    # As an operator (or an alert) starts it: POST create_flow_run on the served deployment.
    platform = live
    with prefect_rest(served_api) as api:
        found = api.get("/deployments/name/backup/backup").raise_for_status().json()
        assert found["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        run = (
            api.post(
                f"/deployments/{found['id']}/create_flow_run",
                json={"parameters": {"compression": "gzip", "keep_daily": 3}},
            )
            .raise_for_status()
            .json()
        )
        refused = api.post(
            f"/deployments/{found['id']}/create_flow_run", json={"parameters": {"keep_daily": 0}}
        )
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up:
            state = api.get(f"/flow_runs/{run['id']}").raise_for_status().json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED"):
                break
            time.sleep(0.3)

    assert state["type"] == "COMPLETED", state["message"]
    assert refused.status_code == 409 and "keep_daily" in refused.text
    keys = objects(platform)
    assert len(keys) == 2 and keys[0].endswith(".dump")


def test_a_rejected_strict_retention_deletes_nothing(live):
    platform = live
    old = put_old_backups(
        platform, {"20261020T020000.000000Z": True, "20261021T020000.000000Z": True}
    )

    run = start_in_thread(backup, keep_daily=1, keep_weekly=0)
    paused = wait_for_paused_run("backup")
    plan = read_artifacts(paused.id)["approval-plan"].data
    resume_flow_run(paused.id, run_input=REJECT)
    state = run.join(120)

    assert "Delete backup 20261021T020000.000000Z (delete: beyond retention)" in plan
    assert "Delete backup 20261020T020000.000000Z (delete: beyond retention)" in plan
    assert state.is_failed()
    assert "retention was not applied (nothing was deleted)" in state.message
    assert "rejected by bob: keep them" in state.message
    # The new backup is stored whole, and every old one is still there.
    new = [k for k in objects(platform) if k not in old]
    assert len(new) == 2 and new[1] == new[0] + ".manifest.json"
    assert set(old) <= set(objects(platform))
    report = read_artifacts(paused.id)["backup"].data
    assert "### Retention (not applied: nothing was deleted)" in report


def test_a_strict_retention_approved_after_the_backups_changed_deletes_nothing(live):
    platform = live
    old = put_old_backups(
        platform, {"20261020T020000.000000Z": True, "20261021T020000.000000Z": True}
    )
    run = start_in_thread(backup, keep_daily=1, keep_weekly=0)
    paused = wait_for_paused_run("backup")
    # During the pause one of the backups it would delete is removed by someone else.
    s3 = platform.s3()
    for key in [k for k in objects(platform) if "20261020T020000.000000Z" in k]:
        s3.delete_object(Bucket=BACKUP_BUCKET, Key=key)
    before = objects(platform)

    resume_flow_run(paused.id, run_input=APPROVE)
    state = run.join(120)

    assert state.is_failed()
    assert "retention was not applied (nothing was deleted)" in state.message
    assert "changed since the plan was approved" in state.message
    assert objects(platform) == before
    assert "20261021T020000.000000Z" in " ".join(before) and len(old) == 4


def test_the_scheduled_defaults_delete_without_asking(live, monkeypatch):
    # Were it to pause, it would fail in 5 s instead of hanging the test.
    monkeypatch.setenv("RUNBOOK_APPROVAL_TIMEOUT_SECONDS", "5")
    platform = live
    mondays = [f"2025{month:02d}{day:02d}T020000.000000Z" for month, day in
               [(1, 6), (1, 13), (1, 20), (1, 27), (2, 3), (2, 10), (2, 17), (2, 24)]]  # fmt: skip
    put_old_backups(platform, {**dict.fromkeys(mondays, True), "20250303T020000.000000Z": False})

    state = backup(return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    # 7 daily = today's and the 6 newest Mondays; the 2 oldest and the incomplete one go.
    assert sorted(result["deleted"]) == [*mondays[:2], "20250303T020000.000000Z"]
    assert "approval-plan" not in read_artifacts(state.state_details.flow_run_id)
