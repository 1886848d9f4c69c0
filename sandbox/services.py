"""Real local servers for tests and the sandbox: PostgreSQL, Redis and the moto AWS server.

Every class here starts a genuine server on a free loopback port and is a context manager
that stops it again, also when the body raises, removing whatever it wrote to disk. They
also register an ``atexit`` hook while running so an interpreter that exits without
leaving the ``with`` block (a crashed fixture, an uncaught ``KeyboardInterrupt``) does not
leave a server behind. Nothing here touches global state: callers get URLs/DSNs and pass
them on explicitly.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import quote

import psycopg
import redis
from psycopg import sql
from redis.backoff import NoBackoff
from redis.retry import Retry

LOOPBACK = "127.0.0.1"

# How many times a server is retried on a fresh port when the one free_port() picked was
# taken by someone else in the meantime (free_port cannot reserve a port).
_PORT_ATTEMPTS = 3


class SandboxDependencyError(RuntimeError):
    """A program the sandbox needs is not installed on this machine."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def ensure_redis_server_installed() -> str:
    """Return the path of ``redis-server``, or explain how to install it."""
    found = shutil.which("redis-server")
    if found is None:
        found = next(
            (
                p
                for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server")
                if os.access(p, os.X_OK)
            ),
            None,
        )
    if found is None:
        raise SandboxDependencyError(
            "redis-server is not installed, and the sandbox and the tests need a real one. "
            "Run the project's setup script (it installs it with "
            "`apt-get install -y redis-server`), then try again."
        )
    return found


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


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust the signal
    # Field 3, after the parenthesised command name (which may itself contain spaces).
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Service:
    """Start/stop lifecycle shared by every server: context manager plus an atexit net."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        # start() cleans up after itself when it fails, so __exit__ is not needed then.
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _arm_atexit(self) -> None:
        atexit.unregister(self.stop)  # never register twice
        atexit.register(self.stop)

    def _disarm_atexit(self) -> None:
        atexit.unregister(self.stop)


# --------------------------------------------------------------------------- PostgreSQL


class PostgresServer(Service):
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
        # Random defaults: a sandbox password that never changes ends up in someone's
        # real configuration sooner or later.
        self.superuser_password = superuser_password or secrets.token_hex(16)
        self.app_user = app_user
        self.app_password = app_password or secrets.token_hex(16)
        self.app_db = app_db
        self.max_connections = max_connections
        self.startup_timeout = startup_timeout
        self._bindir = Path(bindir) if bindir is not None else None
        self._port = port
        self._port_fixed = port is not None
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._provisioned = False
        self._running = False
        self._lock = threading.RLock()

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("PostgresServer has no port yet: call start() first")
        return self._port

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
                    self._stop_postmaster()  # it died on its own: reap it, then restart
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
            self._stop_postmaster()
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
        for attempt in range(_PORT_ATTEMPTS):
            if self._port is None:
                self._port = free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [*postgres, "-p", str(self._port)],
                    cwd=self._tmp,  # see _run
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_until_accepting():
                return
            self._stop_postmaster()
            with self.log_path.open(errors="replace") as log_file:
                log_file.seek(log_offset)
                new_log = log_file.read()
            port_taken = "Address already in use" in new_log
            # A restarted cluster must come back where its clients expect it.
            may_move = not (self._port_fixed or self._provisioned)
            if port_taken and may_move and attempt + 1 < _PORT_ATTEMPTS:
                self._port = None
                continue
            raise RuntimeError(
                f"PostgreSQL did not start on port {self._port} within "
                f"{self.startup_timeout:g}s:\n--- server log ---\n{new_log[-3000:]}"
            )

    def _wait_until_accepting(self) -> bool:
        """Wait until the superuser can log in (proves auth too); False if it died/hung."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if not self._postmaster_says_ready():
                # Until our postmaster says so, whatever answers on the port is not it.
                time.sleep(0.02)
                continue
            try:
                with psycopg.connect(self.admin_dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)  # refused, or "the database system is starting up"
        return False

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

    def _stop_postmaster(self) -> None:
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


# --------------------------------------------------------------------------------- Redis


class RedisServer(Service):
    """A ``redis-server`` subprocess on a free loopback port, with no persistence.

    ``stop()`` then ``start()`` restarts it on the *same* port (empty again), which is how
    tests simulate a Redis outage. With ``password`` the server requires it; the password
    goes into a 0600 config file, not onto the command line where ``ps`` shows it.
    """

    def __init__(
        self, password: str | None = None, *, port: int | None = None, startup_timeout: float = 10.0
    ) -> None:
        self.password = password
        self.startup_timeout = startup_timeout
        self._port = port
        self._port_fixed = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._lock = threading.RLock()

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        with self._lock:
            if self.is_running:
                return self
            server = ensure_redis_server_installed()
            self._arm_atexit()
            try:
                self._tmp = Path(tempfile.mkdtemp(prefix="ca-redis-"))
                conf = self._tmp / "redis.conf"
                conf.touch(mode=0o600)
                if self.password:
                    escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
                    conf.write_text(f'requirepass "{escaped}"\n')
                self._launch(server, conf)
                # Once it has run on a port, restarts must come back on that port.
                self._port_fixed = True
            except BaseException:
                self.stop()
                raise
            return self

    def stop(self) -> None:
        """Stop the server and remove its directory. Idempotent."""
        with self._lock:
            self._terminate()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            self._disarm_atexit()

    def _launch(self, server: str, conf: Path) -> None:
        assert self._tmp is not None
        log_path = self._tmp / "redis.log"
        for attempt in range(_PORT_ATTEMPTS):
            if self._port is None:
                self._port = free_port()
            with log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [
                        server,
                        str(conf),
                        "--port",
                        str(self._port),
                        "--bind",
                        LOOPBACK,
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--daemonize",
                        "no",
                        # Even a manual SAVE must not drop dump.rdb into the caller's cwd.
                        "--dir",
                        str(self._tmp),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_until_ready():
                return
            self._terminate()
            log_text = _tail(log_path)
            if (
                "Address already in use" in log_text
                and not self._port_fixed
                and attempt + 1 < _PORT_ATTEMPTS
            ):
                self._port = None
                log_path.unlink(missing_ok=True)
                continue
            raise RuntimeError(f"redis-server did not start on port {self._port}:\n{log_text}")

    def _wait_until_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            client = redis.Redis(
                host=LOOPBACK,
                port=self.port,
                password=self.password,
                socket_connect_timeout=0.5,
                socket_timeout=0.5,
                retry=Retry(NoBackoff(), 0),  # this loop is the retry
            )
            try:
                if client.ping():
                    return True
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass  # not up yet, or someone else's server holds the port (poll() tells)
            finally:
                client.close()
            time.sleep(0.02)
        return False

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: Redis exits at once (nothing to save)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        else:
            proc.wait()


# ---------------------------------------------------------------------------------- moto


class MotoServer(Service):
    """The moto AWS emulator (S3, Secrets Manager, ...) served over HTTP from a thread.

    Point boto3 at it with ``boto3.client("s3", **moto.boto3_kwargs())``. Note that moto
    keeps its state per *process*: two MotoServers in one process share buckets and
    secrets; ``reset()`` wipes that state.
    """

    def __init__(self, *, port: int | None = None) -> None:
        # Port 0 lets the OS pick while binding: ThreadedMotoServer binds inside its thread
        # and would wait forever if a pre-picked port had been taken meanwhile.
        self._port = port or 0
        self._server: Any = None
        self._lock = threading.RLock()

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("MotoServer has no port yet: call start() first")
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def boto3_kwargs(self, region_name: str = "us-east-1") -> dict[str, str]:
        """Keyword arguments for ``boto3.client(...)``: endpoint, region, dummy credentials."""
        return {
            "endpoint_url": self.endpoint_url,
            "region_name": region_name,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }

    def start(self) -> Self:
        with self._lock:
            if self._server is not None:
                return self
            # moto is a dev dependency: import it only when a moto server is wanted.
            from moto.server import ThreadedMotoServer

            server = ThreadedMotoServer(ip_address=LOOPBACK, port=self._port, verbose=False)
            # werkzeug logs every request at INFO: noise on `make up`'s console.
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            self._arm_atexit()
            try:
                server.start()
                self._port = int(server.get_host_and_port()[1])
            except BaseException:
                self._disarm_atexit()
                raise
            self._server = server
            return self

    def stop(self) -> None:
        """Stop serving and release the port. Idempotent; ``start()`` reuses the port."""
        with self._lock:
            server, self._server = self._server, None
            if server is not None:
                server.stop()
                # ThreadedMotoServer.stop() leaves the listening socket open.
                wsgi_server = getattr(server, "_server", None)
                if wsgi_server is not None:
                    wsgi_server.server_close()
            self._disarm_atexit()

    def reset(self) -> None:
        """Forget every bucket, secret, ... (moto's ``/moto-api/reset``)."""
        url = f"{self.endpoint_url}/moto-api/reset"  # always http://127.0.0.1
        request = urllib.request.Request(url, method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            response.read()


# ------------------------------------------------------------------- in-process HTTP base


class _ServiceHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its owner and does not shout about gone clients."""

    daemon_threads = True  # a handler still sleeping in a delay must not block stop()
    service: Any = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # the client gave up (e.g. its timeout fired during an injected delay)
        super().handle_error(request, client_address)


class ThreadedHTTPService(Service):
    """Serves ``handler_class`` on loopback from a daemon thread; base of the HTTP stand-ins.

    ``stop()`` then ``start()`` serves again on the same port.
    """

    handler_class: ClassVar[type[BaseHTTPRequestHandler]]
    thread_name: ClassVar[str] = "sandbox-http"

    def __init__(self, host: str = LOOPBACK, port: int = 0) -> None:
        self.host = host
        self._port = port
        self._httpd: _ServiceHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle_lock = threading.RLock()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"{type(self).__name__} has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._httpd is not None

    def start(self) -> Self:
        with self._lifecycle_lock:
            if self._httpd is not None:
                return self
            httpd = _ServiceHTTPServer((self.host, self._port), self.handler_class)
            httpd.service = self
            self._port = int(httpd.server_address[1])
            self._httpd = httpd
            self._thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},  # keeps stop() quick
                name=f"{self.thread_name}:{self._port}",
                daemon=True,
            )
            self._thread.start()
            self._arm_atexit()
            return self

    def stop(self) -> None:
        """Stop serving and close the listening socket. Idempotent."""
        with self._lifecycle_lock:
            httpd, self._httpd = self._httpd, None
            thread, self._thread = self._thread, None
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
            if thread is not None:
                thread.join(timeout=5)
            self._disarm_atexit()
