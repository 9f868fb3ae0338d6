"""tagflow.s3 against the session's real S3 server: URIs, the client factory, whole-object reads and writes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from botocore.exceptions import ClientError

from tagflow import s3
from tagflow.errors import InputError


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("/data/list.lst", "'/data/list.lst': expected an S3 URI of the form s3://BUCKET/KEY"),
        ("s3:///key", "'s3:///key': the S3 URI has no bucket name"),
        ("S3://b/k", "expected an S3 URI"),
    ],
)
def test_a_bad_uri_is_refused_with_the_form_expected(uri, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        s3.S3Uri.parse(uri)


def test_a_long_bad_uri_is_cut_in_the_message():
    with pytest.raises(InputError) as err:
        s3.S3Uri.parse("x" * 10_000)
    assert len(str(err.value)) < 400 and "10000" in str(err.value)


def test_join_puts_one_slash_between_segments():
    base = s3.S3Uri.parse("s3://b/data/")
    assert str(base.join("training", "/train.rec")) == "s3://b/data/training/train.rec"
    assert str(s3.S3Uri.parse("s3://b").join("x/", "y")) == "s3://b/x/y"
    assert s3.S3Uri.parse("s3://b/a/b.txt") == s3.S3Uri("b", "a/b.txt")


def test_the_endpoint_comes_from_botocores_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert s3.endpoint_from_env() == "http://s3-only:2"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert s3.endpoint_from_env() == "http://general:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert s3.endpoint_from_env() is None


def test_a_local_endpoint_gets_path_style_sigv4_presigned_urls(s3_server):
    client = s3.make_client(s3_server.endpoint)
    url = client.generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=60)
    assert url.startswith(f"{s3_server.endpoint}/b/k?") and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url


def test_put_file_uploads_only_what_changed(s3_client, bucket, tmp_path):
    path, uri = tmp_path / "a.bin", s3.S3Uri(bucket, "x/a.bin")
    path.write_bytes(b"first")
    assert s3.put_file(s3_client, path, uri) is True
    assert s3.object_sha256(s3_client, uri) == s3.file_sha256(path)
    first = s3_client.head_object(Bucket=bucket, Key=uri.key)
    assert s3.put_file(s3_client, path, uri) is False  # the same bytes: nothing sent
    assert s3_client.head_object(Bucket=bucket, Key=uri.key)["LastModified"] == first["LastModified"]
    path.write_bytes(b"second")
    assert s3.put_file(s3_client, path, uri) is True
    assert s3_client.get_object(Bucket=bucket, Key=uri.key)["Body"].read() == b"second"


def test_an_object_tagflow_did_not_write_has_no_recorded_sha256(s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="foreign", Body=b"x")
    assert s3.object_sha256(s3_client, s3.S3Uri(bucket, "foreign")) is None
    assert s3.object_sha256(s3_client, s3.S3Uri(bucket, "absent")) is None


def test_get_file_writes_whole_files_only(s3_client, bucket, tmp_path):
    s3_client.put_object(Bucket=bucket, Key="d/f.txt", Body=b"payload")
    target = tmp_path / "deep" / "f.txt"
    s3.get_file(s3_client, s3.S3Uri(bucket, "d/f.txt"), target)
    assert target.read_bytes() == b"payload"
    missing = tmp_path / "deep" / "missing.txt"
    with pytest.raises(ClientError, match="404"):  # callers turn it into their own message
        s3.get_file(s3_client, s3.S3Uri(bucket, "d/missing.txt"), missing)
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]  # no partial file, no temporary


def test_require_bucket_says_what_to_do(s3_server, s3_client):
    with pytest.raises(InputError, match=r"bucket 'no-such-bucket-t1' does not exist: create it first"):
        s3.require_bucket(s3_client, "no-such-bucket-t1")
    wrong = s3.make_client(
        s3_server.endpoint,
        session=boto3.session.Session(
            aws_access_key_id=s3_server.access_key, aws_secret_access_key="wrong", region_name=s3_server.region
        ),
        max_attempts=1,
    )
    with pytest.raises(InputError, match=r"bucket 't-any' is not accessible with these credentials"):
        s3.require_bucket(wrong, "t-any")


def test_ensure_bucket_creates_once(s3_client):
    name = "t-ensure-bucket-once"
    s3.ensure_bucket(s3_client, name)
    s3.ensure_bucket(s3_client, name)
    s3.require_bucket(s3_client, name)
    s3_client.delete_bucket(Bucket=name)


def test_list_objects_reads_every_page(s3_client, bucket):
    keys = [f"p/{i:04d}" for i in range(1003)]  # more than one page of 1,000
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3_client.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))
    s3_client.put_object(Bucket=bucket, Key="q/outside", Body=b"x")
    found = s3.list_objects(s3_client, s3.S3Uri(bucket, "p/"))
    assert sorted(found) == keys
    assert found["p/0007"][0] == len(b"p/0007") and len(found["p/0007"][1]) == 32  # size, ETag without quotes
