"""The fault matrix: every mutating runbook, killed at each of its step boundaries.

SIGKILL column: the run dies in its own process at the boundary (`RUNBOOK_TEST_KILL_AT`,
no `finally` runs), is marked Crashed as its runner would, then `reconcile` runs.
SIGTERM column: the process gets SIGTERM at the boundary (`RUNBOOK_TEST_TERM_AT`), what a
runner sends to a run cancelled from the UI/API and Kubernetes to an evicted pod; the
runbook's own undo must put things back, without reconcile.

Either way the same invariants are then read from the real systems: replicas as recorded,
images as recorded, maintenance mode off, no scratch database, no open multipart upload,
each AWS secret with one AWSCURRENT (the recorded one unless the run completed) and no
AWSPENDING, the live database accepting connections with its rows, no Job running that
no intent reports, the status page not left saying "scheduled", no silence of the run's
window still active, and the run's locks free — for a SIGKILLed run, freed by that one
reconcile (it frees a dead run's recorded leases once its targets are back), not by
Prefect's lease expiry 300 s later; plus each case's own `checks` (an HPA as asked, a
migration Job never deleted and reported, a certificate issued, an upload that was open
aborted). A case's `prepare` sets the stage (a failing rollout, a blocked migration, rows
enough for a multipart upload) and puts it back.

Each cell lands in `FAULT_MATRIX` (runbook, step, signal → held/not); tests/conftest.py
writes it to `.local/fault-matrix.md` and prints it at the end of the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from kubernetes import client
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.flow_runs import resume_flow_run
from psycopg import sql

from flows.backup import backup
from runbook.decisions.maintenance import WINDOW_ANNOTATION, silences_of_run
from runbook.fault_points import TERM_AT_VARIABLE
from sandbox.platform import (
    API_KEY_SECRET_ID,
    APP_ROLE,
    DATABASE_PASSWORD_SECRET_ID,
    TLS_CERTIFICATE,
    TLS_SECRET,
)
from tasks import kubernetes as k8s
from tasks.intent import list_intents
from tests.backup_helpers import clear_backups, databases, drop_databases_like, query, uploads
from tests.helpers import wait_for_paused_run
from tests.reconcile_helpers import (
    APPROVE,
    clear_all_intents,
    free_leaked_locks,
    held_locks,
    reconciled,
    recorded_intent_of,
    run_until_killed,
    start_in_process,
)
from tests.release_helpers import NS, image_of, live, wait_settled, wait_until

pytestmark = pytest.mark.slow

COMPONENTS = ("backend", "celery-workers", "frontend")
SECRETS = (API_KEY_SECRET_ID, DATABASE_PASSWORD_SECRET_ID)
WRITERS = ("backend", "celery-workers")
PRE_RESTORE = "complianceagent_pre_restore_"

# (runbook, step, signal) → {"held": bool, "note": str}; read by tests/conftest.py.
FAULT_MATRIX: dict[tuple[str, str, str], dict[str, Any]] = {}


FLOWS = {
    "restore": ("flows.restore", "restore"),
    "deploy": ("flows.deploy", "deploy"),
    "rollback": ("flows.rollback", "rollback"),
    "maintenance-window": ("flows.maintenance_window", "maintenance_window"),
    "scale": ("flows.scale", "scale"),
    "autoscale": ("flows.scale", "autoscale"),
    "migrations": ("flows.migrations", "migrations"),
    "backup": ("flows.backup", "backup"),
    "restart": ("flows.restart", "restart"),
    "cert-renewal": ("flows.certificates", "cert_renewal"),
    "secret-rotation": ("flows.secret_rotation", "secret_rotation"),
}


@dataclass(frozen=True)
class Seen:
    """What a cell's own checks get: the column, the dead run, what reconcile returned
    (SIGKILL column), and what the case's preparation yielded."""

    column: str
    run_id: UUID
    reconciled: dict[str, Any] | None
    context: dict[str, Any]


@dataclass(frozen=True)
class Case:
    runbook: str
    step: str
    parameters: dict[str, Any]
    locks: tuple[str, ...]
    approve: tuple[str, ...] = ()
    needs_backup: bool = False
    # What the run leaves on purpose, in the SIGKILL column too (scale's one write).
    replicas: Callable[[Any], dict[str, int]] | None = None
    # Images the run leaves on purpose (a rollback's one write), from the preparation.
    images: Callable[[dict[str, Any]], dict[str, str]] | None = None
    # A restore past its swap: the previous database is kept as `<db>_pre_restore_*`.
    swapped: bool = False
    # Sets the stage (and puts it back) around the cell; yields what `checks` needs.
    prepare: Callable[[Any], AbstractContextManager[dict[str, Any]]] | None = None
    # The runbook's own invariants, read from the real systems: name → held.
    checks: Callable[[Any, Seen], dict[str, bool]] | None = None

    @property
    def module(self) -> str:
        return FLOWS[self.runbook][0]

    @property
    def flow(self) -> str:
        return FLOWS[self.runbook][1]


RESTORE_LOCKS = ("database/complianceagent", *(f"deployment/{n}" for n in WRITERS))
RESTORE: dict[str, Any] = {
    "parameters": {},
    "locks": RESTORE_LOCKS,
    "approve": ("restore",),
    "needs_backup": True,
}
DEPLOY_LOCKS = tuple(f"deployment/{n}" for n in COMPONENTS)
DEPLOY: dict[str, Any] = {
    "parameters": {"version": "9.9.9", "components": ("backend", "frontend")},
    "locks": DEPLOY_LOCKS,
}
WINDOW: dict[str, Any] = {
    "parameters": {"reason": "fault matrix", "duration_seconds": 600},
    "locks": ("deployment/backend",),
    "approve": ("maintenance-window",),
}
MIGRATE: dict[str, Any] = {"require_maintenance_mode": False}
FRONTEND_HPA = "frontend-hpa"
CERT_API = "cert-manager.io/v1"
ROTATE_LOCKS = tuple(f"deployment/{n}" for n in WRITERS)
ROTATE_PASSWORD: dict[str, Any] = {
    "parameters": {"secret": "database-password"},
    "locks": (f"secret/{DATABASE_PASSWORD_SECRET_ID}", *ROTATE_LOCKS),
}
ROTATE_API_KEY: dict[str, Any] = {
    "parameters": {"secret": "api-key"},
    "locks": (f"secret/{API_KEY_SECRET_ID}", *ROTATE_LOCKS),
}


@contextmanager
def _frontend_rollouts_fail(platform: Any) -> Iterator[dict[str, Any]]:
    """The new frontend never becomes ready: backend and workers roll out, then the
    deploy rolls all three back (the kube fixture clears the failure afterwards)."""
    platform.kube.fail_rollouts_for_image("frontend:9.9.7")
    yield {}


@contextmanager
def _frontend_on_a_new_image(platform: Any) -> Iterator[dict[str, Any]]:
    """Two revisions to roll back between; rollback brings the frontend's first back."""
    previous = image_of(platform.kube, "frontend")
    k8s.set_deployment_image.fn("frontend", "frontend", "complianceagent/frontend:9.0.0")
    wait_settled(platform.kube, "frontend")
    yield {"images": {"frontend": previous}}


@contextmanager
def _no_frontend_hpa(platform: Any) -> Iterator[dict[str, Any]]:
    """No HPA on the frontend, so autoscale writes one; whatever was there comes back."""
    previous = k8s.read_horizontal_pod_autoscaler.fn(FRONTEND_HPA)
    if previous is not None:
        _delete_hpa(platform)
    try:
        yield {}
    finally:
        if previous is None:
            _delete_hpa(platform)
        else:
            k8s.apply_horizontal_pod_autoscaler.fn(
                {key: previous[key] for key in ("apiVersion", "kind", "spec")}
                | {"metadata": {"name": FRONTEND_HPA, "namespace": NS}}
            )


def _delete_hpa(platform: Any) -> None:
    with (
        client.ApiClient(client.Configuration(host=platform.kube.url)) as api,
        suppress(client.ApiException),
    ):
        client.AutoscalingV2Api(api).delete_namespaced_horizontal_pod_autoscaler(FRONTEND_HPA, NS)


def _hpa_as_asked(platform: Any, seen: Seen) -> dict[str, bool]:
    spec = (k8s.read_horizontal_pod_autoscaler.fn(FRONTEND_HPA) or {}).get("spec") or {}
    return {
        "HPA as asked (one write, kept)": (spec.get("minReplicas"), spec.get("maxReplicas"))
        == (3, 9)
    }


MIGRATION_LOCKS = ("database/complianceagent",)


@contextmanager
def _migration_blocked(platform: Any) -> Iterator[dict[str, Any]]:
    """The migration waits for a table lock, as one does behind a long transaction: its
    Job is still running when reconcile looks. `release()` lets it finish."""
    blocker = psycopg.connect(platform.postgres.dsn)
    blocker.execute("LOCK TABLE compliance_scans IN ACCESS EXCLUSIVE MODE")
    try:
        yield {"release": blocker.rollback}
    finally:
        blocker.close()


def _migration_job(platform: Any) -> dict[str, Any] | None:
    jobs = [
        j
        for j in platform.kube.list("batch/v1", "Job", NS)
        if j["metadata"]["name"].startswith("backend-migrate-")
    ]
    return jobs[-1] if jobs else None


def _job_active(job: dict[str, Any] | None) -> bool:
    return bool(job and (job.get("status") or {}).get("active"))


def _job_deleted_by_anyone(platform: Any) -> bool:
    return any(w.kind == "Job" and w.method == "DELETE" for w in platform.kube.writes)


def _running_job_reported(platform: Any, seen: Seen) -> dict[str, bool]:
    """Killed with its Job running: the Job is never deleted, reconcile reports it and
    keeps the intent; once the Job ends, the next reconcile reports how and clears it."""
    run = str(seen.run_id)
    held = {"job still running, not deleted": _job_active(_migration_job(platform))}
    if seen.reconciled is not None:
        problems = seen.reconciled["problems"].get(run) or []
        held["reconcile reports the running job"] = any("still running" in p for p in problems)
        # No backup or restore may start on the database under a running migration.
        held["database lock kept while the job runs"] = held_locks(MIGRATION_LOCKS) != []
    held["intent kept while the job runs"] = recorded_intent_of(seen.run_id) is not None
    seen.context["release"]()
    wait_until(lambda: not _job_active(_migration_job(platform)), "the migration ends", 60)
    again = reconciled()
    held["then reported as finished, intent cleared"] = (
        any("succeeded" in line for line in again["changed"].get(run, []))
        and recorded_intent_of(seen.run_id) is None
    )
    if seen.reconciled is not None:
        held["then the lock freed"] = held_locks(MIGRATION_LOCKS) == []
    held["no job deleted"] = not _job_deleted_by_anyone(platform)
    return held


def _finished_job_reported(platform: Any, seen: Seen) -> dict[str, bool]:
    held = {"job finished": not _job_active(_migration_job(platform))}
    if seen.reconciled is not None:
        run = str(seen.run_id)
        held["reconcile reports how it ended, clears the intent"] = (
            any("succeeded" in line for line in seen.reconciled["changed"].get(run, []))
            and recorded_intent_of(seen.run_id) is None
        )
    return held


@contextmanager
def _quick_issuance(platform: Any) -> Iterator[dict[str, Any]]:
    kube, delay = platform.kube, platform.kube.certificate_delay
    kube.certificate_delay = 0.1
    try:
        yield {"revision": _certificate(platform)["status"]["revision"]}
    finally:
        kube.certificate_delay = delay


def _certificate(platform: Any) -> dict[str, Any]:
    return platform.kube.get(CERT_API, "Certificate", NS, TLS_CERTIFICATE)


def _renewed_by_cert_manager(platform: Any, seen: Seen) -> dict[str, bool]:
    """The one write (Issuing=True) stands: cert-manager finishes the issuance alone."""

    def issued() -> bool:
        status = _certificate(platform)["status"]
        types = {c["type"]: c["status"] for c in status.get("conditions") or []}
        return types == {"Ready": "True"} and status["revision"] == seen.context["revision"] + 1

    try:
        wait_until(issued, "cert-manager issues the renewal", 30)
    except AssertionError:
        return {"renewed: Ready, revision + 1": False}
    secret = platform.kube.get("v1", "Secret", NS, TLS_SECRET)
    return {"renewed: Ready, revision + 1": True, "TLS Secret kept": secret is not None}


def _upload_was_open(platform: Any, seen: Seen) -> dict[str, bool]:
    """Proof the cell is mid-upload: reconcile found the dead run's upload open and
    aborted it (SIGTERM: the run's own abort did, checked by "no open upload")."""
    if seen.reconciled is None:
        return {}
    done = seen.reconciled["changed"].get(str(seen.run_id), [])
    return {"reconcile aborted the open upload": any("aborted" in line for line in done)}


@contextmanager
def _ballast(platform: Any) -> Iterator[dict[str, Any]]:
    """~12 MB of incompressible rows: the dump is a multipart upload of two 8 MiB parts
    (the sandbox's own data fits in one PUT, with no upload to leave open)."""
    random_hex = " || ".join(["md5(random()::text)"] * 10)
    with psycopg.connect(platform.postgres.dsn, autocommit=True) as db:
        db.execute("CREATE TABLE fault_matrix_ballast (id int PRIMARY KEY, payload bytea)")
        db.execute(
            f"INSERT INTO fault_matrix_ballast SELECT g, decode({random_hex}, 'hex')"
            " FROM generate_series(1, 75000) g"
        )
    try:
        yield {}
    finally:
        with psycopg.connect(platform.postgres.dsn, autocommit=True) as db:
            db.execute("DROP TABLE IF EXISTS fault_matrix_ballast")


CASES = [
    Case("restore", "restore: scratch restored", **RESTORE),
    Case("restore", "restore: writers stopped", **RESTORE),
    Case("restore", "restore: connections refused", **RESTORE),
    Case("restore", "restore: swap committed", **RESTORE, swapped=True),
    Case("restore", "restore: writers back", **RESTORE, swapped=True),
    Case("deploy", "deploy: rolled out backend", **DEPLOY),
    Case("deploy", "deploy: rolled out celery-workers", **DEPLOY),
    Case("deploy", "deploy: rolled out frontend", **DEPLOY),
    Case(
        "deploy",
        "deploy: rolled back",
        {"version": "9.9.7", "components": ("backend", "frontend")},
        DEPLOY_LOCKS,
        prepare=_frontend_rollouts_fail,
    ),
    Case("maintenance-window", "maintenance-window: status page scheduled", **WINDOW),
    Case("maintenance-window", "maintenance-window: alerts silenced", **WINDOW),
    Case("maintenance-window", "maintenance-window: maintenance mode on", **WINDOW),
    Case(
        "scale",
        "scale: scaled",
        {"deployment": "backend", "replicas": 4},
        ("deployment/backend",),
        replicas=lambda _: {"backend": 4},
    ),
    Case("backup", "backup: archive stored", {}, ("database/complianceagent",)),
    Case(
        "backup",
        "backup: a part uploaded",
        {},
        ("database/complianceagent",),
        prepare=_ballast,
        checks=_upload_was_open,
    ),
    Case("secret-rotation", "secret-rotation: createSecret done", **ROTATE_PASSWORD),
    Case("secret-rotation", "secret-rotation: setSecret done", **ROTATE_PASSWORD),
    Case("secret-rotation", "secret-rotation: testSecret done", **ROTATE_PASSWORD),
    Case("secret-rotation", "secret-rotation: finishSecret done", **ROTATE_API_KEY),
    # After finishSecret, the backend's pods restarted and the workers' not yet.
    Case("secret-rotation", "restart: restarted backend", **ROTATE_API_KEY),
    Case(
        "rollback",
        "rollback: rolled back frontend",
        {"deployment": "frontend"},
        ("deployment/frontend",),
        ("rollback",),
        prepare=_frontend_on_a_new_image,
        images=lambda context: context["images"],
    ),
    Case(
        "autoscale",
        "autoscale: HPA applied",
        {"deployment": "frontend", "min_replicas": 3, "max_replicas": 9},
        ("deployment/frontend",),
        prepare=_no_frontend_hpa,
        checks=_hpa_as_asked,
    ),
    Case(
        "migrations",
        "migrations: job created",
        MIGRATE,
        ("database/complianceagent",),
        ("migrations",),
        prepare=_migration_blocked,
        checks=_running_job_reported,
    ),
    Case(
        "migrations",
        "migrations: job finished",
        MIGRATE,
        ("database/complianceagent",),
        ("migrations",),
        checks=_finished_job_reported,
    ),
    Case(
        "restart", "restart: restarted backend", {"deployment": "backend"}, ("deployment/backend",)
    ),
    Case(
        "cert-renewal",
        "cert-renewal: renewal requested",
        {"certificate": TLS_CERTIFICATE},
        (f"certificate/{NS}/{TLS_CERTIFICATE}",),
        ("cert-renewal",),
        prepare=_quick_issuance,
        checks=_renewed_by_cert_manager,
    ),
]


def _id(case: Case) -> str:
    boundary = case.step.split(": ", 1)[-1]
    return f"{case.runbook}-{boundary}".replace(" ", "-")


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
    """The statuses posted about the fault matrix's window during this cell, oldest first
    (by its reason, which every post of the window and of reconcile quotes: an incident
    run of an earlier test posting meanwhile is not this window)."""
    return [
        n.json["incident"]["status"]
        for n in platform.receiver.received
        if n.path.startswith("/statuspage")
        and n.json
        and WINDOW["parameters"]["reason"] in str(n.json["incident"].get("body"))
    ]


def _active_silences_of(platform: Any, run_id: UUID) -> list[str]:
    url = platform.env["RUNBOOK_ALERTMANAGER_URL"].rstrip("/") + "/api/v2/silences"
    return silences_of_run(httpx.get(url, timeout=10).raise_for_status().json(), str(run_id))


def _new_databases_as_expected(platform: Any, case: Case, before: Baseline) -> bool:
    """None gone, none new; past a restore's swap, exactly one previous database kept."""
    now = set(databases(platform))
    new = now - before.databases
    if not before.databases <= now:
        return False
    if case.swapped:
        return len(new) == 1 and all(n.startswith(PRE_RESTORE) for n in new)
    return not new


def _running_jobs_unreported(kube: Any) -> list[str]:
    """Jobs still running that no recorded intent names (reconcile reports those)."""
    intents, _ = list_intents.fn()
    reported = {u.get("job") for i in intents for u in i.undo if u.get("kind") == "report-job"}
    return [
        j["metadata"]["name"]
        for j in kube.list("batch/v1", "Job", NS)
        if (j.get("status") or {}).get("active") and j["metadata"]["name"] not in reported
    ]


def _invariants(
    platform: Any, kube: Any, case: Case, before: Baseline, seen: Seen
) -> dict[str, bool]:
    """Each invariant, read from the real systems: name → held."""
    for name in COMPONENTS:
        wait_settled(kube, name, timeout=30)
    expected = {**before.replicas, **(case.replicas(platform) if case.replicas else {})}
    images = {**before.images, **(case.images(seen.context) if case.images else {})}
    stages = {secret_id: _stages(platform, secret_id) for secret_id in SECRETS}
    return {
        "replicas as recorded": _replicas(platform) == expected,
        "images as recorded": {n: image_of(kube, n) for n in COMPONENTS} == images,
        "maintenance off": _maintenance(kube) == ("false", False),
        "no scratch database": _new_databases_as_expected(platform, case, before),
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
        "no active silence of the window": _active_silences_of(platform, seen.run_id) == [],
        "no Job running unreported": _running_jobs_unreported(kube) == [],
        **(case.checks(platform, seen) if case.checks else {}),
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
    kept = set(databases(platform))
    yield platform
    # A cell that did not hold must not fail the next ones: open the live database again.
    with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as admin:
        admin.execute("ALTER DATABASE complianceagent ALLOW_CONNECTIONS true")
    clear_all_intents()
    drop_databases_like(platform, r"complianceagent\_restore\_%")
    with psycopg.connect(platform.postgres.admin_dsn, autocommit=True) as admin:
        for name in set(databases(platform)) - kept:
            if name.startswith(PRE_RESTORE):  # what a swapped-in restore kept, this cell's
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    clear_backups(platform)


def _prepared(case: Case, platform: Any) -> AbstractContextManager[dict[str, Any]]:
    return case.prepare(platform) if case.prepare else nullcontext({})


@contextmanager
def _cell(case: Case, platform: Any, kube: Any) -> Iterator[tuple[dict[str, Any], Any]]:
    """The case's preconditions, and (its context, the platform as it was before the run).
    The locks a cell leaked are freed on the way out, after its invariants were read."""
    if case.needs_backup:
        assert backup(return_state=True).is_completed()
    with _prepared(case, platform) as context:
        before = _baseline(platform, kube)
        try:
            yield context, before
        finally:
            free_leaked_locks(*case.locks)


# --- SIGKILL, then reconcile ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_sigkill_then_reconcile(clean: Any, kube: Any, case: Case) -> None:
    platform = clean
    with _cell(case, platform, kube) as (context, before):
        run_id = run_until_killed(
            case.module, case.flow, case.runbook, case.step, case.parameters, case.approve
        )
        result = reconciled()
        freed = result["freed_locks"]
        seen = Seen("SIGKILL + reconcile", run_id, result, context)
        held = _invariants(platform, kube, case, before, seen)
        # Read before any lease could expire: reconcile freed them (a migration's only
        # once its Job ended: its case's checks run the second reconcile that does).
        leaked = held_locks(case.locks)
        held["locks free"] = leaked == []
    note = (
        f"lease of {', '.join(leaked)} still held after reconcile"
        if leaked
        else f"reconcile freed {len(freed)} lock(s)"
        if freed
        else "locks free"
    )
    _record(case, "SIGKILL + reconcile", held, note)


# --- SIGTERM (a cancel), the runbook's own undo ------------------------------------------


def run_until_terminated(case: Case) -> tuple[UUID, int, StateType | None]:
    """Run the case's flow in its own process that gets SIGTERM at the step; returns the
    run's id, the process's exit code and the run's final state type."""
    process = start_in_process(
        case.module, case.flow, case.parameters, **{TERM_AT_VARIABLE: case.step}
    )
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
    with _cell(case, platform, kube) as (context, before):
        run_id, exit_code, final = run_until_terminated(case)
        assert exit_code != 0, f"{case.step}: the run finished, SIGTERM never arrived"
        assert final not in (StateType.RUNNING, StateType.COMPLETED, StateType.PAUSED), final
        seen = Seen("SIGTERM (own undo)", run_id, None, context)
        held = _invariants(platform, kube, case, before, seen)
        held["locks free"] = held_locks(case.locks) == []
    _record(
        case,
        "SIGTERM (own undo)",
        held,
        f"run ended {final.value if final else '?'}, process exit {exit_code}",
    )
    assert run_id
