"""Which failures are retried, and what counts as already gone: real exceptions raised by
the real clients, and real servers for the retry loop and the deletes."""

from __future__ import annotations

import time

import botocore.exceptions
import httpx
import psycopg
import pytest
import redis
from kubernetes.client.exceptions import ApiException

from sandbox.platform import BACKUP_BUCKET
from sandbox.services import free_port
from tasks.retry_policy import (
    RETRIES,
    PlatformCallError,
    call_with_retries,
    done_if_gone,
    is_gone,
    is_transient,
    retry_after_seconds,
)
from tests.faults import FaultyProxy


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


# --- the one retry loop and the one "already gone", against real servers ----------------


def test_call_with_retries_rides_out_a_real_s3_outage(sandbox, monkeypatch, caplog):
    from tasks.aws import aws_call, aws_client

    with FaultyProxy(sandbox.moto.host, sandbox.moto.port) as proxy:
        monkeypatch.setenv("RUNBOOK_AWS_ENDPOINT_URL", proxy.url)
        proxy.cut_after(uploaded_bytes=1, outage_seconds=1.0)  # the first request is cut
        started = time.monotonic()

        listed = call_with_retries(
            "list the bucket",
            lambda: aws_call("list", aws_client("s3").list_objects_v2, Bucket=BACKUP_BUCKET),
        )

    assert listed["ResponseMetadata"]["HTTPStatusCode"] == 200
    retried = [r for r in caplog.records if "list the bucket failed" in r.getMessage()]
    assert 1 <= len(retried) <= RETRIES
    assert time.monotonic() - started >= 0.5  # it backed off before trying again


def test_call_with_retries_fails_at_once_on_a_permanent_error(sandbox):
    s3, attempts = sandbox.s3(), []

    def get_missing() -> object:
        attempts.append(1)
        return s3.get_object(Bucket=BACKUP_BUCKET, Key="no/such/key")

    with pytest.raises(botocore.exceptions.ClientError):
        call_with_retries("get a missing key", get_missing)
    assert len(attempts) == 1


def test_call_with_retries_gives_up_after_its_retries():
    closed, attempts = free_port(), []

    def refused() -> object:
        attempts.append(1)
        return httpx.get(f"http://127.0.0.1:{closed}/", timeout=1)

    with pytest.raises(httpx.ConnectError):
        call_with_retries("reach a closed port", refused, retries=2)
    assert len(attempts) == 3


def test_is_gone_for_real_404s_and_only_those(sandbox):
    s3 = sandbox.s3()
    missing_key = raised(lambda: s3.get_object(Bucket=BACKUP_BUCKET, Key="no/such/key"))
    missing_upload = raised(
        lambda: s3.abort_multipart_upload(Bucket=BACKUP_BUCKET, Key="k", UploadId="nope")
    )
    not_found = httpx.Response(404, request=httpx.Request("DELETE", "http://x"))
    assert is_gone(missing_key) and is_gone(missing_upload)
    assert is_gone(ApiException(status=404))
    assert is_gone(httpx.HTTPStatusError("x", request=not_found.request, response=not_found))
    assert is_gone(PlatformCallError("x", status=404))
    assert not is_gone(ApiException(status=409))
    assert not is_gone(raised(lambda: httpx.get(f"http://127.0.0.1:{free_port()}/", timeout=1)))
    assert not is_gone(ValueError("bad input"))


def test_done_if_gone_aborts_a_real_upload_once_and_propagates_other_failures(sandbox):
    s3 = sandbox.s3()
    upload = s3.create_multipart_upload(Bucket=BACKUP_BUCKET, Key="retry-policy/probe")

    def abort() -> object:
        return s3.abort_multipart_upload(
            Bucket=BACKUP_BUCKET, Key="retry-policy/probe", UploadId=upload["UploadId"]
        )

    assert done_if_gone(abort) is True  # removed now
    assert done_if_gone(abort) is False  # already gone: done, not an error
    listed = s3.list_multipart_uploads(Bucket=BACKUP_BUCKET, Prefix="retry-policy/")
    assert listed.get("Uploads", []) == []
    with pytest.raises(httpx.ConnectError):
        done_if_gone(lambda: httpx.delete(f"http://127.0.0.1:{free_port()}/", timeout=1))
