"""Killing a runbook run at a step boundary, as an OOM kill or a lost node would.

The run is started in its own process (`python -c`, against the test's Prefect server and
sandbox), with `RUNBOOK_TEST_KILL_AT=<step>`: at that boundary it SIGKILLs itself, so no
`finally` and no undo runs. The process's exit code -9 is checked, then the run is marked
Crashed with the message Prefect's runner writes when a flow run's process exits that way
(`Flow run process exited with status code: -9`); that is the state a served or worker-run
flow reaches by itself, and what the reconcile automation reacts to.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Crashed

from deployments.catalog import PROJECT_ROOT
from flows.reconcile import reconcile
from runbook.decisions.intent import VARIABLE_PREFIX, parse_intent, variable_name
from runbook.fault_points import KILL_AT_VARIABLE
from tasks.intent import delete_intent
from tasks.locks import lock_name
from tests.helpers import wait_for_paused_run

APPROVE = {"approve": True, "approver": "ada", "reason": "CHG-404"}


# What a served or worker-run flow run gets (deployments/local.py, the job template).
HEARTBEATS = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}


def start_in_process(
    module: str, flow: str, parameters: dict[str, Any], **env: str
) -> subprocess.Popen[bytes]:
    """`module.flow(**parameters)` in a process of its own, against the test's server."""
    code = f"from {module} import {flow}; {flow}(**{parameters!r})"
    environment = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), **env}
    return subprocess.Popen([sys.executable, "-c", code], env=environment, cwd=PROJECT_ROOT)


def run_until_killed(
    module: str,
    flow: str,
    flow_name: str,
    kill_at: str,
    parameters: dict[str, Any],
    approve: tuple[str, ...] = (),
    crashed: bool = True,
    **env: str,
) -> UUID:
    """Run `module.flow(**parameters)` in a process that dies at `kill_at`; approve the
    runs named in `approve` on the way. Returns the dead run's id, then Crashed as its
    runner would mark it — or, with `crashed=False`, left Running as after a lost node
    (no runner saw the process exit)."""
    process = start_in_process(module, flow, parameters, **{KILL_AT_VARIABLE: kill_at, **env})
    try:
        for name in approve:
            resume_flow_run(wait_for_paused_run(name, timeout=120).id, run_input=APPROVE)
        code_ = process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert code_ == -signal.SIGKILL, f"{flow} exited {code_}, not killed at {kill_at!r}"
    run_id = newest_running(flow_name)
    if crashed:
        with get_client(sync_client=True) as prefect_api:
            prefect_api.set_flow_run_state(
                run_id, Crashed(message="Flow run process exited with status code: -9"), force=True
            )
    return run_id


def newest_running(flow_name: str) -> UUID:
    with get_client(sync_client=True) as prefect_api:
        [run] = prefect_api.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    return run.id


def recorded_intent_of(run_id: UUID) -> Any:
    """The run's recorded intent, or None."""
    with get_client(sync_client=True) as prefect_api:
        variable = prefect_api.read_variable_by_name(variable_name(str(run_id)))
    return None if variable is None else parse_intent(variable.value)


def clear_all_intents() -> None:
    """Other tests' failed runs keep their intents (reconcile verifies them): start clean."""
    with get_client(sync_client=True) as prefect_api:
        for variable in prefect_api.read_variables(limit=None):
            if variable.name.startswith(VARIABLE_PREFIX):
                delete_intent(str(variable.value["run_id"]))


def free_leaked_locks(*targets: str) -> None:
    """Cleanup after a test that failed before reconcile freed a dead run's locks (their
    leases would expire only after Prefect's 300 s): free them as an operator would
    (`prefect gcl update NAME --active-slots 0`), so the rest of the session does not
    wait. Tests assert that reconcile freed them; this only keeps a failure local."""
    with get_client(sync_client=True) as prefect_api:
        for target in targets:
            with suppress(ObjectNotFound):  # never taken (the run died before): free
                prefect_api.update_global_concurrency_limit(
                    lock_name(target), GlobalConcurrencyLimitUpdate(active_slots=0)
                )


def reconciled(timeout: float = 120) -> dict[str, Any]:
    """One reconcile of our own, run to its end, and what it returned. The session's served
    reconcile may be at work at the same moment (prefect.yaml's trigger starts it when a
    runbook run is marked Crashed); ours then skips at the `reconcile` lock: wait for that
    one to finish and run again."""
    give_up = time.monotonic() + timeout
    while True:
        state = reconcile(return_state=True)
        assert state.is_completed(), state.message
        result = dict(state.result())
        if "skipped" not in result:
            return result
        assert time.monotonic() < give_up, f"reconcile skipped for {timeout:g}s: {result}"
        time.sleep(0.5)


def held_locks(targets: tuple[str, ...]) -> list[str]:
    """The targets whose lock has a slot taken now (read from the server: taking it to
    find out could itself leave a slot behind)."""
    held = []
    with get_client(sync_client=True) as prefect_api:
        for target in targets:
            try:
                limit = prefect_api.read_global_concurrency_limit_by_name(lock_name(target))
            except ObjectNotFound:
                continue  # never taken
            if limit.active_slots:
                held.append(target)
    return held
