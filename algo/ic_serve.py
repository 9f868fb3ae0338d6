"""Serve one image-classification model over HTTP, like a SageMaker endpoint (runs in the MXNet algorithm environment).

    .venv-mxnet/bin/python algo/ic_serve.py --model-dir DIR --name NAME [--host 127.0.0.1] [--port 0]

DIR is an extracted model.tar.gz as ic_train.py (or SageMaker's built-in algorithm) writes it:
`image-classification-symbol.json`, `image-classification-NNNN.params` (the one metrics.json names as
`params_file`, else the highest-numbered), `model-shapes.json` (`[{"name": "data", "shape": [B, C, H, W]}]`) and,
from the local trainer, `metrics.json`.

Routes (stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive):

- `GET /ping`: 200 once a model is loaded, 503 before (the container contract).
- `POST /invocations`: one image (`image/jpeg`, `image/png`, `application/x-image`) → JSON array of `num_classes`
  probabilities (sigmoid per label for multi-label models, softmax otherwise). 415 for other content types, 413 over
  `--max-bytes` (default 6 MB, SageMaker's payload limit), 400 for empty or undecodable bodies; errors are JSON
  `{"message": ...}` and never stop the server.
- `POST /endpoints/NAME/invocations`: the SageMaker Runtime InvokeEndpoint route (what botocore's
  `sagemaker-runtime` client sends), answering with its response headers (`x-Amzn-Invoked-Production-Variant`).
  Container errors come back as InvokeEndpoint does it: `ModelError` (424) carrying `OriginalStatusCode` and
  `OriginalMessage`; an unknown endpoint name is a `ValidationError` (400). SigV4 signatures are not checked.
- `GET /metadata`: model folder, source, load time, shape, and metrics.json (a deploy gate reads the objective here).
- `POST /admin/load` `{"model_dir": ..., "source": ...}` (loopback clients only): loads and warms the new model
  completely, then swaps one reference; requests already running finish on the old model, none is dropped.

Preprocessing matches what the trainer's ImageRecordIter feeds the net: decode with OpenCV (3 channels, or 1 when the
model's image_shape has 1), resize the shorter side to the `resize` hyperparameter (or to max(H, W) when unset),
centre-crop H x W, BGR → RGB, float32 NCHW raw 0-255 pixels (no mean/std: the net's first layer `bn_data`
normalises). MXNet executors are not thread-safe: a model binds `--workers` executors (default 1) and each runs
one forward at a time, taken from an idle queue, while decoding happens in the request threads in parallel.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger("ic-serve")

MODEL_PREFIX = "image-classification"
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "application/x-image"})
DEFAULT_MAX_BYTES = 6 * 1024 * 1024
DRAIN_LIMIT = 64 * 1024 * 1024  # beyond this an oversized body is not read before answering 413 (connection closes)
VARIANT = "AllTraffic"
ACCOUNT = "000000000000"
LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


class RequestError(Exception):
    """A request the server rejects with `status` and a message saying what was expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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

    def __init__(self, address: tuple[str, int], name: str, max_bytes: int, workers: int) -> None:
        super().__init__(address, Handler)
        self.endpoint_name = name
        self.max_bytes = max_bytes
        self.workers = workers
        self.model: Model | None = None
        self.swap_lock = threading.Lock()  # one load at a time; serving never waits on it

    def load(self, model_dir: Path, source: str | None = None) -> Model:
        with self.swap_lock:
            model = Model(model_dir, source, self.workers)
            previous, self.model = self.model, model
        log.info(
            "serving %s (%s, %d classes)%s", model.source, model.params_file.name, model.num_classes,
            f", replacing {previous.source}" if previous else "",
        )  # fmt: skip
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
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in IMAGE_TYPES:
            raise RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type {content_type or '(none)'!r} is not supported; expected one of "
                f"{', '.join(sorted(IMAGE_TYPES))}",
            )
        if not body:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is empty; expected one image")
        model = self.server.model  # one reference for the whole request: a swap now does not affect it
        if model is None:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "no model is loaded yet")
        return model.predict(model.preprocess(body))

    def do_GET(self) -> None:
        model = self.server.model
        if self.path == "/ping":
            self._send(HTTPStatus.OK if model else HTTPStatus.SERVICE_UNAVAILABLE, b"")
        elif self.path == "/metadata":
            if model is None:
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"message": "no model is loaded yet"})
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
        from urllib.parse import unquote

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
            if err.status == HTTPStatus.SERVICE_UNAVAILABLE:
                self._aws_error(503, "ServiceUnavailable", {"message": str(err)})
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
        if self.client_address[0] not in LOOPBACK:
            self.close_connection = True
            self._json(HTTPStatus.FORBIDDEN, {"message": "/admin/load is accepted from loopback clients only"})
            return
        try:
            request = json.loads(self._read_body() or b"{}")
            model_dir = Path(request["model_dir"])
        except (RequestError, ValueError, KeyError, TypeError) as err:
            self._json(HTTPStatus.BAD_REQUEST, {"message": f'expected JSON {{"model_dir": PATH}}: {err}'})
            return
        try:
            model = self.server.load(model_dir, request.get("source"))
        except Exception as err:  # the old model keeps serving
            log.exception("loading %s failed", model_dir)
            self._json(HTTPStatus.UNPROCESSABLE_ENTITY, {"message": f"{model_dir}: {type(err).__name__}: {err}"})
            return
        self._json(HTTPStatus.OK, {"name": self.server.endpoint_name, **model.describe()})


def _request_id() -> str:
    import uuid

    return str(uuid.uuid4())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="an extracted model.tar.gz")
    parser.add_argument("--source", help="where the model came from (shown by /metadata)")
    parser.add_argument("--name", required=True, help="the endpoint name answered at /endpoints/NAME/invocations")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--workers", type=int, default=1, help="executors running forwards in parallel")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="[%(asctime)s %(levelname)s %(thread)d] %(message)s"
    )
    server = Server((args.host, args.port), args.name, args.max_bytes, args.workers)

    def on_term(signum, frame) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    started = time.monotonic()
    try:
        server.load(args.model_dir, args.source)
    except Exception as err:
        log.error("cannot load the model in %s: %s: %s", args.model_dir, type(err).__name__, err)
        return 1
    log.info(
        "endpoint %s listening on http://%s:%d (ready in %.1fs)",
        args.name, *server.server_address[:2], time.monotonic() - started,
    )  # fmt: skip
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    log.info("endpoint %s stopped", args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
