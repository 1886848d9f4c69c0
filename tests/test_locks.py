"""Changes to one target never interleave; different targets do not wait for each other.

A holder flow takes a target's lock and keeps it until the test releases it, so the
assertions depend on who holds what, not on how fast flow runs start.
"""

from __future__ import annotations

import threading
import time
import uuid
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.settings import PREFECT_API_URL

from tasks.locks import LockLost, exclusive, lock_name
from tests.helpers import prefect_rest, start_in_thread

pytestmark = pytest.mark.slow

HELD = threading.Event()
RELEASE = threading.Event()


@flow
def hold_until_released(target: str) -> None:
    with exclusive(target):
        HELD.set()
        RELEASE.wait(120)


@flow
def change(target: str, wait_seconds: float) -> str:
    with exclusive(target, wait_seconds=wait_seconds):
        return f"changed {target}"


def _limit(target: str) -> GlobalConcurrencyLimitResponse:
    """The target's lock as the Prefect server sees it: `active_slots` = who holds it now."""
    with get_client(sync_client=True) as prefect_api:
        return prefect_api.read_global_concurrency_limit_by_name(lock_name(target))


@pytest.fixture
def holder(prefect_server):
    HELD.clear()
    RELEASE.clear()
    threads: list[threading.Thread] = []

    def hold(target: str) -> None:
        thread = threading.Thread(target=hold_until_released, args=(target,), daemon=True)
        thread.start()
        threads.append(thread)
        assert HELD.wait(120), "holder never got the lock"

    yield hold
    RELEASE.set()
    for thread in threads:
        thread.join(120)


def test_same_target_waits_for_the_holder(holder):
    holder("deployment/probe")

    started = time.monotonic()
    state = change("deployment/probe", wait_seconds=3, return_state=True)
    assert state.is_failed()  # could not get the lock while it was held
    assert "timed out after 3 s: another run holds it" in str(state.message)
    assert time.monotonic() - started >= 3

    limit = _limit("deployment/probe")
    assert limit.limit == 1
    assert limit.active_slots == 1

    RELEASE.set()
    assert change("deployment/probe", wait_seconds=60) == "changed deployment/probe"
    # The wait that timed out left no grant behind: once both are done the lock is free.
    assert _limit("deployment/probe").active_slots == 0


def test_different_target_does_not_wait(holder):
    holder("deployment/a")
    assert change("deployment/b", wait_seconds=30) == "changed deployment/b"
    # b changed while a's holder kept a: a's slot is still taken, b's is free again.
    assert _limit("deployment/a").active_slots == 1
    assert _limit("deployment/b").active_slots == 0


# --- a limit that is not a lock ------------------------------------------------------------

RAN: list[str] = []


@flow
def guarded_change(target: str) -> None:
    with exclusive(target, wait_seconds=30):
        RAN.append(target)


def _create_limit(target: str, *, active: bool, limit: int) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as prefect_api:
        prefect_api.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=lock_name(target), limit=limit, active=active)
        )


@pytest.mark.parametrize(
    ("active", "limit", "why"),
    [(False, 1, "is inactive"), (True, 5, "allows 5 holders at once")],
    ids=["inactive", "five-slots"],
)
def test_a_limit_that_does_not_exclude_is_refused(prefect_server, active, limit, why):
    target = f"deployment/unsafe-{uuid.uuid4().hex[:8]}"
    _create_limit(target, active=active, limit=limit)
    RAN.clear()

    state = guarded_change(target, return_state=True)

    assert state.is_failed()
    assert "refusing to change" in state.message and why in state.message
    assert RAN == []  # the change never ran unprotected
    # It is left as the operator set it (no silent repair), and nothing holds it.
    seen = _limit(target)
    assert (seen.active, seen.limit, seen.active_slots) == (active, limit, 0)


# --- a lost lease stops the flow at a step boundary ----------------------------------------

STEPS: list[str] = []
LEASES: list[UUID] = []


@flow
def two_steps_with_undo(target: str) -> None:
    with exclusive(target) as lock:
        # 1. The first step; the test revokes the lease while it runs.
        STEPS.append("step 1 started")
        LEASES.extend(lease.lease_id for lease in lock.leases)
        HELD.set()
        RELEASE.wait(120)
        STEPS.append("step 1 finished")
        try:
            # 2. Only while the lock is still ours.
            lock.ensure_held()
            STEPS.append("step 2")
        except LockLost:
            STEPS.append("step 1 undone")
            raise


def test_a_revoked_lease_stops_the_flow_at_the_next_step_and_undoes(prefect_server):
    target = f"deployment/lease-{uuid.uuid4().hex[:8]}"
    HELD.clear()
    RELEASE.clear()
    STEPS.clear()
    LEASES.clear()
    run = start_in_thread(two_steps_with_undo, target=target)
    assert HELD.wait(120), "the flow never took the lock"

    # The server revokes the lease (as its repossessor does for an expired one): the slot
    # is free for others while the flow is still inside step 1.
    with prefect_rest(str(PREFECT_API_URL.value())) as api:
        api.post(
            "/v2/concurrency_limits/decrement-with-lease", json={"lease_id": str(LEASES[0])}
        ).raise_for_status()
    assert _limit(target).active_slots == 0
    RELEASE.set()
    state = run.join(60)

    # Step 1 ran to its end (no cancellation injected mid-step); step 2 never ran; the undo did.
    assert STEPS == ["step 1 started", "step 1 finished", "step 1 undone"]
    assert state.is_failed()
    assert "lost the lock on " + target in state.message
    assert f"lease {LEASES[0]} was revoked or expired" in state.message
    assert _limit(target).active_slots == 0
