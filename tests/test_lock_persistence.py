"""A held lock survives a restart of the Prefect server when its leases live in Redis
(`prefect-redis`'s lease storage, as in production); with the memory default a restart
forgets the lease and leaks the slot for good. Each test runs its own `prefect server
start` subprocess (not the session's harness) so it can restart it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prefect._internal.concurrency.services import _QueueServiceBase
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from sandbox.platform import Sandbox
from sandbox.services.base import LOOPBACK, free_port
from tasks.locks import LockLost, exclusive, lock_name

pytestmark = pytest.mark.slow

REDIS_LEASES = "prefect_redis.lease_storage"
MEMORY_LEASES = "prefect.server.concurrency.lease_storage.memory"


class PrefectServer:
    """`prefect server start` on its own SQLite file and port; `restart()` keeps both."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            **env,
        }
        self.env.pop("PREFECT_API_URL", None)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                *(sys.executable, "-m", "prefect", "server", "start"),
                *("--host", LOOPBACK, "--port", str(self.port), "--no-scheduler", "--no-late-runs"),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        give_up = time.monotonic() + 180
        while time.monotonic() < give_up:
            assert self._process.poll() is None, "the Prefect server exited while starting"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError("the Prefect server did not start within 180 s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextmanager
    def pointed_at(self) -> Iterator[None]:
        """This process's Prefect client points at this server while inside.

        Prefect's in-process services (lock acquisition per lock name, events, API logs)
        keep the client they were started with for the life of the process: left running,
        a later test's `exclusive("database/…")` would still talk to this server after it
        stopped. They are drained on the way out, while the server still answers, and
        start afresh against the session's server on their next use."""
        try:
            with temporary_settings(updates={PREFECT_API_URL: self.url}):
                yield
        finally:
            _QueueServiceBase.drain_all(timeout=30)


@pytest.fixture
def own_server(sandbox: Sandbox) -> Iterator[Callable[[str], PrefectServer]]:
    """A Prefect server whose lease storage the test picks; the client points at it."""
    home = Path(tempfile.mkdtemp(prefix="ca-prefect-leases-"))
    servers: list[PrefectServer] = []

    def start(lease_storage: str) -> PrefectServer:
        server = PrefectServer(
            home,
            {
                "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": lease_storage,
                # Its own Redis database: nothing else of the sandbox lives there.
                "PREFECT_REDIS_MESSAGING_URL": sandbox.redis.url.rsplit("/", 1)[0] + "/7",
            },
        )
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(home, ignore_errors=True)


def _active_slots(target: str) -> int:
    with get_client(sync_client=True) as prefect_api:
        return prefect_api.read_global_concurrency_limit_by_name(lock_name(target)).active_slots


def test_a_held_lock_survives_a_server_restart_with_redis_leases(own_server):
    server = own_server(REDIS_LEASES)
    target = f"deployment/restart-{uuid.uuid4().hex[:8]}"

    with server.pointed_at():
        with exclusive(target) as lock:
            assert _active_slots(target) == 1
            server.restart()
            # Still held: the slot is taken and the lease is known (renewed, not lost).
            assert _active_slots(target) == 1
            lock.ensure_held()
        # And releasable: the release after the restart frees the slot.
        assert _active_slots(target) == 0
        with exclusive(target, wait_seconds=10):
            assert _active_slots(target) == 1


def test_with_memory_leases_a_restart_loses_the_lease_and_leaks_the_slot(own_server):
    """What `make up` (memory default) does, documented by this test: after a restart the
    holder learns at its next step that the lock is gone (LockLost), and the slot stays
    taken with no lease to free it: every later run waits until an operator resets it
    (`prefect gcl update NAME --active-slots 0`)."""
    server = own_server(MEMORY_LEASES)
    target = f"deployment/restart-{uuid.uuid4().hex[:8]}"

    with server.pointed_at():
        with pytest.raises(LockLost, match="was revoked or expired"), exclusive(target) as lock:
            server.restart()
            lock.ensure_held()
        assert _active_slots(target) == 1  # leaked: nobody holds it, nobody can free it
        with pytest.raises(Exception, match="timed out"), exclusive(target, wait_seconds=3):
            pass
