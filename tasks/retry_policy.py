"""Which failures are worth retrying, shared by every task that talks to a system.

Temporary faults — timeouts, refused or reset connections, HTTP 429 and 5xx — are
retried with exponential backoff and jitter. Everything else (400, 404, 409, 422, a
validation error, a bug) fails at once, so a wrong name is reported in a second instead
of after a minute of pointless retries. A `Retry-After` header is honoured (capped) by
waiting before the retry is scheduled.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import botocore.exceptions
import httpx
import psycopg
import redis.exceptions
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from prefect.tasks import exponential_backoff

logger = logging.getLogger(__name__)

TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_SECONDS = 30.0


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


def _status_of(exc: BaseException) -> int | None:
    if isinstance(exc, ApiException):
        return exc.status or None
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    return None


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's `Retry-After` in seconds, if it sent one as a number."""
    if isinstance(exc, PlatformCallError):
        return exc.retry_after
    headers: Any = None
    if isinstance(exc, ApiException):
        headers = exc.headers
    elif isinstance(exc, httpx.HTTPStatusError):
        headers = exc.response.headers
    if not headers:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return min(float(value), MAX_RETRY_AFTER_SECONDS) if value is not None else None
    except ValueError:
        return None


def is_transient(exc: BaseException) -> bool:
    """True when trying the same call again may well succeed."""
    if isinstance(exc, PlatformCallError):
        return exc.transient
    status = _status_of(exc)
    if status is not None:
        return status in TRANSIENT_HTTP_STATUSES
    if isinstance(exc, ApiException):
        # Status 0: the client never got an HTTP answer (connection-level failure).
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        return code in {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout"}
    return isinstance(
        exc,
        (
            TimeoutError,
            ConnectionError,
            socket.timeout,
            httpx.TransportError,
            urllib3.exceptions.HTTPError,
            psycopg.OperationalError,
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectionClosedError,
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectTimeoutError,
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


# Spread into @task(...) of every task that calls out: 3 retries, 0.5 s, 1 s, 2 s ± 20 %.
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=0.5),
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": retry_on_transient,
}
