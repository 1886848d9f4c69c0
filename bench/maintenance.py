"""Maintenance window overhead: the window's wall time (from approval to closed) minus the
time of the work inside it, against the sandbox and a real Prefect server.

Target (issue 8): ≤ 5 s plus the measured drain. The work is a manual window resumed as
soon as it pauses for "done"; one request held open 2 s when the window opens makes the
drain a real measurement rather than zero.

    .venv/bin/python -m bench maintenance
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import httpx

from bench.common import platform_and_prefect

RUNS = 3
HELD_SECONDS = 2.0
APPROVE = {"approve": True, "approver": "bench", "reason": "bench"}
DONE = {"operator": "bench", "what_was_done": "nothing"}


def _one_window(platform: Any) -> dict[str, float]:
    from prefect.flow_runs import resume_flow_run

    from flows.maintenance_window import maintenance_window
    from tests.helpers import read_flow_run, start_in_thread, wait_for_paused_run

    run = start_in_thread(maintenance_window, reason="bench window", work="manual")
    paused = wait_for_paused_run("maintenance-window")
    platform.backend.delay_seconds["/api/v1/slow"] = HELD_SECONDS
    held = threading.Thread(target=httpx.get, args=(f"{platform.backend.url}/api/v1/slow",))
    held.start()
    while platform.backend.in_flight < 1:
        time.sleep(0.01)
    resume_flow_run(paused.id, run_input=APPROVE)
    while True:  # paused again, for the operator's "done"
        state = read_flow_run(paused.id).state
        if state and state.is_paused() and state.state_details.pause_key == "maintenance-work-done":
            break
        time.sleep(0.05)
    resume_flow_run(paused.id, run_input=DONE)
    final = run.join(timeout=120)
    held.join()
    assert final.is_completed(), final.message
    result: dict[str, float] = final.result()
    return result


def main() -> None:
    with platform_and_prefect() as platform:
        platform.kube.rollout_delay = 0.2  # the emulator's default rollout time
        _one_window(platform)  # warm-up: imports, first task runs, lock creation
        results = []
        for _ in range(RUNS):
            platform.reset()
            results.append(_one_window(platform))
    overhead = [r["window_seconds"] - r["inside_seconds"] for r in results]
    drain = [r["drain_seconds"] for r in results]
    without_drain = [o - d for o, d in zip(overhead, drain, strict=True)]
    print("\n== maintenance window overhead (window wall time - inside step time)")
    print(f"   overhead:          median {statistics.median(overhead):.2f} s  {_all(overhead)}")
    print(f"   of which drain:    median {statistics.median(drain):.2f} s  {_all(drain)}")
    print(
        f"   overhead - drain:  median {statistics.median(without_drain):.2f} s  "
        f"{_all(without_drain)}   target: <= 5 s"
    )
    print(f"   (n={RUNS}; one request held {HELD_SECONDS:g} s when the window opens)", flush=True)


def _all(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"
