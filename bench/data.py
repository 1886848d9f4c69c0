"""The data runbooks' figures, in one run, on one database (`bench_data`, an unlogged table
of ordinary rows — account, timestamp, a JSON document of repeated vocabulary, numbers,
paths and e-mail addresses — filled by `generate_series`), against the sandbox's
PostgreSQL and moto S3.

(a) compression: pg_dump's own gzip (`-Fc`, level 6) against zstd levels 1 and 3 in our
    stream (`-Fc -Z0`, then zstandard) — stored size and backup time — which picks the
    default (level 1). Each row measures what it says: the `zstd` CLI gives the same
    sizes on the same rows. zstd -1 coming out smaller than -3 is zstd on generated rows
    (sequential ids and random hex both do it; -3's shorter matches cost more than the
    literals they replace); on text of varied words -3 was ~5 % smaller. Level 1 stays
    the default either way: -3 costs about twice the CPU, which pg_dump needs on 2 cores.
(b) backup throughput: our backup (pg_dump → compression → SHA-256 → S3 multipart, row
    counts in the same snapshot) against
    - raw `pg_dump` to /dev/null with the same compression (`pg_dump -Z0 | zstd -1 >
      /dev/null` for zstd): it pays no S3 cost, so on 2 cores the ratio stays below 1;
    - the peer, the script a user would write instead: `pg_dump -Fc -Z0 | zstd -1 |`
      a few lines of Python handing stdin to boto3's `upload_fileobj` (8 MiB parts), to
      the same moto server. Target: ours/peer ≥ 0.95.
(c) memory: peak RSS (VmHWM) of the process doing the streaming (ours, and the peer's
    uploader), at the small and the big size. Target: no more than 20 MB apart.
(d) restore: our restore's data path (size + SHA-256 check of the object, `pg_restore
    --list`, a new database, pg_restore streamed from S3, row counts) against raw
    `pg_restore` of the same archive from a local file into the same server; the swap
    (two renames) is timed on its own. Target: ratio ≤ 1.1, plus the swap.

Sizes: `BENCH_DATA_MB` (default 100) and `BENCH_DATA_BIG_MB` (default 1000) of table
data; on a shared machine, e.g. `BENCH_DATA_MB=20 BENCH_DATA_BIG_MB=60 python -m bench data`.

The streaming runs in a child process (`python -m bench.data child-…`), so its memory is
its own and moto (which serves S3 from this process) is not counted in it.

Note the machine: on 2 cores, moto's own work (HTTP, MD5 of every part) and botocore's
payload SHA-256 (plain-HTTP endpoints are signed with it) take CPU from the very pg_dump
and compression the baseline has to itself; against S3 proper neither runs on our cores.
"""

from __future__ import annotations

import json
import os
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
from tasks.postgres_streams import ZSTD_LEVEL

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATABASE = "bench_data"
BUCKET = "complianceagent-backups"
ROWS_PER_MB = 4_500  # ~220 bytes a row on disk (with its primary key)
MB = 1e6
SMALL_MB = int(os.environ.get("BENCH_DATA_MB", "100"))
BIG_MB = int(os.environ.get("BENCH_DATA_BIG_MB", "1000"))


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


def child_backup(compression: str, level: str, key: str) -> None:
    from runbook.decisions.backups import Compression
    from tasks.postgres_streams import stream_dump_to_s3

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
            }
        )
    )


def child_peer_upload(key: str) -> None:
    """The peer: what a user would pipe `pg_dump -Fc -Z0 | zstd -1 |` into."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    s3 = boto3.client("s3", endpoint_url=os.environ["RUNBOOK_AWS_ENDPOINT_URL"])
    print("ready", flush=True)
    s3.upload_fileobj(
        sys.stdin.buffer, BUCKET, key, Config=TransferConfig(multipart_chunksize=8 * 2**20)
    )
    print(json.dumps({"peak_rss_kb": _status_kb("VmHWM")}))


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


def _peer_backup(platform: Any, env: dict[str, str], dsn: str, key: str) -> dict[str, Any]:
    """Seconds and uploader peak memory of `pg_dump -Fc -Z0 | zstd -1 | <upload_fileobj>`.

    The clock starts once the uploader has imported boto3, as ours starts after its imports.
    """
    args, pg_env = _libpq(dsn)
    read_end, write_end = os.pipe()
    upload = subprocess.Popen(
        [sys.executable, "-m", "bench.data", "child-peer-upload", key],
        stdin=read_end,
        stdout=subprocess.PIPE,
        env=env,
        cwd=PROJECT_ROOT,
        text=True,
    )
    os.close(read_end)
    assert upload.stdout is not None
    assert upload.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    dump = subprocess.Popen(
        [platform.postgres.bin("pg_dump"), "-Fc", "-Z0", *args], env=pg_env, stdout=subprocess.PIPE
    )
    assert dump.stdout is not None
    zstd = subprocess.Popen(["zstd", "-1", "-q", "-c"], stdin=dump.stdout, stdout=write_end)
    dump.stdout.close()  # zstd holds the pipe ends now
    os.close(write_end)
    output = upload.stdout.read()
    assert upload.wait() == 0, "the peer's upload failed"
    seconds = time.perf_counter() - started
    assert zstd.wait() == 0 and dump.wait() == 0, "the peer's pg_dump | zstd failed"
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return {**result, "seconds": seconds}


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
    """Rows like a compliance product's: repeated vocabulary, numbers, one md5 each."""
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute(
            "CREATE UNLOGGED TABLE IF NOT EXISTS events (id bigint PRIMARY KEY,"
            " account text NOT NULL, payload text NOT NULL, at timestamptz NOT NULL)"
        )
        db.execute(
            "INSERT INTO events SELECT g, 'acct-' || (g %% 5000), json_build_object("
            " 'framework', (ARRAY['soc2', 'iso27001', 'gdpr', 'hipaa', 'pci-dss'])[1 + g %% 5],"
            " 'status', (ARRAY['passed', 'failed', 'pending'])[1 + (g * 7) %% 3],"
            " 'score', (g * 31) %% 101, 'evidence', 'evidence/acct-' || (g %% 5000) || '/scan-'"
            " || g || '.pdf', 'checked_by', 'user' || (g %% 997) || '@example.com')::text,"
            " now() - g * interval '1 second'"
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


def _against_peer(
    platform: Any, env: dict[str, str], dsn: str, n: int, tag: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`n` of ours (zstd-1) and `n` of the peer, interleaved, to the same moto server."""
    ours, peer = [], []
    for i in range(n):
        ours.append(_child(env, "child-backup", "zstd", "1", f"bench/{tag}-ours-{i}"))
        peer.append(_peer_backup(platform, env, dsn, f"bench/{tag}-peer-{i}"))
    return ours, peer


def _versus_peer(title: str, ours: list[dict[str, Any]], peer: list[dict[str, Any]]) -> None:
    dump_mb = ours[0]["dump_bytes"] / MB
    report(
        f"(b) {title} (MB/s of pg_dump output), against the peer script",
        [r["dump_bytes"] / MB / r["seconds"] for r in ours],
        [dump_mb / r["seconds"] for r in peer],
        "MB/s",
        "ratio ≥ 0.95",
    )
    print(
        f"   peak RSS: ours {max(r['peak_rss_kb'] for r in ours) / 1024:.1f} MiB (Prefect and "
        f"the runbook imported), peer's uploader {max(r['peak_rss_kb'] for r in peer) / 1024:.1f}"
        " MiB (boto3 only)",
        flush=True,
    )


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
        f"pg_dump + {mid['moto_cpu']:.1f} s moto (the S3 stand-in, same 2 cores)"
    )


def bench_backups(platform: Any, env: dict[str, str], dsn: str) -> dict[str, Any]:
    """(a), (b) and (c) at the small then the big size. Returns the big backup, for (d)."""
    small_label, big_label = f"~{SMALL_MB} MB", f"~{BIG_MB} MB"
    runs = {
        "gzip-6": _backups(platform, env, dsn, "gzip", 6, 2, "gzip-6"),
        "zstd-3": _backups(platform, env, dsn, "zstd", 3, 2, "zstd-3"),
        "zstd-1": _backups(platform, env, dsn, "zstd", 1, 3, "zstd-1"),
    }
    dump_mb = runs["zstd-1"][0][0]["dump_bytes"] / MB
    print(f"\n== (a) compression of {dump_mb:.0f} MB of pg_dump output (custom format)")
    print(f"   {'codec':8} {'stored MB':>10} {'ratio':>6} {'ours s':>8} {'raw s':>8}")
    for name, (ours, raw) in runs.items():
        size = ours[0]["size"] / MB
        print(
            f"   {name:8} {size:10.1f} {dump_mb / size:6.2f} "
            f"{statistics.median(r['seconds'] for r in ours):8.2f} {statistics.median(raw):8.2f}"
        )
    gzip, zstd, zstd3 = runs["gzip-6"][0], runs["zstd-1"][0], runs["zstd-3"][0]
    seconds = {k: statistics.median(r["seconds"] for r in v[0]) for k, v in runs.items()}
    print(
        f"   → default zstd level {ZSTD_LEVEL}: {seconds['gzip-6'] / seconds['zstd-1']:.1f}x "
        f"faster than pg_dump's gzip, {(zstd[0]['size'] / gzip[0]['size'] - 1) * 100:+.0f} % "
        f"size; level 3 would be {(zstd3[0]['size'] / zstd[0]['size'] - 1) * 100:+.0f} % size "
        f"for {(seconds['zstd-3'] / seconds['zstd-1'] - 1) * 100:+.0f} % time"
    )
    _throughput(f"backup throughput, gzip-6, {small_label}", *runs["gzip-6"])
    _throughput(f"backup throughput, zstd-1, {small_label}", *runs["zstd-1"])
    _versus_peer(f"backup, zstd-1, {small_label}", *_against_peer(platform, env, dsn, 3, "small"))
    small = zstd[0]

    _fill(dsn, SMALL_MB * ROWS_PER_MB + 1, BIG_MB * ROWS_PER_MB)
    print(f"\nbench_data: {_size_mb(dsn):.0f} MB", flush=True)
    ours, raw = _backups(platform, env, dsn, "zstd", 1, 2, "zstd-1-big")
    _throughput(f"backup throughput, zstd-1, {big_label}", ours, raw)
    _versus_peer(f"backup, zstd-1, {big_label}", *_against_peer(platform, env, dsn, 2, "big"))
    big = ours[0]

    print("\n== (c) peak RSS of the streaming process (VmHWM)")
    for label, result in ((small_label, small), (big_label, big)):
        print(
            f"   {label:8} ({result['dump_bytes'] / MB:5.0f} MB dumped): peak "
            f"{result['peak_rss_kb'] / 1024:6.1f} MiB; after imports, before streaming "
            f"{result['rss_before_kb'] / 1024:.1f} MiB"
        )
    apart = (big["peak_rss_kb"] - small["peak_rss_kb"]) / 1024
    print(f"   apart: {apart:.1f} MiB   target: ≤ 20 MB", flush=True)
    return {**big, "key": "bench/zstd-1-big-0"}


def bench_restore(
    platform: Any, env: dict[str, str], dsn: str, backup: dict[str, Any], samples: int = 2
) -> None:
    """(d): the big zstd backup, ours from S3 against raw pg_restore from a local file,
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
        f"(d) restore of the ~{BIG_MB} MB backup while the platform is stopped: create + "
        "pg_restore streamed from S3 + row counts, vs raw pg_restore from a local file",
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
        _fill(dsn, 1, SMALL_MB * ROWS_PER_MB)
        print(f"bench_data: {_size_mb(dsn):.0f} MB", flush=True)
        big = bench_backups(platform, env, dsn)
        bench_restore(platform, env, dsn, big)
    print(f"\n(bench.data took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child-backup":
        child_backup(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == "child-peer-upload":
        child_peer_upload(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "child-restore":
        child_restore(*sys.argv[2:6])
    else:
        main()
