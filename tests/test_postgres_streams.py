"""What the data tasks let out: no DSN text in an error, no stray variable in a client
program's environment, no customer row in a pg_restore failure. Against the sandbox's
real PostgreSQL and moto S3; the client programs are real programs (one of them a shell
script standing where pg_dump would, to show what it was given)."""

from __future__ import annotations

import os
import stat

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from flows.backup import backup
from runbook.decisions.backups import Compression
from sandbox.platform import BACKUP_BUCKET
from tasks.postgres import InvalidDsn, count_rows, create_database, drop_database, server_version
from tasks.postgres_programs import PostgresToolError
from tasks.postgres_streams import pg_restore_from_s3, stream_dump_to_s3
from tests.backup_helpers import clear_backups, objects, stored_by_the_server, uploads

MALFORMED = [
    # libpq's own messages quote these tokens: `invalid percent-encoded token: "s3cr%zzet"`
    "postgresql://complianceagent:s3cr%zzet@127.0.0.1:5432/complianceagent",
    "host=127.0.0.1 dbname=complianceagent user=complianceagent password=s3cr zzet",
    "host=127.0.0.1 dbname=complianceagent password='s3cr%zzet",
]


@pytest.mark.parametrize("dsn", MALFORMED)
def test_a_malformed_dsn_fails_naming_the_setting_not_its_text(sandbox, monkeypatch, dsn):
    monkeypatch.setenv("RUNBOOK_DATABASE_DSN", dsn)

    with pytest.raises(InvalidDsn) as failure:
        count_rows.fn("complianceagent")

    assert "RUNBOOK_DATABASE_DSN" in str(failure.value)
    assert "s3cr" not in str(failure.value) and "zzet" not in str(failure.value)
    # Not even chained: a traceback would print libpq's message.
    assert failure.value.__cause__ is None and failure.value.__context__ is None


def test_a_backup_with_a_malformed_dsn_stores_and_sends_no_password(platform, monkeypatch):
    monkeypatch.setenv("RUNBOOK_DATABASE_DSN", MALFORMED[0])

    state = backup(return_state=True)

    assert state.is_failed()
    assert "RUNBOOK_DATABASE_DSN" in state.message
    stored = stored_by_the_server(state.state_details.flow_run_id)
    assert "s3cr" not in stored and "zzet" not in stored
    chat = platform.receiver.wait_for(lambda n: n.path.startswith("/slack"))
    assert "RUNBOOK_DATABASE_DSN" in chat.json["text"] and "zzet" not in chat.json["text"]


def test_pg_dump_gets_an_allow_listed_environment_and_the_password(sandbox, monkeypatch, tmp_path):
    # A real program in pg_dump's place: it answers --version like pg_dump of the server's
    # major version, then writes the environment it was given and fails.
    major = server_version()["num"] // 10000
    fake = tmp_path / "pg_dump"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "pg_dump (PostgreSQL) {major}.0"; exit 0; fi\n'
        'env -0 > "$(dirname "$0")/environ"\n'
        "exit 3\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("RUNBOOK_POSTGRES_BINDIR", str(tmp_path))
    monkeypatch.setenv("BILLING_DB_PASSWORD", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("PGSSLMODE", "prefer")  # where/how to connect: passed on
    monkeypatch.setenv("PGPASSWORD", "not-the-dsn-one")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    clear_backups(sandbox)

    with pytest.raises(PostgresToolError, match="pg_dump exited with 3"):
        stream_dump_to_s3(
            BACKUP_BUCKET, "postgres/complianceagent/env.dump.zst", "x", Compression.ZSTD
        )

    entries = (tmp_path / "environ").read_bytes().split(b"\0")
    seen = dict(e.decode().split("=", 1) for e in entries if e)
    assert seen["PGPASSWORD"] == sandbox.postgres.app_password  # from the DSN, nothing else
    assert seen["PGSSLMODE"] == "prefer" and seen["LC_ALL"] == "C.UTF-8"
    assert seen["PATH"] == os.environ["PATH"]
    assert [k for k in seen if "password" in k.lower()] == ["PGPASSWORD"]
    for secret in ("RUNBOOK_DATABASE_DSN", "AWS_SECRET_ACCESS_KEY", "BILLING_DB_PASSWORD"):
        assert secret not in seen
    allowed = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PWD", "SHLVL", "_"}
    assert {k for k in seen if not k.startswith(("PG", "LC_"))} <= allowed, seen.keys()
    assert objects(sandbox) == [] and uploads(sandbox) == []  # a failed dump stores nothing


@pytest.fixture
def banned_row_restore(sandbox, monkeypatch):
    """A backup whose restore fails on a row: the target database bans the row's e-mail
    through a CHECK constraint the archive itself carries."""
    admin = sandbox.postgres.admin_dsn
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute("DROP DATABASE IF EXISTS redaction_src WITH (FORCE)")
        db.execute(f"CREATE DATABASE redaction_src OWNER {sandbox.postgres.app_user}")
    source = make_conninfo(sandbox.postgres.dsn, dbname="redaction_src")
    with psycopg.connect(source, autocommit=True) as db:
        db.execute(
            "CREATE FUNCTION public.allowed(text) RETURNS boolean LANGUAGE sql STABLE AS"
            " $$ SELECT $1 IS DISTINCT FROM current_setting('app.banned', true) $$"
        )
        db.execute(
            "CREATE TABLE people (id int PRIMARY KEY, email text CHECK (public.allowed(email)))"
        )
        db.execute("INSERT INTO people VALUES (1, 'alice@example.com')")
    monkeypatch.setenv("RUNBOOK_DATABASE_DSN", source)
    clear_backups(sandbox, "redaction_src")
    key = "postgres/redaction_src/row.dump"
    manifest = stream_dump_to_s3(BACKUP_BUCKET, key, "row", Compression.GZIP)
    create_database.fn("redaction_dst", like="redaction_src")
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute("ALTER DATABASE redaction_dst SET app.banned = 'alice@example.com'")
    yield manifest
    drop_database.fn("redaction_dst")
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute("DROP DATABASE IF EXISTS redaction_src WITH (FORCE)")
    clear_backups(sandbox, "redaction_src")


def test_a_pg_restore_failure_quoting_a_row_is_redacted(banned_row_restore):
    manifest = banned_row_restore

    with pytest.raises(PostgresToolError) as failure:
        pg_restore_from_s3.fn(
            BACKUP_BUCKET, manifest.archive_key, Compression.GZIP, manifest.sha256, "redaction_dst"
        )

    message = str(failure.value)
    assert "pg_restore exited with 1" in message
    assert "violates check constraint" in message  # the cause is still there …
    assert "[redacted]" in message
    assert "alice@example.com" not in message  # … the customer's row is not
