"""The data runbooks' figures, in one run, on one database (`bench_data`, an unlogged table
of md5 text filled by `generate_series`), against the sandbox's PostgreSQL and moto S3.

(a) compression: pg_dump's own gzip (`-Fc`, level 6) against zstd in our stream
    (`-Fc -Z0`, then zstandard) — stored size and backup time — which picks the default.
(b) backup throughput: our backup (pg_dump → compression → SHA-256 → S3 multipart, row
    counts in the same snapshot) against raw `pg_dump` to /dev/null with the same
    compression (for zstd: `pg_dump -Z0 | zstd > /dev/null`). Target: ratio ≥ 0.95.
(c) memory: peak RSS (VmHWM) of the process doing the streaming, at ~100 MB and
    ~1 GB of data. Target: no more than 20 MB apart.
(d) restore: our restore's data path (size + SHA-256 check of the object, `pg_restore
    --list`, a new database, pg_restore streamed from S3, row counts) against raw
    `pg_restore` of the same archive from a local file into the same server; the swap
    (two renames) is timed on its own. Target: ratio ≤ 1.1, plus the swap.

The streaming runs in a child process (`python -m bench.data child-…`), so its memory is
its own and moto (which serves S3 from this process) is not counted in it.

Note the machine: on 2 cores, moto's own work (HTTP, MD5 of every part) and botocore's
payload SHA-256 (plain-HTTP endpoints are signed with it) take CPU from the very pg_dump
and compression the baseline has to itself; against S3 proper neither runs on our cores.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.common import platform_and_prefect, report

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATABASE = "bench_data"
BUCKET = "complianceagent-backups"
ROWS_PER_100MB = 800_000  # ~125 bytes a row on disk (with its primary key)
MB = 1e6


# --- the child processes -----------------------------------------------------------------


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB. VmHWM, not `ru_maxrss`: a child's ru_maxrss
    starts at its parent's RSS at fork time (Linux keeps the old mm's high-water mark
    across exec), and the parent here holds moto with every object uploaded so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class _CompletionTime(logging.Handler):
    """Picks "S3 put them together in 1.23s" out of the backup's log."""

    seconds = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"put them together in ([0-9.]+)s", record.getMessage())
        if found:
            self.seconds = float(found.group(1))


def child_backup(compression: str, level: str, key: str) -> None:
    from runbook.decisions.backups import Compression
    from tasks.postgres_streams import stream_dump_to_s3

    completion = _CompletionTime()
    logging.getLogger("prefect.runbook").addHandler(completion)
    before = _status_kb("VmRSS")
    cpu = _cpu_seconds(resource.RUSAGE_SELF)
    started = time.perf_counter()
    manifest = stream_dump_to_s3(
        BUCKET, key, "20260101T000000.000000Z", Compression(compression), zstd_level=int(level)
    )
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - started,
                "cpu": _cpu_seconds(resource.RUSAGE_SELF) - cpu,
                "pg_dump_cpu": _cpu_seconds(resource.RUSAGE_CHILDREN),
                "rss_before_kb": before,
                "peak_rss_kb": _status_kb("VmHWM"),
                "size": manifest.size_bytes,
                "dump_bytes": manifest.dump_bytes,
                "sha256": manifest.sha256,
                "rows": manifest.total_rows,
                "complete_seconds": completion.seconds,
            }
        )
    )


def child_restore(key: str, compression: str, sha256: str, scratch: str) -> None:
    from runbook.decisions.backups import Compression
    from tasks.postgres import count_rows, create_database
    from tasks.postgres_streams import list_archive, pg_restore_from_s3
    from tasks.s3_streams import hash_object

    started = time.perf_counter()
    checked = hash_object.fn(BUCKET, key)
    assert checked["sha256"] == sha256
    list_archive.fn(BUCKET, key, Compression(compression))
    checked_at = time.perf_counter()
    create_database.fn(scratch, like=DATABASE)
    pg_restore_from_s3.fn(BUCKET, key, Compression(compression), sha256, scratch)
    restored_at = time.perf_counter()
    rows = sum(count_rows.fn(scratch).values())
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "check": checked_at - started,
                "restore": restored_at - checked_at,
                "count": done - restored_at,
                "rows": rows,
            }
        )
    )


def _child(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.data", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench child {args[0]} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- the baselines -----------------------------------------------------------------------


def _libpq(dsn: str) -> tuple[list[str], dict[str, str]]:
    params = conninfo_to_dict(dsn)
    password = str(params.pop("password"))
    env = {**os.environ, "PGPASSWORD": password}
    return [f"--dbname={make_conninfo('', **params)}"], env


def _raw_dump(platform: Any, dsn: str, compression: str, level: int) -> float:
    """Seconds of `pg_dump -Fc -Z6 > /dev/null`, or `pg_dump -Fc -Z0 | zstd > /dev/null`."""
    pg_dump = platform.postgres.bin("pg_dump")
    args, env = _libpq(dsn)
    started = time.perf_counter()
    if compression == "gzip":
        subprocess.run(
            [pg_dump, "-Fc", "-Z6", *args], env=env, stdout=subprocess.DEVNULL, check=True
        )
        return time.perf_counter() - started
    dump = subprocess.Popen([pg_dump, "-Fc", "-Z0", *args], env=env, stdout=subprocess.PIPE)
    assert dump.stdout is not None
    with dump.stdout:
        subprocess.run(
            ["zstd", f"-{level}", "-q", "-c"],
            stdin=dump.stdout,
            stdout=subprocess.DEVNULL,
            check=True,
        )
    assert dump.wait() == 0
    return time.perf_counter() - started


def _raw_restore(platform: Any, dsn: str, archive: Path, database: str) -> float:
    args, env = _libpq(make_conninfo(dsn, dbname=database))
    started = time.perf_counter()
    subprocess.run(
        [platform.postgres.bin("pg_restore"), "--no-owner", "--exit-on-error", *args, str(archive)],
        env=env,
        check=True,
    )
    return time.perf_counter() - started


# --- the data ------------------------------------------------------------------------------


def _fill(dsn: str, first: int, last: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute(
            "CREATE UNLOGGED TABLE IF NOT EXISTS events (id bigint PRIMARY KEY,"
            " account text NOT NULL, payload text NOT NULL, at timestamptz NOT NULL)"
        )
        db.execute(
            "INSERT INTO events SELECT g, 'acct-' || (g %% 5000),"
            " md5(g::text) || md5((g * 7)::text), now() - g * interval '1 second'"
            " FROM generate_series(%s::bigint, %s::bigint) g",
            (first, last),
        )
        db.execute("VACUUM ANALYZE events")


def _size_mb(dsn: str) -> float:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return float(row[0]) / MB


def _drop(platform: Any, *names: str) -> None:
    with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as admin:
        for name in names:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the figures -------------------------------------------------------------------------


def _backups(
    platform: Any, env: dict[str, str], dsn: str, compression: str, level: int, n: int, tag: str
) -> tuple[list[dict[str, Any]], list[float]]:
    """`n` of ours and `n` raw, interleaved (the machine's noise hits both alike)."""
    ours, raw = [], []
    for i in range(n):
        parent_cpu = _cpu_seconds(resource.RUSAGE_SELF)  # moto serves S3 from this process
        result = _child(env, "child-backup", compression, str(level), f"bench/{tag}-{i}")
        result["moto_cpu"] = _cpu_seconds(resource.RUSAGE_SELF) - parent_cpu
        ours.append(result)
        raw.append(_raw_dump(platform, dsn, compression, level))
    return ours, raw


def _throughput(title: str, ours: list[dict[str, Any]], raw: list[float]) -> None:
    dump_mb = ours[0]["dump_bytes"] / MB
    report(
        f"(b) {title} (MB/s of pg_dump output)",
        [r["dump_bytes"] / MB / r["seconds"] for r in ours],
        [dump_mb / seconds for seconds in raw],
        "MB/s",
        "ratio ≥ 0.95",
    )
    mid = sorted(ours, key=lambda r: r["seconds"])[len(ours) // 2]
    print(
        f"   CPU of ours: {mid['cpu']:.1f} s streaming process + {mid['pg_dump_cpu']:.1f} s "
        f"pg_dump + {mid['moto_cpu']:.1f} s moto (the S3 stand-in, same 2 cores); "
        f"moto put the parts together in {mid['complete_seconds']:.2f} s after the last one"
    )


def bench_backups(platform: Any, env: dict[str, str], dsn: str) -> dict[str, Any]:
    """(a), (b) and (c) at ~100 MB then ~1 GB. Returns the 1 GB backup, for (d)."""
    runs = {
        "gzip-6": _backups(platform, env, dsn, "gzip", 6, 2, "gzip-6"),
        "zstd-3": _backups(platform, env, dsn, "zstd", 3, 1, "zstd-3"),
        "zstd-1": _backups(platform, env, dsn, "zstd", 1, 3, "zstd-1"),
    }
    dump_mb = runs["zstd-1"][0][0]["dump_bytes"] / MB
    print(f"\n== (a) compression of {dump_mb:.0f} MB of pg_dump output (custom format)")
    print(f"   {'codec':8} {'stored MB':>10} {'ratio':>6} {'ours s':>8} {'raw s':>8}")
    for name, (ours, raw) in runs.items():
        size = ours[0]["size"] / MB
        print(
            f"   {name:8} {size:10.1f} {dump_mb / size:6.2f} "
            f"{min(r['seconds'] for r in ours):8.2f} {min(raw):8.2f}"
        )
    gzip, zstd = runs["gzip-6"][0], runs["zstd-1"][0]
    speedup = min(r["seconds"] for r in gzip) / min(r["seconds"] for r in zstd)
    print(
        f"   → default zstd level 1: {speedup:.1f}x faster than pg_dump's gzip, "
        f"{(zstd[0]['size'] / gzip[0]['size'] - 1) * 100:+.0f} % size"
    )
    _throughput("backup throughput, gzip-6, ~100 MB", *runs["gzip-6"])
    _throughput("backup throughput, zstd-1, ~100 MB", *runs["zstd-1"])
    small = zstd[0]

    _fill(dsn, ROWS_PER_100MB + 1, 10 * ROWS_PER_100MB)
    print(f"\nbench_data: {_size_mb(dsn):.0f} MB", flush=True)
    ours, raw = _backups(platform, env, dsn, "zstd", 1, 2, "zstd-1-1gb")
    _throughput("backup throughput, zstd-1, ~1 GB", ours, raw)
    big = ours[0]

    print("\n== (c) peak RSS of the streaming process (VmHWM)")
    for label, result in (("~100 MB", small), ("~1 GB", big)):
        print(
            f"   {label:8} ({result['dump_bytes'] / MB:5.0f} MB dumped): peak "
            f"{result['peak_rss_kb'] / 1024:6.1f} MiB; after imports, before streaming "
            f"{result['rss_before_kb'] / 1024:.1f} MiB"
        )
    apart = (big["peak_rss_kb"] - small["peak_rss_kb"]) / 1024
    print(f"   apart: {apart:.1f} MiB   target: ≤ 20 MB", flush=True)
    return {**big, "key": "bench/zstd-1-1gb-0"}


def bench_restore(
    platform: Any, env: dict[str, str], dsn: str, backup: dict[str, Any], samples: int = 2
) -> None:
    """(d): the 1 GB zstd backup, ours from S3 against raw pg_restore from a local file,
    alternated (this machine's noise is ±20 %)."""
    import zstandard

    from tasks.postgres import swap_databases

    raw, ours = [], []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as workdir:
        archive = Path(workdir) / "archive.dump"
        body = platform.s3().get_object(Bucket=BUCKET, Key=backup["key"])["Body"]
        with archive.open("wb") as file:
            zstandard.ZstdDecompressor().copy_stream(body, file)
        for _ in range(samples):
            with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as admin:
                admin.execute(
                    f"CREATE DATABASE bench_raw OWNER {platform.postgres.app_user} "
                    "TEMPLATE template0"
                )
            raw.append(_raw_restore(platform, dsn, archive, "bench_raw"))
            _drop(platform, "bench_raw")
            _drop(platform, "bench_scratch")
            result = _child(
                env, "child-restore", backup["key"], "zstd", backup["sha256"], "bench_scratch"
            )
            assert result["rows"] == backup["rows"], (result, backup)
            ours.append(result)
    started = time.perf_counter()
    swap_databases.fn(DATABASE, "bench_scratch", "bench_data_old")
    swap = time.perf_counter() - started
    _drop(platform, "bench_data_old")

    report(
        "(d) restore of the ~1 GB backup while the platform is stopped: create + pg_restore "
        "streamed from S3 + row counts, vs raw pg_restore from a local file",
        [r["restore"] + r["count"] for r in ours],
        raw,
        "s",
        "ratio ≤ 1.1, plus the swap",
    )
    check = statistics.median(r["check"] for r in ours)
    counts = statistics.median(r["count"] for r in ours)
    print(
        f"   of which row counts {counts:.1f} s; swap (end sessions, two renames in one "
        f"transaction) {swap:.3f} s; before the approval, while nothing is stopped, the "
        f"size + SHA-256 check of the object and pg_restore --list took {check:.1f} s"
    )


def main() -> None:
    started = time.perf_counter()
    with platform_and_prefect() as platform:
        with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {DATABASE} OWNER {platform.postgres.app_user}")
        dsn = make_conninfo(platform.postgres.dsn, dbname=DATABASE)
        env = {**os.environ, "RUNBOOK_DATABASE_DSN": dsn}
        _fill(dsn, 1, ROWS_PER_100MB)
        print(f"bench_data: {_size_mb(dsn):.0f} MB", flush=True)
        big = bench_backups(platform, env, dsn)
        bench_restore(platform, env, dsn, big)
    print(f"\n(bench.data took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child-backup":
        child_backup(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == "child-restore":
        child_restore(*sys.argv[2:6])
    else:
        main()
