"""Which failures are worth retrying, shared by every task that talks to a system.

Temporary faults — timeouts, refused or reset connections, HTTP 429 and 5xx — are
retried with exponential backoff and jitter. Everything else (400, 404, 409, 422, a
validation error, a bug) fails at once, so a wrong name is reported in a second instead
of after a minute of pointless retries. A `Retry-After` header is honoured (capped) by
waiting before the retry is scheduled.

The client libraries are looked up in `sys.modules` rather than imported: an exception
can only come from a library that is already loaded, and a flow that never touches
botocore or kubernetes should not pay seconds to import them at start-up.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from prefect.tasks import exponential_backoff

logger = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_SECONDS = 30.0


def _loaded(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """Exception classes `names` of `module`, if that module is already imported."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name) for name in names) if loaded else ()


class PlatformCallError(RuntimeError):
    """A call to one of the platform's systems failed; the message says which call and why.

    `transient` tells the retry policy whether trying again may help.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        transient: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient
        self.retry_after = retry_after


class DeadlineExceeded(TimeoutError):
    """A wait gave up after its own deadline (a rollout or Job still undecided).

    Not a temporary fault: retrying would wait the whole deadline again, so it fails at once.
    """


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, _loaded("kubernetes.client.exceptions", "ApiException")):
        return getattr(exc, "status", None) or None
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code
    if isinstance(exc, _loaded("botocore.exceptions", "ClientError")):
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    return None


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's `Retry-After` in seconds, if it sent one as a number."""
    if isinstance(exc, PlatformCallError):
        return min(exc.retry_after, MAX_RETRY_AFTER_SECONDS) if exc.retry_after else None
    headers: Any = None
    if isinstance(exc, _loaded("kubernetes.client.exceptions", "ApiException")):
        headers = getattr(exc, "headers", None)
    elif isinstance(exc, httpx.HTTPStatusError):
        headers = exc.response.headers
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return min(float(value), MAX_RETRY_AFTER_SECONDS) if value is not None else None
    except ValueError:
        return None


def is_gone(exc: BaseException) -> bool:
    """True when the call failed because its object does not exist (HTTP 404 and its kin).

    For a delete or an undo that means the work is already done.
    """
    if isinstance(exc, PlatformCallError):
        return exc.status == 404
    if _status_of(exc) == 404:
        return True
    if isinstance(exc, _loaded("botocore.exceptions", "ClientError")):
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in {"NoSuchKey", "NoSuchUpload", "ResourceNotFoundException"}
    return False


def done_if_gone(call: Callable[[], object]) -> bool:
    """Run a delete (or any undo): True if it removed something now, False if the object
    was already gone. Every other failure propagates. Safe to run twice."""
    try:
        call()
    except Exception as exc:
        if is_gone(exc):
            return False
        raise
    return True


def is_transient(exc: BaseException) -> bool:
    """True when trying the same call again may well succeed."""
    if isinstance(exc, DeadlineExceeded):
        return False
    if isinstance(exc, PlatformCallError):
        return exc.transient
    status = _status_of(exc)
    if status is not None:
        return status in TRANSIENT_HTTP_STATUSES
    if isinstance(exc, _loaded("kubernetes.client.exceptions", "ApiException")):
        # Status 0: the client never got an HTTP answer (connection-level failure).
        return True
    if isinstance(exc, _loaded("botocore.exceptions", "ClientError")):
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout"}
    return isinstance(
        exc,
        (
            TimeoutError,
            ConnectionError,
            socket.timeout,
            httpx.TransportError,
            *_loaded("urllib3.exceptions", "HTTPError"),
            *_loaded("psycopg", "OperationalError"),
            *_loaded("redis.exceptions", "ConnectionError", "TimeoutError"),
            *_loaded(
                "botocore.exceptions",
                "EndpointConnectionError",
                "ConnectionClosedError",
                "ReadTimeoutError",
                "ConnectTimeoutError",
            ),
        ),
    )


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` for Prefect tasks: retry temporary faults only."""
    exc = state.result(raise_on_failure=False)
    if not isinstance(exc, BaseException) or not is_transient(exc):
        return False
    wait = retry_after_seconds(exc)
    if wait:
        logger.info("server asked to retry after %.0fs", wait)
        time.sleep(wait)
    return True


RETRIES = 3
BACKOFF_FACTOR = 0.5

# Spread into @task(...) of every task that calls out: 3 retries, 0.5 s, 1 s, 2 s ± 20 %.
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=BACKOFF_FACTOR),
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": retry_on_transient,
}


def call_with_retries(what: str, call: Callable[[], T], retries: int = RETRIES) -> T:
    """`call()`, retried like a task (same policy, same backoff) while it fails transiently.

    For calls inside a stream or a context manager, where a Prefect task retry would mean
    starting the whole stream over. Everything that is not transient propagates at once.
    """
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == retries or not is_transient(exc):
                raise
            wait = retry_after_seconds(exc) or BACKOFF_FACTOR * 2**attempt
            logger.warning(
                "%s failed (%s); retry %d of %d in %.1fs", what, exc, attempt + 1, retries, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")
