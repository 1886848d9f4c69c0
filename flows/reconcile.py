"""Crash recovery: put the platform back from the intent a runbook recorded.

Every mutating runbook records, before its first write, what it is about to change and
how to put it back (`tasks.intent`, a Prefect Variable per run). When its process dies
— SIGKILL, OOM, an evicted pod, a lost node — nothing in it runs again; `reconcile` does
what its undo would have done.

Guarantees:
- Runs every 2 minutes, and at once when a runbook run ends Crashed or Cancelled, or
  stops sending heartbeats (the automations prefect.yaml's `triggers:` create).
- A run Prefect still shows Running (or Paused, Cancelling) whose last heartbeat is older
  than `RUNBOOK_HEARTBEAT_TIMEOUT_SECONDS` lost its process or node without anyone
  seeing it exit: reconcile marks it Crashed through the API, saying why, and then
  treats it as any dead run. A run that never sent a heartbeat is never guessed dead.
- A dead run's lock leases (recorded by `tasks.locks` when taken) are freed once its
  intent is put back, so the next run of its targets starts at once instead of waiting
  for Prefect's lease expiry (300 s); a live run's leases are never touched. While a
  dead run's change is still under way (a migration Job running), its leases are renewed
  each time reconcile runs (`RUNBOOK_RECONCILE_LEASE_SECONDS`, longer than its period):
  the database stays locked for as long as the Job runs, however long past the expiry.
  If the lease lapsed anyway (reconcile was down past its expiry), it takes the lock
  again for the Job, or, when another run took it first, reports that in chat (never
  takes it from that run).
- Never touches what a live run owns: an intent is acted on only when its run is in a
  terminal state (Crashed, Cancelled, Failed, Completed) or gone from the server, and no
  live run has recorded an intent on one of the same targets since.
- Every step compares with the live state and writes only what differs: a second run,
  or two at the same time, do nothing more (and the `reconcile` lock keeps a second one
  from even trying). The intent is cleared only when every step of it is done; a
  migration Job still running is reported and its intent kept until it ends.
- Reports what it did (and what it left, and why) as an artifact, and in chat when it
  changed something. Lists the `*_pre_restore_*` databases restores kept, with age and
  size; `drop-pre-restore-databases` drops those past a retention, after an approval.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from pydantic import Field

from flows.restart import restart_deployments
from runbook.decisions.deployment import deployment_view, main_container
from runbook.decisions.intent import (
    HEARTBEAT_STATES,
    Intent,
    describe_step,
    judge,
    lease_actions,
    pre_restore_age,
    pre_restore_to_drop,
    secret_repair,
    silent_run,
)
from runbook.decisions.locks import LeaseRecord
from runbook.decisions.maintenance import (
    WINDOW_ANNOTATION,
    interrupted_window_update,
    open_window_of,
    silences_of_run,
)
from runbook.decisions.migrations import MAINTENANCE_VARIABLE, job_outcome, maintenance_mode_of
from runbook.decisions.release import choose_rollback, recorded_revision_now
from runbook.report import markdown_table
from runbook.settings import load_settings
from tasks.alertmanager import expire_silence, list_silences
from tasks.approval import Plan, RequestedBy, request_approval
from tasks.intent import (
    delete_intent,
    list_intents,
    mark_crashed,
    read_last_heartbeats,
    read_run_states,
)
from tasks.kubernetes import (
    annotate_deployment,
    list_deployment_revisions,
    read_deployment,
    read_deployment_scale,
    read_job,
    restore_pod_template,
    scale_deployment,
    set_deployment_env,
    wait_for_rollout,
)
from tasks.locks import exclusive, free_lease, list_lease_records, renew_lease, retake_lease
from tasks.notify import announce, update_status_page
from tasks.postgres import allow_connections, drop_database, read_database_sizes
from tasks.postgres_roles import alter_role_password
from tasks.s3 import abort_multipart_upload, list_multipart_uploads
from tasks.secrets_manager import (
    describe_secret_versions,
    move_current_stage,
    read_secret_version,
    remove_pending_stage,
)

# Another reconcile holding the lock longer than this is at work: this one stops.
LOCK_WAIT_SECONDS = 5
ROLLOUT_DEADLINE_SECONDS = 300


class StillRunning(Exception):
    """A step that must wait (a migration Job still running): the intent is kept."""


@dataclass
class Repair:
    """What reconcile did for one intent."""

    intent: Intent
    done: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    kept: bool = False
    # Kept because something of the run is still changing its target (a Job running).
    under_way: bool = False


@flow(name="reconcile", flow_run_name="reconcile")
def reconcile() -> dict[str, Any]:
    """Put the platform back from the intents of runbook runs that died.

    Nothing to fill in: it reads what the runbooks recorded.
    """
    logger = get_run_logger()
    try:
        # 1. One reconcile at a time; another one holding the lock is already at it.
        with exclusive("reconcile", wait_seconds=LOCK_WAIT_SECONDS):
            # 2. Read the recorded intents and the state of each one's run.
            intents, unreadable = list_intents()
            leases = list_lease_records()
            runs = {i.run_id for i in intents} | {lease.run_id for lease in leases}
            states = read_run_states(sorted(runs))
            # 3. A run shown alive whose heartbeats stopped lost its node: mark it Crashed.
            crashed = _crash_silent_runs(states)
            # 4. Judge: a dead run's intent, unless a live run now owns its targets.
            judgement = judge(intents, states)
            # 5. Put each dead run's targets back, step by step; clear what is done.
            repairs = [_repair(intent) for intent in judgement.to_reconcile]
            # 6. Free the locks dead runs still hold once their targets are back (the
            #    next run need not wait for the lease to expire); renew them while their
            #    change is still under way (a Job outlives its run, and its lock must too).
            unfinished = {r.intent.run_id for r in repairs if r.kept}
            unfinished |= {v.intent.run_id for v in judgement.left}
            under_way = {r.intent.run_id for r in repairs if r.under_way}
            locks = lease_actions(leases, states, under_way, unfinished)
            for lease in locks.free:
                free_lease(lease)
            renewed, lapsed = _renew_under_way(locks.renew)
    except TimeoutError:
        logger.info("another reconcile holds the lock; nothing to do")
        return {"skipped": "another reconcile is running"}

    # 7. List the previous databases restores kept (age, size).
    kept_databases = _pre_restore_databases()

    # 8. Report: an artifact always, chat when something changed or needs a person.
    freed = sorted(f"{lease.target} (run {lease.run_id})" for lease in locks.free)
    _publish(repairs, judgement.left, unreadable, kept_databases, crashed, freed, renewed, lapsed)
    return {
        "reconciled": [r.intent.run_id for r in repairs if not r.kept],
        "changed": {r.intent.run_id: r.done for r in repairs if r.done},
        "left": {v.intent.run_id: v.why for v in judgement.left},
        "problems": {r.intent.run_id: r.problems for r in repairs if r.problems},
        "marked_crashed": crashed,
        "freed_locks": freed,
        "renewed_locks": renewed,
        "lapsed_locks": lapsed,
    }


def _crash_silent_runs(states: dict[str, str | None]) -> dict[str, str]:
    """Mark Crashed the runs shown alive whose heartbeats stopped (`states` is updated
    with what the server answers); run id → why."""
    watched = [run_id for run_id, state in states.items() if state in HEARTBEAT_STATES]
    if not watched:
        return {}
    timeout = load_settings().heartbeat_timeout_seconds
    beats = read_last_heartbeats(watched)
    now = dt.datetime.now(dt.UTC)
    crashed = {}
    for run_id in watched:
        why = silent_run(states[run_id], beats.get(run_id), now, timeout)
        if why is not None:
            states[run_id] = mark_crashed(run_id, why)
            crashed[run_id] = why
    return crashed


def _renew_under_way(leases: Sequence[LeaseRecord]) -> tuple[list[str], dict[str, str]]:
    """Keep each lock held while its run's change is under way: renew the lease, or take
    the lock again when the lease already lapsed (reconcile was down past its expiry).
    Returns (held on, lock → why not: another run took it meanwhile)."""
    seconds = load_settings().reconcile_lease_seconds
    held, lapsed = [], {}
    for lease in leases:
        lock = f"{lease.target} (run {lease.run_id})"
        gone = renew_lease(lease, seconds)
        if gone is None:
            held.append(lock)
        elif retake_lease(lease, seconds) is not None:
            held.append(lock)
            get_run_logger().warning("%s: %s; the lock was free and is taken again", lock, gone)
        else:
            lapsed[lock] = (
                f"{gone}, and another run has taken the lock since: it may act on "
                "the target while this run's change is still under way"
            )
    return sorted(held), lapsed


def _repair(intent: Intent) -> Repair:
    """Apply the intent's undo steps in order; clear it when all are done."""
    repair = Repair(intent)
    for step in intent.undo:
        what = describe_step(step)
        try:
            changed = STEPS[step["kind"]](intent, step)
        except StillRunning as exc:
            repair.kept = repair.under_way = True
            repair.problems.append(f"{what}: {exc}")
            continue
        except Exception as exc:
            repair.kept = True
            repair.problems.append(f"{what} FAILED: {exc}")
            continue
        (repair.done if changed else repair.unchanged).append(
            what if changed is True else str(changed or what)
        )
    if not repair.kept:
        delete_intent(intent.run_id)
    return repair


# --- the undo steps: each writes only what differs; True/str = changed -------------------


def _scale(intent: Intent, step: Mapping[str, Any]) -> bool:
    name, replicas = step["deployment"], int(step["replicas"])
    if read_deployment_scale(name) == replicas:
        return False
    scale_deployment(name, replicas)
    return True


def _revision(intent: Intent, step: Mapping[str, Any]) -> bool:
    name = step["deployment"]
    live = read_deployment(name)
    revisions = list_deployment_revisions(name)
    revision = recorded_revision_now(revisions, int(step["revision"]), step.get("image"))
    choice = choose_rollback(live, revisions, revision)
    if choice.already_there:
        return False
    cause = f"reconcile: run {intent.run_id} of {intent.runbook} died mid-change"
    restored = deployment_view(restore_pod_template(name, choice.target["template"], cause))
    wait_for_rollout(name, restored.generation, ROLLOUT_DEADLINE_SECONDS)
    return True


def _maintenance_off(intent: Intent, step: Mapping[str, Any]) -> bool | str:
    name = step["deployment"]
    live = read_deployment(name)
    changed = False
    if maintenance_mode_of(live):
        container = step.get("container") or main_container(live)["name"]
        patched = set_deployment_env(name, container, {MAINTENANCE_VARIABLE: "false"})
        wait_for_rollout(name, deployment_view(patched).generation, ROLLOUT_DEADLINE_SECONDS)
        changed = True
    window = open_window_of(live)
    if window is not None and window.get("flowRunId") == intent.run_id:
        annotate_deployment(name, {WINDOW_ANNOTATION: None})
        changed = True
    return changed


def _allow_connections(intent: Intent, step: Mapping[str, Any]) -> bool:
    # Before a swap commits, the live name is the old database; after, it is the restored
    # one (never refused). Either way, the live name must accept connections.
    return allow_connections(step["database"])


def _drop_database(intent: Intent, step: Mapping[str, Any]) -> bool:
    # A scratch database swapped in no longer exists under its scratch name: IF EXISTS.
    return drop_database(step["database"])


def _abort_upload(intent: Intent, step: Mapping[str, Any]) -> bool:
    bucket, key = step["bucket"], step["key"]
    open_uploads = [u for u in list_multipart_uploads(bucket, key) if u["key"] == key]
    for upload in open_uploads:
        abort_multipart_upload(bucket, key, upload["upload_id"])
    return bool(open_uploads)


def _report_job(intent: Intent, step: Mapping[str, Any]) -> str:
    job = read_job(step["job"])
    if job is None:
        return f"job/{step['job']} is gone"
    outcome = job_outcome(job)
    if not outcome.finished:
        raise StillRunning("still running: left alone (kubectl logs job/" + step["job"] + ")")
    verdict = "succeeded" if outcome.succeeded else f"failed: {outcome.detail}"
    return f"job/{step['job']} {verdict}; left for its ttlSecondsAfterFinished"


def _secret_stages(intent: Intent, step: Mapping[str, Any]) -> bool:
    secret_id, previous, pending = step["secret_id"], step["previous"], step["pending"]
    repair = secret_repair(describe_secret_versions(secret_id), previous, pending)
    if repair.move_current_back:
        move_current_stage(secret_id, previous, pending)
    if repair.remove_pending:
        remove_pending_stage(secret_id, pending)
    if step.get("role"):
        # setSecret may have run: the role's password goes back to AWSCURRENT's value.
        alter_role_password(step["role"], read_secret_version(secret_id, previous))
    if repair.move_current_back and step.get("restart"):
        restart_deployments(list(step["restart"]))
    return repair.move_current_back or repair.remove_pending


def _status_page_resolved(intent: Intent, step: Mapping[str, Any]) -> bool | str:
    # The run died with the status page saying "scheduled": tell users the window ended.
    if not update_status_page("resolved", interrupted_window_update(step["reason"])):
        return "no status page configured"
    return True


def _expire_silences(intent: Intent, step: Mapping[str, Any]) -> bool:
    # Found by the run id their comment carries: the run may have died before it could
    # record the silence's id.
    silence_ids = silences_of_run(list_silences(), step["run_id"])
    for silence_id in silence_ids:
        expire_silence(silence_id)
    return bool(silence_ids)


def _note(intent: Intent, step: Mapping[str, Any]) -> str:
    return f"{step.get('text', 'nothing to put back')}"


STEPS: dict[str, Callable[[Intent, Mapping[str, Any]], bool | str]] = {
    "scale": _scale,
    "revision": _revision,
    "maintenance-off": _maintenance_off,
    "allow-connections": _allow_connections,
    "drop-database": _drop_database,
    "abort-upload": _abort_upload,
    "report-job": _report_job,
    "secret-stages": _secret_stages,
    "status-page-resolved": _status_page_resolved,
    "expire-silences": _expire_silences,
    "note": _note,
}


# --- the previous databases restores kept ------------------------------------------------------


def _pre_restore_databases() -> list[dict[str, Any]]:
    now = dt.datetime.now(dt.UTC)
    rows = []
    for name, size in sorted(read_database_sizes().items()):
        age = pre_restore_age(name, now)
        if age is not None:
            rows.append(
                {
                    "database": name,
                    "age (days)": round(age.total_seconds() / 86400, 1),
                    "size (bytes)": size if size is not None else "-",
                }
            )
    return rows


@flow(name="drop-pre-restore-databases", flow_run_name="drop-pre-restore-databases")
def drop_pre_restore_databases(
    keep_days: Annotated[int, Field(ge=0, le=365)] = 7,
    requested_by: RequestedBy = None,
) -> dict[str, Any]:
    """Drop the `<db>_pre_restore_<UTC time>` databases restores kept, past a retention,
    after an approval listing them (name, age, size).

    Args:
        keep_days: Keep the previous databases younger than this many days (0-365).
        requested_by: Who asks for this change (optional); that person cannot approve it.
    """
    now = dt.datetime.now(dt.UTC)
    # 1. List them with age and size; choose those past the retention.
    sizes = read_database_sizes()
    drop, keep = pre_restore_to_drop(sizes, now, keep_days)
    if not drop:
        return {"dropped": [], "kept": keep}
    # 2. Approval, listing what goes.
    request_approval(
        Plan(
            title=f"Drop {len(drop)} previous database(s) older than {keep_days} days",
            target=", ".join(f"database/{n}" for n in drop),
            steps=tuple(f"DROP DATABASE {n}" for n in drop),
            facts={n: f"{sizes.get(n) or '?'} bytes" for n in drop},
        )
    )
    # 3. Drop them.
    for name in drop:
        drop_database(name)
    summary = f"dropped {', '.join(drop)}; kept {', '.join(keep) or 'none'}"
    create_markdown_artifact(
        key="drop-pre-restore-databases", markdown=f"## Previous databases\n\n{summary}"
    )
    return {"dropped": drop, "kept": keep}


# --- the report ---------------------------------------------------------------------------------


def _publish(
    repairs: list[Repair],
    left: list[Any],
    unreadable: list[str],
    kept: list[dict[str, Any]],
    crashed: Mapping[str, str],
    freed: list[str],
    renewed: list[str],
    lapsed: Mapping[str, str],
) -> None:
    changed = [r for r in repairs if r.done]
    headline = (
        f"Reconcile: {len(changed)} dead run(s) put back, {len(repairs) - len(changed)} "
        f"already as recorded, {len(left)} left to live runs"
    )
    if crashed:
        headline += f"; {len(crashed)} silent run(s) marked Crashed"
    if freed:
        headline += f"; {len(freed)} lock(s) of dead runs freed"
    if renewed:
        headline += f"; {len(renewed)} lock(s) held on while their change runs"
    if lapsed:
        headline += f"; {len(lapsed)} lock(s) LAPSED under a running change"
    rows = [
        {
            "run": r.intent.run_id,
            "runbook": r.intent.runbook,
            "put back": "; ".join(r.done) or "-",
            "already as recorded": "; ".join(r.unchanged) or "-",
            "problems": "; ".join(r.problems) or "-",
        }
        for r in repairs
    ]
    sections = [
        "## Reconcile",
        headline,
        "### Dead runs",
        markdown_table(rows) if rows else "_none_",
        "### Left alone",
        markdown_table(
            [{"run": v.intent.run_id, "runbook": v.intent.runbook, "why": v.why} for v in left]
        )
        if left
        else "_none_",
        "### Marked Crashed (heartbeats stopped)",
        markdown_table([{"run": run_id, "why": why} for run_id, why in crashed.items()])
        if crashed
        else "_none_",
        "### Locks of dead runs freed",
        "\n".join(f"- {lock}" for lock in freed) or "_none_",
        "### Locks of dead runs held on (their change is still under way)",
        "\n".join(
            [f"- {lock}: renewed" for lock in renewed]
            + [f"- {lock}: {why}" for lock, why in lapsed.items()]
        )
        or "_none_",
        "### Previous databases kept by restores",
        markdown_table(kept) if kept else "_none_",
    ]
    if unreadable:
        sections += ["### Unreadable intents", "\n".join(f"- {u}" for u in unreadable)]
    create_markdown_artifact(key="reconcile", markdown="\n\n".join(sections), description=headline)
    get_run_logger().info(headline)
    if changed or crashed or freed or lapsed or any(r.problems for r in repairs):
        lines = [f"- run {run_id} marked Crashed: {why}" for run_id, why in crashed.items()]
        lines += [f"- lock freed: {lock}" for lock in freed]
        lines += [f"- lock held on: {lock}" for lock in renewed]
        lines += [f"- lock LAPSED: {lock}: {why}" for lock, why in lapsed.items()]
        lines += [
            f"- {r.intent.runbook} run {r.intent.run_id}: " + "; ".join(r.done + r.problems)
            for r in repairs
            if r.done or r.problems
        ]
        announce(":wrench: " + headline + "\n" + "\n".join(lines))
