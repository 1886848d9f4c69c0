"""Driving flow runs from a test: run one in a thread, find it paused, resume it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort


@dataclass
class BackgroundRun:
    """A flow called in a thread, so the test can act on it while it runs (or pauses)."""

    thread: threading.Thread
    outcome: dict[str, Any] = field(default_factory=dict)

    def join(self, timeout: float = 60) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "flow run did not finish in time"
        return self.outcome.get("state")


def start_in_thread(flow_fn: Callable[..., Any], **parameters: Any) -> BackgroundRun:
    outcome: dict[str, Any] = {}

    def target() -> None:
        outcome["state"] = flow_fn(**parameters, return_state=True)

    thread = threading.Thread(target=target, daemon=True)
    run = BackgroundRun(thread, outcome)
    thread.start()
    return run


def wait_for_paused_run(flow_name: str, timeout: float = 60) -> FlowRun:
    """The newest paused run of `flow_name`, waiting for it to pause."""
    give_up = time.monotonic() + timeout
    with get_client(sync_client=True) as prefect_api:
        while time.monotonic() < give_up:
            runs = prefect_api.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                ),
                sort=FlowRunSort.START_TIME_DESC,
                limit=20,
            )
            for run in runs:
                flow = prefect_api.read_flow(run.flow_id)
                if flow.name == flow_name:
                    return run
            time.sleep(0.2)
    raise AssertionError(f"no paused run of {flow_name} within {timeout}s")


def read_flow_run(run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as prefect_api:
        return prefect_api.read_flow_run(run_id)


def read_artifacts(run_id: UUID) -> dict[str, Any]:
    """The run's artifacts by key (latest of each)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect_api:
        artifacts = prefect_api.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return {a.key: a for a in sorted(artifacts, key=lambda a: a.created or 0) if a.key}


class RetryOn503(httpx.HTTPTransport):
    """Retry 503 answers, as Prefect's own client does: the test server's SQLite answers
    503 ("database is locked") now and then under concurrent writes."""

    ATTEMPTS = 6

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(1, self.ATTEMPTS + 1):
            response = super().handle_request(request)
            if response.status_code != 503 or attempt == self.ATTEMPTS:
                return response
            response.close()
            time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")


def prefect_rest(api_url: str, auth: tuple[str, str] | None = None) -> httpx.Client:
    """An HTTP client for Prefect's REST API, as an operator's script would use it (with
    `auth`, through a server's basic auth)."""
    return httpx.Client(base_url=api_url, timeout=30, transport=RetryOn503(), auth=auth)
