"""S3 streams: an object's bytes as they arrive, and an upload of bytes as they are made.

Streams never pass through a task's arguments or result, and both directions hold a
bounded amount of memory whatever the object's size.

Uploads are boto3's managed transfer (what `upload_fileobj` runs) over a stream that cannot seek:
it is cut into `PART_SIZE` parts, at most `MAX_PARTS_IN_MEMORY` held and `MAX_CONCURRENCY`
sent at a time, so a producer (pg_dump) is slowed down to what S3 takes. The object
appears only once every part is in. A transfer that fails aborts its multipart upload
itself; when S3 cannot be reached even for that, `upload_stream` keeps trying to abort
for about half a minute, and after that the backup's sweep of stale uploads removes it
on the next run (on AWS, a bucket lifecycle rule `AbortIncompleteMultipartUpload` is the
last line).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import botocore.exceptions
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from prefect import task

from runbook.fault_points import fault_point
from tasks.aws import aws_call, aws_client, aws_errors
from tasks.logs import run_logger
from tasks.retry_policy import TRANSIENT_RETRIES, PlatformCallError, call_with_retries
from tasks.s3 import abort_upload, open_uploads

MiB = 1024 * 1024
PART_SIZE = 8 * MiB  # S3 refuses parts under 5 MiB (but the last); 8 keeps requests few
MAX_CONCURRENCY = 4
MAX_PARTS_IN_MEMORY = 4
READ_CHUNK = 1 * MiB
# 0.5 s doubling: ~30 s in all, enough to outlast a short S3 outage before giving up.
ABORT_RETRIES = 6


def _transfer_config() -> TransferConfig:
    config = TransferConfig(
        multipart_threshold=PART_SIZE,
        multipart_chunksize=PART_SIZE,
        max_concurrency=MAX_CONCURRENCY,
        use_threads=True,
        preferred_transfer_client="classic",
    )
    # Not a constructor argument, but s3transfer's bound on parts read ahead of the upload.
    config.max_in_memory_upload_chunks = MAX_PARTS_IN_MEMORY
    return config


class TransferAbandoned(RuntimeError):
    """The reader was asked for more after its transfer had already failed."""


class HashingReader:
    """A file that cannot seek, reading the bytes an iterator yields; hashes and counts them.

    `read(n)` returns exactly `n` bytes until the end: the managed transfer makes a part of
    each read, and S3 refuses short parts.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self.abandoned: Callable[[], bool] = lambda: False
        self._pending = bytearray()
        self._digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1) -> bytes:
        if self.abandoned():
            raise TransferAbandoned("the upload failed or was cancelled; not reading on")
        while size < 0 or len(self._pending) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._pending += chunk
        cut = len(self._pending) if size < 0 else min(size, len(self._pending))
        data = bytes(memoryview(self._pending)[:cut])
        del self._pending[:cut]
        self._digest.update(data)
        self.size += len(data)
        return data

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def upload_stream(
    bucket: str,
    key: str,
    chunks: Iterable[bytes],
    *,
    metadata: dict[str, str] | None = None,
    content_type: str = "application/octet-stream",
) -> dict[str, Any]:
    """Store the bytes `chunks` yields as s3://bucket/key: `{"size", "sha256"}` of them.

    An exception raised by `chunks` (the producer failed) fails the upload like an S3
    error does: no object, no open multipart upload.
    """
    where = f"s3://{bucket}/{key}"
    reader = HashingReader(chunks)
    try:
        # `upload_fileobj`'s own steps, plus one: s3transfer keeps reading a stream after
        # its transfer failed (to its very end: a whole pg_dump), so the reader stops then.
        client = aws_client("s3", botocore_retries=True)
        # A step boundary inside the upload for the fault matrix (a part stored, the
        # multipart upload open); a no-op outside its tests. Once per (cached) client.
        client.meta.events.register(
            "after-call.s3.UploadPart", _part_uploaded, unique_id="fault-point-part-uploaded"
        )
        with (
            aws_errors(f"upload {where}"),
            create_transfer_manager(client, _transfer_config()) as transfer,
        ):
            future = transfer.upload(
                reader,
                bucket,
                key,
                extra_args={"Metadata": metadata or {}, "ContentType": content_type},
            )
            reader.abandoned = future.done
            future.result()
    except BaseException:
        abort_open_uploads(bucket, key)
        raise
    return {"size": reader.size, "sha256": reader.sha256}


def _part_uploaded(**_: Any) -> None:
    fault_point("backup: a part uploaded")


def abort_open_uploads(bucket: str, key: str) -> None:
    """Abort every open multipart upload of exactly `key`. Never raises: the error it
    would hide is the one that made the upload fail."""
    logger = run_logger()
    where = f"s3://{bucket}/{key}"
    try:
        for upload in call_with_retries(
            f"list uploads of {where}", lambda: open_uploads(bucket, key), ABORT_RETRIES
        ):
            if upload["key"] == key:
                aborted = call_with_retries(
                    f"abort the upload of {where}",
                    lambda u=upload: abort_upload(bucket, key, u["upload_id"]),  # type: ignore[misc]
                    ABORT_RETRIES,
                )
                logger.info("aborted the upload of %s%s", where, "" if aborted else " (gone)")
    except Exception as exc:
        logger.error(
            "could not abort the upload of %s (%s); the next backup's sweep of stale uploads will",
            where,
            exc,
        )


def read_object_chunks(bucket: str, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    """Yield the object's bytes as they arrive, `chunk_size` at a time.

    A failure mid-way raises `PlatformCallError`; the caller decides whether to start over.
    """
    response = aws_call(
        f"get s3://{bucket}/{key}", aws_client("s3").get_object, Bucket=bucket, Key=key
    )
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


@task(**TRANSIENT_RETRIES, task_run_name="sha256 of s3://{bucket}/{key}")
def hash_object(bucket: str, key: str) -> dict[str, Any]:
    """Read the whole object and hash it: `{"size", "sha256"}`. Holds one chunk at a time."""
    digest, size = hashlib.sha256(), 0
    for chunk in read_object_chunks(bucket, key):
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}
