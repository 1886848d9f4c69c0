"""Tasks that talk to AWS (S3 here), one call each, named for the call they make.

The client is built from settings (`RUNBOOK_AWS_REGION`, `RUNBOOK_AWS_ENDPOINT_URL`, the
moto server in the sandbox); credentials come from boto3's usual chain. botocore's own
retries are off: a temporary fault (connection error, timeout, 429, 5xx, SlowDown) becomes
a transient `PlatformCallError` and Prefect retries the task; anything else fails at once.

Streams never pass through a task's arguments or result: `MultipartUpload` takes bytes as
they come and stores them part by part, and `read_object_chunks` yields an object's bytes
as they arrive. Both hold a bounded amount of memory, whatever the object's size.
"""

from __future__ import annotations

import functools
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self

import boto3
import botocore.exceptions
from botocore.config import Config
from prefect import task

from runbook.settings import load_settings
from tasks.logs import run_logger
from tasks.retry_policy import (
    TRANSIENT_HTTP_STATUSES,
    TRANSIENT_RETRIES,
    PlatformCallError,
    is_transient,
)

MiB = 1024 * 1024
# S3 refuses parts under 5 MiB (except the last); 8 MiB keeps the request count sane.
MIN_PART_SIZE = 5 * MiB
DEFAULT_PART_SIZE = 8 * MiB
READ_CHUNK = 1 * MiB
_THROTTLED = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout"}


@functools.lru_cache(maxsize=4)
def _client(region: str, endpoint_url: str | None) -> Any:
    config = Config(
        retries={"mode": "standard", "max_attempts": 1},  # one retry layer: ours
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=8,
    )
    session = boto3.session.Session()
    return session.client("s3", region_name=region, endpoint_url=endpoint_url, config=config)


def s3_client() -> Any:
    """The shared S3 client for the configured region and endpoint (clients are thread-safe)."""
    settings = load_settings()
    endpoint = str(settings.aws_endpoint_url).rstrip("/") if settings.aws_endpoint_url else None
    return _client(settings.aws_region, endpoint)


def _call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Make one S3 call; botocore's errors become `PlatformCallError`s naming the call."""
    try:
        return fn(**kwargs)
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


def _retrying(what: str, call: Callable[[], Any], attempts: int) -> Any:
    """`call()`, tried up to `attempts` times while it fails transiently (0.5 s, 1 s, 2 s …).

    For calls inside a stream, where a Prefect retry would mean starting the stream over.
    """
    delay = 0.5
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except PlatformCallError as exc:
            if not exc.transient or attempt == attempts:
                raise
            run_logger().warning("%s failed (%s); attempt %d of %d", what, exc, attempt, attempts)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# --- single calls -----------------------------------------------------------------------


@task(**TRANSIENT_RETRIES, task_run_name="list s3://{bucket}/{prefix}")
def list_objects(bucket: str, prefix: str) -> list[dict[str, Any]]:
    """`aws s3api list-objects-v2`, all pages: `[{"key", "size", "last_modified"}]`."""
    s3, found, token = s3_client(), [], None
    while True:
        page = _call(
            f"list s3://{bucket}/{prefix}",
            s3.list_objects_v2,
            Bucket=bucket,
            Prefix=prefix,
            **({"ContinuationToken": token} if token else {}),
        )
        found += [
            {"key": o["Key"], "size": o["Size"], "last_modified": o["LastModified"].isoformat()}
            for o in page.get("Contents", [])
        ]
        token = page.get("NextContinuationToken")
        if not token:
            return found


@task(**TRANSIENT_RETRIES, task_run_name="get s3://{bucket}/{key}")
def get_object_bytes(bucket: str, key: str, max_bytes: int = 4 * MiB) -> bytes:
    """`aws s3api get-object` of a small object (a manifest). Refuses anything larger."""
    s3 = s3_client()
    response = _call(f"get s3://{bucket}/{key}", s3.get_object, Bucket=bucket, Key=key)
    if response["ContentLength"] > max_bytes:
        response["Body"].close()
        raise PlatformCallError(
            f"s3://{bucket}/{key} is {response['ContentLength']} bytes, more than {max_bytes}"
        )
    body: bytes = response["Body"].read()
    return body


@task(**TRANSIENT_RETRIES, task_run_name="put s3://{bucket}/{key}")
def put_object_bytes(
    bucket: str, key: str, body: bytes, content_type: str = "application/octet-stream"
) -> str:
    """`aws s3api put-object` of a small object; returns its ETag."""
    response = _call(
        f"put s3://{bucket}/{key}",
        s3_client().put_object,
        Bucket=bucket,
        Key=key,
        Body=body,
        ContentType=content_type,
    )
    return str(response["ETag"])


@task(**TRANSIENT_RETRIES, task_run_name="delete {count} objects from s3://{bucket}")
def delete_objects(bucket: str, keys: list[str], count: int = 0) -> list[str]:
    """`aws s3api delete-objects` (1000 keys a request). Already gone counts as deleted."""
    s3, deleted = s3_client(), []
    for start in range(0, len(keys), 1000):
        batch = keys[start : start + 1000]
        response = _call(
            f"delete {len(batch)} objects from s3://{bucket}",
            s3.delete_objects,
            Bucket=bucket,
            Delete={"Objects": [{"Key": k} for k in batch], "Quiet": False},
        )
        if response.get("Errors"):
            first = response["Errors"][0]
            raise PlatformCallError(
                f"delete s3://{bucket}/{first['Key']}: {first['Code']}: {first.get('Message')}"
            )
        deleted += [d["Key"] for d in response.get("Deleted", [])]
    return deleted


@task(**TRANSIENT_RETRIES, task_run_name="head s3://{bucket}/{key}")
def head_object(bucket: str, key: str) -> dict[str, Any] | None:
    """`aws s3api head-object`: `{"size", "metadata"}`, or None if there is no such object."""
    try:
        response = _call(
            f"head s3://{bucket}/{key}", s3_client().head_object, Bucket=bucket, Key=key
        )
    except PlatformCallError as exc:
        if exc.status == 404:
            return None
        raise
    return {"size": int(response["ContentLength"]), "metadata": response.get("Metadata", {})}


@task(**TRANSIENT_RETRIES, task_run_name="list multipart uploads in s3://{bucket}/{prefix}")
def list_multipart_uploads(bucket: str, prefix: str) -> list[dict[str, str]]:
    """`aws s3api list-multipart-uploads`: uploads started and neither completed nor aborted."""
    s3, found = s3_client(), []
    markers: dict[str, str] = {}
    while True:
        page = _call(
            f"list multipart uploads in s3://{bucket}/{prefix}",
            s3.list_multipart_uploads,
            Bucket=bucket,
            Prefix=prefix,
            **markers,
        )
        found += [
            {"key": u["Key"], "upload_id": u["UploadId"], "initiated": u["Initiated"].isoformat()}
            for u in page.get("Uploads", [])
        ]
        if not page.get("IsTruncated"):
            return found
        markers = {
            "KeyMarker": page["NextKeyMarker"],
            "UploadIdMarker": page["NextUploadIdMarker"],
        }


@task(**TRANSIENT_RETRIES, task_run_name="abort multipart upload of s3://{bucket}/{key}")
def abort_multipart_upload(bucket: str, key: str, upload_id: str) -> bool:
    """`aws s3api abort-multipart-upload`; its stored parts are freed. False if already gone."""
    try:
        _call(
            f"abort multipart upload of s3://{bucket}/{key}",
            s3_client().abort_multipart_upload,
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
        )
    except PlatformCallError as exc:
        if exc.status == 404:
            return False
        raise
    return True


# --- streams ----------------------------------------------------------------------------


@task(**TRANSIENT_RETRIES, task_run_name="sha256 of s3://{bucket}/{key}")
def hash_object(bucket: str, key: str) -> dict[str, Any]:
    """Read the whole object and hash it: `{"size", "sha256"}`. Holds one chunk at a time."""
    digest, size = hashlib.sha256(), 0
    for chunk in read_object_chunks(bucket, key):
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def read_object_chunks(bucket: str, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    """Yield the object's bytes as they arrive, `chunk_size` at a time.

    A failure mid-way raises `PlatformCallError`; the caller decides whether to start over.
    """
    s3 = s3_client()
    response = _call(f"get s3://{bucket}/{key}", s3.get_object, Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        while True:
            try:
                chunk = body.read(chunk_size)
            except (botocore.exceptions.BotoCoreError, OSError) as exc:
                raise PlatformCallError(
                    f"read s3://{bucket}/{key}: {type(exc).__name__}: {exc}", transient=True
                ) from None
            if not chunk:
                return
            yield chunk
    finally:
        body.close()


class MultipartUpload:
    """Store the bytes written to it as one S3 object, uploaded part by part meanwhile.

    `write()` cuts the stream into `part_size` parts and hands them to an uploading thread
    through a queue of `queue_depth`; when the queue is full, `write()` waits, which slows
    the producer (pg_dump) down to what S3 takes. So at most about
    `part_size * (queue_depth + 2)` bytes are held, for an object of any size.

    The object appears in the bucket only at `complete()`. Leaving the `with` block in any
    other way — an exception, a failed part, Ctrl-C — aborts the upload, so neither a
    partial object nor orphaned parts are left behind. If S3 cannot be reached even to
    abort, the abort is retried for `abort_deadline` seconds; after that the backup
    flow's sweep of stale uploads removes it on the next run (and on AWS, a bucket
    lifecycle rule `AbortIncompleteMultipartUpload` is the last line).
    """

    def __init__(
        self,
        bucket: str,
        key: str,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        queue_depth: int = 2,
        metadata: dict[str, str] | None = None,
        content_type: str = "application/octet-stream",
        part_attempts: int = 4,
        abort_deadline: float = 60.0,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        self.bucket, self.key = bucket, key
        self.part_size = part_size
        self.metadata = metadata or {}
        self.content_type = content_type
        self.part_attempts = part_attempts
        self.abort_deadline = abort_deadline
        self.upload_id: str | None = None
        self.size = 0
        self._s3 = s3_client()
        self._buffer = bytearray()
        self._next_part = 1
        self._parts: list[dict[str, Any]] = []
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=queue_depth)
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._uploader = threading.Thread(target=self._upload_parts, daemon=True)
        self._completed = False

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    # -- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> Self:
        response = _retrying(
            f"create multipart upload of {self.where}",
            lambda: _call(
                f"create multipart upload of {self.where}",
                self._s3.create_multipart_upload,
                Bucket=self.bucket,
                Key=self.key,
                ContentType=self.content_type,
                Metadata=self.metadata,
            ),
            self.part_attempts,
        )
        self.upload_id = response["UploadId"]
        self._uploader.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._completed:
            self.abort()

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self._buffer += data
        while len(self._buffer) >= self.part_size:
            part = bytes(memoryview(self._buffer)[: self.part_size])
            del self._buffer[: self.part_size]  # O(1): bytearray drops from the front cheaply
            self._enqueue(part)

    def _enqueue(self, part: bytes) -> None:
        item = (self._next_part, part)
        self._next_part += 1
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _upload_parts(self) -> None:
        try:
            while not self._stopping.is_set():
                item = self._queue.get()
                if item is None:
                    return
                number, body = item
                response = _retrying(
                    f"upload part {number} of {self.where}",
                    lambda n=number, b=body: _call(  # type: ignore[misc]
                        f"upload part {n} of {self.where}",
                        self._s3.upload_part,
                        Bucket=self.bucket,
                        Key=self.key,
                        UploadId=self.upload_id,
                        PartNumber=n,
                        Body=b,
                    ),
                    self.part_attempts,
                )
                self._parts.append({"PartNumber": number, "ETag": response["ETag"]})
        except BaseException as exc:
            self._error = exc

    # -- the two ends ----------------------------------------------------------------------

    def complete(self) -> dict[str, Any]:
        """Upload what is left, then make the object.

        Returns `{"key", "size", "parts", "etag", "complete_seconds"}`, the last being how
        long S3 took to put the parts together.
        """
        if self._buffer or self._next_part == 1:
            self._enqueue(bytes(self._buffer))  # the last part may be small
            self._buffer = bytearray()
        self._enqueue_stop()
        self._uploader.join()
        self._raise_if_failed()
        parts = sorted(self._parts, key=lambda p: p["PartNumber"])
        started = time.perf_counter()
        response = self._complete_upload(parts)
        self._completed = True
        return {
            "key": self.key,
            "size": self.size,
            "parts": len(parts),
            "etag": response["ETag"],
            "complete_seconds": time.perf_counter() - started,
        }

    def _complete_upload(self, parts: list[dict[str, Any]]) -> Any:
        what = f"complete multipart upload of {self.where}"
        call = functools.partial(
            _call,
            what,
            self._s3.complete_multipart_upload,
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": parts},
        )
        try:
            return _retrying(what, call, self.part_attempts)
        except PlatformCallError as exc:
            # An earlier attempt may have completed it before its answer got lost.
            if exc.status == 404:
                found = head_object.fn(self.bucket, self.key)
                if found is not None and found["size"] == self.size:
                    return {"ETag": "(completed by an earlier attempt)"}
            raise

    def _enqueue_stop(self) -> None:
        while True:
            self._raise_if_failed()
            if not self._uploader.is_alive():
                return
            try:
                self._queue.put(None, timeout=0.2)
                return
            except queue.Full:
                continue

    def abort(self) -> None:
        """Give the upload up and free its parts. Safe to call twice; never raises."""
        logger = run_logger()
        self._stopping.set()
        while True:  # unblock the uploader if it waits on an empty queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._uploader.is_alive():
            self._queue.put(None)
            self._uploader.join(timeout=90)  # a part in flight finishes (or times out) first
        upload_id = self.upload_id
        if upload_id is None:
            return
        give_up_at = time.monotonic() + self.abort_deadline
        delay = 0.5
        while True:
            try:
                aborted = abort_multipart_upload.fn(self.bucket, self.key, upload_id)
                logger.info(
                    "aborted the upload of %s%s",
                    self.where,
                    "" if aborted else " (it was already gone)",
                )
                self.upload_id = None
                return
            except PlatformCallError as exc:
                if not is_transient(exc) or time.monotonic() + delay > give_up_at:
                    logger.error(
                        "could not abort the upload of %s (%s); the next backup's sweep of "
                        "stale uploads will",
                        self.where,
                        exc,
                    )
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
