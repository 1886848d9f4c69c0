"""S3 tasks, one call each, named for the call they make; lists go through boto3's
paginators. Streams (an object's bytes as they arrive, an upload as it is written) are in
`tasks/s3_streams.py`."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.aws import aws_call, aws_client, aws_errors
from tasks.retry_policy import TRANSIENT_RETRIES, PlatformCallError, done_if_gone

MiB = 1024 * 1024


def abort_upload(bucket: str, key: str, upload_id: str) -> bool:
    """`abort-multipart-upload`: True if aborted now, False if it was already gone."""
    return done_if_gone(
        lambda: aws_call(
            f"abort multipart upload of s3://{bucket}/{key}",
            aws_client("s3").abort_multipart_upload,
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
        )
    )


def open_uploads(bucket: str, prefix: str) -> list[dict[str, str]]:
    """Multipart uploads under `prefix` started and neither completed nor aborted."""
    pages = aws_client("s3").get_paginator("list_multipart_uploads")
    with aws_errors(f"list multipart uploads in s3://{bucket}/{prefix}"):
        return [
            {"key": u["Key"], "upload_id": u["UploadId"], "initiated": u["Initiated"].isoformat()}
            for page in pages.paginate(Bucket=bucket, Prefix=prefix)
            for u in page.get("Uploads", [])
        ]


@task(**TRANSIENT_RETRIES, task_run_name="list s3://{bucket}/{prefix}")
def list_objects(bucket: str, prefix: str) -> list[dict[str, Any]]:
    """`aws s3api list-objects-v2`, all pages: `[{"key", "size", "last_modified"}]`."""
    pages = aws_client("s3").get_paginator("list_objects_v2")
    with aws_errors(f"list s3://{bucket}/{prefix}"):
        return [
            {"key": o["Key"], "size": o["Size"], "last_modified": o["LastModified"].isoformat()}
            for page in pages.paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])
        ]


@task(**TRANSIENT_RETRIES, task_run_name="get s3://{bucket}/{key}")
def get_object_bytes(bucket: str, key: str, max_bytes: int = 4 * MiB) -> bytes:
    """`aws s3api get-object` of a small object (a manifest). Refuses anything larger."""
    what = f"get s3://{bucket}/{key}"
    response = aws_call(what, aws_client("s3").get_object, Bucket=bucket, Key=key)
    if response["ContentLength"] > max_bytes:
        response["Body"].close()
        raise PlatformCallError(
            f"s3://{bucket}/{key} is {response['ContentLength']} bytes, more than {max_bytes}"
        )
    with aws_errors(what):
        body: bytes = response["Body"].read()
    return body


@task(**TRANSIENT_RETRIES, task_run_name="put s3://{bucket}/{key}")
def put_object_bytes(
    bucket: str, key: str, body: bytes, content_type: str = "application/octet-stream"
) -> str:
    """`aws s3api put-object` of a small object; returns its ETag."""
    response = aws_call(
        f"put s3://{bucket}/{key}",
        aws_client("s3").put_object,
        Bucket=bucket,
        Key=key,
        Body=body,
        ContentType=content_type,
    )
    return str(response["ETag"])


@task(**TRANSIENT_RETRIES, task_run_name="delete {count} objects from s3://{bucket}")
def delete_objects(bucket: str, keys: list[str], count: int = 0) -> list[str]:
    """`aws s3api delete-objects` (1000 keys a request). Already gone counts as deleted:
    S3 answers a delete of a missing key with success."""
    s3, deleted = aws_client("s3"), []
    for start in range(0, len(keys), 1000):
        batch = keys[start : start + 1000]
        response = aws_call(
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


@task(**TRANSIENT_RETRIES, task_run_name="list multipart uploads in s3://{bucket}/{prefix}")
def list_multipart_uploads(bucket: str, prefix: str) -> list[dict[str, str]]:
    """`aws s3api list-multipart-uploads`: uploads started and neither completed nor aborted."""
    return open_uploads(bucket, prefix)


@task(**TRANSIENT_RETRIES, task_run_name="abort multipart upload of s3://{bucket}/{key}")
def abort_multipart_upload(bucket: str, key: str, upload_id: str) -> bool:
    """`aws s3api abort-multipart-upload`; its stored parts are freed. False if already gone."""
    return abort_upload(bucket, key, upload_id)
