"""Tasks that talk to PostgreSQL: SQL through psycopg, and `pg_dump`/`pg_restore`.

Credentials: the DSN (`RUNBOOK_DATABASE_DSN`) is a `SecretStr`. The client programs get
the connection without its password on their command line and the password in the
`PGPASSWORD` variable of their own environment only, so `ps` and the logs never show it;
error messages are scrubbed of it all the same.

The client programs must be the server's major version (a newer pg_dump writes archives
an older pg_restore cannot read): they come from `RUNBOOK_POSTGRES_BINDIR`, else from
Debian's `/usr/lib/postgresql/<server major>/bin`, else from PATH, and are checked.

Database names given to these tasks are names, never SQL: they are always quoted as
identifiers. `drop_database` refuses to drop the application database itself.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import psycopg
import zstandard
from prefect import task
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from runbook.decisions.backups import Compression, Manifest
from runbook.settings import load_settings
from tasks.aws import DEFAULT_PART_SIZE, READ_CHUNK, MultipartUpload, read_object_chunks
from tasks.logs import run_logger
from tasks.retry_policy import TRANSIENT_RETRIES, PlatformCallError

PIPE_CHUNK = 1024 * 1024
READ_AHEAD = 8  # chunks of pg_dump output read ahead of the compression
ZSTD_LEVEL = 3
GZIP_LEVEL = 6  # zlib's default, what `pg_dump -Fc` uses unless told otherwise
STDERR_KEEP = 200  # lines of a client program's stderr kept for the error message

# Every ordinary table pg_dump dumps the data of: not system, temporary or extension-owned.
_TABLES = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""


class PostgresToolError(RuntimeError):
    """pg_dump/pg_restore could not be found, is the wrong version, or failed."""


# --- connections ------------------------------------------------------------------------


def _dsn() -> str:
    return load_settings().require("database_dsn").get_secret_value()


def _scrub(text: str, dsn: str) -> str:
    """`text` without the DSN or its password, whatever quoting they came in."""
    password = str(conninfo_to_dict(dsn).get("password") or "")
    for secret in sorted({dsn, password}, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def _conninfo(dsn: str, database: str | None = None) -> tuple[str, str | None]:
    """(conninfo without the password, password) for `database` (default: the DSN's)."""
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    if database is not None:
        params["dbname"] = database
    return make_conninfo("", **params), str(password) if password is not None else None


def describe_database(database: str | None = None) -> str:
    """`complianceagent on 10.0.0.5:5432` — where a database is, without credentials."""
    params = conninfo_to_dict(_dsn())
    name = database or str(params.get("dbname") or params.get("user"))
    return f"{name} on {params.get('host', 'localhost')}:{params.get('port', '5432')}"


@contextlib.contextmanager
def _connect(database: str | None = None, **kwargs: Any) -> Iterator[psycopg.Connection[Any]]:
    """A connection to `database` (default: the application's), errors scrubbed."""
    dsn = _dsn()
    conninfo, password = _conninfo(dsn, database)
    try:
        with psycopg.connect(
            conninfo, password=password, application_name="runbook", **kwargs
        ) as conn:
            yield conn
    except psycopg.OperationalError as exc:
        raise PlatformCallError(_scrub(f"PostgreSQL: {exc}", dsn), transient=True) from None


def _maintenance() -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
    """Autocommit connection to the maintenance database, for CREATE/DROP/ALTER DATABASE."""
    return _connect(load_settings().postgres_maintenance_database, autocommit=True)


# --- the client programs ----------------------------------------------------------------


def _major(version_text: str) -> int:
    match = re.search(r"\(PostgreSQL\) (\d+)", version_text)
    if match is None:
        raise PostgresToolError(f"cannot read a PostgreSQL version from {version_text!r:.80}")
    return int(match.group(1))


@functools.lru_cache(maxsize=16)
def _version_of(program: str) -> str:
    result = subprocess.run(
        [program, "--version"], capture_output=True, text=True, timeout=10, check=True
    )
    return result.stdout.strip()


def client_program(name: str, server_major: int) -> tuple[str, str]:
    """(path, `--version` text) of `pg_dump`/`pg_restore` for a server of `server_major`."""
    bindir = load_settings().postgres_bindir
    if bindir is not None:
        candidates = [str(bindir / name)]
    else:
        candidates = [f"/usr/lib/postgresql/{server_major}/bin/{name}"]
        on_path = shutil.which(name)
        if on_path:
            candidates.append(on_path)
    found = []
    for candidate in candidates:
        if not os.access(candidate, os.X_OK):
            continue
        version = _version_of(candidate)
        if _major(version) == server_major:
            return candidate, version
        found.append(f"{candidate} is {version}")
    raise PostgresToolError(
        f"no {name} of PostgreSQL {server_major} (the server's major version) found"
        + (f" ({'; '.join(found)})" if found else "")
        + "; install it or point RUNBOOK_POSTGRES_BINDIR at its bin directory"
    )


def _program_env(password: str | None) -> dict[str, str]:
    # No PG* variables of ours leak in (a stray PGDATABASE would win over nothing);
    # the password reaches the child through its own environment only.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    return env


class _StderrTail:
    """Drain a child's stderr on a thread (a full pipe would stall it); keep the tail."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_KEEP)
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        for line in stream:
            self.lines.append(line.decode(errors="replace").rstrip())

    def text(self) -> str:
        self._thread.join(timeout=5)
        return "\n".join(self.lines)


def _larger_pipe(stream: IO[bytes]) -> None:
    """Let the pipe hold 1 MiB instead of 64 KiB, where Linux allows: fewer stalls."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_CHUNK)


def _pipe_chunks(stream: IO[bytes]) -> Generator[bytes, None, None]:
    while chunk := stream.read(PIPE_CHUNK):
        yield chunk


def _read_ahead(
    source: Generator[bytes, None, None], depth: int = READ_AHEAD
) -> Generator[bytes, None, None]:
    """Yield what `source` yields, pulled by a thread up to `depth` chunks ahead.

    Without it, the two ends take turns instead of overlapping: pg_dump stops writing
    while we compress (a pipe holds little), and pg_restore waits while we download.
    """
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: bytes | BaseException | None) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                chunks.put(item, timeout=0.2)
                return

    def pull() -> None:
        with contextlib.closing(source):  # closed by the thread that runs it
            try:
                for chunk in source:
                    put(chunk)
                    if stop.is_set():
                        return
            except BaseException as exc:
                put(exc)
            put(None)

    threading.Thread(target=pull, daemon=True, name="read-ahead").start()
    try:
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


# --- single SQL calls -------------------------------------------------------------------


@task(**TRANSIENT_RETRIES)
def read_server_version() -> dict[str, Any]:
    """`SHOW server_version`: `{"version": "15.18 (Debian …)", "num": 150018}`."""
    with _connect() as conn:
        version = conn.execute("SHOW server_version").fetchone()
        number = conn.execute("SHOW server_version_num").fetchone()
    assert version is not None and number is not None
    return {"version": str(version[0]), "num": int(number[0])}


def _count_rows(conn: psycopg.Connection[Any]) -> dict[str, int]:
    counts = {}
    for schema, table in conn.execute(_TABLES).fetchall():
        query = sql.SQL("SELECT count(*) FROM ONLY {}.{}").format(
            sql.Identifier(schema), sql.Identifier(table)
        )
        row = conn.execute(query).fetchone()
        counts[f"{schema}.{table}"] = int(row[0]) if row else 0
    return counts


def _schema_version(conn: psycopg.Connection[Any]) -> str | None:
    found = conn.execute("SELECT to_regclass('public.alembic_version')").fetchone()
    if not found or found[0] is None:
        return None
    rows = conn.execute("SELECT version_num FROM public.alembic_version").fetchall()
    return ",".join(sorted(str(r[0]) for r in rows)) or None


@task(**TRANSIENT_RETRIES, task_run_name="count rows in {database}")
def count_rows(database: str) -> dict[str, int]:
    """`SELECT count(*)` of every table of `database`: `{"schema.table": rows}`."""
    with _connect(database) as conn:
        return _count_rows(conn)


@task(**TRANSIENT_RETRIES, task_run_name="read schema version of {database}")
def read_schema_version(database: str) -> str | None:
    """`SELECT version_num FROM alembic_version` (None if the table is not there)."""
    with _connect(database) as conn:
        return _schema_version(conn)


@task(**TRANSIENT_RETRIES, task_run_name="create database {name}")
def create_database(name: str, like: str) -> str:
    """`CREATE DATABASE name` with the encoding and collation of database `like`.

    From template0, so nothing a template1 may hold gets mixed into a restore.
    """
    with _maintenance() as conn:
        row = conn.execute(
            "SELECT pg_encoding_to_char(encoding), datcollate, datctype"
            " FROM pg_database WHERE datname = %s",
            (like,),
        ).fetchone()
        if row is None:
            raise PlatformCallError(f"create database {name}: there is no database {like}")
        encoding, collate, ctype = row
        conn.execute(
            sql.SQL(
                "CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}"
            ).format(sql.Identifier(name), encoding, collate, ctype)
        )
    return name


@task(**TRANSIENT_RETRIES, task_run_name="drop database {name}")
def drop_database(name: str) -> bool:
    """`DROP DATABASE IF EXISTS name WITH (FORCE)`. Already gone counts as done (False).

    Refuses the application database itself, whatever the caller meant.
    """
    if name == load_settings().database_name:
        raise PlatformCallError(f"drop database {name}: refusing to drop the live database")
    with _maintenance() as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
    return exists is not None


@task(task_run_name="swap in {scratch} as {live}, keep the old one as {keep_as}")
def swap_databases(live: str, scratch: str, keep_as: str, wait_seconds: float = 30) -> None:
    """Make `scratch` the live database and keep the old one as `keep_as`, atomically.

    1. `ALTER DATABASE live ALLOW_CONNECTIONS false`: nobody new gets in;
    2. end every session on `live` and `scratch` (the backend is already scaled to 0);
    3. in one transaction, `live` → `keep_as` and `scratch` → `live`.
    If anything fails, `live` is open again and still the old one. Not retried: the
    restore flow's cleanup must see the failure, not a second attempt.
    """
    logger = run_logger()
    with _maintenance() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(live))
        )
        try:
            give_up_at = time.monotonic() + wait_seconds
            while True:
                ended = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
                    ([live, scratch],),
                ).fetchone()
                if ended and ended[0]:
                    logger.info("ended %d sessions on %s/%s", ended[0], live, scratch)
                try:
                    with conn.transaction():
                        for old, new in ((live, keep_as), (scratch, live)):
                            conn.execute(
                                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                                    sql.Identifier(old), sql.Identifier(new)
                                )
                            )
                        conn.execute(
                            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                                sql.Identifier(keep_as)
                            )
                        )
                    return
                except psycopg.errors.ObjectInUse:
                    # A session was still ending; try again until wait_seconds.
                    if time.monotonic() > give_up_at:
                        raise
                    time.sleep(0.2)
        except BaseException:
            conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(live))
            )
            raise


# --- pg_dump → S3 -----------------------------------------------------------------------


def stream_dump_to_s3(
    bucket: str,
    key: str,
    backup_id: str,
    compression: Compression,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    zstd_level: int = ZSTD_LEVEL,
    zstd_threads: int = 0,
) -> Manifest:
    """Run pg_dump and store its archive at s3://bucket/key as it is written.

    Row counts are taken in the snapshot pg_dump dumps (exported by our transaction and
    handed to `pg_dump --snapshot`), on that connection while pg_dump runs. Returns the
    manifest (not yet stored); raises with nothing left in the bucket if anything fails.
    """
    dsn = _dsn()
    logger = run_logger()
    started = dt.datetime.now(dt.UTC)
    conninfo, password = _conninfo(dsn)
    with _connect(autocommit=False) as snap, ThreadPoolExecutor(1) as counter:
        snap.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = snap.execute(
            "SELECT pg_export_snapshot(), current_database(), current_setting('server_version'),"
            " current_setting('server_version_num')::int"
        ).fetchone()
        assert row is not None
        snapshot, database, server_version, server_version_num = row
        program, program_version = client_program("pg_dump", server_version_num // 10000)
        level = 0 if compression is Compression.ZSTD else GZIP_LEVEL
        argv = [
            program,
            "--format=custom",
            f"--compress={level}",
            f"--snapshot={snapshot}",
            "--no-password",
            f"--dbname={conninfo}",
        ]
        logger.info("running %s", " ".join([*argv[:-1], "--dbname=<the application database>"]))
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_program_env(password)
        )
        assert process.stdout is not None and process.stderr is not None
        stderr = _StderrTail(process.stderr)
        counts: Future[tuple[dict[str, int], str | None]] = counter.submit(
            lambda: (_count_rows(snap), _schema_version(snap))
        )
        compressor = (
            zstandard.ZstdCompressor(level=zstd_level, threads=zstd_threads).compressobj()
            if compression is Compression.ZSTD
            else None
        )
        digest, dump_bytes = hashlib.sha256(), 0
        metadata = {"backup-id": backup_id, "database": database, "compression": compression}
        try:
            with MultipartUpload(bucket, key, part_size=part_size, metadata=metadata) as upload:
                _larger_pipe(process.stdout)
                for chunk in _read_ahead(_pipe_chunks(process.stdout)):
                    dump_bytes += len(chunk)
                    stored = compressor.compress(chunk) if compressor else chunk
                    if stored:
                        digest.update(stored)
                        upload.write(stored)
                if compressor:
                    tail = compressor.flush()
                    digest.update(tail)
                    upload.write(tail)
                if process.wait() != 0:
                    raise PostgresToolError(
                        _scrub(f"pg_dump exited with {process.returncode}: {stderr.text()}", dsn)
                    )
                row_counts, schema_version = counts.result()
                stored_object = upload.complete()
                logger.info(
                    "stored s3://%s/%s: %d parts; S3 put them together in %.2fs",
                    bucket,
                    key,
                    stored_object["parts"],
                    stored_object["complete_seconds"],
                )
        except BaseException:
            _stop(process)
            snap.cancel_safe()  # the counting may still run; it must not hold us up
            raise
        finally:
            counts.cancel()
    finished = dt.datetime.now(dt.UTC)
    return Manifest(
        backup_id=backup_id,
        database=database,
        archive_key=key,
        compression=compression,
        size_bytes=stored_object["size"],
        dump_bytes=dump_bytes,
        sha256=digest.hexdigest(),
        started_at=started,
        finished_at=finished,
        server_version=server_version,
        server_version_num=server_version_num,
        pg_dump_version=program_version,
        snapshot=snapshot,
        row_counts=row_counts,
        schema_version=schema_version,
    )


@task(task_run_name="pg_dump to s3://{bucket}/{key}")
def pg_dump_to_s3(bucket: str, key: str, backup_id: str, compression: Compression) -> Manifest:
    """`pg_dump -Fc | aws s3 cp - s3://bucket/key`, in bounded memory, with a manifest.

    Not retried by Prefect: a second attempt would dump everything again. Each part is
    retried inside, and a failed run leaves nothing behind, so the next run starts clean.
    """
    manifest = stream_dump_to_s3(bucket, key, backup_id, compression)
    run_logger().info(
        "stored %s: %d bytes (%d from pg_dump), %d tables, sha256 %s",
        key,
        manifest.size_bytes,
        manifest.dump_bytes,
        len(manifest.row_counts),
        manifest.sha256,
    )
    return manifest


# --- S3 → pg_restore --------------------------------------------------------------------


def _archive_chunks(
    bucket: str, key: str, compression: Compression, digest: Any | None = None
) -> Generator[bytes, None, None]:
    """The pg_dump archive's bytes, read from S3 and decompressed as needed; the stored
    bytes are fed to `digest` on the way."""
    decompressor = (
        zstandard.ZstdDecompressor().decompressobj() if compression is Compression.ZSTD else None
    )
    for stored in read_object_chunks(bucket, key, READ_CHUNK):
        if digest is not None:
            digest.update(stored)
        if decompressor is None:
            yield stored
            continue
        try:
            archive = decompressor.decompress(stored)
        except zstandard.ZstdError as exc:
            raise PostgresToolError(f"s3://{bucket}/{key} is not valid zstd: {exc}") from None
        if archive:
            yield archive


def _feed(process: subprocess.Popen[bytes], chunks: Generator[bytes, None, None]) -> bool:
    """Write `chunks` to the child's stdin; False if the child stopped reading first.

    Either way the generator is closed, which closes the S3 response under it.
    """
    assert process.stdin is not None
    with contextlib.closing(chunks):
        try:
            for chunk in chunks:
                process.stdin.write(chunk)
            process.stdin.close()
        except BrokenPipeError:
            return False
    return True


@task(**TRANSIENT_RETRIES, task_run_name="pg_restore --list s3://{bucket}/{key}")
def list_archive(bucket: str, key: str, compression: Compression) -> list[str]:
    """`pg_restore --list`: the archive's table of contents, read from its first bytes.

    Proves pg_restore of the server's version can read the archive at all, before
    anything is changed. Returns the `TABLE DATA` entries as `schema.table`.
    """
    dsn = _dsn()
    server = read_server_version.fn()
    program, _ = client_program("pg_restore", server["num"] // 10000)
    process = subprocess.Popen(
        [program, "--list", "--format=custom"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_program_env(None),
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = _StderrTail(process.stderr)
    with ThreadPoolExecutor(1) as reader:
        listing = reader.submit(process.stdout.read)
        try:
            _feed(process, _archive_chunks(bucket, key, compression))
        finally:
            _stop_when_done(process)
        text = listing.result().decode(errors="replace")
    if process.returncode != 0:
        raise PostgresToolError(
            _scrub(f"pg_restore --list exited with {process.returncode}: {stderr.text()}", dsn)
        )
    entries = re.findall(r"^\d+; \d+ \d+ TABLE DATA (\S+) (\S+) ", text, flags=re.M)
    return [f"{schema}.{table}" for schema, table in entries]


def _stop_when_done(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)


@task(task_run_name="pg_restore s3://{bucket}/{key} into {database}")
def pg_restore_from_s3(
    bucket: str,
    key: str,
    compression: Compression,
    sha256: str,
    database: str,
    jobs: int = 1,
) -> dict[str, Any]:
    """`aws s3 cp s3://bucket/key - | pg_restore --no-owner -d database`.

    With `jobs` = 1 the archive streams from S3 straight into pg_restore (no local copy).
    With more, pg_restore needs a file it can seek in: the archive is written to a
    private temporary file first (checked against `sha256` before use) and restored with
    `--jobs`. Either way the stored bytes are hashed on the way and a mismatch fails the
    restore. `--exit-on-error`: any error stops it, there is no half-restored success.
    Not retried: the caller drops the database and starts over if it wants to.
    """
    dsn = _dsn()
    logger = run_logger()
    server = read_server_version.fn()
    program, _ = client_program("pg_restore", server["num"] // 10000)
    conninfo, password = _conninfo(dsn, database)
    argv = [
        program,
        "--format=custom",
        "--no-owner",
        "--exit-on-error",
        "--no-password",
        f"--dbname={conninfo}",
    ]
    digest = hashlib.sha256()
    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="runbook-restore-") as workdir:
        if jobs > 1:
            archive = Path(workdir) / "archive.dump"
            with archive.open("wb") as file:
                for chunk in _archive_chunks(bucket, key, compression, digest):
                    file.write(chunk)
            _check_digest(digest, sha256, bucket, key)
            argv += [f"--jobs={jobs}", str(archive)]
        logger.info("running %s", " ".join(a for a in argv if not a.startswith("--dbname")))
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if jobs == 1 else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=_program_env(password),
        )
        assert process.stderr is not None
        stderr = _StderrTail(process.stderr)
        try:
            if jobs == 1:
                assert process.stdin is not None
                _larger_pipe(process.stdin)
                _feed(process, _read_ahead(_archive_chunks(bucket, key, compression, digest)))
            process.wait()
        except BaseException:
            _stop(process)
            raise
    if process.returncode != 0:
        raise PostgresToolError(
            _scrub(f"pg_restore exited with {process.returncode}: {stderr.text()}", dsn)
        )
    _check_digest(digest, sha256, bucket, key)
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    logger.info("restored s3://%s/%s into %s in %.1fs", bucket, key, database, seconds)
    return {"database": database, "seconds": seconds, "jobs": jobs}


def _check_digest(digest: Any, expected: str, bucket: str, key: str) -> None:
    if digest.hexdigest() != expected:
        raise PostgresToolError(
            f"s3://{bucket}/{key} changed while it was read: SHA-256 {digest.hexdigest()[:16]}…, "
            f"the manifest says {expected[:16]}…"
        )


# --- disk usage (the restore's free-space check) ---------------------------------------


@task(**TRANSIENT_RETRIES)
def read_database_sizes() -> dict[str, int | None]:
    """`pg_database_size` of every database on the server (None where we may not connect)."""
    with _connect() as conn:
        rows = conn.execute(
            "SELECT datname, CASE WHEN has_database_privilege(oid, 'CONNECT')"
            " THEN pg_database_size(oid) END FROM pg_database ORDER BY datname"
        ).fetchall()
    return {str(name): None if size is None else int(size) for name, size in rows}


@task(**TRANSIENT_RETRIES)
def read_wal_size() -> int | None:
    """Bytes in the server's WAL directory (`pg_ls_waldir()`); None if we may not read it
    (it needs superuser or pg_monitor)."""
    with _connect() as conn:
        try:
            row = conn.execute("SELECT coalesce(sum(size), 0) FROM pg_ls_waldir()").fetchone()
        except psycopg.errors.InsufficientPrivilege:
            return None
    return int(row[0]) if row else None
