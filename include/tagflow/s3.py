"""S3 access shared by every stage: one client factory, URI parsing, whole-object writes.

The same code talks to AWS and to the local S3 server. The endpoint comes from the caller or from botocore's own
environment variables (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`); when an endpoint is set the client uses path-style
addressing and SigV4 (`s3v4`), which the local server requires for presigned URLs. Credentials are never passed in
code: botocore finds them (environment, profile, instance role, or an Airflow connection's session).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tagflow.errors import InputError, describe_os_error, quote

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = object

# S3 throughput scales with concurrent requests; botocore's default pool (10) would cap a 32-thread download.
DEFAULT_POOL_SIZE = 64
MULTIPART_THRESHOLD = 64 * 1024 * 1024
SHA256_METADATA_KEY = "tagflow-sha256"


@dataclass(frozen=True)
class S3Uri:
    """`s3://bucket/key` split into its parts; `key` may be empty or a prefix."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise InputError(f"{quote(uri)}: expected an S3 URI of the form s3://BUCKET/KEY")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise InputError(f"{quote(uri)}: the S3 URI has no bucket name")
        return cls(bucket, key)

    def join(self, *parts: str) -> S3Uri:
        """This URI with `parts` appended as key segments (`/` between them, none doubled)."""
        segments = [self.key.rstrip("/"), *(p.strip("/") for p in parts)]
        return S3Uri(self.bucket, "/".join(s for s in segments if s))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def endpoint_from_env() -> str | None:
    """The S3 endpoint botocore would use from the environment, or None for AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def make_client(
    endpoint_url: str | None = None,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    retry_mode: str = "standard",
    max_attempts: int = 5,
    connect_timeout: float = 5,
    read_timeout: float = 60,
    session: object | None = None,
) -> S3Client:
    """An S3 client sized for concurrent use, with botocore's retries.

    `session` is a boto3 Session (for example one an Airflow hook built from a connection); by default the
    environment's credentials are used.
    """
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or endpoint_from_env()
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"} if endpoint_url else {},
        retries={"mode": retry_mode, "max_attempts": max_attempts},
        max_pool_connections=pool_size,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    factory = session if session is not None else boto3.session.Session()
    return factory.client("s3", endpoint_url=endpoint_url, config=config)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def object_sha256(client: S3Client, uri: S3Uri) -> str | None:
    """The sha256 tagflow recorded when it wrote `uri`, or None if the object is absent or was not ours."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=uri.bucket, Key=uri.key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return head.get("Metadata", {}).get(SHA256_METADATA_KEY)


def put_file(client: S3Client, path: Path, uri: S3Uri, *, sha256: str | None = None) -> bool:
    """Upload `path` to `uri` unless an identical object (same sha256) is already there; True if uploaded.

    S3 makes an object visible only when its PUT or multipart upload completes, so readers never see half of it.
    The sha256 is stored as object metadata, which is how a re-run recognises that nothing changed.
    """
    from boto3.s3.transfer import TransferConfig

    sha256 = sha256 or file_sha256(path)
    if object_sha256(client, uri) == sha256:
        return False
    client.upload_file(
        str(path),
        uri.bucket,
        uri.key,
        ExtraArgs={"Metadata": {SHA256_METADATA_KEY: sha256}},
        Config=TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD),
    )
    return True


def get_file(client: S3Client, uri: S3Uri, path: Path) -> None:
    """Download `uri` to `path` whole: written to a temporary name beside it, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        client.download_file(uri.bucket, uri.key, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_bucket(client: S3Client, bucket: str) -> None:
    """Create `bucket` if it does not exist (the local server does not create buckets on upload)."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)


def require_bucket(client: S3Client, bucket: str) -> None:
    """Fail with a clear message unless `bucket` exists and is reachable with these credentials."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise InputError(f"bucket {bucket!r} does not exist: create it first (aws s3 mb s3://{bucket})") from None
        raise InputError(f"bucket {bucket!r} is not accessible with these credentials ({code or err})") from None


def list_objects(client: S3Client, uri: S3Uri) -> dict[str, tuple[int, str]]:
    """Every object under the prefix `uri` as {key: (size, etag)}; one request per 1,000 keys."""
    found: dict[str, tuple[int, str]] = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=uri.bucket, Prefix=uri.key):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = (obj["Size"], obj["ETag"].strip('"'))
    return found


def read_location(location: str, client=None) -> tuple[bytes, str]:
    """The bytes of a local file or an `s3://` object, and the name to use in messages."""
    if location.startswith("s3://"):
        uri = S3Uri.parse(location)
        client = client or make_client()
        try:
            return client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read(), location
        except client.exceptions.NoSuchKey:
            raise InputError(f"{location}: no such object") from None
    path = Path(location)
    if path.is_dir():
        raise InputError(f"{quote(location)} is a folder; expected a file")
    try:
        return path.read_bytes(), location
    except OSError as err:
        raise InputError(f"cannot read {describe_os_error(err)}") from None
