"""Serve one image-classification model over HTTP, like a SageMaker endpoint (runs in the MXNet algorithm environment).

    .venv-mxnet/bin/python algo/ic_serve.py --name NAME [--host 127.0.0.1] [--port 8080] [--work-dir DIR]

The server starts with no model; `POST /admin/load` gives it one (tagflow.local.endpoint.load does it). A model is a
model.tar.gz as ic_train.py (or SageMaker's built-in algorithm) writes it: `image-classification-symbol.json`,
`image-classification-NNNN.params` (the one metrics.json names as `params_file`, else the highest-numbered),
`model-shapes.json` (`[{"name": "data", "shape": [B, C, H, W]}]`) and, from the local trainer, `metrics.json`.

Routes (stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive):

- `GET /health`: 200 `{"name", "loaded", "source"}` as soon as the server listens, with or without a model.
- `GET /ping`: 200 once a model is loaded, 503 before (the container contract).
- `POST /invocations`: one image (`image/jpeg`, `image/png`, `application/x-image`) → JSON array of `num_classes`
  probabilities (sigmoid per label for multi-label models, softmax otherwise). 503 without a model, 415 for other
  content types, 413 over `--max-bytes` (default 6 MB, SageMaker's payload limit), 400 for empty or undecodable
  bodies; errors are JSON `{"message": ...}` and never stop the server.
- `POST /endpoints/NAME/invocations`: the SageMaker Runtime InvokeEndpoint route (what botocore's
  `sagemaker-runtime` client sends), answering with its response headers (`x-Amzn-Invoked-Production-Variant`).
  Errors come back as InvokeEndpoint's: `ModelError` (424) carrying `OriginalStatusCode` and `OriginalMessage` for
  what the container rejects, `ModelNotReadyException` (429) while no model is loaded, `ValidationError` (400) for
  an unknown endpoint name. SigV4 signatures are not checked.
- `GET /metadata`: model folder, source, load time, shape, and metrics.json (a deploy gate reads the objective
  here); 503 without a model.
- `POST /admin/load` `{"model_url": URL, "source": "s3://…", "name": NAME}`: fetch a model.tar.gz from URL (http(s),
  e.g. an S3 presigned GET; or file:// for an archive on this machine, from loopback clients only), extract it into
  a new folder under `--work-dir`, load and warm it completely, then swap one reference: requests already running
  finish on the old model, none is dropped, and the old model's folder is deleted. `source` is what /health and
  /metadata report (default: the URL without its query); `name`, when given, is the endpoint's name from then on.
  Any failure answers JSON `{"message": ...}` (400 bad request, 403 not authorized, 413 too large, 422 not a
  model, 502/504 the download failed) and the old model keeps serving. One load runs at a time.

Admin authorization: when the environment has TAGFLOW_ENDPOINT_TOKEN, every /admin/load must carry
`Authorization: Bearer <that token>` (compared in constant time), loopback clients included; without a token,
only loopback clients may load. Reads (/health, /ping, /metadata, invocations) are open, as on a container.

Preprocessing matches what the trainer's ImageRecordIter feeds the net: decode with OpenCV (3 channels, or 1 when the
model's image_shape has 1), resize the shorter side to the `resize` hyperparameter (or to max(H, W) when unset),
centre-crop H x W, BGR → RGB, float32 NCHW raw 0-255 pixels (no mean/std: the net's first layer `bn_data`
normalises). MXNet executors are not thread-safe: a model binds `--workers` executors (default 1) and each runs
one forward at a time, taken from an idle queue, while decoding happens in the request threads in parallel.
"""

from __future__ import annotations

import argparse
import gzip
import hmac
import ipaddress
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

log = logging.getLogger("ic-serve")

MODEL_PREFIX = "image-classification"
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "application/x-image"})
DEFAULT_MAX_BYTES = 6 * 1024 * 1024
DRAIN_LIMIT = 64 * 1024 * 1024  # beyond this an oversized body is not read before answering 413 (connection closes)
VARIANT = "AllTraffic"
ACCOUNT = "000000000000"
NO_MODEL = "no model is loaded yet"
MODEL_MEMBERS = (f"{MODEL_PREFIX}-symbol.json", "model-shapes.json")
MAX_ARCHIVE_BYTES = 2 * 1024**3  # a model.tar.gz larger than this is refused (413) before or while downloading
MAX_EXTRACTED_BYTES = 4 * 1024**3  # and so is one whose members add up to more (a gzip bomb)
DOWNLOAD_SOCKET_TIMEOUT_S = 60  # no byte from the model's server for this long fails the load
DOWNLOAD_DEADLINE_S = 1200  # nor may the whole download take longer
TOKEN_ENV = "TAGFLOW_ENDPOINT_TOKEN"
MIN_TOKEN_CHARS = 16
# SageMaker's endpoint-name rule: what InvokeEndpoint accepts in its path.
ENDPOINT_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
NAME_RULE = "expected 1-63 letters, digits and inner hyphens (a SageMaker endpoint name)"


class RequestError(Exception):
    """A request the server rejects with `status` and a message saying what was expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """True for a client address on this machine's loopback (127.0.0.0/8, ::1, and IPv4-mapped 127.x)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def shown_url(url: str) -> str:
    """`url` without its query: a presigned URL's signature is a credential, never logged or echoed."""
    parts = urlsplit(url)
    return parts._replace(query="", fragment="").geturl()


def _upstream_message(body: bytes) -> str:
    """The gist of an error body from the model's server: S3's <Code> and <Message>, else its first 300 chars."""
    text = body.decode("utf-8", errors="replace")
    found = {tag: re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S) for tag in ("Code", "Message")}
    if found["Code"]:
        return " ".join(m[1].strip() for m in found.values() if m)
    return text.strip()[:300] or "(empty body)"


def download(url: str, dest: Path, limit: int = MAX_ARCHIVE_BYTES) -> int:
    """Stream `url` into `dest`; RequestError 413 over `limit` bytes, 502 when the transfer fails, 504 past the
    deadline. Returns the byte count."""
    shown = shown_url(url)
    started = time.monotonic()
    try:
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_SOCKET_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        message = _upstream_message(err.read(4096))
        raise RequestError(HTTPStatus.BAD_GATEWAY, f"GET {shown} answered HTTP {err.code}: {message}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RequestError(HTTPStatus.BAD_GATEWAY, f"GET {shown} failed: {reason}") from None
    with response, dest.open("wb") as out:
        declared = response.headers.get("Content-Length")
        expected = int(declared) if declared and declared.isdigit() else None
        if expected is not None and expected > limit:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{shown} has {expected} bytes; the limit is {limit}"
            )
        total = 0
        try:
            while chunk := response.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{shown} is over the {limit}-byte limit")
                if time.monotonic() - started > DOWNLOAD_DEADLINE_S:
                    raise RequestError(
                        HTTPStatus.GATEWAY_TIMEOUT, f"GET {shown} took over {DOWNLOAD_DEADLINE_S}s ({total} bytes)"
                    )
                out.write(chunk)
        except OSError as err:  # a socket timeout or a reset mid-body
            raise RequestError(HTTPStatus.BAD_GATEWAY, f"GET {shown} failed after {total} bytes: {err}") from None
    if expected is not None and total != expected:
        raise RequestError(HTTPStatus.BAD_GATEWAY, f"GET {shown} ended after {total} of {expected} bytes")
    return total


def extract(archive: Path, dest: Path, source: str, limit: int = MAX_EXTRACTED_BYTES) -> None:
    """Unpack a model.tar.gz into `dest` (tarfile's "data" filter: no absolute paths, links out or devices) and
    check it holds an image-classification model; RequestError 422 (or 413 over `limit` bytes) otherwise."""
    total = 0
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                total += member.size
                if total > limit:
                    raise RequestError(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{source}: the archive unpacks to over {limit} bytes"
                    )
                tar.extract(member, dest, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if reason.endswith("opened successfully:"):  # tarfile tried every compression it knows
            reason = "no tar archive, compressed or not"
        message = f"{source}: not a readable model.tar.gz ({reason})"
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, message) from None
    missing = [m for m in MODEL_MEMBERS if not (dest / m).is_file()]
    if missing or not any(dest.glob(f"{MODEL_PREFIX}-*.params")):
        raise RequestError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            f"{source}: not an image-classification model; it lacks "
            f"{', '.join(missing) or f'{MODEL_PREFIX}-NNNN.params'}",
        )


def admin_refusal(token: str | None, client: str, authorization: str) -> str | None:
    """Why a client at address `client`, sending this Authorization header, may not load models into a server whose
    admin token is `token`; None if it may."""
    if token is None:
        if is_loopback(client):
            return None
        return (
            f"/admin/load accepts loopback clients only: this server has no admin token (start it with "
            f"{TOKEN_ENV} set, then send `Authorization: Bearer <token>`)"
        )
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return f"/admin/load needs the header `Authorization: Bearer <token>` with this server's {TOKEN_ENV}"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return f"/admin/load: the bearer token is not this server's {TOKEN_ENV}"
    return None


def _params_file(model_dir: Path, metrics: dict) -> Path:
    named = metrics.get("params_file")
    if named:
        path = model_dir / named
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir / 'metrics.json'} names params_file {named!r}, which is missing")
        return path
    found = sorted(model_dir.glob(f"{MODEL_PREFIX}-[0-9][0-9][0-9][0-9].params"))
    if not found:
        raise FileNotFoundError(f"{model_dir}: no {MODEL_PREFIX}-NNNN.params file")
    return found[-1]


class Model:
    """One loaded network: an executor bound for a single image, plus what /metadata reports about it."""

    def __init__(self, model_dir: Path, source: str | None = None, workers: int = 1) -> None:
        import mxnet as mx

        self.model_dir = model_dir.resolve()
        self.source = source or str(self.model_dir)
        metrics_path = model_dir / "metrics.json"
        self.metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        shapes = json.loads((model_dir / "model-shapes.json").read_text())
        data = next((s for s in shapes if s.get("name") == "data"), None)
        if data is None or len(data.get("shape", [])) != 4:
            raise ValueError(f"{model_dir / 'model-shapes.json'}: expected a 'data' entry with shape [B, C, H, W]")
        self.channels, self.height, self.width = (int(v) for v in data["shape"][1:])
        resize = (self.metrics.get("hyperparameters") or {}).get("resize")
        self.resize = int(resize) if resize else max(self.height, self.width)
        self.params_file = _params_file(model_dir, self.metrics)
        symbol = mx.sym.load(str(model_dir / f"{MODEL_PREFIX}-symbol.json"))
        loaded = mx.nd.load(str(self.params_file))
        args = {k[4:]: v for k, v in loaded.items() if k.startswith("arg:")}
        auxs = {k[4:]: v for k, v in loaded.items() if k.startswith("aux:")}
        shape = (1, self.channels, self.height, self.width)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()  # executors not running a forward right now
        for _ in range(max(1, workers)):
            executor = symbol.simple_bind(mx.cpu(), grad_req="null", data=shape)
            executor.copy_params_from(args, auxs, allow_extra_params=True)
            self._idle.put(executor)
        missing = [n for n in symbol.list_arguments() if n not in args and n not in ("data", "softmax_label")]
        if missing:
            raise ValueError(f"{self.params_file}: no values for {', '.join(missing[:5])}")
        self.num_classes = int(executor.outputs[0].shape[1])
        self.workers = max(1, workers)
        self.loaded_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.predict(np.zeros((self.channels, self.height, self.width), np.float32))  # warm up before serving

    def preprocess(self, body: bytes) -> np.ndarray:
        """Image bytes → (C, H, W) float32 RGB pixels, as the trainer's record iterator produces them."""
        flag = cv2.IMREAD_GRAYSCALE if self.channels == 1 else cv2.IMREAD_COLOR
        img = cv2.imdecode(np.frombuffer(body, np.uint8), flag)
        if img is None or img.size == 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not a decodable JPEG or PNG image")
        h, w = img.shape[:2]
        scale = self.resize / min(h, w)
        if scale != 1.0:
            size = (max(self.width, round(w * scale)), max(self.height, round(h * scale)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        h, w = img.shape[:2]
        top, left = (h - self.height) // 2, (w - self.width) // 2
        img = img[top : top + self.height, left : left + self.width]
        if self.channels == 1:
            return img[None].astype(np.float32)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1).astype(np.float32)

    def predict(self, chw: np.ndarray) -> list[float]:
        executor = self._idle.get()  # blocks while every executor is busy: one forward per executor at a time
        try:
            executor.arg_dict["data"][:] = chw[None]
            executor.forward(is_train=False)
            return executor.outputs[0].asnumpy()[0].astype(float).tolist()
        finally:
            self._idle.put(executor)

    def describe(self) -> dict:
        return {
            "model_dir": str(self.model_dir),
            "source": self.source,
            "params_file": self.params_file.name,
            "loaded_at": self.loaded_at,
            "num_classes": self.num_classes,
            "image_shape": [self.channels, self.height, self.width],
            "multi_label": bool(self.metrics.get("multi_label", False)),
            "metrics": self.metrics,
        }


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], name: str, max_bytes: int, workers: int, work_dir: Path, token: str | None
    ) -> None:
        super().__init__(address, Handler)
        self.endpoint_name = name
        self.max_bytes = max_bytes
        self.workers = workers
        self.work_dir = work_dir
        self.admin_token = token
        self.model: Model | None = None
        self.model_folder: Path | None = None  # where the current model was extracted (deleted when replaced)
        self.swap_lock = threading.Lock()  # one load at a time; serving never waits on it

    def load(self, url: str, source: str, name: str | None = None) -> Model:
        """Fetch, extract, load and warm the model at `url`, then serve it (as `name`, when given); RequestError
        says what went wrong, and the current model keeps serving."""
        with self.swap_lock:
            log.info("loading %s", source)
            folder = Path(tempfile.mkdtemp(prefix="model-", dir=self.work_dir))
            download_to = folder.with_name(f"{folder.name}.tar.gz")
            try:
                parts = urlsplit(url)
                if parts.scheme == "file":
                    archive = Path(unquote(parts.path))
                    if not archive.is_file():
                        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{archive}: no such file on the server")
                else:
                    size = download(url, download_to)
                    log.info("downloaded %s (%d bytes)", source, size)
                    archive = download_to
                extract(archive, folder, source)
                try:
                    model = Model(folder, source, self.workers)
                except Exception as err:
                    raise RequestError(
                        HTTPStatus.UNPROCESSABLE_ENTITY, f"{source}: cannot load the model: {type(err).__name__}: {err}"
                    ) from err
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            finally:
                download_to.unlink(missing_ok=True)
            previous, previous_folder = self.model, self.model_folder
            self.model, self.model_folder = model, folder
            if name:
                self.endpoint_name = name
        log.info(
            "endpoint %s serves %s (%s, %d classes)%s", self.endpoint_name, model.source, model.params_file.name,
            model.num_classes, f", replacing {previous.source}" if previous else "",
        )  # fmt: skip
        if previous_folder:  # the old model lives on in memory until its last request ends
            shutil.rmtree(previous_folder, ignore_errors=True)
        return model


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args) -> None:  # BaseHTTPRequestHandler's signature
        log.debug("%s %s", self.client_address[0], format % args)

    def setup(self) -> None:
        super().setup()
        # Small request/response pairs on keep-alive connections: without this, Nagle's algorithm and the client's
        # delayed ACK add ~40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, body: bytes, content_type: str = "application/json", headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n" + body)  # headers and body leave in one write (end_headers' job)
        self.flush_headers()

    def _json(self, status: int, doc: object, headers=None) -> None:
        self._send(status, json.dumps(doc).encode(), headers=headers)

    def _read_body(self) -> bytes:
        """The whole request body, or RequestError 411/413 (an oversized body is drained so the reply reaches)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length > self.server.max_bytes:
            if length <= DRAIN_LIMIT:
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    left -= len(chunk)
            else:
                self.close_connection = True
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body has {length} bytes; the limit is {self.server.max_bytes}",
            )
        return self.rfile.read(length) if length > 0 else b""

    def _invoke(self) -> list[float]:
        """Run one /invocations request against the current model; RequestError says what was wrong."""
        body = self._read_body()
        model = self.server.model  # one reference for the whole request: a swap now does not affect it
        if model is None:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, NO_MODEL)
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in IMAGE_TYPES:
            raise RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type {content_type or '(none)'!r} is not supported; expected one of "
                f"{', '.join(sorted(IMAGE_TYPES))}",
            )
        if not body:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is empty; expected one image")
        return model.predict(model.preprocess(body))

    def do_GET(self) -> None:
        model = self.server.model
        if self.path == "/ping":
            self._send(HTTPStatus.OK if model else HTTPStatus.SERVICE_UNAVAILABLE, b"")
        elif self.path == "/health":
            self._json(
                HTTPStatus.OK,
                {"name": self.server.endpoint_name, "loaded": model is not None, "source": model and model.source},
            )
        elif self.path == "/metadata":
            if model is None:
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"message": NO_MODEL})
            else:
                self._json(HTTPStatus.OK, {"name": self.server.endpoint_name, **model.describe()})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"message": f"no route GET {self.path}"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/invocations":
            self._container_invoke()
        elif path.startswith("/endpoints/") and path.endswith("/invocations"):
            self._runtime_invoke(path[len("/endpoints/") : -len("/invocations")])
        elif path == "/admin/load":
            self._admin_load()
        else:
            self.close_connection = True
            self._json(HTTPStatus.NOT_FOUND, {"message": f"no route POST {path}"})

    def _container_invoke(self) -> None:
        try:
            probs = self._invoke()
        except RequestError as err:
            log.info("invocation rejected (%d): %s", err.status, err)
            self._json(err.status, {"message": str(err)})
        except Exception as err:  # a bug or a model failure: answer 500 and keep serving
            log.exception("invocation failed")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"message": f"{type(err).__name__}: {err}"})
        else:
            self._json(HTTPStatus.OK, probs)

    def _aws_error(self, status: int, code: str, doc: dict) -> None:
        self._json(status, doc, {"x-amzn-ErrorType": code, "x-amzn-RequestId": _request_id()})

    def _runtime_invoke(self, name: str) -> None:
        name = unquote(name)
        if name != self.server.endpoint_name:
            self.close_connection = True
            arn = f"arn:aws:sagemaker:local:{ACCOUNT}:endpoint/{name.lower()}"
            self._aws_error(400, "ValidationError", {"message": f"Endpoint {name} of account {ACCOUNT} not found."})
            log.info("invocation for unknown endpoint %s (%s)", name, arn)
            return
        try:
            probs = self._invoke()
        except RequestError as err:
            log.info("invocation rejected (%d): %s", err.status, err)
            if err.status == HTTPStatus.SERVICE_UNAVAILABLE:  # no model yet: SageMaker's "model not ready"
                self._aws_error(HTTPStatus.TOO_MANY_REQUESTS, "ModelNotReadyException", {"message": str(err)})
                return
            original = json.dumps({"message": str(err)})
            message = f'Received client error ({err.status}) from primary with message "{original}".'
            self._aws_error(
                424, "ModelError",
                {"message": message, "OriginalStatusCode": int(err.status), "OriginalMessage": original},
            )  # fmt: skip
        except Exception as err:
            log.exception("invocation failed")
            self._aws_error(424, "ModelError", {"message": f"Received server error (500) from primary: {err}",
                                                "OriginalStatusCode": 500, "OriginalMessage": str(err)})  # fmt: skip
        else:
            self._send(
                HTTPStatus.OK, json.dumps(probs).encode(),
                headers={"x-Amzn-Invoked-Production-Variant": VARIANT, "x-amzn-RequestId": _request_id()},
            )  # fmt: skip

    def _admin_load(self) -> None:
        authorization = self.headers.get("Authorization", "")
        refusal = admin_refusal(self.server.admin_token, self.client_address[0], authorization)
        if refusal:
            self.close_connection = True
            log.warning("model load refused for %s: %s", self.client_address[0], refusal)
            self._json(HTTPStatus.FORBIDDEN, {"message": refusal})
            return
        expected = 'expected JSON {"model_url": "http(s)://…/model.tar.gz", "source": "s3://…", "name": NAME}'
        try:
            request = json.loads(self._read_body() or b"{}")
            if not isinstance(request, dict):
                raise TypeError(f"the body is a JSON {type(request).__name__}")
            url = request["model_url"]
            source, name = request.get("source"), request.get("name")
            if not isinstance(url, str) or not isinstance(source, str | None) or not isinstance(name, str | None):
                raise TypeError("model_url, source and name are strings")
        except (RequestError, ValueError, KeyError, TypeError) as err:
            self._json(HTTPStatus.BAD_REQUEST, {"message": f"{expected}: {type(err).__name__}: {err}"})
            return
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https", "file"):
            problem = HTTPStatus.BAD_REQUEST, f"model_url {shown_url(url)!r}: the scheme must be http, https or file"
        elif scheme == "file" and not is_loopback(self.client_address[0]):
            problem = HTTPStatus.FORBIDDEN, "a file:// model_url names a file on the server's machine: loopback only"
        elif name is not None and not ENDPOINT_NAME.fullmatch(name):
            problem = HTTPStatus.BAD_REQUEST, f"name {name!r}: {NAME_RULE}"
        else:
            problem = None
        if problem:
            self._json(problem[0], {"message": problem[1]})
            return
        try:
            model = self.server.load(url, source or shown_url(url), name)
        except RequestError as err:  # the old model keeps serving
            log.warning("load refused (%d): %s", err.status, err)
            self._json(err.status, {"message": str(err)})
            return
        except Exception as err:
            log.exception("loading %s failed", source or shown_url(url))
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"message": f"{type(err).__name__}: {err}"})
            return
        self._json(HTTPStatus.OK, {"name": self.server.endpoint_name, **model.describe()})


def _request_id() -> str:
    import uuid

    return str(uuid.uuid4())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the endpoint name answered at /endpoints/NAME/invocations")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--workers", type=int, default=1, help="executors running forwards in parallel")
    parser.add_argument(
        "--work-dir", type=Path, help="where downloaded models are extracted (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="[%(asctime)s %(levelname)s %(thread)d] %(message)s"
    )
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    if not ENDPOINT_NAME.fullmatch(args.name):
        problem = f"--name {args.name!r}: {NAME_RULE}"
    elif token is not None and len(token) < MIN_TOKEN_CHARS:
        problem = f"{TOKEN_ENV} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} (a random secret)"
    else:
        problem = None
    if problem:
        log.error("%s", problem)
        return 2
    own_work_dir = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="ic-serve-")) if own_work_dir else args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    server = Server((args.host, args.port), args.name, args.max_bytes, args.workers, work_dir, token)

    def on_term(signum, frame) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log.info(
        "endpoint %s listening on http://%s:%d with no model yet; model loads accepted %s",
        args.name, *server.server_address[:2],
        f"with the bearer token from {TOKEN_ENV}" if token else "from loopback clients",
    )  # fmt: skip
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif server.model_folder:
            shutil.rmtree(server.model_folder, ignore_errors=True)
    log.info("endpoint %s stopped", server.endpoint_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
