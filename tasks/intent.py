"""Durable intent, stored as Prefect Variables: `runbook-intent-<flow run id>`.

Why Prefect Variables (and not annotations on the objects touched): the state a runbook
changes is not all in Kubernetes (scratch databases, S3 uploads, secret versions, a
database refusing connections); one store keyed by the run id lists every open intent
with one call, is written and deleted atomically per run, lives in the Prefect server's
database (so it survives the run's process, its node and a server restart), and shows
on the UI's Variables page next to the run it names. The maintenance window additionally
keeps its annotation on the backend Deployment, for kubectl users.

`recorded_intent(...)` records before the block (the first write) and clears the record
when the block ends normally. When the block raises — a failure, a cancel, a SIGTERM —
the record is kept: the runbook's own undo has run, and `reconcile` verifies it (every
undo step is idempotent) and then clears it. A SIGKILL leaves it for `reconcile`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any
from uuid import UUID

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventOrder,
    EventResourceFilter,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Crashed

from runbook.decisions.intent import (
    INTENT_TAG,
    VARIABLE_PREFIX,
    BadIntent,
    Intent,
    new_intent,
    parse_intent,
    variable_name,
)
from tasks.logs import run_logger
from tasks.retry_policy import call_with_retries


def record_intent(
    runbook: str, targets: Iterable[str], undo: Sequence[Mapping[str, Any]]
) -> Intent:
    """Store this run's intent (replacing an earlier one of the same run)."""
    intent = new_intent(str(flow_run.id), runbook, targets, undo, dt.datetime.now(dt.UTC))
    call_with_retries(f"record intent {intent.variable}", lambda: _store(intent))
    run_logger().info("Recorded intent %s: %d undo step(s)", intent.variable, len(undo))
    return intent


def clear_intent(intent: Intent) -> None:
    """Delete the record; already gone counts as cleared."""
    call_with_retries(f"clear intent {intent.variable}", lambda: delete_intent(intent.run_id))


@contextmanager
def recorded_intent(
    runbook: str, targets: Iterable[str], undo: Sequence[Mapping[str, Any]]
) -> Iterator[Intent]:
    """Record the intent for the block; cleared if it ends normally, kept if it raises."""
    intent = record_intent(runbook, targets, undo)
    yield intent
    clear_intent(intent)


def _store(intent: Intent) -> None:
    with get_client(sync_client=True) as prefect_api:
        try:
            prefect_api.create_variable(
                VariableCreate(name=intent.variable, value=intent.value(), tags=[INTENT_TAG])
            )
        except ObjectAlreadyExists:
            prefect_api.delete_variable_by_name(intent.variable)
            prefect_api.create_variable(
                VariableCreate(name=intent.variable, value=intent.value(), tags=[INTENT_TAG])
            )


def delete_intent(run_id: str) -> None:
    with get_client(sync_client=True) as prefect_api, suppress(ObjectNotFound):
        prefect_api.delete_variable_by_name(variable_name(run_id))


@task(task_run_name="list recorded intents")
def list_intents() -> tuple[list[Intent], list[str]]:
    """Every recorded intent, and the names of records that cannot be read."""
    with get_client(sync_client=True) as prefect_api:
        response = prefect_api.request(
            "POST",
            "/variables/filter",
            json={"variables": {"name": {"like_": VARIABLE_PREFIX}}, "limit": 200},
        )
    intents, unreadable = [], []
    for variable in response.json():
        if not str(variable["name"]).startswith(VARIABLE_PREFIX):
            continue
        try:
            intents.append(parse_intent(variable["value"]))
        except BadIntent as exc:
            unreadable.append(f"{variable['name']}: {exc}")
    return intents, unreadable


@task(task_run_name="read the state of the intents' runs")
def read_run_states(run_ids: Sequence[str]) -> dict[str, str | None]:
    """Run id → its state type (`RUNNING`, `CRASHED`, …); None if the server has no such run."""
    states: dict[str, str | None] = {}
    with get_client(sync_client=True) as prefect_api:
        for run_id in run_ids:
            try:
                run = prefect_api.read_flow_run(UUID(run_id))
            except (ObjectNotFound, ValueError):
                states[run_id] = None
                continue
            states[run_id] = run.state.type.value if run.state else None
    return states


HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
# How far back a heartbeat is looked for: Prefect's default event retention (7 days).
HEARTBEAT_LOOKBACK = dt.timedelta(days=7)


@task(task_run_name="read the last heartbeat of the live runs")
def read_last_heartbeats(run_ids: Sequence[str]) -> dict[str, dt.datetime | None]:
    """Run id → when its last `prefect.flow-run.heartbeat` event occurred; None if it
    never sent one (heartbeats off, or none stored yet)."""
    now = dt.datetime.now(dt.UTC)
    beats: dict[str, dt.datetime | None] = {}
    with get_client(sync_client=True) as prefect_api:
        for run_id in run_ids:
            page = prefect_api.read_events(
                EventFilter(
                    occurred=EventOccurredFilter(since=now - HEARTBEAT_LOOKBACK, until=now),
                    event=EventNameFilter(name=[HEARTBEAT_EVENT]),
                    resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
                    order=EventOrder.DESC,
                ),
                limit=1,
            )
            beats[run_id] = page.events[0].occurred if page.events else None
    return beats


@task(task_run_name="mark run {run_id} Crashed")
def mark_crashed(run_id: str, message: str) -> str | None:
    """Set the run Crashed through the API, saying why; returns its state type after.
    Not forced: a run that reached a final state meanwhile keeps it (the server refuses
    to leave a terminal state), and reconcile goes by what the server answers."""
    with get_client(sync_client=True) as prefect_api:
        prefect_api.set_flow_run_state(UUID(run_id), Crashed(message=message))
        run = prefect_api.read_flow_run(UUID(run_id))
    return run.state.type.value if run.state else None
