"""Changes to one target never interleave; different targets do not wait for each other."""

from __future__ import annotations

import threading
import time

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from tasks.locks import exclusive, lock_name

pytestmark = pytest.mark.slow


# Flow parameters are validated copies, so the runs report through a module-level list.
EVENTS: list[tuple[str, str, float]] = []


@flow
def hold(target: str, seconds: float) -> None:
    with exclusive(target):
        EVENTS.append(("in", target, time.monotonic()))
        time.sleep(seconds)
        EVENTS.append(("out", target, time.monotonic()))


def _run_together(*targets: str) -> list[tuple[str, str, float]]:
    EVENTS.clear()
    threads = [threading.Thread(target=hold, args=(t, 3.0)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return list(EVENTS)


def test_same_target_runs_one_at_a_time(prefect_server):
    log = _run_together("deployment/probe", "deployment/probe")
    assert [event for event, _, _ in sorted(log, key=lambda e: e[2])] == ["in", "out", "in", "out"]
    with get_client(sync_client=True) as prefect_api:
        limit = prefect_api.read_global_concurrency_limit_by_name(lock_name("deployment/probe"))
    assert limit.limit == 1


def test_different_targets_overlap(prefect_server):
    log = _run_together("deployment/a", "deployment/b")
    assert [event for event, _, _ in sorted(log, key=lambda e: e[2])] == ["in", "in", "out", "out"]
