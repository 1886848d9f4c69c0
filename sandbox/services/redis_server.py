"""A ``redis-server`` subprocess on a free loopback port, with no persistence."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .base import LOOPBACK, SandboxDependencyError, ServerProcess


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


class RedisServer(ServerProcess):
    """A ``redis-server`` subprocess on a free loopback port, with no persistence.

    ``stop()`` then ``start()`` restarts it on the *same* port (empty again), which is how
    tests simulate a Redis outage. With ``password`` the server requires it; the password
    goes into a 0600 config file, not onto the command line where ``ps`` shows it.
    """

    def __init__(
        self, password: str | None = None, *, port: int | None = None, startup_timeout: float = 10.0
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout)
        self.password = password

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> Self:
        server = ensure_redis_server_installed()
        with self._starting("ca-redis-") as tmp:
            if tmp is None:
                return self
            conf = tmp / "redis.conf"
            conf.touch(mode=0o600)
            if self.password:
                escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
                conf.write_text(f'requirepass "{escaped}"\n')
            self._launch_redis(server, conf)
            # Once it has run on a port, restarts must come back on that port.
            self._port_fixed = True
        return self

    def _launch_redis(self, server: str, conf: Path) -> None:
        assert self._tmp is not None
        tmp = str(self._tmp)
        self._launch(
            "redis-server",
            lambda port: [
                server,
                str(conf),
                "--port",
                str(port),
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
                tmp,
            ],
            self._tmp / "redis.log",
            may_move=not self._port_fixed,
        )

    def _answers(self) -> bool:
        client = redis.Redis(
            host=LOOPBACK,
            port=self.port,
            password=self.password,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # the caller's loop is the retry
        )
        try:
            return bool(client.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False  # not up yet, or someone else's server holds the port (poll() tells)
        finally:
            client.close()
