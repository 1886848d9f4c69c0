"""One change at a time per target: a Prefect global concurrency limit of 1 per target,
held through a lease that cannot leak or lie.

- The limit is created if it is missing (`strict=True`: a missing limit is an error, never
  a silent "runs unprotected").
- An inactive limit, or one with more than one slot, is not a lock: the run refuses with
  `LockUnsafe` (naming the `prefect gcl update` that fixes it) instead of running
  unprotected. Checked once the slot is held, so a limit changed meanwhile is caught too.
- The lease is renewed by our own thread that never interrupts the flow. Prefect's
  `concurrency(strict=True)` injects a cancellation at whatever line the flow is on when a
  renewal fails, which can stop a deploy between two Deployments with no undo. Here a lost
  lease (revoked, expired, or its limit deactivated) is only recorded; the flow calls
  `HeldLocks.ensure_held()` between its steps, which raises `LockLost` — an ordinary
  exception, so the flow's undo runs as for any failed step. A transient error while
  renewing is retried until the lease would have expired.
- The lease names its holder (the flow run) and its id is logged: an operator can free a
  lock whose holder is gone with `POST /api/v2/concurrency_limits/decrement-with-lease`.
- Each held lease is also recorded outside the process (a Prefect Variable
  `runbook-lease-<lease id>`: run, target), deleted on release. A SIGKILLed run leaves its
  records, and `reconcile` frees the locks of runs it judged dead once their undo is
  done (`free_lease`), instead of every later run waiting for the lease to expire; while
  a dead run's change is still under way (a migration Job running), reconcile renews its
  leases instead (`renew_lease`), so the target stays locked past the lease's expiry.
- Leases live in the Prefect server's lease storage: memory by default (a server restart
  forgets them while the slot stays taken), the Redis one of `prefect-redis` in
  production (README, Production).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from uuid import UUID

import httpx
from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, VariableCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder

# Prefect's own acquisition (one request per call here, see `_acquire`) and release; the
# public `concurrency()` wraps exactly these but hides the lease id that `ensure_held`
# needs. prefect is pinned (==3.9.1).
from prefect.concurrency._asyncio import (
    AcquireConcurrencySlotTimeoutError,
    ConcurrencySlotAcquisitionError,
)
from prefect.concurrency._sync import (
    acquire_concurrency_slots_with_lease,
    release_concurrency_slots_with_lease,
)
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from runbook.decisions.locks import (
    LEASE_TAG,
    LEASE_VARIABLE_PREFIX,
    LeaseRecord,
    lock_problem,
    parse_lease_record,
)
from runbook.settings import load_settings
from tasks.logs import run_logger
from tasks.retry_policy import TRANSIENT_RETRIES, call_with_retries, is_transient

# The server keeps a lease `RUNBOOK_LOCK_LEASE_SECONDS` (300) without a renewal; its
# repossessor then frees the slot. Renewed every fifth of that, so a few minutes of API
# trouble never lose a live lease.
RENEWALS_PER_LEASE = 5
# After a failed renewal, try again this soon.
RENEW_RETRY_SECONDS = 5.0


class LockLost(RuntimeError):
    """The run no longer holds a target's lock; it stops at this step boundary (and undoes)."""


class LockUnsafe(RuntimeError):
    """The target's limit would not keep changes apart (inactive, or more than one slot)."""


def lock_name(target: str) -> str:
    """`deployment/backend` → `runbook-lock-deployment-backend` (a valid limit name)."""
    return "runbook-lock-" + "".join(c if c.isalnum() else "-" for c in target.lower())


@dataclass
class _Lease:
    target: str
    name: str
    lease_id: UUID
    seconds: float
    lost: str | None = None  # why, once the renewal thread found it gone
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass
class HeldLocks:
    """What `exclusive`/`exclusive_all` yield: the leases held, for `ensure_held()`."""

    leases: list[_Lease] = field(default_factory=list)

    def ensure_held(self) -> None:
        """Call at a step boundary: raises `LockLost` if any lease is gone (revoked,
        expired, its limit deleted, deactivated or resized); renews the others."""
        for lease in self.leases:
            if lease.lost is None:
                lease.lost = _check_lease(lease)
            if lease.lost is not None:
                raise LockLost(
                    f"lost the lock on {lease.target} ({lease.lost}); stopped before the "
                    "next step so nothing else changes without it"
                )


def _holder() -> ConcurrencyLeaseHolder | None:
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    return ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id)


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


def _limit_problem(name: str) -> str | None:
    """Why the limit `name` is not a lock now (gone, inactive, resized), or None."""
    try:
        with get_client(sync_client=True) as prefect_api:
            limit = call_with_retries(
                f"read lock {name}", lambda: prefect_api.read_global_concurrency_limit_by_name(name)
            )
    except ObjectNotFound:
        return f"lock {name} was deleted"
    return lock_problem(name, bool(limit.active), limit.limit)


def _lease_seconds() -> float:
    return float(load_settings().lock_lease_seconds)


def _renew_lease_id(lease_id: UUID, seconds: float) -> str | None:
    """Renew once for `seconds`; why the lease is gone (410/404), or None when renewed.
    Transient failures raise."""
    try:
        with get_client(sync_client=True) as prefect_api:
            prefect_api.renew_concurrency_lease(lease_id, lease_duration=seconds)
    except Exception as exc:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (404, 410):
            return f"lease {lease_id} was revoked or expired"
        raise
    return None


def _renew(lease: _Lease) -> str | None:
    return _renew_lease_id(lease.lease_id, lease.seconds)


def _check_lease(lease: _Lease) -> str | None:
    gone = call_with_retries(f"renew lease of {lease.name}", lambda: _renew(lease))
    return gone or _limit_problem(lease.name)


def _keep_renewed(lease: _Lease) -> None:
    """The renewal thread: renew every fifth of the lease; on a transient failure retry
    until the lease would have expired. Records a loss, never interrupts the flow."""
    every = lease.seconds / RENEWALS_PER_LEASE
    renewed_at = time.monotonic()
    wait = every
    while not lease.stop.wait(wait) and lease.lost is None:
        try:
            lease.lost = _renew(lease)
            renewed_at, wait = time.monotonic(), every
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() - renewed_at > lease.seconds:
                lease.lost = f"could not renew lease {lease.lease_id}: {exc}"
            else:
                wait = RENEW_RETRY_SECONDS
    if lease.lost is not None and not lease.stop.is_set():
        run_logger().error("%s; the run stops at its next step", lease.lost)


def _release(lease: _Lease) -> None:
    lease.stop.set()
    try:
        call_with_retries(
            f"release lock {lease.name}",
            lambda: release_concurrency_slots_with_lease(lease.lease_id),
        )
    except Exception as exc:
        # Never mask the run's own outcome: the unrenewed lease expires by itself.
        run_logger().error(
            "could not release lock %s (lease %s; the server frees it within %.0fs): %s",
            lease.name,
            lease.lease_id,
            lease.seconds,
            exc,
        )
        return
    _forget_lease(str(lease.lease_id))


def _record_lease(lease: _Lease, holder: ConcurrencyLeaseHolder | None) -> None:
    """Record who holds the lease, for reconcile. Best effort: without the record the
    lock still holds; only a crash would then wait for the lease's expiry."""
    if holder is None:
        return
    record = LeaseRecord(str(lease.lease_id), str(holder.id), lease.target)

    def create() -> None:
        with get_client(sync_client=True) as prefect_api:
            prefect_api.create_variable(
                VariableCreate(name=record.variable, value=record.value(), tags=[LEASE_TAG])
            )

    try:
        call_with_retries(f"record lease {record.variable}", create)
    except Exception as exc:
        run_logger().warning(
            "could not record lease %s of lock %s (a crash would leave it to expire): %s",
            lease.lease_id,
            lease.name,
            exc,
        )


def _forget_lease(lease_id: str) -> None:
    """Delete the lease's record; gone already is done. Best effort: a record left behind
    is cleared by reconcile once its run has ended (freeing a released lease is a no-op)."""
    name = LEASE_VARIABLE_PREFIX + lease_id.lower()
    try:
        with get_client(sync_client=True) as prefect_api, suppress(ObjectNotFound):
            prefect_api.delete_variable_by_name(name)
    except Exception as exc:
        run_logger().warning("could not delete lease record %s: %s", name, exc)


@task(task_run_name="list recorded lock leases")
def list_lease_records() -> list[LeaseRecord]:
    """Every lease a run recorded and has not released."""
    with get_client(sync_client=True) as prefect_api:
        response = prefect_api.request(
            "POST",
            "/variables/filter",
            json={"variables": {"name": {"like_": LEASE_VARIABLE_PREFIX}}, "limit": 200},
        )
    records = []
    for variable in response.json():
        if str(variable["name"]).startswith(LEASE_VARIABLE_PREFIX):
            record = parse_lease_record(variable["value"])
            if record is not None:
                records.append(record)
    return records


@task(task_run_name="free lease of {record.target}", **TRANSIENT_RETRIES)
def free_lease(record: LeaseRecord) -> None:
    """`POST /api/v2/concurrency_limits/decrement-with-lease`: free the lock a dead run
    holds, then delete the record. A lease already expired or released is a no-op."""
    release_concurrency_slots_with_lease(UUID(record.lease_id))
    _forget_lease(record.lease_id)


@task(task_run_name="renew lease of {record.target}", **TRANSIENT_RETRIES)
def renew_lease(record: LeaseRecord, seconds: float) -> str | None:
    """`POST /api/v2/concurrency_limits/leases/{id}/renew`: keep a dead run's lock held
    `seconds` longer, while its change is still under way. Returns why it could not (the
    lease already expired or was revoked: the lock is no longer held), or None."""
    return _renew_lease_id(UUID(record.lease_id), seconds)


@task(task_run_name="retake lapsed lock of {record.target}")
def retake_lease(record: LeaseRecord, seconds: float) -> LeaseRecord | None:
    """`POST /api/v2/concurrency_limits/increment-with-lease`, at once or not at all: take
    the lock again, for `seconds`, on behalf of a dead run whose lease lapsed while its
    change is still under way (a migration Job still running). Returns the new record
    (the old one deleted), or None when another run has taken the lock meanwhile.

    No retries: a retry after a grant whose answer was lost would find the lock taken (by
    that unrecorded grant, which expires by itself) and report it as another run's.
    The client's raw request, not `_acquire`: Prefect's acquisition hands its lease to
    the calling run to release when that run ends, and this lease must outlive reconcile."""
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(record.run_id))
    try:
        with get_client(sync_client=True) as prefect_api:
            response = prefect_api.increment_concurrency_slots_with_lease(
                names=[lock_name(record.target)],
                slots=1,
                mode="concurrency",
                lease_duration=seconds,
                holder=holder,
            )
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 423:  # no slot: another run holds the lock
            return None
        raise
    retaken = LeaseRecord(str(response.json()["lease_id"]), record.run_id, record.target)
    _record_lease(
        _Lease(record.target, lock_name(record.target), UUID(retaken.lease_id), seconds), holder
    )
    _forget_lease(record.lease_id)
    return retaken


def _acquire(
    name: str, wait_seconds: float, seconds: float, holder: ConcurrencyLeaseHolder | None
) -> UUID:
    """The lease of lock `name`, asked for one request at a time until `wait_seconds` are
    over (waiting the server's Retry-After between two).

    Not Prefect's own `timeout_seconds`: at the timeout it cancels the request in flight,
    and a grant the server made just then holds the lock, recorded nowhere and renewed by
    nobody, until its lease expires. Here a request always gets its answer; only between
    requests does the wait end."""
    give_up = time.monotonic() + wait_seconds
    while True:
        try:
            granted = acquire_concurrency_slots_with_lease(
                [name], 1, lease_duration=seconds, strict=True, holder=holder, max_retries=0
            )
            return granted.lease_id
        except ConcurrencySlotAcquisitionError as exc:
            taken = exc.__cause__
            if not (isinstance(taken, httpx.HTTPStatusError) and taken.response.status_code == 423):
                raise
            retry_after = float(taken.response.headers.get("Retry-After", 1))
        left = give_up - time.monotonic()
        if left <= 0:
            raise AcquireConcurrencySlotTimeoutError(
                f"Taking lock {name} timed out after {wait_seconds:g} s: another run holds it"
            )
        time.sleep(min(retry_after, left))


@contextmanager
def _hold(target: str, wait_seconds: float) -> Iterator[_Lease]:
    name = lock_name(target)
    _ensure_limit(name)
    run_logger().info("Taking lock %s", name)
    holder = _holder()
    seconds = _lease_seconds()
    lease = _Lease(target, name, _acquire(name, wait_seconds, seconds, holder), seconds)
    try:
        _record_lease(lease, holder)
        problem = _limit_problem(name)
        if problem:
            raise LockUnsafe(f"refusing to change {target} unprotected: {problem}")
        run_logger().info("Holding lock %s (lease %s)", name, lease.lease_id)
        context = contextvars.copy_context()  # the same Prefect settings and run logger
        threading.Thread(
            target=context.run,
            args=(_keep_renewed, lease),
            daemon=True,
            name=f"lock-renewal-{name}",
        ).start()
        yield lease
    finally:
        _release(lease)


@contextmanager
def exclusive(target: str, wait_seconds: float = 600) -> Iterator[HeldLocks]:
    """Hold the lock on `target` (e.g. `database/complianceagent`) for the block; call
    `ensure_held()` on what it yields between steps."""
    with _hold(target, wait_seconds) as lease:
        yield HeldLocks([lease])


@contextmanager
def exclusive_all(targets: Iterable[str], wait_seconds: float = 600) -> Iterator[HeldLocks]:
    """Hold the locks of several targets, taken in name order so two runs can't deadlock."""
    held = HeldLocks()
    with ExitStack() as stack:
        for target in sorted(set(targets)):
            held.leases.append(stack.enter_context(_hold(target, wait_seconds)))
        yield held
