"""Streams between PostgreSQL's client programs and S3: `pg_dump` → S3 (the backup),
S3 → `pg_restore` (the restore), and S3 → `pg_restore --list` (the archive check).

Nothing is written to local disk except for a parallel restore, which needs a file it can
seek in. The password reaches the programs in their environment, never their command line
(`tasks/postgres_programs.py`); what they say on stderr is redacted before it is raised.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import re
import subprocess
import tempfile
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zstandard
from prefect import task

from runbook.decisions.backups import Compression, Manifest
from tasks.logs import run_logger
from tasks.postgres import (
    connect,
    conninfo,
    database_dsn,
    schema_version,
    scrub,
    server_version,
    table_row_counts,
)
from tasks.postgres_programs import (
    PostgresToolError,
    StderrTail,
    client_program,
    feed,
    larger_pipe,
    pipe_chunks,
    program_env,
    read_ahead,
    stop,
    stop_when_done,
)
from tasks.retry_policy import TRANSIENT_RETRIES
from tasks.s3_streams import READ_CHUNK, read_object_chunks, upload_stream

# zstd level 1: level 3 takes about twice the CPU for at best ~5 % less size (on generated
# rows it is larger: `make bench`, table (a)), and on 2 cores pg_dump needs that CPU.
ZSTD_LEVEL = 1
GZIP_LEVEL = 6  # zlib's default, what `pg_dump -Fc` uses unless told otherwise

__all__ = [
    "PostgresToolError",
    "list_archive",
    "pg_dump_to_s3",
    "pg_restore_from_s3",
    "stream_dump_to_s3",
]


# --- pg_dump → S3 -----------------------------------------------------------------------


def _stored_chunks(
    process: subprocess.Popen[bytes],
    stderr: StderrTail,
    compressor: Any | None,
    counted: Future[Any],
    dsn: str,
    dumped: list[int],
) -> Generator[bytes, None, None]:
    """pg_dump's output as it is to be stored (compressed or not). It ends only once
    pg_dump succeeded and the rows are counted: the object must not exist otherwise."""
    assert process.stdout is not None
    larger_pipe(process.stdout)
    for chunk in read_ahead(pipe_chunks(process.stdout)):
        dumped[0] += len(chunk)
        stored = compressor.compress(chunk) if compressor else chunk
        if stored:
            yield stored
    if process.wait() != 0:
        raise PostgresToolError(
            scrub(f"pg_dump exited with {process.returncode}: {stderr.text()}", dsn)
        )
    counted.result()
    if compressor:
        yield compressor.flush()


def stream_dump_to_s3(
    bucket: str,
    key: str,
    backup_id: str,
    compression: Compression,
    *,
    zstd_level: int = ZSTD_LEVEL,
    zstd_threads: int = 0,
) -> Manifest:
    """Run pg_dump and store its archive at s3://bucket/key as it is written.

    Row counts are taken in the snapshot pg_dump dumps (exported by our transaction and
    handed to `pg_dump --snapshot`), on that connection while pg_dump runs. Returns the
    manifest (not yet stored); raises with nothing left in the bucket if anything fails.
    """
    dsn = database_dsn()
    logger = run_logger()
    started = dt.datetime.now(dt.UTC)
    info, password = conninfo(dsn)
    with connect(autocommit=False) as snap, ThreadPoolExecutor(1) as counter:
        snap.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = snap.execute(
            "SELECT pg_export_snapshot(), current_database(), current_setting('server_version'),"
            " current_setting('server_version_num')::int"
        ).fetchone()
        assert row is not None
        snapshot, database, version, version_num = row
        program, program_version = client_program("pg_dump", version_num // 10000)
        level = 0 if compression is Compression.ZSTD else GZIP_LEVEL
        argv = [
            program,
            "--format=custom",
            f"--compress={level}",
            f"--snapshot={snapshot}",
            "--no-password",
            f"--dbname={info}",
        ]
        logger.info("running %s", " ".join([*argv[:-1], "--dbname=<the application database>"]))
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=program_env(password)
        )
        assert process.stderr is not None
        stderr = StderrTail(process.stderr)
        counted: Future[tuple[dict[str, int], str | None]] = counter.submit(
            lambda: (table_row_counts(snap), schema_version(snap))
        )
        compressor = (
            zstandard.ZstdCompressor(level=zstd_level, threads=zstd_threads).compressobj()
            if compression is Compression.ZSTD
            else None
        )
        dumped = [0]
        chunks = _stored_chunks(process, stderr, compressor, counted, dsn, dumped)
        metadata = {"backup-id": backup_id, "database": database, "compression": compression}
        try:
            with contextlib.closing(chunks):
                stored = upload_stream(bucket, key, chunks, metadata=metadata)
            row_counts, schema = counted.result()
        except BaseException:
            stop(process)
            snap.cancel_safe()  # the counting may still run; it must not hold us up
            raise
        finally:
            counted.cancel()
    logger.info("stored s3://%s/%s: %d bytes", bucket, key, stored["size"])
    return Manifest(
        backup_id=backup_id,
        database=database,
        archive_key=key,
        compression=compression,
        size_bytes=stored["size"],
        dump_bytes=dumped[0],
        sha256=stored["sha256"],
        started_at=started,
        finished_at=dt.datetime.now(dt.UTC),
        server_version=version,
        server_version_num=version_num,
        pg_dump_version=program_version,
        snapshot=snapshot,
        row_counts=row_counts,
        schema_version=schema,
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


@task(**TRANSIENT_RETRIES, task_run_name="pg_restore --list s3://{bucket}/{key}")
def list_archive(bucket: str, key: str, compression: Compression) -> list[str]:
    """`pg_restore --list`: the archive's table of contents, read from its first bytes.

    Proves pg_restore of the server's version can read the archive at all, before
    anything is changed. Returns the `TABLE DATA` entries as `schema.table`.
    """
    dsn = database_dsn()
    program, _ = client_program("pg_restore", server_version()["num"] // 10000)
    process = subprocess.Popen(
        [program, "--list", "--format=custom"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=program_env(None),
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = StderrTail(process.stderr)
    with ThreadPoolExecutor(1) as reader:
        listing = reader.submit(process.stdout.read)
        try:
            feed(process, _archive_chunks(bucket, key, compression))
        finally:
            stop_when_done(process)
        text = listing.result().decode(errors="replace")
    if process.returncode != 0:
        raise PostgresToolError(
            scrub(f"pg_restore --list exited with {process.returncode}: {stderr.text()}", dsn)
        )
    entries = re.findall(r"^\d+; \d+ \d+ TABLE DATA (\S+) (\S+) ", text, flags=re.M)
    return [f"{schema}.{table}" for schema, table in entries]


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
    dsn = database_dsn()
    logger = run_logger()
    program, _ = client_program("pg_restore", server_version()["num"] // 10000)
    info, password = conninfo(dsn, database)
    argv = [
        program,
        "--format=custom",
        "--no-owner",
        "--exit-on-error",
        "--no-password",
        f"--dbname={info}",
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
            env=program_env(password),
        )
        assert process.stderr is not None
        stderr = StderrTail(process.stderr)
        try:
            if jobs == 1:
                assert process.stdin is not None
                larger_pipe(process.stdin)
                feed(process, read_ahead(_archive_chunks(bucket, key, compression, digest)))
            process.wait()
        except BaseException:
            stop(process)
            raise
    if process.returncode != 0:
        raise PostgresToolError(
            scrub(f"pg_restore exited with {process.returncode}: {stderr.text()}", dsn)
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
