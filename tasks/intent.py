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
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run

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
