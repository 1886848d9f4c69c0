"""A lost node, end to end on served deployments: a served maintenance window, paused at
its work form with maintenance mode on, loses its node (its runner and its flow-run
process SIGKILLed together, so no one sees the process exit and the run stays Paused).
Its heartbeats stop; prefect.yaml's Proactive heartbeat trigger on the served `reconcile`
(the session serves reconcile with its triggers, as `make up` does) starts reconcile,
which marks the run Crashed, saying why, and switches maintenance off.

The window is served by a runner of this test's own (a copy of the deployment, named
`lost-node`), so killing "its node" leaves the session's runner serving everything else.
Nothing is shortened: heartbeats every 30 s, the trigger's `within` 90 s and reconcile's
timeout 90 s, as in prefect.yaml; the kill follows a heartbeat, so the trigger fires
~90 s after it. Budget: 2.5 minutes.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter
from prefect.client.schemas.objects import FlowRun
from prefect.flow_runs import resume_flow_run

from deployments.catalog import PROJECT_ROOT
from deployments.local import FAST_RUNNER, HEARTBEATS
from runbook.decisions.maintenance import WINDOW_ANNOTATION
from tasks.intent import read_last_heartbeats
from tests.helpers import prefect_rest, read_flow_run
from tests.reconcile_helpers import APPROVE, free_leaked_locks, recorded_intent_of
from tests.release_helpers import live, wait_until

pytestmark = pytest.mark.slow

DEPLOYMENT = "maintenance-window/lost-node"
HEARTBEAT_TRIGGER = "reconcile when a runbook run stops sending heartbeats"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

SERVE_A_COPY = """
from dataclasses import replace
from prefect import serve
from deployments.catalog import load_catalog, to_runner_deployment
[spec] = [s for s in load_catalog() if s.name == "maintenance-window"]
serve(to_runner_deployment(replace(spec, name="lost-node", schedules=(), triggers=())))
"""


@pytest.fixture
def node(served_api: str, platform: Any, kube: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A runner serving the window alone, in a session of its own (the "node")."""
    runner = subprocess.Popen(
        [sys.executable, "-c", SERVE_A_COPY],
        env={**os.environ, "PREFECT_API_URL": served_api, **FAST_RUNNER, **HEARTBEATS},
        cwd=PROJECT_ROOT,
        start_new_session=True,
    )
    try:
        with prefect_rest(served_api) as api:
            wait_until(
                lambda: api.get(f"/deployments/name/{DEPLOYMENT}").status_code == 200,
                "the node serves the window",
                90,
            )
        yield runner
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(10)
        free_leaked_locks("deployment/backend")


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children first found, then theirs)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def process_of_run(pids: list[int], run_id: UUID) -> int:
    """The flow-run process among `pids`: the one the runner gave this run's id."""
    marker = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for pid in pids:
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    raise AssertionError(f"no process of run {run_id} under the runner")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def maintenance(kube: Any) -> tuple[str | None, bool]:
    backend = live(kube, "backend")
    env = {
        v["name"]: v.get("value")
        for v in backend["spec"]["template"]["spec"]["containers"][0]["env"] or []
    }
    return env.get("MAINTENANCE_MODE"), WINDOW_ANNOTATION in (
        backend["metadata"].get("annotations") or {}
    )


def reconcile_runs_since(moment: dt.datetime) -> list[FlowRun]:
    with get_client(sync_client=True) as prefect_api:
        runs = prefect_api.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["reconcile"])),
            flow_run_filter=FlowRunFilter(),
            limit=50,
        )
    return [r for r in runs if r.created and r.created >= moment]


def wait_for_state(run_id: UUID, states: tuple[str, ...], timeout: float) -> FlowRun:
    give_up = time.monotonic() + timeout
    while (run := read_flow_run(run_id)).state.type.value not in states:
        assert time.monotonic() < give_up, f"run {run_id} is {run.state.type.value}, not {states}"
        time.sleep(0.5)
    return run


def test_a_lost_nodes_run_is_crashed_by_the_heartbeat_trigger_and_put_back(node, platform, kube):
    with get_client(sync_client=True) as prefect_api:
        automations = prefect_api.read_automations_by_name(HEARTBEAT_TRIGGER)
        deployment = prefect_api.read_deployment_by_name(DEPLOYMENT)
        run_id = prefect_api.create_flow_run_from_deployment(
            deployment.id, parameters={"reason": "lost node", "duration_seconds": 600}
        ).id
    assert [a.enabled for a in automations] == [True]  # served reconcile carries it
    started = time.monotonic()

    # Approved; then the window waits at its work form with maintenance mode on.
    wait_for_state(run_id, ("PAUSED",), 60)
    resume_flow_run(run_id, run_input=APPROVE)
    wait_until(lambda: maintenance(kube) == ("true", True), "maintenance mode on", 60)
    wait_for_state(run_id, ("PAUSED",), 60)
    give_up = time.monotonic() + 60
    while read_last_heartbeats.fn([str(run_id)])[str(run_id)] is None:
        assert time.monotonic() < give_up, "the run never sent a heartbeat"
        time.sleep(0.5)

    # The node is lost: its runner and the run's process die together.
    tree = descendants(node.pid)
    process = process_of_run(tree, run_id)
    killed_at = dt.datetime.now(dt.UTC)
    os.killpg(node.pid, signal.SIGKILL)
    for pid in tree:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(process), "the run's process is gone", 10)
    assert read_flow_run(run_id).state.type.value == "PAUSED"  # no one saw it go

    # The trigger starts reconcile, which marks the run Crashed and puts it back.
    crashed = wait_for_state(run_id, TERMINAL, 150)
    elapsed = time.monotonic() - started

    assert crashed.state.type.value == "CRASHED"
    assert "no heartbeat for" in crashed.state.message
    assert "Marked Crashed by reconcile" in crashed.state.message
    by_trigger = [
        r
        for r in reconcile_runs_since(killed_at)
        if r.created_by and r.created_by.display_value == HEARTBEAT_TRIGGER
    ]
    assert by_trigger, "no reconcile run started by the heartbeat trigger after the kill"
    for run in reconcile_runs_since(killed_at):  # and the Crashed trigger's, if any
        wait_for_state(run.id, TERMINAL, 60)
    wait_until(lambda: maintenance(kube) == ("false", False), "maintenance mode off", 30)
    assert recorded_intent_of(run_id) is None
    chat = [n.json["text"] for n in platform.receiver.received if n.path.startswith("/slack")]
    assert any(f"run {run_id} marked Crashed" in text for text in chat)
    print(f"lost node: run started → Crashed and put back in {elapsed:.0f} s")
