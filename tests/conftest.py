"""Shared fixtures: one real local S3 server for the whole test session, and a fresh bucket per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tagflow import s3
from tagflow.local import s3server

REPO = Path(__file__).resolve().parents[1]
MXNET_PYTHON = REPO / ".venv-mxnet" / "bin" / "python"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS server started for this session, its credentials exported for boto3."""
    state = tmp_path_factory.mktemp("s3server")
    info = s3server.start(state)
    saved = {k: os.environ.get(k) for k in info.env()}
    os.environ.update(info.env())
    try:
        yield info
    finally:
        s3server.stop(state)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_client(s3_server):
    return s3.make_client(s3_server.endpoint)


@pytest.fixture
def bucket(s3_client) -> Iterator[str]:
    """A new, empty bucket on the session's server, emptied and removed after the test (SeaweedFS gives each bucket
    its own volumes, so a suite that kept every bucket would run the server out of volumes)."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    remove_bucket(s3_client, name)


def remove_bucket(client, name: str) -> None:
    """Delete every object in the bucket, then the bucket."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def mxnet_python() -> Path:
    """The algorithm environment's interpreter; `make test` creates it."""
    if not MXNET_PYTHON.exists():
        pytest.fail(f"{MXNET_PYTHON} is missing: run `make venvs` (make test does) to create the algorithm environment")
    return MXNET_PYTHON


@pytest.fixture(scope="session")
def mxnet_records(mxnet_python):
    """Run algo/mxnet_records.py (MXNet's own RecordIO code) in the algorithm environment; returns its JSON."""
    import json
    import subprocess

    def run(*args: str, stdin: str | None = None) -> dict:
        done = subprocess.run(
            [str(mxnet_python), str(REPO / "algo" / "mxnet_records.py"), *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"mxnet_records.py {' '.join(args)} failed:\n{done.stderr[-3000:]}"
        return json.loads(done.stdout)

    return run


def write_records(folder: Path, name: str, ids, render) -> list:
    """`folder/NAME.rec` + `.idx` holding `render(i)` = (encoded image, labels) for each ID, written with tagflow's
    RecordWriter (what MXNet's reader reads); the labels, in ID order. The synthetic sets of the training, tuning,
    evaluation and endpoint tests are built with it."""
    from tagflow.recordio import RecordWriter

    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    with RecordWriter(folder / f"{name}.rec", folder / f"{name}.idx") as writer:
        for i in ids:
            data, row = render(i)
            writer.write_image(i, row, data)
            labels.append(row)
    return labels


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    """Every file of `folder` to s3://BUCKET/PREFIX/NAME."""
    for path in sorted(folder.iterdir()):
        s3.put_file(client, path, s3.S3Uri(bucket, f"{prefix.rstrip('/')}/{path.name}"))
