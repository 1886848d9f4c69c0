"""Changes to one target never interleave; different targets do not wait for each other.

A holder flow takes a target's lock and keeps it until the test releases it, so the
assertions depend on who holds what, not on how fast flow runs start.
"""

from __future__ import annotations

import threading
import time

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse

from tasks.locks import exclusive, lock_name

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
    assert time.monotonic() - started >= 3

    limit = _limit("deployment/probe")
    assert limit.limit == 1
    assert limit.active_slots == 1

    RELEASE.set()
    assert change("deployment/probe", wait_seconds=60) == "changed deployment/probe"


def test_different_target_does_not_wait(holder):
    holder("deployment/a")
    assert change("deployment/b", wait_seconds=30) == "changed deployment/b"
    # b changed while a's holder kept a: a's slot is still taken, b's is free again.
    assert _limit("deployment/a").active_slots == 1
    assert _limit("deployment/b").active_slots == 0
