"""One change at a time per target: a Prefect global concurrency limit of 1 per target.

`strict=True` matters: without it, a limit that does not exist is silently skipped and
the change runs unprotected. So the limit is created first if it is missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.logs import run_logger


def lock_name(target: str) -> str:
    """`deployment/backend` → `runbook-lock-deployment-backend` (a valid limit name)."""
    return "runbook-lock-" + "".join(c if c.isalnum() else "-" for c in target.lower())


def _ensure_limit(name: str) -> None:
    with get_client(sync_client=True) as prefect_api:
        try:
            prefect_api.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # Another run may create it between our read and our create: fine.
            with suppress(ObjectAlreadyExists):
                prefect_api.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )


@contextmanager
def exclusive(target: str, wait_seconds: float = 600) -> Iterator[None]:
    """Hold the lock on `target` (e.g. `database/complianceagent`) for the block."""
    name = lock_name(target)
    _ensure_limit(name)
    run_logger().info("Taking lock %s", name)
    with concurrency(name, occupy=1, strict=True, timeout_seconds=wait_seconds):
        yield


@contextmanager
def exclusive_all(targets: Iterable[str], wait_seconds: float = 600) -> Iterator[None]:
    """Hold the locks of several targets, taken in name order so two runs can't deadlock."""
    with ExitStack() as held:
        for target in sorted(set(targets)):
            held.enter_context(exclusive(target, wait_seconds))
        yield
