"""The local endpoint: a model trained by algo/ic_train.py, served by algo/ic_serve.py, called by boto3.

The models are trained once per module (1 epoch, 48 generated 96-px images, ResNet-18): the real trainer's
model.tar.gz, not a hand-made checkpoint. Models reach the server as a worker on another machine would send them:
an S3 presigned URL from the real local S3 server, which the server downloads itself.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.config import Config
from PIL import Image, ImageDraw

from tagflow import s3
from tagflow.errors import InputError, TagflowError
from tagflow.local import endpoint
from tagflow.local.runner import TRAINER, _tar, write_config
from tagflow.recordio import RecordWriter
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
        folder = job / "input" / "data" / split
        folder.mkdir(parents=True)
        with RecordWriter(folder / f"{split}.rec", folder / f"{split}.idx") as writer:
            for i in ids:
                data, labels = render(i)
                writer.write_image(i, labels[:classes], data)
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


def post(url: str, body: bytes, content_type: str | None = "image/jpeg") -> tuple[int, object]:
    request = urllib.request.Request(url, data=body, method="POST")
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


class OversizedArchive(http.server.BaseHTTPRequestHandler):
    """An HTTP server whose every GET announces a 3 GiB body (and sends none): over the server's 2 GiB cap."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(3 * 1024**3))
        self.end_headers()

    def log_message(self, format: str, *args) -> None:
        pass


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
    big = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OversizedArchive)
    threading.Thread(target=big.serve_forever, daemon=True).start()
    cases = [
        (str(not_a_tar), InputError, r"HTTP 422\).*not a readable model\.tar\.gz"),
        (local_broken, InputError, r"HTTP 422\).*not a readable model\.tar\.gz"),
        (
            str(no_model),
            InputError,
            r"HTTP 422\).*not an image-classification model; it lacks image-classification-symbol",
        ),
        (f"s3://{bucket}/models/missing/model.tar.gz", TagflowError, r"HTTP 502\).*answered HTTP 404: NoSuchKey"),
        (f"http://127.0.0.1:{big.server_address[1]}/model.tar.gz", InputError, r"HTTP 413\).*3221225472 bytes"),
    ]
    try:
        for model, error, message in cases:
            with pytest.raises(error, match=message) as raised:
                endpoint.load(url, model, client=s3_client)
            assert f"endpoint at {url} refused {model}" in str(raised.value)
            assert "X-Amz-Signature" not in str(raised.value)  # a presigned URL is a credential: never echoed
    finally:
        big.shutdown()
        big.server_close()
    with pytest.raises(InputError, match=r"HTTP 400\).*name 'not_valid'"):
        endpoint.load(url, models[1], name="not_valid")
    status, doc = post(f"{url}/admin/load", json.dumps({"model_url": "ftp://host/model.tar.gz"}).encode(), None)
    assert status == 400 and "http, https or file" in doc["message"]

    assert endpoint.health(url) == {"name": "tiny", "loaded": True, "source": str(models[0])}
    status, probs = post(served.invocations_url, render(5)[0])
    assert status == 200 and len(probs) == len(COLORS)
    meta = endpoint.metadata(url)
    assert list((Path(served.state_dir) / "models").iterdir()) == [Path(meta["model_dir"])]
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
        info = endpoint.start(name="fresh", state_dir=state, mxnet_python=mxnet_python)
    try:
        answer = endpoint.load(info.url, str(first), client=s3_client)
        assert answer["name"] == "fresh" and answer["source"] == str(first) and answer["num_classes"] == len(COLORS)
        image, _ = render(11)
        runtime = endpoint.runtime_client(info.url)
        probs = json.loads(
            runtime.invoke_endpoint(EndpointName="fresh", ContentType="image/jpeg", Body=image)["Body"].read()
        )
        assert len(probs) == len(COLORS)

        answer = endpoint.load(info.url, str(second), name="renamed", client=s3_client)
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


def test_with_a_token_every_model_load_must_send_it(models, tmp_path, mxnet_python):
    """Started with a token, the server refuses loads without it, or with another, even from loopback."""
    state = tmp_path / "endpoint"
    info = endpoint.start(name="guarded", state_dir=state, mxnet_python=mxnet_python, token=TOKEN)
    try:
        refused = [
            (None, "needs the header `Authorization: Bearer <token>`"),
            (TOKEN[:-1] + "8", "the bearer token is not this server's TAGFLOW_ENDPOINT_TOKEN"),
        ]
        for token, reason in refused:
            with pytest.raises(InputError, match=r"HTTP 403\).*" + re.escape(reason)):  # a retry cannot fix it
                endpoint.load(info.url, models[0], token=token)
        assert endpoint.health(info.url)["loaded"] is False
        answer = endpoint.load(info.url, models[0], token=TOKEN)
        assert answer["source"] == str(models[0])
        assert post(info.invocations_url, render(4)[0])[0] == 200
        assert endpoint.swap(state, models[1], token=TOKEN).model_source == str(models[1])
    finally:
        endpoint.stop(state)
    log = (state / "endpoint.log").read_text()
    assert "model loads accepted with the bearer token" in log and TOKEN not in log


ADMIN_POLICY = """
import json, sys
sys.path.insert(0, sys.argv[1])
from ic_serve import admin_refusal
cases = json.loads(sys.argv[2])
print(json.dumps([admin_refusal(*case) for case in cases]))
"""


def test_admin_policy_for_remote_clients(mxnet_python):
    """The server's rule for clients on other machines, which no test here can be: without a token they are refused;
    with one, they need it. (Loopback cases run for real above.)"""
    cases = [
        (None, "10.1.2.3", ""),
        (None, "10.1.2.3", f"Bearer {TOKEN}"),
        (None, "127.0.0.5", ""),
        (None, "::ffff:127.0.0.1", ""),
        (None, "::1", ""),
        (TOKEN, "10.1.2.3", ""),
        (TOKEN, "10.1.2.3", "Basic dXNlcjpwYXNz"),
        (TOKEN, "10.1.2.3", "Bearer wrong"),
        (TOKEN, "10.1.2.3", f"Bearer {TOKEN}"),
        (TOKEN, "fe80::1%eth0", f"bearer {TOKEN}"),
    ]
    done = subprocess.run(
        [str(mxnet_python), "-c", ADMIN_POLICY, str(endpoint.SERVER.parent), json.dumps(cases)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    refusals = json.loads(done.stdout)
    loopback_only = "accepts loopback clients only"
    assert [r and r.split(":")[0] for r in refusals] == [
        f"/admin/load {loopback_only}",
        f"/admin/load {loopback_only}",
        None,
        None,
        None,
        "/admin/load needs the header `Authorization",
        "/admin/load needs the header `Authorization",
        "/admin/load",
        None,
        None,
    ]
    assert "the bearer token is not this server's" in refusals[7]


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
