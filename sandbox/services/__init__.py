"""Real local servers for tests and the sandbox: PostgreSQL, Redis and the moto AWS server.

Every class here starts a genuine server on a free loopback port and is a context manager
that stops it again, also when the body raises, removing whatever it wrote to disk. They
also register an ``atexit`` hook while running so an interpreter that exits without
leaving the ``with`` block (a crashed fixture, an uncaught ``KeyboardInterrupt``) does not
leave a server behind. Nothing here touches global state: callers get URLs/DSNs and pass
them on explicitly.

- `base`: the `Service` lifecycle, free ports, and `ServerProcess` (start on a free port,
  retry on a taken one, wait until it answers) that PostgreSQL and Redis share;
- `postgres_server`, `redis_server`, `moto_server`: one module per server;
- `alertmanager`: a real Prometheus Alertmanager (maintenance windows silence it);
- `http_service`: `ThreadedHTTPService`, the base of the in-process HTTP stand-ins.
"""

from .alertmanager import AlertmanagerServer, find_alertmanager
from .base import LOOPBACK, SandboxDependencyError, ServerProcess, Service, free_port, pid_alive
from .http_service import ThreadedHTTPService
from .moto_server import MotoServer
from .postgres_server import PostgresServer, find_postgres_bindir
from .redis_server import RedisServer, ensure_redis_server_installed

__all__ = [
    "LOOPBACK",
    "AlertmanagerServer",
    "MotoServer",
    "PostgresServer",
    "RedisServer",
    "SandboxDependencyError",
    "ServerProcess",
    "Service",
    "ThreadedHTTPService",
    "ensure_redis_server_installed",
    "find_alertmanager",
    "find_postgres_bindir",
    "free_port",
    "pid_alive",
]
