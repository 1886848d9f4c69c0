"""Session-wide real backends: one Prefect test server and one sandbox platform.

Starting Prefect's server costs ~25 s and PostgreSQL ~2 s, so both are shared by the
whole session; `platform` resets the fault knobs and recorders before each test that
uses it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

# Before Prefect is imported: no network here, and no analytics phone-home.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
# RUNBOOK_ENVIRONMENT has no default (fail closed); the tests run against the sandbox,
# whatever the shell that started them says.
os.environ["RUNBOOK_ENVIRONMENT"] = "sandbox"

import pytest
from prefect.testing.utilities import prefect_test_harness

from sandbox.platform import Sandbox
from tests.helpers import prefect_rest


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as platform, pytest.MonkeyPatch.context() as env:
        for name, value in platform.env.items():
            env.setenv(name, value)
        # Approvals in tests decide within a second; timeouts are tested at the minimum.
        env.setenv("RUNBOOK_APPROVAL_POLL_SECONDS", "1")
        yield platform


@pytest.fixture
def platform(sandbox: Sandbox, prefect_server: None) -> Sandbox:
    """The sandbox platform with a clean slate of fault knobs and write records, and no
    intent left by an earlier test's run (a reconcile started meanwhile must not act on
    another test's leftovers)."""
    from tasks.intent import delete_intent, list_intents

    sandbox.reset()
    intents, _ = list_intents.fn()
    for intent in intents:
        delete_intent(intent.run_id)
    _cancel_runs_left_paused()
    return sandbox


def _cancel_runs_left_paused() -> None:
    """A run an earlier test left waiting in a form (a remediation paused in a subflow of a
    cancelled incident, say) would otherwise be the newest paused run a later test finds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    with get_client(sync_client=True) as prefect_api:
        paused = prefect_api.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
            )
        )
        for run in paused:
            prefect_api.set_flow_run_state(
                run.id, Cancelled(message="left paused by an earlier test"), force=True
            )


@pytest.fixture(scope="session")
def served_api(sandbox: Sandbox, prefect_server: None) -> Iterator[str]:
    """Every prefect.yaml deployment served by `deployments.local --serve-only`, in its own
    process as in `make up`, against the test server; yields the API URL."""
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from deployments.catalog import PROJECT_ROOT, load_catalog
    from deployments.local import FAST_RUNNER, _stop

    api_url = str(PREFECT_API_URL.value())
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deployments.local",
            "--serve-only",
            "--schedules-inactive",
            "--no-triggers-of",
            "incident-response",
        ],
        env={**os.environ, "PREFECT_API_URL": api_url, **FAST_RUNNER},
        cwd=PROJECT_ROOT,
    )
    try:
        names = {f"{spec.load_flow().name}/{spec.name}" for spec in load_catalog()}
        give_up = time.monotonic() + 120
        with prefect_rest(api_url) as api:
            while names and time.monotonic() < give_up:
                names = {n for n in names if api.get(f"/deployments/name/{n}").status_code != 200}
                time.sleep(0.5)
        assert not names, f"deployments never registered: {names}"
        yield api_url
    finally:
        _stop(process)


@pytest.fixture
def kube(platform: Sandbox) -> Iterator[Any]:
    """The Kubernetes emulator with quick rollouts and Jobs. Whatever the test did, even if
    it failed: the seeded Deployments are put back as they were, Jobs it left are deleted,
    and the delays are the sandbox's again."""
    from tests.release_helpers import deployments_restored, jobs_removed

    delays = platform.kube.rollout_delay, platform.kube.job_delay
    platform.kube.rollout_delay = platform.kube.job_delay = 0.05
    try:
        with deployments_restored(platform.kube), jobs_removed(platform.kube):
            yield platform.kube
    finally:
        platform.kube.rollout_delay, platform.kube.job_delay = delays


RUNS_NEAR_THE_END = ("test_drills_e2e.py", "test_lost_node_e2e.py")
# Runs its reconciles against the served session's `reconcile` lock: first, before any
# test's crashed run has started a served reconcile that could hold it for minutes.
RUNS_FIRST = ("test_reconcile_leases.py",)


def pytest_collection_modifyitems(session: pytest.Session, config: Any, items: list[Any]) -> None:
    """The RBAC test judges every request the session made to the Kubernetes emulator:
    it runs last. Just before it, the end-to-end tests whose served runs and triggers go
    on in the background after them (incidents resolving, reconciles started by a crash):
    no other test runs beside their tails."""
    from tests.test_rbac import RUNS_LAST

    def place(item: Any) -> int:
        if item.name == RUNS_LAST:
            return 2
        if item.path.name in RUNS_FIRST:
            return -1
        return 1 if item.path.name in RUNS_NEAR_THE_END else 0

    items.sort(key=place)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault matrix's table (tests/test_fault_matrix.py), whatever `-s` says: printed
    and written to `.local/fault-matrix.md`."""
    import sys

    module = next((m for n, m in sys.modules.items() if n.endswith("test_fault_matrix")), None)
    matrix = getattr(module, "FAULT_MATRIX", None)
    if not matrix:
        return
    from deployments.catalog import PROJECT_ROOT

    lines = ["| runbook | killed at | signal | invariants | notes |", "|---|---|---|---|---|"]
    for (runbook, step, column), cell in sorted(matrix.items()):
        held = "held" if cell["held"] else "**NOT HELD**"
        boundary = step.split(": ", 1)[-1]
        lines.append(f"| {runbook} | {boundary} | {column} | {held} | {cell['note']} |")
    table = "\n".join(lines) + "\n"
    out = PROJECT_ROOT / ".local" / "fault-matrix.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table)
    terminalreporter.write_sep("=", f"fault matrix (also in {out})")
    terminalreporter.write(table)
