"""A local SageMaker-like endpoint: one model served by algo/ic_serve.py in the algorithm environment.

`start(model_tar, name=...)` fetches a model.tar.gz (a local path or an `s3://` URI), extracts it, starts the server
as its own process group under the MXNet interpreter ($TAGFLOW_MXNET_PYTHON, else <repo>/.venv-mxnet/bin/python)
and waits until `/ping` answers. `stop`, `status` and `swap` find it again by its state folder:

    STATE/endpoint.pid    process id (the server leads its own process group)
    STATE/endpoint.json   name, url, port and the model being served (EndpointInfo)
    STATE/endpoint.log    server log
    STATE/models/N/       the extracted model(s); older ones are removed after a swap

Clients: `boto3.client("sagemaker-runtime", endpoint_url=info.url, ...).invoke_endpoint(EndpointName=info.name,
ContentType="image/jpeg", Body=...)`, or the container routes `POST info.url/invocations` and `GET /ping`. The
server listens on loopback unless `host` says otherwise; it does not check SigV4 signatures.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tagflow import s3
from tagflow.errors import InputError, TagflowError
from tagflow.local import process

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
SERVER = REPO / "algo" / "ic_serve.py"
START_TIMEOUT_S = 120
SWAP_TIMEOUT_S = 300
MODEL_MEMBERS = ("image-classification-symbol.json", "model-shapes.json")


@dataclass(frozen=True)
class EndpointInfo:
    """What a client needs to reach a running endpoint, and what it serves."""

    pid: int
    name: str
    url: str
    host: str
    port: int
    model_source: str
    model_dir: str
    state_dir: str

    @property
    def invocations_url(self) -> str:
        return f"{self.url}/invocations"


def default_state_dir(name: str) -> Path:
    return Path(os.environ.get("TAGFLOW_HOME", ".tagflow")).resolve() / "endpoints" / name


def _next_model_dir(state_dir: Path) -> Path:
    models = state_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name) for p in models.iterdir() if p.name.isdigit()]
    return models / str(max(numbers, default=0) + 1)


def fetch_model(model_tar: Path | str, dest: Path, client: s3.S3Client | None = None) -> Path:
    """Extract `model_tar` (a path or an s3:// URI to a model.tar.gz) into `dest`; InputError if it is no model."""
    source = str(model_tar)
    dest.mkdir(parents=True, exist_ok=False)
    try:
        if source.startswith("s3://"):
            archive = dest / "model.tar.gz"
            s3.get_file(client or s3.make_client(), s3.S3Uri.parse(source), archive)
        else:
            archive = Path(source)
            if not archive.is_file():
                raise InputError(f"model archive {archive} does not exist; expected a model.tar.gz")
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")  # refuses absolute paths, links out and devices
        except tarfile.TarError as err:
            raise InputError(f"{source}: not a readable model.tar.gz ({err})") from None
        if source.startswith("s3://"):
            archive.unlink()
        missing = [m for m in MODEL_MEMBERS if not (dest / m).is_file()]
        if missing or not any(dest.glob("image-classification-*.params")):
            raise InputError(
                f"{source}: not an image-classification model; it lacks "
                f"{', '.join(missing) or 'image-classification-NNNN.params'}"
            )
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def status(state_dir: Path) -> EndpointInfo | None:
    """The endpoint running for `state_dir`, or None if none runs (stale files are ignored)."""
    info_file, pid_file = state_dir / "endpoint.json", state_dir / "endpoint.pid"
    if not (info_file.exists() and pid_file.exists()):
        return None
    if not process.pid_alive(process.read_pid(pid_file)):
        return None
    return EndpointInfo(**json.loads(info_file.read_text()))


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _wait_ready(info: EndpointInfo, proc: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise TagflowError(f"endpoint {info.name} exited with status {proc.returncode}; end of {log_file}:\n{tail}")
        try:
            code, _ = _get(f"{info.url}/ping")
            if code == 200:
                return
            last = f"HTTP {code}"
        except OSError as err:  # not listening yet
            last = err
        time.sleep(0.2)
    raise TagflowError(f"endpoint {info.name} did not answer /ping within {START_TIMEOUT_S}s ({last}); see {log_file}")


def _write_info(info: EndpointInfo) -> None:
    state_dir = Path(info.state_dir)
    tmp = state_dir / ".endpoint.json.part"
    tmp.write_text(json.dumps(asdict(info), indent=2))
    os.replace(tmp, state_dir / "endpoint.json")


def start(
    model_tar: Path | str,
    *,
    name: str,
    port: int | None = None,
    host: str = "127.0.0.1",
    state_dir: Path | None = None,
    workers: int = 1,
    mxnet_python: Path | None = None,
    client: s3.S3Client | None = None,
) -> EndpointInfo:
    """Serve `model_tar` as endpoint `name` (port None: a free one); returns the one already running there, if any.

    `workers` executors run forwards in parallel, each with cores / workers OpenMP threads (unless OMP_NUM_THREADS
    is set): on a small CPU, 1 gives the lowest single-request latency, the core count the most requests/s.
    """
    from tagflow.pack import mxnet_python as default_python

    state_dir = (state_dir or default_state_dir(name)).resolve()
    running = status(state_dir)
    if running:
        if running.name != name:
            raise InputError(f"{state_dir} already serves endpoint {running.name!r}, not {name!r}; stop it first")
        return running
    state_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(state_dir / "models", ignore_errors=True)
    model_dir = fetch_model(model_tar, _next_model_dir(state_dir), client)
    port = port or process.free_ports(1, host)[0]
    python = mxnet_python or default_python()
    args = [
        str(python), str(SERVER), "--model-dir", str(model_dir), "--source", str(model_tar),
        "--name", name, "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    env = dict(os.environ)
    if workers > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
    log_file = state_dir / "endpoint.log"
    with log_file.open("ab") as log_fh:
        proc = subprocess.Popen(
            args, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    url_host = f"[{host}]" if ":" in host else host
    info = EndpointInfo(
        pid=proc.pid,
        name=name,
        url=f"http://{url_host}:{port}",
        host=host,
        port=port,
        model_source=str(model_tar),
        model_dir=str(model_dir),
        state_dir=str(state_dir),
    )
    (state_dir / "endpoint.pid").write_text(f"{proc.pid}\n")
    _write_info(info)
    try:
        _wait_ready(info, proc, log_file)
    except BaseException:
        stop(state_dir)
        raise
    log.info("endpoint %s serves %s at %s (pid %d)", name, model_tar, info.url, proc.pid)
    return info


def swap(state_dir: Path, model_tar: Path | str, client: s3.S3Client | None = None) -> EndpointInfo:
    """Serve `model_tar` instead, without dropping requests: the server loads it fully, then switches."""
    state_dir = state_dir.resolve()
    info = status(state_dir)
    if info is None:
        raise TagflowError(f"no endpoint runs for {state_dir}; start one first")
    model_dir = fetch_model(model_tar, _next_model_dir(state_dir), client)
    body = json.dumps({"model_dir": str(model_dir), "source": str(model_tar)}).encode()
    request = urllib.request.Request(
        f"{info.url}/admin/load", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=SWAP_TIMEOUT_S) as resp:
            resp.read()
    except urllib.error.HTTPError as err:
        shutil.rmtree(model_dir, ignore_errors=True)
        message = err.read().decode(errors="replace")
        raise TagflowError(f"endpoint {info.name} refused {model_tar} (HTTP {err.code}): {message}") from None
    new = replace(info, model_source=str(model_tar), model_dir=str(model_dir))
    _write_info(new)
    for old in (state_dir / "models").iterdir():
        if old != model_dir:
            shutil.rmtree(old, ignore_errors=True)  # the server holds the old model in memory, not on disk
    log.info("endpoint %s now serves %s", info.name, model_tar)
    return new


def stop(state_dir: Path, timeout: float = 20) -> bool:
    """Stop the endpoint for `state_dir` (its whole process group); True if one was running."""
    state_dir = state_dir.resolve()
    pid_file = state_dir / "endpoint.pid"
    if not pid_file.exists():
        return False
    was_running = process.stop_group(process.read_pid(pid_file), timeout)
    pid_file.unlink(missing_ok=True)
    shutil.rmtree(state_dir / "models", ignore_errors=True)
    return was_running


CONTENT_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png"}


def content_type_of(data: bytes) -> str:
    """The Content-Type the container contract expects for these image bytes (application/x-image otherwise)."""
    return next((ct for magic, ct in CONTENT_TYPES.items() if data.startswith(magic)), "application/x-image")


def runtime_client(info: EndpointInfo):
    """A boto3 sagemaker-runtime client for the local endpoint: `invoke_endpoint` works as on SageMaker."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=info.url,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        aws_access_key_id="local",  # the local endpoint, like a container, does not check signatures
        aws_secret_access_key="local",
        config=Config(retries={"max_attempts": 2, "mode": "standard"}),
    )


def metadata(info: EndpointInfo) -> dict:
    """What the endpoint reports about its model (`GET /metadata`: source, shapes, metrics.json)."""
    code, body = _get(f"{info.url}/metadata", timeout=10)
    if code != 200:
        raise TagflowError(f"endpoint {info.name} at {info.url}: /metadata answered HTTP {code}")
    return json.loads(body)


def invoke(info: EndpointInfo, data: bytes, content_type: str | None = None) -> list[float]:
    """Class probabilities for one image, through boto3's sagemaker-runtime client as on SageMaker."""
    response = runtime_client(info).invoke_endpoint(
        EndpointName=info.name, ContentType=content_type or content_type_of(data), Body=data
    )
    return json.loads(response["Body"].read())
