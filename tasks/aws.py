"""What every task that talks to AWS shares: the client factory and the error translation.

Clients are built from settings (`RUNBOOK_AWS_REGION`, `RUNBOOK_AWS_ENDPOINT_URL`, the
moto server in the sandbox); credentials come from boto3's usual chain. botocore's own
retries are off: a temporary fault (connection error, timeout, 429, 5xx, SlowDown) becomes
a transient `PlatformCallError` and the retry policy (`tasks/retry_policy.py`) retries it;
anything else fails at once with a message naming the call and the object.

The one exception is boto3's managed transfer (`tasks/s3_streams.py`): it sends the parts
of an upload from its own threads, out of reach of `call_with_retries`, so its client lets
botocore retry (standard mode: connection errors, throttling, 5xx) as many times as our
policy would.

The services' tasks live beside this module: S3 in `tasks/s3.py` and `tasks/s3_streams.py`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from runbook.settings import load_settings
from tasks.retry_policy import RETRIES, TRANSIENT_HTTP_STATUSES, PlatformCallError

_THROTTLED = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout"}


@functools.lru_cache(maxsize=8)
def _client(service: str, region: str, endpoint_url: str | None, attempts: int) -> Any:
    config = Config(
        retries={"mode": "standard", "max_attempts": attempts},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=8,
    )
    session = boto3.session.Session()
    return session.client(service, region_name=region, endpoint_url=endpoint_url, config=config)


def aws_client(service: str, *, botocore_retries: bool = False) -> Any:
    """The shared client of `service` for the configured region and endpoint (clients are
    thread-safe). `botocore_retries` only for boto3's managed transfers (see above)."""
    settings = load_settings()
    endpoint = str(settings.aws_endpoint_url).rstrip("/") if settings.aws_endpoint_url else None
    return _client(service, settings.aws_region, endpoint, RETRIES + 1 if botocore_retries else 1)


@contextlib.contextmanager
def aws_errors(what: str) -> Iterator[None]:
    """botocore's errors raised inside become `PlatformCallError`s that name `what`."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code, message = error.get("Code", "?"), error.get("Message", "")
        raise PlatformCallError(
            f"{what}: {status} {code}" + (f": {message}" if message else ""),
            status=int(status) if status else None,
            transient=status in TRANSIENT_HTTP_STATUSES or code in _THROTTLED,
        ) from None
    except (botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError) as exc:
        raise PlatformCallError(f"{what}: {type(exc).__name__}: {exc}", transient=True) from None


def aws_call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Make one AWS call; botocore's errors become `PlatformCallError`s naming `what`."""
    with aws_errors(what):
        return fn(**kwargs)
