"""The real local servers: PostgreSQL, Redis and moto start, serve real clients, and clean up."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import boto3
import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sandbox.services import (
    MotoServer,
    PostgresServer,
    RedisServer,
    SandboxDependencyError,
    ensure_redis_server_installed,
    free_port,
    pid_alive,
)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer(app_password="app pw/with:odd@chars") as server:
        yield server


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# ----------------------------------------------------------------------------- PostgreSQL


def test_postgres_app_role_connects_to_its_own_database(postgres):
    assert postgres.dsn == (
        f"postgresql://complianceagent:app%20pw%2Fwith%3Aodd%40chars"
        f"@127.0.0.1:{postgres.port}/complianceagent"
    )
    with psycopg.connect(postgres.dsn) as conn:
        row = conn.execute("SELECT current_user, current_database(), 1 + 1").fetchone()
    assert row == ("complianceagent", "complianceagent", 2)


def test_postgres_admin_dsn_is_the_superuser(postgres):
    with psycopg.connect(postgres.admin_dsn) as conn:
        user, is_super = conn.execute(
            "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('listen_addresses', 'fsync', 'max_connections', 'password_encryption')"
            ).fetchall()
        )
    assert (user, is_super) == ("postgres", True)
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "fsync": "off",
        "max_connections": "100",
        "password_encryption": "scram-sha-256",
    }


def test_postgres_refuses_a_wrong_password(postgres):
    wrong = postgres.dsn.replace("app%20pw", "nope")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=2)


def test_postgres_app_role_can_do_what_the_restore_runbook_does(postgres):
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        member = conn.execute("SELECT pg_has_role('pg_signal_backend', 'MEMBER')").fetchone()
        assert member == (True,)
        conn.execute("CREATE DATABASE restore_scratch")
        scratch_dsn = postgres.dsn.rsplit("/", 1)[0] + "/restore_scratch"
        with psycopg.connect(scratch_dsn) as other:
            other_pid = other.info.backend_pid
            # Sessions on the database block a rename; the app role may end its own.
            terminated = conn.execute("SELECT pg_terminate_backend(%s)", [other_pid]).fetchone()
            assert terminated == (True,)
        conn.execute("ALTER DATABASE restore_scratch RENAME TO restore_renamed")
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'restore_renamed'"
        ).fetchone()
        assert owner == ("complianceagent",)
        conn.execute("DROP DATABASE restore_renamed")


def test_postgres_bindir_has_client_tools_of_the_server_version(postgres, tmp_path):
    with psycopg.connect(postgres.dsn) as conn:
        server_major = conn.info.server_version // 10000
    version = subprocess.run(
        [postgres.bin("pg_dump"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f" {server_major}." in version
    dump = tmp_path / "app.dump"
    subprocess.run(
        [postgres.bin("pg_dump"), "-Fc", "-f", str(dump), "--dbname", postgres.dsn],
        check=True,
        timeout=60,
    )
    assert dump.stat().st_size > 0


def test_postgres_restarts_with_its_data_and_cleans_up_even_on_error():
    with pytest.raises(RuntimeError, match="boom"), PostgresServer() as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('still here')")
        port, tmp, pid = server.port, server.data_dir.parent, server._postmaster_pid()
        assert pid is not None

        server.stop(keep_data=True)  # an outage, not a wipe
        assert not server.is_running
        assert not _port_open(port)
        server.start()
        assert server.port == port
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == ("still here",)
        pid = server._postmaster_pid()
        raise RuntimeError("boom")

    assert not tmp.exists()
    assert not _port_open(port)
    assert pid is not None
    assert not pid_alive(pid)  # zombies count as gone: PID 1 may not reap
    server.stop()  # idempotent


# ---------------------------------------------------------------------------------- Redis


def test_redis_serves_pings_with_password_and_restarts_on_the_same_port():
    with RedisServer(password="s3cret:/@") as server:
        assert server.url == f"redis://:s3cret%3A%2F%40@127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping() is True
            client.set("k", "v")
        # No retries: redis-py otherwise retries auth failures with backoff for ~3.5 s.
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0))
        with anonymous, pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()

        port = server.port
        server.stop()
        server.stop()  # idempotent
        assert not _port_open(port)
        server.start()
        assert server.port == port
        with redis.Redis.from_url(server.url) as client:
            assert client.ping() is True
            assert client.get("k") is None  # no persistence: a restart starts empty


def test_redis_without_password_and_cleanup_on_error():
    with pytest.raises(KeyError), RedisServer() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping() is True
        proc, tmp, port = server._proc, server._tmp, server.port
        raise KeyError("boom")
    assert proc is not None
    assert proc.poll() is not None
    assert tmp is not None
    assert not tmp.exists()
    assert not _port_open(port)


def test_missing_redis_server_names_the_fix(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(os, "access", lambda _path, _mode: False)
    with pytest.raises(SandboxDependencyError, match="setup"):
        ensure_redis_server_installed()


def test_redis_server_is_installed():
    assert os.access(ensure_redis_server_installed(), os.X_OK)


# ----------------------------------------------------------------------------------- moto


def test_moto_serves_s3_over_http(moto):
    assert moto.endpoint_url == f"http://127.0.0.1:{moto.port}"
    s3 = boto3.client("s3", **moto.boto3_kwargs())
    try:
        s3.create_bucket(Bucket="backups")
        s3.put_object(Bucket="backups", Key="db/2026.dump", Body=b"dump bytes")
        body = s3.get_object(Bucket="backups", Key="db/2026.dump")["Body"]
        with body:
            assert body.read() == b"dump bytes"
    finally:
        s3.close()


def test_moto_serves_secrets_manager_over_http(moto):
    client = boto3.client(
        "secretsmanager",
        endpoint_url=moto.endpoint_url,
        region_name="eu-west-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    try:
        client.create_secret(Name="complianceagent/api-key", SecretString="v1")
        value = client.get_secret_value(
            SecretId="complianceagent/api-key", VersionStage="AWSCURRENT"
        )
        assert value["SecretString"] == "v1"
    finally:
        client.close()


def test_moto_reset_forgets_everything_and_stop_releases_the_port():
    with MotoServer() as server:
        s3 = boto3.client("s3", **server.boto3_kwargs())
        try:
            s3.create_bucket(Bucket="to-forget")
            server.reset()
            assert s3.list_buckets()["Buckets"] == []
        finally:
            s3.close()
        port = server.port
    assert not _port_open(port)
    server.stop()  # idempotent


def test_resetting_one_moto_leaves_another_ones_state_alone(moto):
    # moto's state is per process: each MotoServer runs in its own, so a test that resets
    # its own server cannot empty the session sandbox's buckets and secrets.
    s3 = boto3.client("s3", **moto.boto3_kwargs())
    try:
        s3.create_bucket(Bucket="kept-elsewhere")
        with MotoServer() as other:
            other.reset()
        assert "kept-elsewhere" in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    finally:
        s3.delete_bucket(Bucket="kept-elsewhere")
        s3.close()


def test_a_port_in_use_is_a_clear_error_and_leaves_nothing_behind(monkeypatch):
    # A temporary directory of this test's own, traversable by PostgreSQL's user: other
    # processes on the machine create and remove temporary files in /tmp meanwhile.
    private = tempfile.mkdtemp(prefix="port-in-use-", dir="/tmp")
    os.chmod(private, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", private)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="Address already in use"):
            RedisServer(port=port).start()
        with pytest.raises(RuntimeError, match="Address already in use"):
            PostgresServer(port=port).start()
        assert os.listdir(private) == []
    os.rmdir(private)
