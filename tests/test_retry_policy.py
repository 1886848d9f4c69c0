"""Which failures are retried: real exceptions raised by the real clients."""

from __future__ import annotations

import botocore.exceptions
import httpx
import psycopg
import pytest
import redis
from kubernetes.client.exceptions import ApiException

from sandbox.services import free_port
from tasks.retry_policy import PlatformCallError, is_transient, retry_after_seconds


def raised(call):
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("expected the call to fail")


def test_refused_connections_are_transient_for_every_client():
    closed = free_port()
    errors = [
        raised(lambda: httpx.get(f"http://127.0.0.1:{closed}/", timeout=1)),
        raised(
            lambda: psycopg.connect(f"postgresql://u:p@127.0.0.1:{closed}/db", connect_timeout=1)
        ),
        raised(lambda: redis.Redis(port=closed, socket_connect_timeout=1).ping()),
    ]
    assert [is_transient(e) for e in errors] == [True, True, True]


@pytest.mark.parametrize(
    ("status", "transient"),
    [(429, True), (500, True), (503, True), (400, False), (404, False), (409, False), (422, False)],
)
def test_http_statuses(status, transient):
    assert is_transient(ApiException(status=status)) is transient
    response = httpx.Response(status, request=httpx.Request("GET", "http://x"))
    assert (
        is_transient(httpx.HTTPStatusError("x", request=response.request, response=response))
        is transient
    )
    aws = botocore.exceptions.ClientError(
        {"Error": {"Code": "X"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )
    assert is_transient(aws) is transient


def test_throttling_codes_and_classified_errors():
    throttled = botocore.exceptions.ClientError({"Error": {"Code": "SlowDown"}}, "UploadPart")
    assert is_transient(throttled)
    assert is_transient(PlatformCallError("x", transient=True))
    assert not is_transient(PlatformCallError("x", status=404))
    assert not is_transient(ValueError("bad input"))


def test_retry_after_is_read_and_capped():
    response = httpx.Response(
        429, headers={"Retry-After": "3"}, request=httpx.Request("GET", "http://x")
    )
    error = httpx.HTTPStatusError("x", request=response.request, response=response)
    assert retry_after_seconds(error) == 3.0
    assert retry_after_seconds(PlatformCallError("x", retry_after=999)) == 30.0
    capped = httpx.Response(503, headers={"Retry-After": "3600"}, request=response.request)
    assert (
        retry_after_seconds(httpx.HTTPStatusError("x", request=response.request, response=capped))
        == 30.0
    )
