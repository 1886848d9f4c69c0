"""Durable intent: what a mutating runbook is about to change and how to put it back,
recorded outside its process before its first write, and what `reconcile` does with it.

The record is plain JSON (a Prefect Variable's value, < 5000 characters): the run's id,
the runbook, the targets it owns (the same names as its locks) and an ordered list of
undo steps, each a small dict with a `kind`. `reconcile` applies the steps in the
recorded order, so a runbook records them in the order that is safe to apply (restore:
the live database accepting connections first, the scratch copy dropped, the writers
scaled back last). Every step is idempotent: it compares with the live state and writes
only what differs, so a second reconcile does nothing.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from runbook.decisions.locks import LeaseRecord

INTENT_TAG = "runbook-intent"
VARIABLE_PREFIX = "runbook-intent-"

# A run in one of these states will never write again: its intent is reconcile's.
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})

UndoKind = Literal[
    "scale",  # deployment back to `replicas`
    "revision",  # deployment back on the pod template of `revision` (image `image`)
    "maintenance-off",  # MAINTENANCE_MODE=false on `deployment`, this run's window closed
    "allow-connections",  # ALTER DATABASE `database` ALLOW_CONNECTIONS true
    "drop-database",  # DROP DATABASE IF EXISTS `database` (a scratch or verify copy)
    "abort-upload",  # abort the multipart uploads of `key` in `bucket`
    "report-job",  # report job `job`; never deleted while it runs
    "secret-stages",  # AWSPENDING `pending` removed; AWSCURRENT back on `previous`
    "status-page-resolved",  # the status page told the window (`reason`) has ended
    "expire-silences",  # Alertmanager silences whose comment names run `run_id` expired
    "note",  # a single write that needs no undo: reported only
]
UNDO_KINDS: frozenset[str] = frozenset(UndoKind.__args__)  # type: ignore[attr-defined]


class BadIntent(ValueError):
    """A recorded intent that cannot be read; reconcile reports it and leaves it."""


@dataclass(frozen=True)
class Intent:
    """One run's recorded intent."""

    run_id: str
    runbook: str
    targets: tuple[str, ...]
    undo: tuple[Mapping[str, Any], ...]
    recorded_at: str = ""

    def value(self) -> dict[str, Any]:
        """The JSON stored in the variable."""
        return {
            "run_id": self.run_id,
            "runbook": self.runbook,
            "targets": list(self.targets),
            "undo": [dict(u) for u in self.undo],
            "recorded_at": self.recorded_at,
        }

    @property
    def variable(self) -> str:
        return variable_name(self.run_id)


def variable_name(run_id: str) -> str:
    """`runbook-intent-<run id>` (letters, digits and dashes: a valid variable name)."""
    return VARIABLE_PREFIX + re.sub(r"[^a-z0-9-]", "-", run_id.lower())


def new_intent(
    run_id: str,
    runbook: str,
    targets: Iterable[str],
    undo: Sequence[Mapping[str, Any]],
    now: dt.datetime,
) -> Intent:
    """Build an intent, refusing an undo step of unknown kind (a typo must not be silent)."""
    for step in undo:
        if step.get("kind") not in UNDO_KINDS:
            raise BadIntent(f"unknown undo step {step!r}")
    return Intent(run_id, runbook, tuple(sorted(set(targets))), tuple(undo), now.isoformat())


def parse_intent(value: Any) -> Intent:
    """The variable's value as an `Intent`, or `BadIntent` saying what is wrong."""
    if not isinstance(value, Mapping):
        raise BadIntent(f"not an object: {str(value)[:100]}")
    try:
        run_id, runbook = str(value["run_id"]), str(value["runbook"])
        targets = tuple(str(t) for t in value.get("targets") or ())
        undo = tuple(dict(u) for u in value.get("undo") or ())
    except (KeyError, TypeError, ValueError) as exc:
        raise BadIntent(f"missing or malformed field: {exc}") from None
    for step in undo:
        if step.get("kind") not in UNDO_KINDS:
            raise BadIntent(f"unknown undo step {step!r}")
    return Intent(run_id, runbook, targets, undo, str(value.get("recorded_at", "")))


# --- who owns what --------------------------------------------------------------------------


def run_is_dead(state_type: str | None) -> bool:
    """Dead = the run is in a terminal state, or the server has no such run (None).

    Anything else (Running, Pending, Paused, Cancelling, Scheduled) is alive: its own
    process still owns what it recorded. A run whose process was killed stays Running
    until Prefect marks it Crashed (its runner sees the process exit), or until
    `silent_run` finds its heartbeats stopped (a lost node: nobody saw the exit) and
    reconcile marks it Crashed; only then is it reconcile's.
    """
    return state_type is None or state_type.upper() in TERMINAL_STATES


# A run in one of these states has a process that sends heartbeats (a pause for an
# approval or for manual work waits inside the process). Scheduled and Pending runs have
# no process yet: their silence means nothing.
HEARTBEAT_STATES = frozenset({"RUNNING", "PAUSED", "CANCELLING"})


def silent_run(
    state_type: str | None,
    last_heartbeat: dt.datetime | None,
    now: dt.datetime,
    timeout_seconds: float,
) -> str | None:
    """Why a run Prefect still shows alive is dead (its heartbeats stopped), or None.

    No heartbeat at all says nothing (heartbeats off for that run, or its first one not
    stored yet): such a run is left alone, never guessed dead. The answer is the message
    of the Crashed state reconcile sets.
    """
    if state_type is None or state_type.upper() not in HEARTBEAT_STATES:
        return None
    if last_heartbeat is None:
        return None
    silent = (now - last_heartbeat).total_seconds()
    if silent < timeout_seconds:
        return None
    return (
        f"no heartbeat for {silent:.0f} s (limit {timeout_seconds:.0f} s) while "
        f"{state_type.title()}: its process or node is gone. Marked Crashed by reconcile, "
        "which puts back what the run recorded it was changing"
    )


@dataclass(frozen=True)
class Verdict:
    intent: Intent
    act: bool
    why: str


@dataclass(frozen=True)
class Judgement:
    """What reconcile does with each intent: act on it, or leave it (and why)."""

    verdicts: tuple[Verdict, ...] = field(default_factory=tuple)

    @property
    def to_reconcile(self) -> list[Intent]:
        return [v.intent for v in self.verdicts if v.act]

    @property
    def left(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.act]


def judge(intents: Sequence[Intent], states: Mapping[str, str | None]) -> Judgement:
    """Which intents to put back: those of dead runs, unless a live run now owns one of
    the same targets (it recorded its own intent before writing, so it is in `intents`):
    putting a target back under a live run's feet would undo that run's work."""
    alive = [i for i in intents if not run_is_dead(states.get(i.run_id))]
    owned = {t: i.run_id for i in alive for t in i.targets}
    verdicts = []
    for intent in intents:
        state = states.get(intent.run_id)
        if not run_is_dead(state):
            verdicts.append(Verdict(intent, False, f"run is {state}: it owns its changes"))
            continue
        busy = sorted(t for t in intent.targets if t in owned)
        if busy:
            verdicts.append(
                Verdict(
                    intent,
                    False,
                    f"live run {owned[busy[0]]} now owns {', '.join(busy)}; retried later",
                )
            )
            continue
        verdicts.append(Verdict(intent, True, f"run is {state or 'gone from the server'}"))
    return Judgement(tuple(verdicts))


@dataclass(frozen=True)
class LeasePlan:
    """What reconcile does with the recorded lock leases: free, renew, or leave (and why)."""

    free: tuple[LeaseRecord, ...] = ()
    renew: tuple[LeaseRecord, ...] = ()
    leave: tuple[tuple[LeaseRecord, str], ...] = ()


def lease_actions(
    leases: Sequence[LeaseRecord],
    states: Mapping[str, str | None],
    under_way: Iterable[str],
    unfinished: Iterable[str],
) -> LeasePlan:
    """Which recorded leases to free, renew or leave.

    - A live run's leases are its own (it renews them): left.
    - A dead run whose change is still under way (`under_way`: a migration Job still
      running) keeps its locks for as long as that lasts: renewed, since the dead run no
      longer renews them and Prefect would free them at the lease's expiry while the Job
      still changes the database (a backup or a restore could then start under it).
    - A dead run with something else not put back yet (`unfinished`: a step failed, or a
      live run now owns one of its targets) is left: its lease expires by itself, so a
      repair that keeps failing cannot lock a target for good, and a live run waiting
      for that lock is not starved.
    - Any other dead run's leases are freed: its targets are back.
    """
    under_way, unfinished = set(under_way), set(unfinished)
    free: list[LeaseRecord] = []
    renew: list[LeaseRecord] = []
    leave: list[tuple[LeaseRecord, str]] = []
    for lease in leases:
        state = states.get(lease.run_id)
        if not run_is_dead(state):
            leave.append((lease, f"run is {state}: it holds its lock"))
        elif lease.run_id in under_way:
            renew.append(lease)
        elif lease.run_id in unfinished:
            leave.append((lease, "its intent is not put back yet; the lease expires by itself"))
        else:
            free.append(lease)
    return LeasePlan(tuple(free), tuple(renew), tuple(leave))


# --- the steps' decisions -------------------------------------------------------------------


@dataclass(frozen=True)
class SecretRepair:
    """What putting a secret's stages back takes, given its stages now."""

    remove_pending: bool
    move_current_back: bool


def secret_repair(stages: Mapping[str, Sequence[str]], previous: str, pending: str) -> SecretRepair:
    """`stages` maps version id → its stages. AWSPENDING goes from `pending`; if
    AWSCURRENT moved to it (the run died after finishSecret, before it verified the pods),
    AWSCURRENT goes back to `previous`, as the runbook's own undo does."""
    on_pending = set(stages.get(pending, ()))
    return SecretRepair(
        remove_pending="AWSPENDING" in on_pending,
        move_current_back="AWSCURRENT" in on_pending and pending != previous,
    )


def describe_step(step: Mapping[str, Any]) -> str:
    """One line an operator understands, for the report."""
    kind = step.get("kind")
    if kind == "scale":
        return f"deployment/{step['deployment']} back to {step['replicas']} replicas"
    if kind == "revision":
        return (
            f"deployment/{step['deployment']} back on revision {step['revision']}"
            f" ({step.get('image', '?')})"
        )
    if kind == "maintenance-off":
        return f"MAINTENANCE_MODE=false on deployment/{step['deployment']}"
    if kind == "allow-connections":
        return f"database {step['database']} accepting connections"
    if kind == "drop-database":
        return f"database {step['database']} dropped"
    if kind == "abort-upload":
        return f"multipart uploads of s3://{step['bucket']}/{step['key']} aborted"
    if kind == "report-job":
        return f"job/{step['job']} reported"
    if kind == "status-page-resolved":
        return f"status page: maintenance ({step['reason']}) resolved"
    if kind == "expire-silences":
        return f"alert silences of run {step['run_id']} expired"
    if kind == "secret-stages":
        return f"{step['secret_id']}: AWSPENDING removed, AWSCURRENT on {step['previous']}"
    return str(step.get("text", kind))


# --- the previous databases a restore keeps ---------------------------------------------------

_PRE_RESTORE = re.compile(r"_pre_restore_(\d{8})t(\d{6})z$")


def pre_restore_age(name: str, now: dt.datetime) -> dt.timedelta | None:
    """Age of a `<db>_pre_restore_<UTC time>` database from its name; None if not one."""
    match = _PRE_RESTORE.search(name)
    if match is None:
        return None
    made = dt.datetime.strptime("".join(match.groups()), "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)
    return now - made


def pre_restore_to_drop(
    names: Iterable[str], now: dt.datetime, keep_days: int
) -> tuple[list[str], list[str]]:
    """(to drop, to keep): previous databases older than `keep_days`, and the rest."""
    drop: list[str] = []
    keep: list[str] = []
    for name in sorted(names):
        age = pre_restore_age(name, now)
        if age is None:
            continue
        (drop if age > dt.timedelta(days=keep_days) else keep).append(name)
    return drop, keep
