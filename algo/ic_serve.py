"""Serve one image-classification model over HTTP, like a SageMaker endpoint (runs in the MXNet algorithm environment).

    TAGFLOW_ENDPOINT_TOKEN=SECRET .venv-mxnet/bin/python algo/ic_serve.py --name NAME [--host 127.0.0.1] [--port 8080]
        [--work-dir DIR] [--model-root DIR] [--s3-endpoint URL ...] [--max-bytes N] [--max-pixels N]
        [--idle-timeout S] [--read-timeout S] [--max-connections N]

Parts: this module (routes, connections, limits, admin authorization, main), ic_predictor.py (the loaded model:
size check, preprocessing, forward, labels, /metadata), ic_sources.py (which model URLs are accepted, download,
extraction), ic_artifacts.py (the model.tar.gz layout, shared with the evaluation) and ic_errors.py.

The server starts with no model; `POST /admin/load` gives it one (tagflow.local.endpoint.load does it). A model is a
model.tar.gz as ic_train.py (or SageMaker's built-in algorithm) writes it: `image-classification-symbol.json`,
`image-classification-NNNN.params` (the one metrics.json names as `params_file`, else the highest-numbered),
`model-shapes.json` (`[{"name": "data", "shape": [B, C, H, W]}]`) and, from the local trainer, `metrics.json`.

Routes (stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive):

- `GET /health`: 200 `{"name", "loaded", "source"}` as soon as the server listens, with or without a model.
- `GET /ping`: 200 once a model is loaded, 503 before (the container contract).
- `POST /invocations`: one image (`image/jpeg`, `image/png`, `application/x-image`) → JSON array of `num_classes`
  probabilities (sigmoid per label for multi-label models, softmax otherwise), the built-in's answer whatever the
  `Accept` header says, except `Accept: application/json; verbose=true` (LABELS_ACCEPT): then
  `{"labels": [names of the labels whose probability >= their threshold], "probabilities": [...]}`, with the
  thresholds loaded with the model (406 saying why when it has none). 503 without a model, 415 for other
  content types, 413 over `--max-bytes` or `--max-pixels`, 400 for empty or undecodable bodies, 408 for a body
  not received in time; errors are JSON `{"message": ...}` and never stop the server.
- `POST /endpoints/NAME/invocations`: the SageMaker Runtime InvokeEndpoint route (what botocore's
  `sagemaker-runtime` client sends), answering with its response headers (`x-Amzn-Invoked-Production-Variant`).
  Errors come back as InvokeEndpoint's: `ModelError` (424) carrying `OriginalStatusCode` and `OriginalMessage` for
  what the container rejects, `ModelNotReadyException` (429) while no model is loaded, `ValidationError` (400) for
  an unknown endpoint name. SigV4 signatures are not checked.
- `GET /metadata`: model folder, source, load time, shape, the params file and how it was chosen, and what the
  model's metrics.json says (`multi_label`, `saved_epoch`, `selected_by`, `label_names`, and the whole file as
  `metrics`: a deploy gate reads the objective here); each is null for a model without metrics.json (the
  built-in's); the archive's `sha256`; `thresholds` (`{"evaluation", "model_sha256", "label_names",
  "thresholds"}`, or null) and `thresholds_problem` (why there are none, or null); 503 without a model.
- `POST /admin/load` `{"model_url": URL, "source": "s3://…", "name": NAME, "thresholds": {...},
  "thresholds_problem": "…"}`: fetch a model.tar.gz from URL, extract
  it into a new folder under `--work-dir`, load and warm it completely, then swap one reference: requests already
  running finish on the old model, none is dropped, and the old model's folder is deleted. `source` is what /health
  and /metadata report (default: the URL without its query); `name`, when given, is the endpoint's name from then
  on. Any failure answers JSON `{"message": ...}` (400 bad request, 403 not authorized or a source not accepted,
  413 too large, 422 not a model, 502/504 the download failed) and the old model keeps serving. One load at a time.
  `thresholds` are the model's per-label thresholds as the loader found them recorded (tagflow.thresholds, which
  checked the evaluation describes this archive; the loader reads S3 with its own credentials, this server has
  none): they are kept with the model only when their `model_sha256` is the sha256 of the archive fetched and
  there is one per output, else the model serves without and `thresholds_problem` says why. `thresholds_problem`
  alone is the loader's reason there are none (no evaluation recorded, another model's).

Model sources: only what tagflow itself produces. An S3 presigned GET URL (SigV4: `X-Amz-Signature` in the query)
on an origin given by `--s3-endpoint` (the local S3 server; scheme, host and port must match) or on an AWS S3 host
over https (`*.amazonaws.com` names starting `s3` or `BUCKET.s3`); redirects are not followed. Or `file://` for an
archive under `--model-root` (symbolic links resolved first), from loopback clients only. A failed download says
the status code and the object (the URL without its query: a presigned signature is a credential), never the
upstream body; a local archive that is missing or unreadable gets one message for both.

Admin authorization: the server needs TAGFLOW_ENDPOINT_TOKEN (at least 16 characters) and refuses to start
without; every /admin/load must carry `Authorization: Bearer <that token>` (compared in constant time), loopback
clients included. Reads (/health, /ping, /metadata, invocations) are open, as on a container.

Limits (each a flag; tagflow.local.endpoint.start passes them):

- `--max-bytes` 6 MB (SageMaker's payload limit): a larger body gets 413 before it is read; the server then closes
  its side for writing and reads and discards what the client still sends (bounded by DRAIN_LIMIT and the request's
  read timeout), so the client reads the answer instead of a reset.
- `--max-pixels` 16,777,216 (4096 x 4096): the image's size is read from its header (Pillow, `Image.open`, which
  decodes nothing) and a larger image, or one whose resize for the model would be larger, gets 413 with both
  numbers before any decoding. The training designs are ~256 px and a 12-megapixel phone photo still passes; a
  decode then needs at most 3 x 16.8 M = 48 MiB (RGB). OpenCV's own guard OPENCV_IO_MAX_IMAGE_PIXELS is set to
  the same limit as a second line, for any image whose header Pillow would read differently.
- `--idle-timeout` 10 s: a keep-alive connection with no new request for this long is closed.
- `--read-timeout` 30 s: from a request's first byte, its headers and body must arrive within this (a client
  sending a byte now and then is cut off too); 408 when the body is late.
- `--max-connections` 64: connections served at once, one thread each. At the bound a new connection takes the
  place of the longest-idle keep-alive connection (closed); if every connection is in a request, it gets 503
  `{"message": ...}` at once and is closed. Idle connections cost nothing else, and a slow client holds one slot
  for at most the read timeout.

Decoding runs in the request threads, at most one per core at a time (DECODE_SLOTS), so the memory the server needs
is bounded: the model + max_connections x max_bytes of bodies + DECODE_SLOTS x 3 x max_pixels of decoded pixels
(BENCHMARKS.md has it measured).

Preprocessing matches what the trainer's ImageRecordIter feeds the net: decode with OpenCV (3 channels, or 1 when the
model's image_shape has 1), resize the shorter side to the `resize` hyperparameter (or to max(H, W) when unset),
centre-crop H x W, BGR → RGB, float32 NCHW raw 0-255 pixels (no mean/std: the net's first layer `bn_data`
normalises). MXNet executors are not thread-safe: a model binds `--workers` executors (default 1) and each runs
one forward at a time, taken from an idle queue, while decoding happens in the request threads in parallel.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import io
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ic_artifacts import file_sha256
from ic_errors import RequestError
from ic_predictor import DEFAULT_MAX_PIXELS, Model
from ic_sources import download, extract, origin, shown_url, source_refusal

# cv2 is imported where it is used, after main() has set OPENCV_IO_MAX_IMAGE_PIXELS (read once, at import).

log = logging.getLogger("ic-serve")

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "application/x-image"})
DEFAULT_MAX_BYTES = 6 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 64
# After a reply that closes the connection before the body was read, at most this much of what the client still
# sends is read and discarded (within the request's read timeout), so that closing does not reset the reply away.
DRAIN_LIMIT = 256 * 1024 * 1024
REJECT_LINGER_S = 2.0  # a connection refused at the bound is read from this long, for its 503 to arrive
MAX_LINGERING = 64  # and at most this many such connections linger at once (beyond, they are closed at once)
VARIANT = "AllTraffic"
ACCOUNT = "000000000000"
NO_MODEL = "no model is loaded yet"
LABELS_ACCEPT = "application/json; verbose=true"  # the Accept value that asks /invocations for labels
TOKEN_ENV = "TAGFLOW_ENDPOINT_TOKEN"
MIN_TOKEN_CHARS = 16
# SageMaker's endpoint-name rule: what InvokeEndpoint accepts in its path. The single source of this rule is
# include/tagflow/names.py (ENDPOINT_NAME_PATTERN, ENDPOINT_NAME_RULE); this environment cannot import tagflow, so
# the two are kept equal here and a test (tests/test_local_endpoint.py) compares them.
ENDPOINT_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
NAME_RULE = "expected 1-63 letters, digits and inner hyphens (a SageMaker endpoint name)"


@dataclass(frozen=True)
class Limits:
    """What one request and the connections may take (see the module docstring's "Limits")."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    read_timeout: float = DEFAULT_READ_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS


def admin_refusal(token: str, authorization: str) -> str | None:
    """Why a client sending this Authorization header may not load models into a server whose admin token is
    `token`; None if it may. Loopback clients need the token too: anyone on the machine is one."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return f"/admin/load needs the header `Authorization: Bearer <token>` with this server's {TOKEN_ENV}"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return f"/admin/load: the bearer token is not this server's {TOKEN_ENV}"
    return None


def wants_labels(accept: str) -> bool:
    """True when an Accept header asks /invocations for labels: `application/json` with `verbose=true`
    (LABELS_ACCEPT; spaces and case aside, among other media ranges). Any other Accept gets the built-in's array."""
    for item in accept.split(","):
        media, *params = (part.strip().lower().replace(" ", "") for part in item.split(";"))
        if media == "application/json" and "verbose=true" in params:
            return True
    return False


def offered_thresholds(value: object) -> dict | None:
    """The `thresholds` of a load request, checked for shape (TypeError/ValueError say what is wrong: a 400)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"thresholds is a JSON {type(value).__name__}; expected an object")
    evaluation, sha, names, cuts = (value.get(k) for k in ("evaluation", "model_sha256", "label_names", "thresholds"))
    if not isinstance(evaluation, str) or not isinstance(sha, str):
        raise TypeError("thresholds.evaluation and thresholds.model_sha256 are strings")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError("thresholds.label_names is a list of strings")
    if not isinstance(cuts, list) or not all(isinstance(t, int | float) and not isinstance(t, bool) for t in cuts):
        raise TypeError("thresholds.thresholds is a list of numbers")
    if len(names) != len(cuts):
        raise ValueError(f"thresholds has {len(names)} label names for {len(cuts)} thresholds; expected one each")
    return {"evaluation": evaluation, "model_sha256": sha, "label_names": names, "thresholds": [float(t) for t in cuts]}


class _Connection:
    """One open connection: when it began waiting for its next request (None while a request is in progress)."""

    __slots__ = ("idle_since", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle_since: float | None = time.monotonic()


def _bytes_waiting(sock: socket.socket) -> bool:
    """True when the client has sent bytes the server has not read yet: a request is arriving (a peek, which
    neither blocks nor takes them from the thread that will read them)."""
    poller = select.poll()  # not a timed recv: Python waits up to the socket's timeout for data before one
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))  # readable: data, or b"" at EOF
    except OSError:  # reset: nothing will come
        return False


class _RequestReader(io.RawIOBase):
    """A connection's reads under two clocks: until a request's first byte, the idle timeout; from it, the read
    timeout for the whole request (headers and body), however slowly the bytes come. TimeoutError past either."""

    def __init__(self, sock: socket.socket, conn: _Connection, limits: Limits) -> None:
        self.sock, self.conn, self.limits = sock, conn, limits
        self.deadline: float | None = None  # None: between requests

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is None:
            timeout = self.limits.idle_timeout
        else:
            timeout = self.deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError(f"the request took over {self.limits.read_timeout:g}s (--read-timeout)")
        self.sock.settimeout(timeout)
        n = self.sock.recv_into(buffer)
        if n and self.deadline is None:
            self.deadline = time.monotonic() + self.limits.read_timeout
            self.conn.idle_since = None
        return n


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stopping does not wait for idle keep-alive connections
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        name: str,
        workers: int,
        work_dir: Path,
        token: str,
        limits: Limits,
        s3_origins: frozenset[str] = frozenset(),
        model_root: Path | None = None,
    ) -> None:
        super().__init__(address, Handler)
        self.endpoint_name = name
        self.workers = workers
        self.work_dir = work_dir
        self.admin_token = token
        self.limits = limits
        self.s3_origins = s3_origins
        self.model_root = model_root
        self.model: Model | None = None
        self.model_folder: Path | None = None  # where the current model was extracted (deleted when replaced)
        self.swap_lock = threading.Lock()  # one load at a time; serving never waits on it
        self.connections: dict[socket.socket, _Connection] = {}
        self.connections_lock = threading.Lock()
        self.lingering = threading.BoundedSemaphore(MAX_LINGERING)

    def process_request(self, request: socket.socket, client_address) -> None:
        """Serve the connection in a thread of its own, within --max-connections: at the bound, close the
        longest-idle connection to make room, or, when none is idle, answer 503 and close."""
        evicted = None
        with self.connections_lock:
            if len(self.connections) >= self.limits.max_connections:
                idle = sorted((c for c in self.connections.values() if c.idle_since is not None),
                              key=lambda c: c.idle_since)  # fmt: skip
                evicted = next((c for c in idle if not _bytes_waiting(c.sock)), None)
                if evicted is not None:
                    del self.connections[evicted.sock]
            admitted = len(self.connections) < self.limits.max_connections
            if admitted:
                self.connections[request] = _Connection(request)
        if evicted is not None:
            log.info("%d connections open: closing the longest idle one", self.limits.max_connections)
            with contextlib.suppress(OSError):  # its thread's read returns at once, and the thread ends
                evicted.sock.shutdown(socket.SHUT_RDWR)
        if admitted:
            super().process_request(request, client_address)
        else:
            self._refuse(request, client_address)

    def _refuse(self, request: socket.socket, client_address) -> None:
        message = (
            f"the endpoint serves {self.limits.max_connections} connections at once (--max-connections), all "
            f"in a request; retry shortly"
        )
        log.warning("connection from %s refused: %s", client_address[0], message)
        body = json.dumps({"message": message}).encode()
        reply = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        try:
            request.settimeout(0.5)
            request.sendall(reply)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            self.shutdown_request(request)
            return
        if not self.lingering.acquire(blocking=False):
            self.shutdown_request(request)  # too many already lingering: close (the reply may be reset away)
            return
        threading.Thread(target=self._linger, args=(request,), daemon=True).start()

    def _linger(self, request: socket.socket) -> None:
        """Read and discard what a refused client sends until it closes or REJECT_LINGER_S pass, then close: closing
        with its request unread would reset the connection, and the 503 with it."""
        deadline = time.monotonic() + REJECT_LINGER_S
        try:
            while (left := deadline - time.monotonic()) > 0:
                request.settimeout(left)
                if not request.recv(65536):
                    break
        except OSError:
            pass
        finally:
            self.lingering.release()
            self.shutdown_request(request)

    def shutdown_request(self, request: socket.socket) -> None:
        with self.connections_lock:
            self.connections.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """A connection that failed (reset, timed out while answering): one log line, not a traceback."""
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            log.info("connection from %s ended: %s", client_address[0], err)
        else:
            log.exception("connection from %s failed", client_address[0])

    def load(
        self,
        url: str,
        source: str,
        name: str | None = None,
        thresholds: dict | None = None,
        thresholds_problem: str | None = None,
    ) -> Model:
        """Fetch, extract, load and warm the model at `url`, then serve it (as `name`, when given) with its
        `thresholds` (Model.attach_thresholds); RequestError says what went wrong, and the current model keeps
        serving."""
        with self.swap_lock:
            log.info("loading %s", source)
            folder = Path(tempfile.mkdtemp(prefix="model-", dir=self.work_dir))
            download_to = folder.with_name(f"{folder.name}.tar.gz")
            try:
                parts = urlsplit(url)
                if parts.scheme.lower() == "file":
                    archive = Path(os.path.realpath(unquote(parts.path)))
                else:
                    size = download(url, download_to)
                    log.info("downloaded %s (%d bytes)", source, size)
                    archive = download_to
                extract(archive, folder, source)
                digest = file_sha256(archive)
                try:
                    model = Model(folder, source, self.workers, self.limits.max_pixels)
                except Exception as err:
                    raise RequestError(
                        HTTPStatus.UNPROCESSABLE_ENTITY, f"{source}: cannot load the model: {type(err).__name__}: {err}"
                    ) from err
                model.sha256 = digest
                model.attach_thresholds(thresholds, thresholds_problem)
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
            "endpoint %s serves %s (%s, %d classes; thresholds: %s)%s", self.endpoint_name, model.source,
            model.params_file.name, model.num_classes,
            (model.thresholds or {}).get("evaluation") or f"none, {model.thresholds_problem}",
            f", replacing {previous.source}" if previous else "",
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
        conn = self.server.connections.get(self.connection) or _Connection(self.connection)
        self.rfile.close()
        self._reader = _RequestReader(self.connection, conn, self.server.limits)
        self.rfile = io.BufferedReader(self._reader, 65536)
        self._conn = conn
        self._unread: int | None = 0  # body bytes the client may still send (None: unknown, chunked)

    def handle_one_request(self) -> None:
        self._reader.deadline = None  # the idle clock runs until the next request's first byte
        self._conn.idle_since = time.monotonic()
        self._unread = 0
        super().handle_one_request()

    def parse_request(self) -> bool:
        self._conn.idle_since = None  # a pipelined request, already buffered, is in progress too
        if not super().parse_request():
            return False
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._unread = None
        else:
            declared = self.headers.get("Content-Length", "0").strip()
            self._unread = int(declared) if declared.isdigit() else None
        return True

    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue` with a body over the limit: answer 413 before the client sends it."""
        declared = self.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.server.limits.max_bytes:
            self.close_connection = True
            self._unread = 0  # the client waits for this answer before sending anything
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"message": self._too_large(int(declared))})
            return False
        return super().handle_expect_100()

    def _too_large(self, length: int) -> str:
        return f"the body has {length} bytes; the limit is {self.server.limits.max_bytes} (--max-bytes)"

    def _send(self, status: int, body: bytes, content_type: str = "application/json", headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n" + body)  # headers and body leave in one write (end_headers' job)
        self.connection.settimeout(self.server.limits.read_timeout)  # a client that reads nothing is cut off too
        self.flush_headers()
        if self.close_connection and self._unread != 0:
            self._drain()

    def _drain(self) -> None:
        """After a reply that closes the connection with the body (partly) unread: close our side for writing (the
        reply and a FIN reach the client), then read and discard what the client still sends, up to DRAIN_LIMIT
        bytes and the request's read timeout. Closing at once would make the kernel reset the connection, and a
        client still sending would see a broken pipe instead of the reply."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            left = DRAIN_LIMIT if self._unread is None else min(self._unread, DRAIN_LIMIT)
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:  # the read timeout, or the client went away: either way, done
            pass
        self._unread = 0

    def _json(self, status: int, doc: object, headers=None) -> None:
        self._send(status, json.dumps(doc).encode(), headers=headers)

    def _read_body(self) -> bytes:
        """The whole request body, or RequestError 400/408/411/413 (the connection then closes after the reply)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
        declared = self.headers.get("Content-Length", "0").strip()
        if not declared.isdigit():
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length {declared[:40]!r} is not a number of bytes")
        length = int(declared)
        if length > self.server.limits.max_bytes:
            self.close_connection = True
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large(length))
        try:
            body = self.rfile.read(length) if length > 0 else b""
        except TimeoutError:
            self.close_connection = True
            raise RequestError(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the body ({length} bytes) did not arrive within {self.server.limits.read_timeout:g}s "
                f"(--read-timeout)",
            ) from None
        self._unread = 0
        if len(body) < length:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of {length} bytes")
        return body

    def _invoke(self) -> list[float] | dict:
        """Run one /invocations request against the current model: the probabilities, or the labels answer when
        the Accept header asks for it (`wants_labels`); RequestError says what was wrong."""
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
        labels = wants_labels(self.headers.get("Accept", ""))
        if labels and model.thresholds is None:
            raise RequestError(
                HTTPStatus.NOT_ACCEPTABLE,
                f"Accept {LABELS_ACCEPT!r} asks for the labels above their thresholds, but {model.source} has no "
                f"thresholds: {model.thresholds_problem}; ask without it for the probabilities",
            )
        probs = model.predict(model.preprocess(body))
        return model.labels(probs) if labels else probs

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
        refusal = admin_refusal(self.server.admin_token, authorization)
        if refusal:
            self.close_connection = True
            log.warning("model load refused for %s: %s", self.client_address[0], refusal)
            self._json(HTTPStatus.FORBIDDEN, {"message": refusal})
            return
        expected = 'expected JSON {"model_url": "https://…/model.tar.gz?X-Amz-…", "source": "s3://…", "name": NAME}'
        try:
            request = json.loads(self._read_body() or b"{}")
            if not isinstance(request, dict):
                raise TypeError(f"the body is a JSON {type(request).__name__}")
            url = request["model_url"]
            source, name = request.get("source"), request.get("name")
            problem_text = request.get("thresholds_problem")
            if not all(isinstance(v, str | None) for v in (source, name, problem_text)) or not isinstance(url, str):
                raise TypeError("model_url, source, name and thresholds_problem are strings")
            thresholds = offered_thresholds(request.get("thresholds"))
        except RequestError as err:  # the body itself: too large, late, cut short
            self._json(err.status, {"message": str(err)})
            return
        except (ValueError, KeyError, TypeError) as err:
            self._json(HTTPStatus.BAD_REQUEST, {"message": f"{expected}: {type(err).__name__}: {err}"})
            return
        if name is not None and not ENDPOINT_NAME.fullmatch(name):
            problem = HTTPStatus.BAD_REQUEST, f"name {name[:200]!r}: {NAME_RULE}"
        else:
            server = self.server
            problem = source_refusal(url, server.s3_origins, server.model_root, self.client_address[0])
        if problem:
            log.warning("model load refused for %s (%d): %s", self.client_address[0], *problem)
            self._json(problem[0], {"message": problem[1]})
            return
        try:
            model = self.server.load(url, source or shown_url(url), name, thresholds, problem_text)
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


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the endpoint name answered at /endpoints/NAME/invocations")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=1, help="executors running forwards in parallel")
    parser.add_argument(
        "--work-dir", type=Path, help="where downloaded models are extracted (default: a temporary folder)"
    )
    parser.add_argument("--model-root", type=Path, help="file:// model URLs must name archives under this folder")
    parser.add_argument(
        "--s3-endpoint", action="append", default=[], metavar="URL",
        help="an S3 endpoint whose presigned URLs models may be fetched from (repeatable; AWS S3 always)",
    )  # fmt: skip
    parser.add_argument("--max-bytes", type=_positive(int), default=DEFAULT_MAX_BYTES, help="request body limit")
    parser.add_argument("--max-pixels", type=_positive(int), default=DEFAULT_MAX_PIXELS, help="image size limit")
    parser.add_argument("--idle-timeout", type=_positive(float), default=DEFAULT_IDLE_TIMEOUT_S, help="seconds")
    parser.add_argument("--read-timeout", type=_positive(float), default=DEFAULT_READ_TIMEOUT_S, help="seconds")
    parser.add_argument("--max-connections", type=_positive(int), default=DEFAULT_MAX_CONNECTIONS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="[%(asctime)s %(levelname)s %(thread)d] %(message)s"
    )
    token = os.environ.get(TOKEN_ENV, "").strip()
    origins = {url: origin(url) for url in args.s3_endpoint}
    bad_origin = next((url for url, origin in origins.items() if origin is None), None)
    if not ENDPOINT_NAME.fullmatch(args.name):
        problem = f"--name {args.name[:200]!r}: {NAME_RULE}"
    elif not token:
        problem = f"set {TOKEN_ENV} to the admin token model loads must send (tagflow.local.endpoint.start does)"
    elif len(token) < MIN_TOKEN_CHARS:
        problem = f"{TOKEN_ENV} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} (a random secret)"
    elif bad_origin is not None:
        problem = f"--s3-endpoint {bad_origin[:200]!r}: expected http(s)://HOST[:PORT]"
    else:
        problem = None
    if problem:
        log.error("%s", problem)
        return 2
    # OpenCV reads its own bomb guard once, when cv2 is first imported (below this line, by Model).
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(args.max_pixels)
    limits = Limits(args.max_bytes, args.max_pixels, args.idle_timeout, args.read_timeout, args.max_connections)
    own_work_dir = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="ic-serve-")) if own_work_dir else args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    model_root = Path(os.path.realpath(args.model_root)) if args.model_root else None
    server = Server(
        (args.host, args.port), args.name, args.workers, work_dir, token, limits,
        frozenset(o for o in origins.values() if o), model_root,
    )  # fmt: skip

    def on_term(signum, frame) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log.info(
        "endpoint %s listening on http://%s:%d with no model yet; model loads accepted with the bearer token from "
        "%s, from %s%s; limits: %s",
        args.name, *server.server_address[:2], TOKEN_ENV,
        ", ".join([*sorted(server.s3_origins), "AWS S3"]), f" and under {model_root}" if model_root else "", limits,
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
