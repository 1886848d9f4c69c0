"""A throw-away PostgreSQL cluster on a free loopback port (real initdb, real postmaster)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self
from urllib.parse import quote

import psycopg
from psycopg import sql

from .base import LOOPBACK, SandboxDependencyError, ServerProcess, pid_alive


def find_postgres_bindir() -> Path:
    """Return the newest PostgreSQL *server* bin directory (the one with ``initdb``).

    ``pg_config --bindir`` is not enough on Debian: it may name the client-only
    ``/usr/bin``, where ``initdb`` and ``postgres`` are missing.
    """

    def major(path: str) -> int:
        match = re.search(r"/postgresql/(\d+)/", path)
        return int(match.group(1)) if match else -1

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major, reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        bindir = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        if bindir and (Path(bindir) / "initdb").exists():
            return Path(bindir)
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).parent
    raise SandboxDependencyError(
        "PostgreSQL server programs (initdb, pg_ctl, postgres) were not found. Run the "
        "project's setup script (it installs them with `apt-get install -y postgresql`), "
        "then try again."
    )


class PostgresServer(ServerProcess):
    """A throw-away PostgreSQL cluster on a free loopback port.

    ``start()`` runs ``initdb`` (password auth everywhere: ``scram-sha-256``), starts the
    server, waits until a login works, and creates the application role and database. The
    app role owns its database and has ``CREATEDB`` and ``pg_signal_backend``, which is what
    the restore runbook needs to create a scratch database, terminate sessions and
    ``ALTER DATABASE ... RENAME``. As root, every server program runs as the ``postgres``
    user, because ``initdb`` and ``postgres`` refuse to run as root.

    ``stop(keep_data=True)`` stops the server but keeps the cluster, so a later
    ``start()`` brings the same data back on the same port (an outage, not a wipe).
    """

    def __init__(
        self,
        superuser_password: str | None = None,
        app_user: str = "complianceagent",
        app_password: str | None = None,
        app_db: str = "complianceagent",
        *,
        port: int | None = None,
        bindir: str | Path | None = None,
        max_connections: int = 100,
        startup_timeout: float = 30.0,
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout)
        # Random defaults: a sandbox password that never changes ends up in someone's
        # real configuration sooner or later.
        self.superuser_password = superuser_password or secrets.token_hex(16)
        self.app_user = app_user
        self.app_password = app_password or secrets.token_hex(16)
        self.app_db = app_db
        self.max_connections = max_connections
        self._bindir = Path(bindir) if bindir is not None else None
        self._provisioned = False
        self._running = False

    # -- addresses -------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """``postgresql://`` URL of the application role and database."""
        return self._url(self.app_user, self.app_password, self.app_db)

    @property
    def admin_dsn(self) -> str:
        """``postgresql://`` URL of the ``postgres`` superuser on the ``postgres`` database."""
        return self._url("postgres", self.superuser_password, "postgres")

    def _url(self, user: str, password: str, db: str) -> str:
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(db, safe='')}"
        )

    @property
    def bindir(self) -> Path:
        """Server bin directory: use its ``pg_dump``/``pg_restore`` (same major version)."""
        if self._bindir is None:
            self._bindir = find_postgres_bindir()
        return self._bindir

    def bin(self, program: str) -> str:
        """Full path of a program of this server's version, e.g. ``bin("pg_dump")``."""
        return str(self.bindir / program)

    @property
    def data_dir(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("PostgresServer has no cluster: call start() first")
        return self._tmp / "data"

    @property
    def log_path(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("PostgresServer has no cluster: call start() first")
        return self._tmp / "postgres.log"

    @property
    def is_running(self) -> bool:
        return self._running and self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        with self._lock:
            if self.is_running:
                return self
            self._arm_atexit()
            try:
                if self._proc is not None:
                    self._stop_process()  # it died on its own: reap it, then restart
                if self._tmp is None:
                    self._init_cluster()
                self._start_postmaster()
                if not self._provisioned:
                    self._provision()
                    self._provisioned = True
            except BaseException:
                self.stop()
                raise
            self._running = True
            return self

    def stop(self, keep_data: bool = False) -> None:
        """Stop the server (``pg_ctl stop -m fast``); unless ``keep_data``, delete the cluster.

        Idempotent, and safe to call after a failed start.
        """
        with self._lock:
            if self._tmp is None:
                self._disarm_atexit()
                return
            self._stop_process()
            self._running = False
            if keep_data:
                return  # the atexit hook stays armed: it still has a directory to remove
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self._provisioned = False
            if not self._port_fixed:
                self._port = None
            self._disarm_atexit()

    # -- internals -------------------------------------------------------------------

    def _as_postgres(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(
        self, program: str, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        assert self._tmp is not None
        return subprocess.run(
            [*self._as_postgres(), self.bin(program), *args],
            # A cwd the postgres user can enter: runuser keeps root's, and postgres
            # complains about not being able to chdir back there.
            cwd=self._tmp,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _init_cluster(self) -> None:
        base = tempfile.gettempdir()
        if os.geteuid() == 0 and not os.stat(base).st_mode & 0o001:
            base = "/tmp"  # the postgres user must be able to traverse the parent
        self._tmp = Path(tempfile.mkdtemp(prefix="ca-postgres-", dir=base))
        pwfile = self._tmp / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            for path in (self._tmp, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        try:
            result = self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # a throw-away cluster: durability buys nothing but time
                "--no-instructions",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stderr}")
        settings = {
            "listen_addresses": f"'{LOOPBACK}'",
            "unix_socket_directories": f"'{self._tmp}'",
            "max_connections": str(self.max_connections),
            "shared_buffers": "'32MB'",
            # The latency diagnosis reads pg_stat_statements (CREATE EXTENSION at seed).
            "shared_preload_libraries": "'pg_stat_statements'",
            # Speed over durability: the cluster dies with the test session anyway.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# sandbox.services.PostgresServer\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _start_postmaster(self) -> None:
        # The postmaster runs in the foreground as our (grand)child rather than being
        # daemonized by `pg_ctl start`: then we reap it when it exits. Daemonized, it is
        # re-parented to PID 1, which in a container often never reaps, leaving zombies.
        postgres = [*self._as_postgres(), self.bin("postgres"), "-D", str(self.data_dir)]
        self._launch(
            "PostgreSQL",
            lambda port: [*postgres, "-p", str(port)],
            self.log_path,
            # A restarted cluster must come back where its clients expect it.
            may_move=not (self._port_fixed or self._provisioned),
        )

    def _answers(self) -> bool:
        """The superuser can log in (proves auth too)."""
        if not self._postmaster_says_ready():
            return False  # until our postmaster says so, whatever answers is not it
        try:
            with psycopg.connect(self.admin_dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False  # refused, or "the database system is starting up"
        return True

    def _provision(self) -> None:
        user = sql.Identifier(self.app_user)
        statements = [
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                user, sql.Literal(self.app_password)
            ),
            # Lets the app role end sessions of other non-superuser roles too; its own
            # sessions it may always terminate.
            sql.SQL("GRANT pg_signal_backend TO {}").format(user),
            # Owner + CREATEDB is what ALTER DATABASE ... RENAME requires.
            sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(self.app_db), user),
        ]
        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5) as conn:
            for statement in statements:
                conn.execute(statement)

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if (self.data_dir / "postmaster.pid").exists():
            self._run(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
                timeout=40,
            )
            # If pg_ctl could not do it (a hung server, a stale pid file), signal directly
            # so no server outlives us. SIGQUIT is PostgreSQL's immediate shutdown.
            pid = self._postmaster_pid()
            if pid is not None and pid_alive(pid):
                for sig in (signal.SIGQUIT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                    deadline = time.monotonic() + 5.0
                    while pid_alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    if not pid_alive(pid):
                        break
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()  # runuser itself hung; the server is already gone
                proc.wait(timeout=5)

    def _postmaster_says_ready(self) -> bool:
        # The status line of postmaster.pid, which is also what `pg_ctl -w` waits for.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def _postmaster_pid(self) -> int | None:
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first_line)
        except (OSError, IndexError, ValueError):
            return None
