"""A held lock survives a restart of the Prefect server when its leases live in Redis
(`prefect-redis`'s lease storage, as in production); with the memory default a restart
forgets the lease and leaks the slot for good. Each test runs its own `prefect server
start` subprocess (not the session's harness) so it can restart it.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from sandbox.platform import Sandbox
from tasks.locks import LockLost, exclusive, lock_name
from tests.prefect_servers import PrefectServer

pytestmark = pytest.mark.slow

REDIS_LEASES = "prefect_redis.lease_storage"
MEMORY_LEASES = "prefect.server.concurrency.lease_storage.memory"


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
