"""The fault matrix: every mutating runbook, killed at each of its step boundaries.

SIGKILL column: the run dies in its own process at the boundary (`RUNBOOK_TEST_KILL_AT`,
no `finally` runs), is marked Crashed as its runner would, then `reconcile` runs.
SIGTERM column: the process gets SIGTERM at the boundary (`RUNBOOK_TEST_TERM_AT`), what a
runner sends to a run cancelled from the UI/API and Kubernetes to an evicted pod; the
runbook's own undo must put things back, without reconcile.

Either way the same invariants are then read from the real systems: replicas as recorded,
images as recorded, maintenance mode off, no scratch database, no open multipart upload,
each AWS secret with one AWSCURRENT (the recorded one unless the run completed) and no
AWSPENDING, the live database accepting connections with its rows, the status page not
left saying "scheduled", no silence of the run's window still active, and the run's locks
free — for a SIGKILLed run, freed by that one reconcile (it frees a dead run's recorded
leases once its targets are back), not by Prefect's lease expiry 300 s later.

Each cell lands in `FAULT_MATRIX` (runbook, step, signal → held/not); tests/conftest.py
writes it to `.local/fault-matrix.md` and prints it at the end of the session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL

from deployments.catalog import PROJECT_ROOT
from flows.backup import backup
from flows.reconcile import reconcile
from runbook.decisions.maintenance import WINDOW_ANNOTATION, silences_of_run
from runbook.fault_points import TERM_AT_VARIABLE
from sandbox.platform import API_KEY_SECRET_ID, APP_ROLE, DATABASE_PASSWORD_SECRET_ID
from tasks.locks import lock_name
from tests.backup_helpers import clear_backups, databases, drop_databases_like, query, uploads
from tests.helpers import wait_for_paused_run
from tests.reconcile_helpers import (
    APPROVE,
    clear_all_intents,
    free_leaked_locks,
    run_until_killed,
)
from tests.release_helpers import image_of, live, wait_settled

pytestmark = pytest.mark.slow

COMPONENTS = ("backend", "celery-workers", "frontend")
SECRETS = (API_KEY_SECRET_ID, DATABASE_PASSWORD_SECRET_ID)
WRITERS = ("backend", "celery-workers")

# (runbook, step, signal) → {"held": bool, "note": str}; read by tests/conftest.py.
FAULT_MATRIX: dict[tuple[str, str, str], dict[str, Any]] = {}


@dataclass(frozen=True)
class Case:
    runbook: str
    step: str
    module: str
    flow: str
    parameters: dict[str, Any]
    locks: tuple[str, ...]
    approve: tuple[str, ...] = ()
    needs_backup: bool = False
    # What the run leaves on purpose, in the SIGKILL column too (scale's one write).
    replicas: Callable[[Any], dict[str, int]] | None = None
    notes: dict[str, str] = field(default_factory=dict)


def _one_more_backend(platform: Any) -> dict[str, int]:
    return {"backend": _replicas(platform)["backend"]}


RESTORE_LOCKS = ("database/complianceagent", *(f"deployment/{n}" for n in WRITERS))
WINDOW = {"reason": "fault matrix", "duration_seconds": 600}
CASES = [
    Case(
        "restore",
        "restore: writers stopped",
        "flows.restore",
        "restore",
        {},
        RESTORE_LOCKS,
        ("restore",),
        True,
    ),
    Case(
        "restore",
        "restore: connections refused",
        "flows.restore",
        "restore",
        {},
        RESTORE_LOCKS,
        ("restore",),
        True,
    ),
    Case(
        "deploy",
        "deploy: rolled out backend",
        "flows.deploy",
        "deploy",
        {"version": "9.9.9", "components": ("backend", "frontend")},
        ("deployment/backend", "deployment/celery-workers", "deployment/frontend"),
    ),
    Case(
        "maintenance-window",
        "maintenance-window: status page scheduled",
        "flows.maintenance_window",
        "maintenance_window",
        WINDOW,
        ("deployment/backend",),
        ("maintenance-window",),
    ),
    Case(
        "maintenance-window",
        "maintenance-window: alerts silenced",
        "flows.maintenance_window",
        "maintenance_window",
        WINDOW,
        ("deployment/backend",),
        ("maintenance-window",),
    ),
    Case(
        "maintenance-window",
        "maintenance-window: maintenance mode on",
        "flows.maintenance_window",
        "maintenance_window",
        WINDOW,
        ("deployment/backend",),
        ("maintenance-window",),
    ),
    Case(
        "scale",
        "scale: scaled",
        "flows.scale",
        "scale",
        {"deployment": "backend", "replicas": 4},
        ("deployment/backend",),
        replicas=lambda _: {"backend": 4},
    ),
    Case(
        "backup",
        "backup: archive stored",
        "flows.backup",
        "backup",
        {},
        ("database/complianceagent",),
    ),
    Case(
        "secret-rotation",
        "secret-rotation: createSecret done",
        "flows.secret_rotation",
        "secret_rotation",
        {"secret": "database-password"},
        (f"secret/{DATABASE_PASSWORD_SECRET_ID}", *(f"deployment/{n}" for n in WRITERS)),
    ),
    Case(
        "secret-rotation",
        "secret-rotation: finishSecret done",
        "flows.secret_rotation",
        "secret_rotation",
        {"secret": "api-key"},
        (f"secret/{API_KEY_SECRET_ID}", *(f"deployment/{n}" for n in WRITERS)),
    ),
]


def _id(case: Case) -> str:
    return case.step.replace(" ", "-").replace(":", "")


# --- reading the real systems ------------------------------------------------------------


def _replicas(platform: Any) -> dict[str, int]:
    return {name: int(live(platform.kube, name)["spec"]["replicas"]) for name in COMPONENTS}


def _maintenance(kube: Any) -> tuple[str | None, bool]:
    backend = live(kube, "backend")
    container = backend["spec"]["template"]["spec"]["containers"][0]
    env = {v["name"]: v.get("value") for v in container.get("env") or []}
    annotated = WINDOW_ANNOTATION in (backend["metadata"].get("annotations") or {})
    return env.get("MAINTENANCE_MODE"), annotated


def _stages(platform: Any, secret_id: str) -> dict[str, list[str]]:
    described = platform.secretsmanager().describe_secret(SecretId=secret_id)
    return {v: sorted(s) for v, s in described["VersionIdsToStages"].items()}


def _current(platform: Any, secret_id: str) -> str | None:
    return next((v for v, s in _stages(platform, secret_id).items() if "AWSCURRENT" in s), None)


def _secret_value(platform: Any, secret_id: str) -> str:
    sm = platform.secretsmanager()
    return str(sm.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")["SecretString"])


def _app_role_logs_in(platform: Any) -> bool:
    password = _secret_value(platform, DATABASE_PASSWORD_SECRET_ID)
    try:
        with psycopg.connect(platform.postgres.dsn, user=APP_ROLE, password=password):
            return True
    except psycopg.OperationalError:
        return False


def _users(platform: Any) -> int | None:
    try:
        return int(query(platform.postgres.dsn, "SELECT count(*) FROM users")[0][0])
    except psycopg.OperationalError:
        return None


def _held_locks(targets: tuple[str, ...]) -> list[str]:
    held = []
    with get_client(sync_client=True) as prefect_api:
        for target in targets:
            limit = prefect_api.read_global_concurrency_limit_by_name(lock_name(target))
            if limit.active_slots:
                held.append(target)
    return held


@dataclass
class Baseline:
    replicas: dict[str, int]
    images: dict[str, str]
    databases: set[str]
    users: int | None
    secrets: dict[str, str | None]


def _baseline(platform: Any, kube: Any) -> Baseline:
    return Baseline(
        _replicas(platform),
        {name: image_of(kube, name) for name in COMPONENTS},
        set(databases(platform)),
        _users(platform),
        {secret_id: _current(platform, secret_id) for secret_id in SECRETS},
    )


def _status_page(platform: Any) -> list[str]:
    """The statuses posted to the status page during this cell, oldest first."""
    return [
        n.json["incident"]["status"]
        for n in platform.receiver.received
        if n.path.startswith("/statuspage") and n.json
    ]


def _active_silences_of(platform: Any, run_id: UUID) -> list[str]:
    url = platform.env["RUNBOOK_ALERTMANAGER_URL"].rstrip("/") + "/api/v2/silences"
    return silences_of_run(httpx.get(url, timeout=10).raise_for_status().json(), str(run_id))


def _invariants(
    platform: Any, kube: Any, case: Case, before: Baseline, run_id: UUID
) -> dict[str, bool]:
    """Each invariant, read from the real systems: name → held."""
    for name in COMPONENTS:
        wait_settled(kube, name, timeout=30)
    expected = {**before.replicas, **(case.replicas(platform) if case.replicas else {})}
    stages = {secret_id: _stages(platform, secret_id) for secret_id in SECRETS}
    return {
        "replicas as recorded": _replicas(platform) == expected,
        "images as recorded": {n: image_of(kube, n) for n in COMPONENTS} == before.images,
        "maintenance off": _maintenance(kube) == ("false", False),
        "no scratch database": set(databases(platform)) == before.databases,
        "no open upload": uploads(platform) == [],
        "secret stages consistent": all(
            sum("AWSCURRENT" in s for s in stages[i].values()) == 1
            and not any("AWSPENDING" in s for s in stages[i].values())
            and _current(platform, i) == before.secrets[i]
            for i in SECRETS
        ),
        "app role logs in with AWSCURRENT": _app_role_logs_in(platform),
        "live database accepts connections with its rows": _users(platform) == before.users,
        "status page not left scheduled": _status_page(platform)[-1:] in ([], ["resolved"]),
        "no active silence of the window": _active_silences_of(platform, run_id) == [],
    }


def _record(case: Case, column: str, held: dict[str, bool], note: str) -> None:
    failed = [name for name, ok in held.items() if not ok]
    FAULT_MATRIX[(case.runbook, case.step, column)] = {
        "held": not failed,
        "note": ("NOT HELD: " + ", ".join(failed) + "; " if failed else "") + note,
    }
    assert not failed, f"{case.step} ({column}): not held: {failed}"


@pytest.fixture
def clean(platform: Any, kube: Any) -> Any:
    clear_all_intents()
    clear_backups(platform)
    yield platform
    # A cell that did not hold must not fail the next ones: open the live database again.
    with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as admin:
        admin.execute("ALTER DATABASE complianceagent ALLOW_CONNECTIONS true")
    clear_all_intents()
    drop_databases_like(platform, r"complianceagent\_restore\_%")
    clear_backups(platform)


# --- SIGKILL, then reconcile ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_sigkill_then_reconcile(clean: Any, kube: Any, case: Case) -> None:
    platform = clean
    if case.needs_backup:
        assert backup(return_state=True).is_completed()
    before = _baseline(platform, kube)
    try:
        run_id = run_until_killed(
            case.module, case.flow, case.runbook, case.step, case.parameters, case.approve
        )
        state = reconcile(return_state=True)
        assert state.is_completed(), state.message
        freed = state.result()["freed_locks"]
        # Read at once: reconcile freed them, nobody waited for the leases to expire.
        leaked = _held_locks(case.locks)
        held = _invariants(platform, kube, case, before, run_id)
        held["locks free"] = leaked == []
    finally:
        free_leaked_locks(*case.locks)  # only after a cell that did not hold
    note = (
        f"lease of {', '.join(leaked)} still held after reconcile"
        if leaked
        else f"reconcile freed {len(freed)} lock(s)"
    )
    _record(case, "SIGKILL + reconcile", held, note)


# --- SIGTERM (a cancel), the runbook's own undo ------------------------------------------


def run_until_terminated(case: Case) -> tuple[UUID, int, StateType | None]:
    """Run the case's flow in its own process that gets SIGTERM at the step; returns the
    run's id, the process's exit code and the run's final state type."""
    code = f"from {case.module} import {case.flow}; {case.flow}(**{case.parameters!r})"
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        TERM_AT_VARIABLE: case.step,
    }
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=PROJECT_ROOT)
    try:
        for name in case.approve:
            resume_flow_run(wait_for_paused_run(name, timeout=120).id, run_input=APPROVE)
        exit_code = process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    run = _newest_run(case.runbook)
    return run.id, exit_code, None if run.state is None else run.state.type


def _newest_run(flow_name: str) -> Any:
    with get_client(sync_client=True) as prefect_api:
        [run] = prefect_api.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    return run


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_sigterm_runs_the_runbooks_own_undo(clean: Any, kube: Any, case: Case) -> None:
    platform = clean
    if case.needs_backup:
        assert backup(return_state=True).is_completed()
    before = _baseline(platform, kube)
    try:
        run_id, exit_code, final = run_until_terminated(case)
        assert exit_code != 0, f"{case.step}: the run finished, SIGTERM never arrived"
        assert final not in (StateType.RUNNING, StateType.COMPLETED, StateType.PAUSED), final
        held = _invariants(platform, kube, case, before, run_id)
        held["locks free"] = _held_locks(case.locks) == []
    finally:
        free_leaked_locks(*case.locks)
    _record(
        case,
        "SIGTERM (own undo)",
        held,
        f"run ended {final.value if final else '?'}, process exit {exit_code}",
    )
    assert run_id
