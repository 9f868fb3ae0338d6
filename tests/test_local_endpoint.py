"""The local endpoint: a model trained by algo/ic_train.py, served by algo/ic_serve.py, called by boto3.

The models are trained once per module (1 epoch, 48 generated 96-px images, ResNet-18): the real trainer's
model.tar.gz, not a hand-made checkpoint. Models reach the server as a worker on another machine would send them:
an S3 presigned URL from the real local S3 server, which the server downloads itself.
"""

from __future__ import annotations

import ast
import hashlib
import http.server
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.config import Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from conftest import write_records
from tagflow import s3
from tagflow.errors import InputError, TagflowError
from tagflow.local import endpoint
from tagflow.local.runner import TRAINER, _tar, write_config
from tagflow.sagemaker_config import training_job_request

pytestmark = [pytest.mark.slow, pytest.mark.mxnet]

COLORS = ((220, 30, 30), (30, 170, 40), (30, 60, 220), (240, 220, 20))


def render(index: int, size: int = 96) -> tuple[bytes, np.ndarray]:
    """A grey JPEG with one or two discs; a label per colour drawn."""
    rng = np.random.default_rng(index)
    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    labels = np.zeros(len(COLORS), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        color = int(rng.integers(len(COLORS)))
        r = size // 6
        x, y = (int(v) for v in rng.integers(r, size - r, 2))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[color])
        labels[color] = 1
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue(), labels


def first_labels(design: tuple, classes: int) -> tuple:
    """(image, its first `classes` labels): a smaller model from the same designs."""
    data, labels = design
    return data, labels[:classes]


def train_tiny_model(workdir: Path, mxnet_python: Path, *, images: int = 48, classes: int = len(COLORS)) -> Path:
    """Run the real trainer for one epoch on a tiny generated set (labels: the first `classes` colours); returns
    its model.tar.gz. One epoch leaves the probabilities mostly saturated at 0 or 1; that is fine for serving tests."""
    job = workdir / "job"
    n_train = images * 3 // 4
    request = training_job_request(
        "tiny-endpoint-model",
        image_uri="local/image-classification",
        role_arn="arn:aws:iam::000000000000:role/tagflow-local",
        train_uri="s3://unused/train/",
        validation_uri="s3://unused/validation/",
        output_uri="s3://unused/models",
        hyperparameters={
            "num_classes": classes,
            "num_training_samples": n_train,
            "multi_label": 1,
            "image_shape": "3,96,96",
            "num_layers": 18,
            "epochs": 1,
            "mini_batch_size": 8,
            "learning_rate": 0.05,
        },
        instance_type="ml.m5.large",
        max_runtime_s=600,
    )
    write_config(job, request)
    for split, ids in (("train", range(n_train)), ("validation", range(n_train, images))):
        write_records(job / "input" / "data" / split, split, ids, lambda i: first_labels(render(i), classes))
    done = subprocess.run(
        [str(mxnet_python), str(TRAINER), "--job-dir", str(job)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    archive = workdir / "model.tar.gz"
    _tar(job / "model", archive)
    return archive


@pytest.fixture(scope="module")
def models(tmp_path_factory, mxnet_python) -> tuple[Path, Path]:
    """A 4-label model to serve and a 3-label one to swap to: the answer's length tells which model gave it."""
    first = train_tiny_model(tmp_path_factory.mktemp("model-a"), mxnet_python)
    second = train_tiny_model(tmp_path_factory.mktemp("model-b"), mxnet_python, classes=3)
    return first, second


@pytest.fixture
def served(models, tmp_path, mxnet_python):
    """An endpoint named 'tiny' serving the first model; stopped after the test."""
    state = tmp_path / "endpoint"
    info = endpoint.start(models[0], name="tiny", state_dir=state, mxnet_python=mxnet_python)
    try:
        yield info
    finally:
        endpoint.stop(state)


def runtime_client(info: endpoint.EndpointInfo):
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=info.url,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(retries={"max_attempts": 1}),
    )


def post(
    url: str, body: bytes, content_type: str | None = "image/jpeg", headers: dict | None = None
) -> tuple[int, object]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_boto3_sagemaker_runtime_invokes_the_local_endpoint(served):
    image, _ = render(1000)
    response = runtime_client(served).invoke_endpoint(EndpointName="tiny", ContentType="image/jpeg", Body=image)
    assert response["ContentType"] == "application/json"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    probs = json.loads(response["Body"].read())
    assert len(probs) == len(COLORS)
    assert all(0.0 <= p <= 1.0 for p in probs)
    # The same answer on the container route, and for the same picture as PNG (same pixels, same preprocessing).
    status, direct = post(served.invocations_url, image)
    assert status == 200 and direct == pytest.approx(probs, abs=1e-6)
    png = io.BytesIO()
    Image.open(io.BytesIO(image)).save(png, "PNG")
    status, from_png = post(served.invocations_url, png.getvalue(), "image/png")
    assert status == 200 and from_png == pytest.approx(probs, abs=1e-5)


def test_ping_metadata_and_idempotent_start(served, models, mxnet_python):
    assert get(f"{served.url}/ping")[0] == 200
    assert endpoint.health(served.url) == {"name": "tiny", "loaded": True, "source": str(models[0])}
    status, body = get(f"{served.url}/metadata")
    meta = json.loads(body)
    assert status == 200 and endpoint.metadata(served.url) == meta == endpoint.metadata(served)
    assert meta["name"] == "tiny" and meta["source"] == str(models[0])
    assert meta["num_classes"] == len(COLORS) and meta["image_shape"] == [3, 96, 96] and meta["multi_label"]
    assert meta["params_file"] == meta["metrics"]["params_file"]
    assert 0.0 <= meta["metrics"]["validation"]["accuracy"] <= 1.0
    state = Path(served.state_dir)
    assert endpoint.status(state) == served
    assert endpoint.start(models[1], name="tiny", state_dir=state, mxnet_python=mxnet_python) == served


def test_metadata_of_a_model_without_metrics_json_says_null_not_a_guess(models, tmp_path, mxnet_python):
    """A SageMaker-trained model.tar.gz has no metrics.json: /metadata says null for what only that file knows (not
    multi_label False, not an empty dict a gate could mistake for values), and the model still serves."""
    from tagflow.deploy import local_serving_value

    archive = tmp_path / "no-metrics.tar.gz"
    with tarfile.open(models[0]) as src, tarfile.open(archive, "w:gz") as dst:
        for member in src.getmembers():
            if member.name != "metrics.json":
                dst.addfile(member, src.extractfile(member))
    with tarfile.open(archive) as tar:
        assert "metrics.json" not in tar.getnames() and any(n.endswith(".params") for n in tar.getnames())
    state = tmp_path / "endpoint"
    info = endpoint.start(archive, name="no-metrics", state_dir=state, mxnet_python=mxnet_python)
    try:
        meta = endpoint.metadata(info)
        assert meta is not None and meta["source"] == str(archive)
        for unknown in ("multi_label", "saved_epoch", "selected_by", "label_names", "metrics"):
            assert meta[unknown] is None, (unknown, meta[unknown])
        assert meta["params_file_chosen_by"] == "highest-numbered"
        assert re.fullmatch(r"image-classification-\d{4}\.params", meta["params_file"])
        assert meta["num_classes"] == len(COLORS) and meta["image_shape"] == [3, 96, 96]  # read from the files
        assert local_serving_value(meta, "validation:mAP") is None
        status, probabilities = post(info.invocations_url, render(5)[0])
        assert status == 200 and len(probabilities) == len(COLORS)
    finally:
        endpoint.stop(state)


def load_raw(info: endpoint.EndpointInfo, archive: Path, **request) -> tuple[int, object]:
    """POST /admin/load as a loader would, with `request`'s extra fields (thresholds, thresholds_problem)."""
    state = Path(info.state_dir)
    copy = state / "incoming" / "raw.tar.gz"
    copy.parent.mkdir(mode=0o700, exist_ok=True)
    copy.write_bytes(archive.read_bytes())
    body = json.dumps({"model_url": copy.as_uri(), "source": "raw-model", **request}).encode()
    headers = {"Authorization": f"Bearer {endpoint.admin_token(state)}"}
    try:
        return post(f"{info.url}/admin/load", body, "application/json", headers)
    finally:
        copy.unlink(missing_ok=True)


LABELS = "application/json; verbose=true"


def test_thresholds_are_kept_only_for_the_archive_they_were_chosen_for(served, models):
    """The loader's thresholds (tests/test_thresholds.py has them found for real beside an evaluated model) are kept
    for the archive whose sha256 they name and whose outputs they number; otherwise the model serves without, and a
    request for labels gets 406 naming why. The default answer is the array, whatever else Accept says."""
    sha = hashlib.sha256(models[0].read_bytes()).hexdigest()
    names = ["red", "green", "blue", "yellow"]
    offered = {"evaluation": "s3://b/p/output/j/evaluation/evaluation.json", "model_sha256": sha,
               "label_names": names, "thresholds": [0.5, 0.0, 1.5, 0.5]}  # fmt: skip
    status, meta = load_raw(served, models[0], thresholds=offered)
    assert status == 200 and meta["sha256"] == sha
    assert meta["thresholds"] == offered and meta["thresholds_problem"] is None
    image = render(7)[0]
    status, probs = post(served.invocations_url, image)
    assert status == 200 and len(probs) == len(COLORS)
    want = {"labels": [n for n, p, t in zip(names, probs, offered["thresholds"], strict=True) if p >= t],
            "probabilities": probs}  # fmt: skip
    assert "green" in want["labels"] and "blue" not in want["labels"]  # thresholds 0 and 1.5: always, never
    for accept in (LABELS, "application/json;verbose=TRUE", "text/html, application/json ; verbose=true"):
        assert post(served.invocations_url, image, headers={"Accept": accept}) == (200, want), accept
    for accept in ("application/json", "application/json; verbose=false", "*/*", "text/csv; verbose=true"):
        assert post(served.invocations_url, image, headers={"Accept": accept}) == (200, probs), accept
    # Through boto3 too.
    verbose = runtime_client(served).invoke_endpoint(
        EndpointName="tiny", ContentType="image/jpeg", Accept=LABELS, Body=image
    )
    assert json.loads(verbose["Body"].read()) == want

    # A malformed offer is a 400 and changes nothing: the model and its thresholds keep serving.
    for bad, message in (
        ({**offered, "thresholds": [0.5, "high", 0.1, 0.2]}, "thresholds.thresholds is a list of numbers"),
        ({**offered, "label_names": names[:3]}, "thresholds has 3 label names for 4 thresholds; expected one each"),
        ([0.5] * 4, "thresholds is a JSON list; expected an object"),
    ):
        status, answer = load_raw(served, models[0], thresholds=bad)
        assert status == 400 and message in answer["message"], answer
    assert endpoint.metadata(served)["thresholds"] == offered

    # Thresholds chosen for another archive, or fewer than the outputs: served without, and said why.
    other = "0" * 64
    status, meta = load_raw(served, models[0], thresholds={**offered, "model_sha256": other})
    assert status == 200 and meta["thresholds"] is None
    assert meta["thresholds_problem"] == (
        f"{offered['evaluation']} describes the archive with sha256 {other}, but the one fetched from raw-model has "
        f"sha256 {sha} (it changed after the loader checked it)"
    )
    status, answer = post(served.invocations_url, image, headers={"Accept": LABELS})
    assert status == 406 and answer["message"] == (
        f"Accept {LABELS!r} asks for the labels above their thresholds, but raw-model has no thresholds: "
        f"{meta['thresholds_problem']}; ask without it for the probabilities"
    )
    assert post(served.invocations_url, image) == (200, probs)  # the default answer needs no thresholds
    short = {**offered, "label_names": names[:3], "thresholds": [0.5] * 3}
    status, meta = load_raw(served, models[0], thresholds=short)
    assert meta["thresholds"] is None
    assert meta["thresholds_problem"] == f"{offered['evaluation']} has 3 thresholds, but the model has 4 outputs"
    # The loader's reason there are none is what /metadata and the 406 say; SageMaker's route wraps the 406.
    status, meta = load_raw(served, models[0], thresholds_problem="no evaluation is recorded for raw-model")
    assert meta["thresholds"] is None and meta["thresholds_problem"] == "no evaluation is recorded for raw-model"
    with pytest.raises(runtime_client(served).exceptions.ModelError) as err:
        runtime_client(served).invoke_endpoint(EndpointName="tiny", ContentType="image/jpeg", Accept=LABELS, Body=image)
    assert err.value.response["OriginalStatusCode"] == 406
    assert "no evaluation is recorded for raw-model" in err.value.response["OriginalMessage"]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served):
    url = served.invocations_url
    image, _ = render(7)
    cases = [
        (b"this is not an image", "image/jpeg", 400),
        (image[: len(image) // 3], "image/jpeg", 400),  # a truncated JPEG
        (b"", "image/jpeg", 400),
        (b"\xff" * (6 * 1024 * 1024 + 1), "image/jpeg", 413),
        (image, "text/csv", 415),
        (image, None, 415),
    ]
    for body, content_type, expected in cases:
        status, doc = post(url, body, content_type)
        assert status == expected, (content_type, len(body), doc)
        assert doc["message"]
        assert post(url, image)[0] == 200  # still serving after each bad request

    # Through boto3: the container's rejection arrives as SageMaker's ModelError with the original status.
    client = runtime_client(served)
    with pytest.raises(client.exceptions.ModelError) as err:
        client.invoke_endpoint(EndpointName="tiny", ContentType="text/csv", Body=b"1,2,3")
    assert err.value.response["OriginalStatusCode"] == 415
    with pytest.raises(client.exceptions.ValidationError, match="Endpoint other of account"):
        client.invoke_endpoint(EndpointName="other", ContentType="image/jpeg", Body=image)
    assert get(f"{served.url}/ping")[0] == 200


def test_swap_under_load_drops_nothing(served, models):
    image, _ = render(3)
    client = runtime_client(served)
    statuses: list[int] = []
    widths: dict[int, list[int]] = {0: [], 1: []}  # per client thread, the answer lengths in order
    stop = threading.Event()

    def fire(thread: int) -> None:
        while not stop.is_set():
            status, doc = post(served.invocations_url, image)
            statuses.append(status)
            if status == 200:
                widths[thread].append(len(doc))

    threads = [threading.Thread(target=fire, args=(t,)) for t in widths]
    for t in threads:
        t.start()
    try:
        while len(statuses) < 5:
            time.sleep(0.05)
        new = endpoint.swap(Path(served.state_dir), models[1])
        deadline = time.monotonic() + 120
        while not all(seen and seen[-1] == 3 for seen in widths.values()) and time.monotonic() < deadline:
            time.sleep(0.05)  # until both client threads have had answers from the new model
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    for seen in widths.values():
        # Old model (4 labels) until the switch, the new one (3 labels) after it, never back.
        assert seen[0] == 4 and seen[-1] == 3 and seen == sorted(seen, reverse=True), seen
    response = client.invoke_endpoint(EndpointName="tiny", ContentType="image/jpeg", Body=image)
    assert len(json.loads(response["Body"].read())) == 3
    meta = json.loads(get(f"{served.url}/metadata")[1])
    assert meta["source"] == str(models[1]) and meta["num_classes"] == 3
    assert endpoint.status(Path(served.state_dir)) == new
    assert new.model_source == str(models[1])
    # The server keeps only the folder of the model it serves.
    assert list((Path(served.state_dir) / "models").iterdir()) == [Path(meta["model_dir"])]


def test_a_bad_model_url_is_refused_and_the_old_model_keeps_serving(served, models, s3_client, bucket, tmp_path):
    url = served.url
    not_a_tar = s3.S3Uri(bucket, "models/not-a-tar/model.tar.gz")
    s3_client.put_object(Bucket=bucket, Key=not_a_tar.key, Body=b"not a tar")
    no_model = s3.S3Uri(bucket, "models/no-model/model.tar.gz")
    only_metrics = tmp_path / "only-metrics.tar.gz"
    with tarfile.open(only_metrics, "w:gz") as tar:
        info = tarfile.TarInfo("metrics.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    s3.put_file(s3_client, only_metrics, no_model)
    local_broken = tmp_path / "model.tar.gz"
    local_broken.write_bytes(b"not a tar")
    cases = [
        (str(not_a_tar), InputError, r"HTTP 422\).*not a readable model\.tar\.gz"),
        (local_broken, InputError, r"HTTP 422\).*not a readable model\.tar\.gz"),
        (
            str(no_model),
            InputError,
            r"HTTP 422\).*not an image-classification model; it lacks image-classification-symbol",
        ),
        # The status and the object only: S3's error body (NoSuchKey, its message) is not repeated.
        (
            f"s3://{bucket}/models/missing/model.tar.gz",
            TagflowError,
            rf"HTTP 502\): GET {s3_client.meta.endpoint_url}/{bucket}/models/missing/model.tar.gz answered HTTP 404$",
        ),
    ]
    for model, error, message in cases:
        with pytest.raises(error, match=message) as raised:
            endpoint.load(served, model, client=s3_client)
        assert f"endpoint at {url} refused {model}" in str(raised.value)
        assert "X-Amz-Signature" not in str(raised.value)  # a presigned URL is a credential: never echoed
        assert "NoSuchKey" not in str(raised.value)
    with pytest.raises(InputError, match=r"endpoint name 'not_valid': expected 1-63 letters"):
        endpoint.load(served, models[1], name="not_valid")
    with pytest.raises(InputError, match=r"is a local file: load it into an endpoint started on this machine"):
        endpoint.load(url, models[1])  # a URL alone: the archive has no way onto the server
    admin = {"Authorization": f"Bearer {endpoint.admin_token(served.state_dir)}"}
    for request, expected in [
        ({"model_url": "ftp://host/model.tar.gz"}, (400, "expected an S3 presigned URL (http or https) or file://")),
        ({"model_url": str(models[1].resolve().as_uri())}, (403, "local archives are loaded from")),
        ({"model_url": models[1].as_uri(), "name": "bad_name"}, (400, "name 'bad_name': expected 1-63 letters")),
    ]:
        status, doc = post(f"{url}/admin/load", json.dumps(request).encode(), "application/json", admin)
        assert status == expected[0] and expected[1] in doc["message"], doc

    assert endpoint.health(url) == {"name": "tiny", "loaded": True, "source": str(models[0])}
    status, probs = post(served.invocations_url, render(5)[0])
    assert status == 200 and len(probs) == len(COLORS)
    meta = endpoint.metadata(url)
    assert list((Path(served.state_dir) / "models").iterdir()) == [Path(meta["model_dir"])]
    assert list((Path(served.state_dir) / "incoming").iterdir()) == []  # local copies go once loaded (or refused)
    assert "X-Amz-Signature" not in (Path(served.state_dir) / "endpoint.log").read_text()


def test_an_empty_endpoint_is_healthy_and_says_it_has_no_model(tmp_path, mxnet_python):
    state = tmp_path / "endpoint"
    info = endpoint.start(name="empty", state_dir=state, mxnet_python=mxnet_python)
    try:
        assert info.model_source is None
        assert endpoint.health(info.url) == {"name": "empty", "loaded": False, "source": None}
        assert endpoint.status(state) == info
        assert get(f"{info.url}/ping")[0] == 503
        assert endpoint.metadata(info.url) is None
        image, _ = render(2)
        assert post(info.invocations_url, image) == (503, {"message": "no model is loaded yet"})
        client = endpoint.runtime_client(info.url)
        with pytest.raises(client.exceptions.ModelNotReadyException, match="no model is loaded yet"):
            client.invoke_endpoint(EndpointName="empty", ContentType="image/jpeg", Body=image)
    finally:
        endpoint.stop(state)


def test_load_by_presigned_url_from_s3_and_rename(models, s3_client, bucket, tmp_path, mxnet_python):
    """What a deploy task on another worker does: it reaches the server by URL only, and the server downloads the
    model itself from a presigned URL (it has no S3 credentials of its own and no access to the caller's disk)."""
    first, second = s3.S3Uri(bucket, "jobs/a/output/model.tar.gz"), s3.S3Uri(bucket, "jobs/b/output/model.tar.gz")
    s3.put_file(s3_client, models[0], first)
    s3.put_file(s3_client, models[1], second)
    state = tmp_path / "endpoint"
    with pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            env.delenv(key)  # the server process gets no S3 credentials
        # the S3 endpoint whose presigned URLs it accepts comes from the client (the environment has none now)
        info = endpoint.start(name="fresh", state_dir=state, mxnet_python=mxnet_python, client=s3_client)
    try:
        answer = endpoint.load(info, str(first), client=s3_client)
        assert answer["name"] == "fresh" and answer["source"] == str(first) and answer["num_classes"] == len(COLORS)
        image, _ = render(11)
        runtime = endpoint.runtime_client(info.url)
        probs = json.loads(
            runtime.invoke_endpoint(EndpointName="fresh", ContentType="image/jpeg", Body=image)["Body"].read()
        )
        assert len(probs) == len(COLORS)

        answer = endpoint.load(
            info.url, str(second), name="renamed", client=s3_client, token=endpoint.admin_token(state)
        )
        assert answer["name"] == "renamed" and answer["num_classes"] == 3
        response = runtime.invoke_endpoint(EndpointName="renamed", ContentType="image/jpeg", Body=image)
        assert len(json.loads(response["Body"].read())) == 3
        with pytest.raises(runtime.exceptions.ValidationError, match="Endpoint fresh of account"):
            runtime.invoke_endpoint(EndpointName="fresh", ContentType="image/jpeg", Body=image)
        assert endpoint.health(info.url) == {"name": "renamed", "loaded": True, "source": str(second)}
        assert endpoint.metadata(info.url)["name"] == "renamed"
        now = endpoint.status(state)
        assert (now.name, now.model_source, now.url) == ("renamed", str(second), info.url)
        assert list((state / "models").iterdir()) == [Path(answer["model_dir"])]
    finally:
        endpoint.stop(state)
    assert not (state / "models").exists()


TOKEN = "t0ken-" + "9" * 42


def test_every_endpoint_has_a_private_token_and_every_load_must_send_it(models, tmp_path, mxnet_python):
    """Started without a token, the server gets a new one, kept 0600 in its state folder (where load and swap find
    it); loads without it, or with another, are refused even from loopback. A given token is kept the same way."""
    state = tmp_path / "endpoint"
    info = endpoint.start(name="guarded", state_dir=state, mxnet_python=mxnet_python)
    try:
        token_file = state / "admin-token"
        token = endpoint.admin_token(state)
        assert len(token) >= 32 and token_file.stat().st_mode & 0o777 == 0o600
        load_url = f"{info.url}/admin/load"
        body = json.dumps({"model_url": "https://s3.amazonaws.com/b/model.tar.gz"}).encode()
        refused = [
            ({}, " needs the header `Authorization: Bearer <token>` with this server's TAGFLOW_ENDPOINT_TOKEN"),
            (
                {"Authorization": f"Bearer {token[:-1]}x"},
                ": the bearer token is not this server's TAGFLOW_ENDPOINT_TOKEN",
            ),
            (
                {"Authorization": f"Basic {token}"},
                " needs the header `Authorization: Bearer <token>` with this server's TAGFLOW_ENDPOINT_TOKEN",
            ),
        ]
        for headers, reason in refused:
            assert post(load_url, body, "application/json", headers) == (403, {"message": f"/admin/load{reason}"})
        with pytest.raises(InputError, match=r"HTTP 403\).*the bearer token is not this server's"):
            endpoint.load(info, models[0], token="another-token-of-enough-length")
        assert endpoint.health(info.url)["loaded"] is False
        answer = endpoint.load(info, models[0])  # the token from the state folder
        assert answer["source"] == str(models[0])
        assert post(info.invocations_url, render(4)[0])[0] == 200
        assert endpoint.swap(state, models[1]).model_source == str(models[1])
    finally:
        endpoint.stop(state)
    log = (state / "endpoint.log").read_text()
    assert "model loads accepted with the bearer token" in log and token not in log

    # Restarted, it keeps its token (the Airflow Variable set at `make up` stays right); a given one replaces it.
    again = endpoint.start(name="guarded", state_dir=state, mxnet_python=mxnet_python)
    try:
        assert endpoint.admin_token(state) == token
    finally:
        endpoint.stop(state)
    given = endpoint.start(name="guarded", state_dir=state, mxnet_python=mxnet_python, token=TOKEN)
    try:
        assert given.pid != again.pid and endpoint.admin_token(state) == TOKEN
        assert endpoint.load(given, models[0])["num_classes"] == len(COLORS)
    finally:
        endpoint.stop(state)


def test_the_server_refuses_to_start_without_a_token(mxnet_python, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != endpoint.TOKEN_ENV}
    done = subprocess.run(
        [str(mxnet_python), str(endpoint.SERVER), "--name", "x", "--port", "0", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "set TAGFLOW_ENDPOINT_TOKEN to the admin token model loads must send" in done.stdout


POLICY = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from ic_serve import admin_refusal
from ic_sources import source_refusal
cases = json.loads(sys.argv[2])
root = Path(sys.argv[3])
print(json.dumps({
    "admin": [admin_refusal(*case) for case in cases["admin"]],
    "source": [source_refusal(url, frozenset(cases["origins"]), root, client) for url, client in cases["source"]],
}))
"""


def test_admin_and_model_source_policy(mxnet_python, tmp_path):
    """The server's rules, for cases no test here can make for real (other machines, AWS hosts): the token, always;
    models from the S3 endpoint it was given or AWS S3 (presigned), or from under its model root, nothing else."""
    root = tmp_path / "incoming"
    root.mkdir()
    (root / "m.tar.gz").write_bytes(b"x")
    (root / "escape.tar.gz").symlink_to(tmp_path / "elsewhere.tar.gz")
    signed = "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=abc"
    admin = [
        (TOKEN, ""),
        (TOKEN, "Basic dXNlcjpwYXNz"),
        (TOKEN, "Bearer wrong"),
        (TOKEN, f"Bearer {TOKEN}"),
        (TOKEN, f"bearer {TOKEN}"),
    ]
    source = [
        (f"http://127.0.0.1:8333/b/model.tar.gz{signed}", "127.0.0.1"),  # the configured S3 endpoint
        (f"http://127.0.0.1:8333/b/model.tar.gz{signed}", "10.1.2.3"),  # from any client
        (f"https://my-bucket.s3.eu-west-1.amazonaws.com/m/model.tar.gz{signed}", "10.1.2.3"),
        (f"https://s3.amazonaws.com/b/model.tar.gz{signed}", "10.1.2.3"),
        (f"http://s3.amazonaws.com/b/model.tar.gz{signed}", "10.1.2.3"),  # AWS over plain http
        (f"https://s3.amazonaws.com.evil.example/b/model.tar.gz{signed}", "10.1.2.3"),
        (f"http://127.0.0.1:9999/b/model.tar.gz{signed}", "127.0.0.1"),  # another port on this machine
        (f"http://169.254.169.254/latest/meta-data/{signed}", "127.0.0.1"),
        (f"http://user@127.0.0.1:8333/b/model.tar.gz{signed}", "127.0.0.1"),
        ("http://127.0.0.1:8333/b/model.tar.gz", "127.0.0.1"),  # not presigned
        ((root / "m.tar.gz").as_uri(), "127.0.0.1"),
        ((root / "m.tar.gz").as_uri(), "10.1.2.3"),
        ((tmp_path / "elsewhere.tar.gz").as_uri(), "127.0.0.1"),
        ((root / "escape.tar.gz").as_uri(), "127.0.0.1"),  # a link out of the root
        (f"file://{root}/../m.tar.gz", "127.0.0.1"),
        ("file:///etc/passwd", "::1"),
        ("ftp://127.0.0.1:8333/x", "127.0.0.1"),
    ]
    cases = {"admin": admin, "source": source, "origins": ["http://127.0.0.1:8333"]}
    done = subprocess.run(
        [str(mxnet_python), "-c", POLICY, str(endpoint.SERVER.parent), json.dumps(cases), str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout)
    assert [r and r.split(" `")[0].split(":")[0] for r in answers["admin"]] == [
        "/admin/load needs the header",
        "/admin/load needs the header",
        "/admin/load",
        None,
        None,
    ]
    assert "the bearer token is not this server's" in answers["admin"][2]
    assert [a and a[0] for a in answers["source"]] == [
        None, None, None, None, 403, 403, 403, 403, 400, 400, None, 403, 403, 403, 403, 403, 400,
    ]  # fmt: skip
    messages = [a[1] for a in answers["source"] if a]
    assert "models are fetched from the S3 endpoint (http://127.0.0.1:8333) or AWS S3 only" in messages[2]
    assert all("X-Amz-Signature=abc" not in m for m in messages)  # the query (a signature) is never echoed


class Upstream(http.server.BaseHTTPRequestHandler):
    """Stands for the S3 endpoint an endpoint was started for: denies with a body, redirects, or announces 3 GiB."""

    def do_GET(self) -> None:
        if self.path.startswith("/big"):
            self.send_response(200)
            self.send_header("Content-Length", str(3 * 1024**3))  # over the 2 GiB cap; no body follows
        elif self.path.startswith("/moved"):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/secret")
            self.send_header("Content-Length", "0")
        else:
            body = b"<Error><Code>AccessDenied</Code><Message>secret upstream detail</Message></Error>"
            self.send_response(403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.end_headers()

    def log_message(self, format: str, *args) -> None:
        pass


def test_a_failed_download_names_the_status_and_object_never_the_body(tmp_path, mxnet_python):
    """An upstream's error body is not echoed, a redirect is not followed, and an archive announced over the size
    cap is refused before its body: against an HTTP server the endpoint was told is its S3 endpoint."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{upstream.server_address[1]}"
    state = tmp_path / "endpoint"
    info = endpoint.start(name="fetching", state_dir=state, mxnet_python=mxnet_python, s3_endpoints=[origin])
    try:
        for path, error, message in [
            ("/denied/model.tar.gz", TagflowError, rf"HTTP 502\): GET {origin}/denied/model.tar.gz answered HTTP 403$"),
            ("/moved/model.tar.gz", TagflowError, rf"HTTP 502\): GET {origin}/moved/model.tar.gz answered HTTP 302$"),
            ("/big/model.tar.gz", InputError, r"HTTP 413\).*has 3221225472 bytes; the limit is"),
        ]:
            with pytest.raises(error, match=message) as raised:
                endpoint.load(info, f"{origin}{path}?X-Amz-Signature=abc")
            assert "secret" not in str(raised.value) and "abc" not in str(raised.value)
    finally:
        endpoint.stop(state)
        upstream.shutdown()
        upstream.server_close()


def test_start_from_s3_and_stop_leaves_no_process(models, s3_client, bucket, tmp_path, mxnet_python):
    uri = s3.S3Uri(bucket, "models/tiny/output/model.tar.gz")
    s3.put_file(s3_client, models[0], uri)
    state = tmp_path / "endpoint"
    info = endpoint.start(str(uri), name="from-s3", state_dir=state, workers=2, mxnet_python=mxnet_python)
    status, probs = post(info.invocations_url, render(9)[0])
    assert status == 200 and len(probs) == len(COLORS)
    assert endpoint.stop(state) is True
    with pytest.raises(ProcessLookupError):
        os.kill(info.pid, 0)
    assert endpoint.status(state) is None
    assert endpoint.stop(state) is False
    with pytest.raises(OSError):
        get(f"{info.url}/ping")


def test_serves_an_artifact_laid_out_like_sagemakers_without_our_metrics(models, tmp_path, mxnet_python):
    """The built-in algorithm's model.tar.gz has the symbol, NNNN.params and model-shapes.json, no metrics.json:
    the server must pick the highest-numbered params and answer the same as with our file."""
    import tarfile

    bare = tmp_path / "sagemaker-like.tar.gz"
    with tarfile.open(models[0]) as src, tarfile.open(bare, "w:gz") as dst:
        for member in src.getmembers():
            if member.isfile() and member.name.rsplit("/", 1)[-1] != "metrics.json":
                dst.addfile(member, src.extractfile(member))
    with tarfile.open(bare) as check:
        assert not any(n.endswith("metrics.json") for n in check.getnames())
    image, _ = render(1001)
    answers = []
    for archive in (models[0], bare):
        state = tmp_path / f"ep-{archive.name}"
        info = endpoint.start(archive, name="tiny", state_dir=state, mxnet_python=mxnet_python)
        try:
            status, probs = post(info.invocations_url, image)
            assert status == 200
            answers.append(probs)
        finally:
            endpoint.stop(state)
    assert answers[1] == pytest.approx(answers[0], abs=1e-6)


# --- Hardening: limits on what one request and the connections may take ------------------------------------------


def png_grey(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of width x height black pixels: tiny on the wire (zlib packs the zero rows), huge
    decoded (a decompression bomb at 20000 x 20000: ~390 KB, 400 M pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    rows = (b"\x00" * (width + 1)) * max(1, min(height, (1 << 24) // (width + 1)))  # ~16 MB of rows at a time
    per_block = len(rows) // (width + 1)
    data = b"".join(packer.compress(rows) for _ in range(height // per_block))
    data += packer.compress(b"\x00" * (width + 1) * (height % per_block)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def proc_status(pid: int) -> dict[str, int]:
    """The numbers of /proc/PID/status (VmHWM and VmRSS in kB, Threads)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "Threads"):
            values[key] = int(value.split()[0])
    return values


def png_of(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


def test_a_decompression_bomb_is_refused_from_its_header(served):
    """A 20000 x 20000 PNG (~390 KB) is refused with its size and the limit before anything is decoded: the server's
    peak memory does not move (decoding it would take 1.2 GB), three at once included; so is a 1-pixel strip whose
    resize for the model would be the bomb."""
    bomb = png_grey(20000, 20000)
    assert len(bomb) < 1024 * 1024
    before = proc_status(served.pid)["VmHWM"]
    answers: list[tuple[int, object]] = []
    clients = [threading.Thread(target=lambda: answers.append(post(served.invocations_url, bomb))) for _ in range(3)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    limit = "the limit is 16777216 pixels (--max-pixels)"
    assert answers == [(413, {"message": f"the image is 20000x20000 = 400000000 pixels; {limit}"})] * 3
    status, doc = post(served.invocations_url, png_grey(300000, 1), "image/png")
    assert status == 413 and doc["message"] == (
        f"the image is 300000x1 pixels, which the model resizes to 28800000x96 = 2764800000 pixels; {limit}"
    )
    assert proc_status(served.pid)["VmHWM"] - before < 200 * 1024  # kB: nothing near a decoded bomb
    # Through boto3 the refusal is SageMaker's ModelError carrying the container's 413.
    client = runtime_client(served)
    with pytest.raises(client.exceptions.ModelError) as err:
        client.invoke_endpoint(EndpointName="tiny", ContentType="image/png", Body=bomb)
    assert err.value.response["OriginalStatusCode"] == 413
    assert post(served.invocations_url, render(1)[0])[0] == 200


def test_a_70_mb_body_gets_a_readable_413(served):
    """The body is not read into memory, yet the client, which sends all of it before reading, gets the answer (not
    a broken pipe); a client that asks first (`Expect: 100-continue`) gets it without sending the body."""
    big = b"\xff" * (70 * 1024 * 1024)
    message = f"the body has {len(big)} bytes; the limit is {6 * 1024 * 1024} (--max-bytes)"
    assert post(served.invocations_url, big) == (413, {"message": message})
    with socket.create_connection((served.host, served.port), timeout=30) as sock:
        sock.sendall(
            f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(big)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        reply = read_reply(sock)
    assert reply[0] == 413 and json.loads(reply[1]) == {"message": message}
    assert post(served.invocations_url, render(1)[0])[0] == 200


def read_reply(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP response read from `sock` (its Content-Length), or (0, b"") at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


@pytest.fixture(scope="module")
def limited(models, tmp_path_factory, mxnet_python):
    """An endpoint with small limits: 8 connections, a 200 x 200 pixel limit, 3 s to send a request."""
    state = tmp_path_factory.mktemp("limited") / "endpoint"
    info = endpoint.start(
        models[0], name="limited", state_dir=state, mxnet_python=mxnet_python,
        max_connections=8, max_pixels=200 * 200, read_timeout=3, idle_timeout=60,
    )  # fmt: skip
    try:
        yield info
    finally:
        endpoint.stop(state)


def until(check, seconds: float = 60.0):
    """Poll `check()` until it returns something true (returned), or fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    pytest.fail(f"{check.__name__} did not happen within {seconds}s")


def test_the_limits_are_the_servers_flags(limited):
    assert post(limited.invocations_url, png_of((200, 200)), "image/png")[0] == 200
    status, doc = post(limited.invocations_url, png_of((201, 200)), "image/png")
    assert (status, doc) == (413, {"message": "the image is 201x200 = 40200 pixels; the limit is 40000 pixels "
                                              "(--max-pixels)"})  # fmt: skip
    log = (Path(limited.state_dir) / "endpoint.log").read_text()
    assert "max_pixels=40000" in log and "max_connections=8" in log and "read_timeout=3.0" in log


def test_idle_connections_make_room_and_threads_stay_bounded(limited):
    """200 idle connections: the server keeps at most 8 (one thread each), closing the longest idle to make room,
    and a normal request is answered meanwhile."""
    baseline = proc_status(limited.pid)["Threads"]
    idle = [socket.create_connection((limited.host, limited.port), timeout=30) for _ in range(200)]
    try:
        status, probs = post(limited.invocations_url, render(2)[0])
        assert status == 200 and len(probs) == len(COLORS)

        def closed_by_server() -> list[socket.socket]:
            gone = []
            for sock in idle:
                sock.setblocking(False)
                try:
                    if sock.recv(1) == b"":
                        gone.append(sock)
                except BlockingIOError:
                    pass
            return gone if len(gone) >= 200 - 8 else []

        until(closed_by_server)
        assert proc_status(limited.pid)["Threads"] <= baseline + 8 + 2
    finally:
        for sock in idle:
            sock.close()


def test_slow_clients_are_cut_off_and_a_full_server_answers_503(limited):
    """A client sending its headers a byte at a time is cut off at the read timeout; one whose body is late gets
    408; when every connection is in a request, a new one gets 503 at once; and then the server serves again."""
    slow = socket.create_connection((limited.host, limited.port), timeout=30)
    request = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nX-Pad: " + b"a" * 300
    cut_off = False
    try:
        for i, byte in enumerate(request):  # 300+ bytes, one every 0.1 s: over 30 s, ten times the read timeout
            slow.sendall(bytes([byte]))
            if i == 5:  # meanwhile, others are served
                assert post(limited.invocations_url, render(6)[0])[0] == 200
            time.sleep(0.1)
    except OSError:
        cut_off = True
    if not cut_off:
        slow.settimeout(5)
        cut_off = slow.recv(1) == b""
    slow.close()
    assert cut_off

    with socket.create_connection((limited.host, limited.port), timeout=30) as late:
        late.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n"
                     b"\r\n" + b"\xff" * 10)  # fmt: skip
        status, body = read_reply(late)
    assert status == 408
    assert json.loads(body) == {"message": "the body (1000 bytes) did not arrive within 3s (--read-timeout)"}

    def refused() -> tuple[int, bytes] | None:
        """8 connections begin a request, then a 9th asks: 503 while the 8 are in their requests. Each try opens
        its own 8, so a busy machine that lets the 3 s read timeout pass only costs another try."""
        busy = [socket.create_connection((limited.host, limited.port), timeout=30) for _ in range(8)]
        try:
            for sock in busy:
                sock.sendall(b"POST /invocations HTTP/1.1\r\n")  # a request begun, not finished
            time.sleep(0.2)  # the server reads the first bytes of each
            with socket.create_connection((limited.host, limited.port), timeout=30) as extra:
                extra.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = read_reply(extra)
            return reply if reply[0] == 503 else None
        finally:
            for sock in busy:
                sock.close()

    status, body = until(refused)
    assert "serves 8 connections at once (--max-connections), all in a request" in json.loads(body)["message"]
    until(lambda: get(f"{limited.url}/ping")[0] == 200)


def test_bad_endpoint_names_touch_nothing(tmp_path, mxnet_python):
    """A path-like name is refused with the rule (exit 2) before anything on disk changes: not the folder it names,
    not one outside the endpoints' state area."""
    home = tmp_path / "home"
    victim = tmp_path / "victim"
    (victim / "models").mkdir(parents=True)
    (victim / "models" / "keep").touch()
    env = {**os.environ, "TAGFLOW_HOME": str(home)}
    for args in (
        ["serve", "start", "--name", str(victim)],
        ["serve", "start", "--name", "../../evil"],
        ["serve", "stop", "--name", str(victim)],
        ["serve", "stop", "--name", "../../evil"],
        ["serve", "status", "--name", "../../evil"],
        ["serve", "swap", "x.tar.gz", "--name", "../../evil"],
    ):
        done = subprocess.run(
            [str(Path(sys.executable).parent / "tagflow"), *args],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "expected 1-63 letters, digits and inner hyphens" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert sorted(p.name for p in victim.rglob("*")) == ["keep", "models"]
    assert not (tmp_path / "evil").exists() and not home.exists()
    with pytest.raises(InputError, match=r"endpoint name 'a/b': expected 1-63"):
        endpoint.start(name="a/b", state_dir=tmp_path / "given", mxnet_python=mxnet_python)
    assert not (tmp_path / "given").exists()


def test_the_server_checks_names_by_the_same_rule_as_tagflow(mxnet_python):
    """ic_serve.py runs where tagflow cannot be imported, so it keeps a copy of tagflow.names' rule: the same text,
    and the same verdict on names at the edges."""
    from tagflow import names

    tree = ast.parse(endpoint.SERVER.read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
    assert ast.literal_eval(found["NAME_RULE"]) == names.ENDPOINT_NAME_RULE
    server_pattern = re.compile(ast.literal_eval(found["ENDPOINT_NAME"].args[0]))
    samples = ["a", "a-b", "a--b", "-a", "a-", "a" * 63, "a" * 64, "a_b", "a.b", "a/b", "..", "A9", "é", ""]
    for name in samples:
        assert bool(server_pattern.fullmatch(name)) == bool(re.fullmatch(names.ENDPOINT_NAME_PATTERN, name)), name


def test_state_files_are_the_users_only(served):
    """Everything an endpoint writes (token, log, pid, the model it extracted from a local archive) is 0600/0700.
    (The S3 server's files: tests/test_s3server.py.)"""
    root = Path(served.state_dir)
    entries = [root, *root.rglob("*")]
    assert {p.name for p in entries} >= {"admin-token", "endpoint.log", "endpoint.json", "models", "incoming"}
    assert any(p.name.endswith(".params") for p in entries)
    modes = {p: p.stat().st_mode & 0o777 for p in entries if not p.is_symlink()}
    exposed = [f"{p} {mode:o}" for p, mode in modes.items() if mode & 0o077]
    assert exposed == [], exposed


@pytest.fixture(scope="module")
def served_module(models, tmp_path_factory, mxnet_python):
    state = tmp_path_factory.mktemp("property") / "endpoint"
    info = endpoint.start(models[0], name="prop", state_dir=state, mxnet_python=mxnet_python)
    try:
        yield info
    finally:
        endpoint.stop(state)


def _png_header(width: int, height: int, tail: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return b"\x89PNG\r\n\x1a\n" + ihdr + tail


BODIES = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda tail: render(3)[0][:64] + tail, st.binary(max_size=512)),  # a JPEG's start, then noise
    st.builds(
        _png_header, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.binary(max_size=256)
    ),  # any size a PNG header can claim
    st.builds(lambda cut: render(5)[0][:cut], st.integers(0, 4000)),  # truncated JPEGs
)
CONTENT_TYPES = st.sampled_from(
    ["image/jpeg", "image/png", "application/x-image", "image/PNG; charset=x", "text/csv", "", "application/json"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES, content_type=CONTENT_TYPES)
def test_any_body_gets_an_answer_and_the_server_keeps_serving(served_module, body, content_type):
    status, doc = post(served_module.invocations_url, body, content_type or None)
    assert 200 <= status < 300 or 400 <= status < 500, (status, doc)
    if status >= 400:
        assert isinstance(doc, dict) and isinstance(doc["message"], str) and doc["message"]
    else:
        assert isinstance(doc, list) and len(doc) == len(COLORS)
    assert get(f"{served_module.url}/ping")[0] == 200
