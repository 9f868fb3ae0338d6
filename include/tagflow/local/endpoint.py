"""A local SageMaker-like endpoint: one model served by algo/ic_serve.py in the algorithm environment, addressed by URL.

The server is a service: whoever holds its admin token can load a model into it from any machine (`load`: the
server downloads the model.tar.gz itself, from an S3 presigned GET URL on the S3 endpoint it was started for, or on
AWS S3); anyone who can reach its URL can read what it serves (`health`, `metadata`) and call it (`runtime_client`,
`invoke`). Every server has an admin token (TAGFLOW_ENDPOINT_TOKEN): `start` takes one or makes one
(`secrets.token_urlsafe`) and keeps it in STATE/admin-token (0600), where `load`, `swap` and `make up`/`make demo`
(the Airflow Variable `tagflow_endpoint_token`) find it.

`start(model_tar=None, name=...)` runs a server on this machine as its own process group under the MXNet interpreter
($TAGFLOW_MXNET_PYTHON, else <repo>/.venv-mxnet/bin/python), waits until `/health` answers and, given a model, loads
it. `stop` and `status` (and the CLI's `swap`) find that server again by its state folder:

    STATE/endpoint.pid    process id (the server leads its own process group)
    STATE/endpoint.json   its url, host and port (name and model are asked of the server: a load can change them)
    STATE/endpoint.log    server log
    STATE/admin-token     the admin token (mode 0600), kept across restarts like the S3 server's keys
    STATE/models/         the server's work folder: the extracted model it serves
    STATE/incoming/       the server's --model-root: a local model.tar.gz is copied here for the server to load,
                          then removed (the server loads local archives from this folder only)

A model's per-label thresholds travel with it: `load` looks for the evaluation recorded beside an s3:// model
(tagflow.thresholds.recorded: PREFIX/output/JOB/evaluation/evaluation.json, checked to describe this archive by its
sha256) and hands them to the server with the model, or the reason there are none. The loader does this, not the
server, because the loader holds the S3 credentials (the server only ever gets one presigned URL, for the model);
the server keeps them only if the archive it fetched has the sha256 they were chosen for. `/invocations` with
`Accept: application/json; verbose=true` then answers `{"labels": [...], "probabilities": [...]}`; `/metadata` says
which evaluation the thresholds came from (`thresholds`) or why there are none (`thresholds_problem`).

Every file under STATE is the user's only (0600, folders 0700). The name is checked (`tagflow.names`) before any of
it is touched. The server's limits (body bytes, image pixels, idle and read timeouts, connections) are `start`'s
keyword arguments, defaulting to the server's own (algo/ic_serve.py's docstring says which and why).

Clients: `boto3.client("sagemaker-runtime", endpoint_url=URL, ...).invoke_endpoint(EndpointName=NAME,
ContentType="image/jpeg", Body=...)`, or the container routes `POST URL/invocations` and `GET URL/ping`. The server
listens on loopback unless `host` says otherwise; it does not check SigV4 signatures.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tagflow import local, s3
from tagflow.errors import InputError, TagflowError, quote
from tagflow.local import process
from tagflow.names import check_endpoint_name

log = logging.getLogger(__name__)

REPO = local.REPO
SERVER = REPO / "algo" / "ic_serve.py"
TOKEN_ENV = "TAGFLOW_ENDPOINT_TOKEN"  # the server's admin token, read by the server from its environment
TOKEN_FILE = "admin-token"
MIN_TOKEN_CHARS = 16  # what the server accepts
START_TIMEOUT_S = 120
# The server downloads (up to 20 min), extracts, loads and warms the model before answering a load.
LOAD_TIMEOUT_S = 1800
PRESIGN_EXPIRES_S = 3600


@dataclass(frozen=True)
class EndpointInfo:
    """An endpoint server started on this machine: where it is, and what it served when asked."""

    pid: int
    name: str
    url: str
    host: str
    port: int
    model_source: str | None  # None while it has no model
    state_dir: str

    @property
    def invocations_url(self) -> str:
        return f"{self.url}/invocations"


def default_state_dir(name: str) -> Path:
    """$TAGFLOW_HOME/endpoints/NAME; InputError (with the rule) for a name that is no endpoint name, before any file
    is touched: a name is never a path."""
    return local.home() / "endpoints" / check_endpoint_name(name, "endpoint name")


def admin_token(state_dir: Path | str) -> str:
    """The admin token of the endpoint started for `state_dir` (STATE/admin-token); TagflowError when there is none."""
    path = Path(state_dir) / TOKEN_FILE
    try:
        return path.read_text().strip()
    except OSError as err:
        raise TagflowError(
            f"cannot read the endpoint's admin token {path}: {err.strerror}; start the endpoint first"
        ) from None


def _keep_token(state_dir: Path, token: str | None) -> str:
    """`token`, or the one kept in `state_dir`, or a new one; written to STATE/admin-token (0600) either way."""
    path = state_dir / TOKEN_FILE
    if token is None:
        try:
            token = path.read_text().strip() or None
        except FileNotFoundError:
            token = None
    token = token or secrets.token_urlsafe(32)
    if len(token) < MIN_TOKEN_CHARS:
        raise InputError(f"the endpoint's admin token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    tmp = path.with_name(f".{TOKEN_FILE}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(f"{token}\n")
    os.replace(tmp, path)
    return token


def _url(endpoint: str | EndpointInfo) -> str:
    return (endpoint.url if isinstance(endpoint, EndpointInfo) else endpoint).rstrip("/")


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _message(body: bytes) -> str:
    """The server's JSON `message`, else the body as text."""
    try:
        return str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip() or "(empty body)"


def health(url: str | EndpointInfo, timeout: float = 5.0) -> dict:
    """`GET /health`: `{"name", "loaded", "source"}`; TagflowError when the endpoint does not answer."""
    url = _url(url)
    try:
        code, body = _get(f"{url}/health", timeout)
    except OSError as err:
        raise TagflowError(f"endpoint at {url} does not answer /health: {getattr(err, 'reason', err)}") from None
    if code != 200:
        raise TagflowError(f"endpoint at {url}: /health answered HTTP {code}: {_message(body)}")
    return json.loads(body)


def metadata(url: str | EndpointInfo) -> dict | None:
    """What the endpoint reports about its model (`GET /metadata`: name, source, shapes, metrics.json), or None
    while it has no model."""
    url = _url(url)
    try:
        code, body = _get(f"{url}/metadata", timeout=10)
    except OSError as err:
        raise TagflowError(f"endpoint at {url} does not answer /metadata: {getattr(err, 'reason', err)}") from None
    if code == 503:
        return None
    if code != 200:
        raise TagflowError(f"endpoint at {url}: /metadata answered HTTP {code}: {_message(body)}")
    return json.loads(body)


def _model_url(model_uri: str, client: s3.S3Client | None, model_root: Path | None) -> tuple[str, Path | None]:
    """A URL the server can fetch `model_uri` from, and the local copy to remove once it has: an S3 presigned GET
    (SigV4), an http(s) URL as it is (the server accepts presigned S3 URLs only), or, for a path on this machine,
    a file:// URL of a copy under the server's `model_root` (the only folder it loads local archives from)."""
    if model_uri.startswith("s3://"):
        uri = s3.S3Uri.parse(model_uri)
        url = (client or s3.make_client()).generate_presigned_url(
            "get_object", Params={"Bucket": uri.bucket, "Key": uri.key}, ExpiresIn=PRESIGN_EXPIRES_S
        )
        if "X-Amz-Signature=" not in url:  # botocore presigns with SigV2 unless the client says s3v4
            raise TagflowError(
                "the S3 client presigns URLs with SigV2, which the S3 server refuses; make it with "
                "botocore Config(signature_version='s3v4') (tagflow.s3.make_client and aws_default do)"
            )
        return url, None
    if model_uri.startswith(("http://", "https://")):
        return model_uri, None
    path = Path(model_uri)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"model archive {quote(model_uri)} {what}; expected a model.tar.gz")
    if model_root is None:
        raise InputError(
            f"model archive {quote(model_uri)} is a local file: load it into an endpoint started on this machine "
            "(pass its EndpointInfo, from tagflow.local.endpoint.status), or upload it to S3 and load the s3:// URI"
        )
    with local.private_files():
        model_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        copy = model_root / f"{uuid.uuid4().hex}.tar.gz"
        try:
            shutil.copyfile(path, copy)
        except OSError as err:
            copy.unlink(missing_ok=True)
            raise InputError(f"cannot read model archive {quote(model_uri)}: {err.strerror}") from None
    return copy.as_uri(), copy


def load(
    endpoint: str | EndpointInfo,
    model_uri: str | Path,
    *,
    name: str | None = None,
    client: s3.S3Client | None = None,
    token: str | None = None,
) -> dict:
    """Have the endpoint (its URL, or an EndpointInfo for a server started on this machine) serve `model_uri` (an
    `s3://` URI, presigned with `client`; a local path, for an EndpointInfo; or an S3 presigned URL), renamed `name`
    when given. The server loads and warms the new model before switching, so no request is dropped; on any failure
    the old model keeps serving. `token` is the server's admin token, sent as a bearer token; by default, for an
    EndpointInfo, the one kept in its state folder. The thresholds recorded for the model go with it (module
    docstring); a model without them, or whose evaluation describes another archive, serves without, and the answer
    says why (`thresholds_problem`). Returns the server's /metadata for the new model.

    InputError when the archive is no model, the request is wrong or the token is refused (retrying cannot help);
    TagflowError for anything else (unreachable, download failed), naming the endpoint, the model and the reason."""
    url = _url(endpoint)
    state_dir = Path(endpoint.state_dir) if isinstance(endpoint, EndpointInfo) else None
    if token is None and state_dir is not None:
        token = admin_token(state_dir)
    if name is not None:
        check_endpoint_name(name, "endpoint name")
    model_uri = str(model_uri)
    # `source` is shown by /health and /metadata and logged: never a URL's query (a presigned URL's signature)
    source = model_uri.split("?", 1)[0] if model_uri.startswith(("http://", "https://")) else model_uri
    request = {"model_url": "", "source": source, "name": name, **_thresholds_of(source, client)}
    model_url, copy = _model_url(model_uri, client, state_dir and state_dir / "incoming")
    try:
        return _post_load(url, {**request, "model_url": model_url}, token)
    finally:
        if copy is not None:
            copy.unlink(missing_ok=True)


def _thresholds_of(model_uri: str, client: s3.S3Client | None) -> dict:
    """The load request's `thresholds` for `model_uri` (tagflow.thresholds.recorded), or its `thresholds_problem`:
    why there are none (no evaluation beside it, or one of another archive: the model still serves, without)."""
    from tagflow import thresholds

    try:
        return {"thresholds": thresholds.recorded(model_uri, client=client).to_dict()}
    except thresholds.NoEvaluation as err:
        log.info("%s", err)
        return {"thresholds_problem": str(err)}
    except InputError as err:  # another archive's evaluation, or one tagflow cannot read
        log.warning("%s: serving it without thresholds", err)
        return {"thresholds_problem": str(err)}


def _post_load(url: str, request: dict, token: str | None) -> dict:
    source = request["source"]
    if request["name"] is None:
        del request["name"]
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    post = urllib.request.Request(
        f"{url}/admin/load", data=json.dumps(request).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(post, timeout=LOAD_TIMEOUT_S) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        error = InputError if err.code in (400, 403, 413, 422) else TagflowError
        raise error(f"endpoint at {url} refused {source} (HTTP {err.code}): {_message(err.read())}") from None
    except OSError as err:
        raise TagflowError(
            f"endpoint at {url} did not answer the load of {source}: {getattr(err, 'reason', err)}"
        ) from None
    log.info("endpoint %s at %s now serves %s", answer["name"], url, source)
    return answer


def status(state_dir: Path) -> EndpointInfo | None:
    """The endpoint started for `state_dir`, or None if none runs (stale files are ignored). Its name and model are
    the server's answer to /health; TagflowError if the process runs but does not answer."""
    info_file, pid_file = state_dir / "endpoint.json", state_dir / "endpoint.pid"
    if not (info_file.exists() and pid_file.exists()):
        return None
    pid = process.read_pid(pid_file)
    if not process.pid_alive(pid):
        return None
    where = json.loads(info_file.read_text())
    now = health(where["url"])
    return EndpointInfo(
        pid=pid,
        name=now["name"],
        url=where["url"],
        host=where["host"],
        port=where["port"],
        model_source=now["source"],
        state_dir=str(state_dir.resolve()),
    )


def s3_endpoints_of(state_dir: Path) -> list[str]:
    """The S3 endpoints the endpoint started for `state_dir` accepts presigned model URLs from (AWS S3 aside)."""
    try:
        return list(json.loads((state_dir / "endpoint.json").read_text()).get("s3_endpoints", []))
    except (OSError, ValueError):
        return []


def _wait_listening(url: str, name: str, proc: subprocess.Popen, log_file: Path, log_start: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with log_file.open("rb") as fh:
                fh.seek(log_start)
                tail = fh.read().decode(errors="replace")[-2000:]
            raise TagflowError(f"endpoint {name} exited with status {proc.returncode}; end of {log_file}:\n{tail}")
        try:
            code, _ = _get(f"{url}/health")
            if code == 200:
                return
            last = f"HTTP {code}"
        except OSError as err:  # not listening yet
            last = err
        time.sleep(0.2)
    raise TagflowError(f"endpoint {name} did not answer /health within {START_TIMEOUT_S}s ({last}); see {log_file}")


def start(
    model_tar: Path | str | None = None,
    *,
    name: str,
    port: int | None = None,
    host: str = "127.0.0.1",
    state_dir: Path | None = None,
    workers: int = 1,
    mxnet_python: Path | None = None,
    client: s3.S3Client | None = None,
    token: str | None = None,
    s3_endpoints: Sequence[str] | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    idle_timeout: float | None = None,
    read_timeout: float | None = None,
    max_connections: int | None = None,
) -> EndpointInfo:
    """Run endpoint `name` on this machine (port None: a free one) and, given `model_tar`, load it (see `load`);
    returns the endpoint already running for `state_dir`, if any, unchanged. `token` becomes the server's admin
    token; None: the one kept in `state_dir`, else a new random one (see `admin_token`).

    `s3_endpoints` are the S3 endpoints (URLs) whose presigned URLs the server may fetch models from (AWS S3 always);
    default: `client`'s endpoint, else the environment's (tagflow.s3.endpoint_from_env). The limits (`max_bytes`,
    `max_pixels`, `idle_timeout`, `read_timeout` in seconds, `max_connections`) default to the server's own.

    `workers` executors run forwards in parallel, each with cores / workers OpenMP threads (unless OMP_NUM_THREADS
    is set): on a small CPU, 1 gives the lowest single-request latency, the core count the most requests/s.
    """
    from tagflow.local import mxnet_python as default_python

    check_endpoint_name(name, "endpoint name")
    state_dir = (state_dir or default_state_dir(name)).resolve()
    running = status(state_dir)
    if running:
        if running.name != name:
            raise InputError(f"{state_dir} already serves endpoint {running.name!r}, not {name!r}; stop it first")
        return running
    if s3_endpoints is None:
        configured = (client.meta.endpoint_url if client is not None else None) or s3.endpoint_from_env()
        s3_endpoints = [configured] if configured else []
    limits = {
        "--max-bytes": max_bytes, "--max-pixels": max_pixels, "--idle-timeout": idle_timeout,
        "--read-timeout": read_timeout, "--max-connections": max_connections,
    }  # fmt: skip
    with local.private_files():
        ours = (state_dir / "endpoint.json").is_file()  # a folder an earlier start made, not any folder given
        local.make_private_dir(state_dir)
        token = _keep_token(state_dir, token)
        if ours:  # what a server killed without its clean-up left behind
            shutil.rmtree(state_dir / "models", ignore_errors=True)
            shutil.rmtree(state_dir / "incoming", ignore_errors=True)
        port = port or process.free_ports(1, host)[0]
        python = mxnet_python or default_python()
        args = [
            str(python), str(SERVER), "--name", name, "--host", host, "--port", str(port), "--workers", str(workers),
            "--work-dir", str(state_dir / "models"), "--model-root", str(state_dir / "incoming"),
        ]  # fmt: skip
        for url in s3_endpoints:
            args += ["--s3-endpoint", url]
        for flag, value in limits.items():
            if value is not None:
                args += [flag, str(value)]
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        env[TOKEN_ENV] = token
        if workers > 1:
            env.setdefault("OMP_NUM_THREADS", str(max(1, local.usable_cores() // workers)))
        log_file = state_dir / "endpoint.log"
        with log_file.open("ab") as log_fh:
            log_start = log_fh.tell()  # the log grows across starts: errors quote this start's part only
            proc = subprocess.Popen(
                args, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, umask=local.PRIVATE_UMASK,
            )  # fmt: skip
        url_host = f"[{host}]" if ":" in host else host
        url = f"http://{url_host}:{port}"
        (state_dir / "endpoint.pid").write_text(f"{proc.pid}\n")
        tmp = state_dir / ".endpoint.json.part"
        tmp.write_text(json.dumps({"url": url, "host": host, "port": port, "s3_endpoints": s3_endpoints}, indent=2))
        os.replace(tmp, state_dir / "endpoint.json")
    info = EndpointInfo(
        pid=proc.pid, name=name, url=url, host=host, port=port, model_source=None, state_dir=str(state_dir)
    )
    try:
        _wait_listening(url, name, proc, log_file, log_start)
        if model_tar is not None:
            load(info, model_tar, client=client, token=token)
    except BaseException:
        stop(state_dir)
        raise
    info = replace(info, model_source=None if model_tar is None else str(model_tar))
    log.info("endpoint %s at %s (pid %d) serves %s", name, url, proc.pid, info.model_source or "no model yet")
    return info


def swap(
    state_dir: Path, model_tar: Path | str, client: s3.S3Client | None = None, token: str | None = None
) -> EndpointInfo:
    """Serve `model_tar` on the endpoint started for `state_dir` instead, without dropping requests (see `load`;
    `token` None: the one kept in `state_dir`)."""
    info = status(state_dir)
    if info is None:
        raise TagflowError(f"no endpoint runs for {state_dir}; start one first")
    answer = load(info, model_tar, client=client, token=token)
    return replace(info, name=answer["name"], model_source=answer["source"])


def stop(state_dir: Path, timeout: float = 20) -> bool:
    """Stop the endpoint for `state_dir` (its whole process group); True if one was running. The server's own work
    folders (models/, incoming/) go with it; the token and the log stay."""
    state_dir = state_dir.resolve()
    pid_file = state_dir / "endpoint.pid"
    if not (pid_file.exists() and (state_dir / "endpoint.json").is_file()):  # no endpoint's state folder
        return False
    was_running = process.stop_group(process.read_pid(pid_file), timeout)
    pid_file.unlink(missing_ok=True)
    shutil.rmtree(state_dir / "models", ignore_errors=True)
    shutil.rmtree(state_dir / "incoming", ignore_errors=True)
    return was_running


CONTENT_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png"}


def content_type_of(data: bytes) -> str:
    """The Content-Type the container contract expects for these image bytes (application/x-image otherwise)."""
    return next((ct for magic, ct in CONTENT_TYPES.items() if data.startswith(magic)), "application/x-image")


def runtime_client(url: str | EndpointInfo):
    """A boto3 sagemaker-runtime client for the endpoint at `url`: `invoke_endpoint` works as on SageMaker."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=_url(url),
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        aws_access_key_id="local",  # the local endpoint, like a container, does not check signatures
        aws_secret_access_key="local",
        config=Config(retries={"max_attempts": 2, "mode": "standard"}),
    )


def invoke(info: EndpointInfo, data: bytes, content_type: str | None = None) -> list[float]:
    """Class probabilities for one image, through boto3's sagemaker-runtime client as on SageMaker."""
    response = runtime_client(info).invoke_endpoint(
        EndpointName=info.name, ContentType=content_type or content_type_of(data), Body=data
    )
    return json.loads(response["Body"].read())
