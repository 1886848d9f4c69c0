"""The PostgreSQL client programs (`pg_dump`, `pg_restore`) and the pipes to and from them.

Which program: it must be the server's major version (a newer pg_dump writes archives an
older pg_restore cannot read), so it comes from `RUNBOOK_POSTGRES_BINDIR`, else from
Debian's `/usr/lib/postgresql/<server major>/bin`, else from PATH, and is checked.

What it sees: not our environment (it holds every credential of the runbook) but an
allow-list — PATH, HOME, locale and time zone, libpq's non-secret connection variables
(so it connects as our own psycopg connection does) — plus `PGPASSWORD` from
`RUNBOOK_DATABASE_DSN`. No variable named like a password gets in otherwise.

What it says: its stderr can quote rows (a COPY error does) and be long, so it reaches an
exception only through `runbook.redaction.redact_output`.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import os
import queue
import re
import shutil
import subprocess
import threading
from collections.abc import Generator
from typing import IO

from runbook.redaction import redact_output
from runbook.settings import load_settings

PIPE_CHUNK = 1024 * 1024
READ_AHEAD = 8  # chunks of a program's output read ahead of the compression
STDERR_KEEP = 200  # lines of a client program's stderr kept before redaction and capping

_PLAIN_ENV = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR"})
# libpq's environment variables that choose where and how to connect, none of them a secret
# (https://www.postgresql.org/docs/15/libpq-envars.html).
_LIBPQ_ENV = frozenset(
    {
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGSYSCONFDIR",
        "PGOPTIONS",
        "PGAPPNAME",
        "PGSSLMODE",
        "PGREQUIRESSL",
        "PGSSLCOMPRESSION",
        "PGSSLCERT",
        "PGSSLKEY",
        "PGSSLROOTCERT",
        "PGSSLCRL",
        "PGSSLCRLDIR",
        "PGSSLSNI",
        "PGSSLMINPROTOCOLVERSION",
        "PGSSLMAXPROTOCOLVERSION",
        "PGREQUIREPEER",
        "PGREQUIREAUTH",
        "PGCHANNELBINDING",
        "PGGSSENCMODE",
        "PGKRBSRVNAME",
        "PGGSSLIB",
        "PGGSSDELEGATION",
        "PGCONNECT_TIMEOUT",
        "PGCLIENTENCODING",
        "PGTARGETSESSIONATTRS",
        "PGLOADBALANCEHOSTS",
        "PGDATESTYLE",
        "PGTZ",
        "PGLOCALEDIR",
    }
)


class PostgresToolError(RuntimeError):
    """pg_dump/pg_restore could not be found, is the wrong version, or failed."""


def _major(version_text: str) -> int:
    match = re.search(r"\(PostgreSQL\) (\d+)", version_text)
    if match is None:
        raise PostgresToolError(f"cannot read a PostgreSQL version from {version_text!r:.80}")
    return int(match.group(1))


@functools.lru_cache(maxsize=16)
def _version_of(program: str) -> str:
    result = subprocess.run(
        [program, "--version"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
        env=program_env(None),
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


def _passed_on(name: str) -> bool:
    if "password" in name.lower():
        return False
    return name in _PLAIN_ENV or name in _LIBPQ_ENV or name.startswith("LC_")


def program_env(password: str | None) -> dict[str, str]:
    """The whole environment of a client program: the allow-list, and the password."""
    env = {name: value for name, value in os.environ.items() if _passed_on(name)}
    if password is not None:
        env["PGPASSWORD"] = password
    return env


class StderrTail:
    """Drain a child's stderr on a thread (a full pipe would stall it); keep the tail."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_KEEP)
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        for line in stream:
            self.lines.append(line.decode(errors="replace").rstrip())

    def text(self) -> str:
        """The end of what the program said, row data redacted: fit for an exception."""
        self._thread.join(timeout=5)
        return redact_output("\n".join(self.lines))


def larger_pipe(stream: IO[bytes]) -> None:
    """Let the pipe hold 1 MiB instead of 64 KiB, where Linux allows: fewer stalls."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_CHUNK)


def pipe_chunks(stream: IO[bytes]) -> Generator[bytes, None, None]:
    while chunk := stream.read(PIPE_CHUNK):
        yield chunk


def read_ahead(
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


def feed(process: subprocess.Popen[bytes], chunks: Generator[bytes, None, None]) -> bool:
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


def stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the program if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def stop_when_done(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Give the program `timeout` seconds to finish on its own, then stop it."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
