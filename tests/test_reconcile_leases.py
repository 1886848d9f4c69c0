"""A migration Job outlives its run, and its lock must too: a killed migration whose Job is
still running keeps the database locked for as long as the Job runs (reconcile renews the
dead run's lease each time it runs), not only until Prefect's lease expiry; if the lease
lapsed anyway (reconcile down past its expiry), reconcile takes the lock again for the Job
unless another run took it first, which it reports; once the Job ended, the next
reconcile frees it.

The run's lease is shortened to Prefect's minimum (`RUNBOOK_LOCK_LEASE_SECONDS=60`) so the
test outlives it in about a minute. When that expiry is past is not guessed: a control
lease of the same length, taken after the kill (so it expires after the run's own) and
renewed by nobody, shows when the server's repossessor has freed an unrenewed lease.

The session's test server is Prefect's ephemeral one, which does not run the repossessor
(an expired lease is never freed there): this test runs its own `prefect server start`,
the repossessor looking every second instead of every 15 s.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists

from tasks.locks import exclusive, list_lease_records, lock_name
from tests.prefect_servers import PrefectServer
from tests.reconcile_helpers import reconciled, run_until_killed
from tests.release_helpers import wait_until
from tests.test_fault_matrix import MIGRATE, _job_active, _migration_blocked, _migration_job
from tests.test_lock_persistence import MEMORY_LEASES

pytestmark = pytest.mark.slow

DATABASE = "database/complianceagent"
PROBE = "lease-probe/unrenewed"
LEASE_SECONDS = 60  # the least Prefect's server accepts


@pytest.fixture
def clean(platform: Any, kube: Any) -> Iterator[Any]:
    """The sandbox, and a Prefect server of this test's own whose repossessor runs; the
    client (and the runs this test starts) point at it."""
    home = Path(tempfile.mkdtemp(prefix="ca-prefect-repossessor-"))
    server = PrefectServer(
        home,
        {
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": MEMORY_LEASES,
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
        },
    )
    server.start()
    try:
        with server.pointed_at():
            yield platform
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def active_slots(target: str) -> int:
    with get_client(sync_client=True) as prefect_api:
        return int(
            prefect_api.read_global_concurrency_limit_by_name(lock_name(target)).active_slots
        )


def take_unrenewed_lease(target: str, seconds: float) -> UUID:
    """A lease nobody renews, as a dead run's would be without reconcile."""
    name = lock_name(target)
    with get_client(sync_client=True) as prefect_api:
        with suppress(ObjectAlreadyExists):
            prefect_api.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1)
            )
        response = prefect_api.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=seconds
        )
    return UUID(response.json()["lease_id"])


def end_lease(lease_id: UUID) -> None:
    """The slot freed and the lease forgotten: what the server's repossessor does once a
    lease is past its expiry, without waiting for it."""
    with get_client(sync_client=True) as prefect_api:
        prefect_api.release_concurrency_slots_with_lease(lease_id)


def database_leases() -> list[Any]:
    return [r for r in list_lease_records.fn() if r.target == DATABASE]


def lock_taken_at_once(target: str) -> bool:
    try:
        with exclusive(target, wait_seconds=1):
            return True
    except TimeoutError:
        return False


def test_a_killed_migrations_lock_is_held_while_its_job_runs_even_past_a_lapse(clean, kube):
    platform = clean
    lock = f"{DATABASE} (run "
    with _migration_blocked(platform) as blocked:
        run_id = run_until_killed(
            "flows.migrations",
            "migrations",
            "migrations",
            "migrations: job created",
            MIGRATE,
            ("migrations",),
            RUNBOOK_LOCK_LEASE_SECONDS=str(LEASE_SECONDS),
        )
        held = f"{lock}{run_id})"
        assert _job_active(_migration_job(platform))
        take_unrenewed_lease(PROBE, LEASE_SECONDS)

        first = reconciled()

        assert first["renewed_locks"] == [held]
        assert first["freed_locks"] == [] and first["lapsed_locks"] == {}
        assert any("still running" in p for p in first["problems"][str(run_id)])

        # Past the run's own lease expiry: the unrenewed control lease (taken later, as
        # long) has been repossessed by the server.
        wait_until(lambda: active_slots(PROBE) == 0, "the server frees an unrenewed lease", 90)

        second = reconciled()

        assert second["renewed_locks"] == [held]
        assert active_slots(DATABASE) == 1
        assert not lock_taken_at_once(DATABASE)  # a backup or restore would wait
        [renewed_lease] = database_leases()
        assert renewed_lease.run_id == str(run_id)

        # The lease lapses (reconcile was down past its expiry) and another run takes the
        # lock first: reported, never taken from it.
        end_lease(UUID(renewed_lease.lease_id))
        other = take_unrenewed_lease(DATABASE, LEASE_SECONDS)

        taken = reconciled()

        assert taken["renewed_locks"] == []
        assert "another run has taken the lock" in taken["lapsed_locks"][held]

        # That run ends; the Job still runs: the next reconcile takes the lock again for it.
        end_lease(other)

        retaken = reconciled()

        assert retaken["renewed_locks"] == [held] and retaken["lapsed_locks"] == {}
        assert active_slots(DATABASE) == 1
        assert not lock_taken_at_once(DATABASE)
        [new_lease] = database_leases()
        assert new_lease.run_id == str(run_id) and new_lease.lease_id != renewed_lease.lease_id

        # The Job ends: the next reconcile reports it and frees the database.
        blocked["release"]()
        wait_until(lambda: not _job_active(_migration_job(platform)), "the migration ends", 60)

    third = reconciled()

    assert third["freed_locks"] == [held]
    assert third["renewed_locks"] == []
    assert any("succeeded" in line for line in third["changed"][str(run_id)])
    assert lock_taken_at_once(DATABASE)
    assert database_leases() == []
