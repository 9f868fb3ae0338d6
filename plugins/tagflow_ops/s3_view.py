"""tagflow's reports, models and dataset files in the browser, behind Airflow's login: `GET /tagflow/s3/BUCKET/KEY`.

An Airflow plugin adding a FastAPI app to the API server (`fastapi_apps`, mounted at `/tagflow`). The route reads
the object with the `aws_default` connection (the amazon provider's S3Hook: the connection's endpoint, keys or
role) and streams it with its Content-Type (guessed from the key when the object has none, or only S3's default
`binary/octet-stream`), under a Content-Security-Policy that lets a self-contained report show its inline styles and
its PNGs (`data:` or beside it) and run nothing (`default-src 'none'`: no script, frame, font or fetch), and with
`X-Content-Type-Options: nosniff`. A key ending in `/` lists that folder (a plain HTML table of links).

Why a plugin and not presigned URLs: on the local backend the S3 server listens on loopback with keys the browser
has not got, and a presigned URL is a bearer credential: it works for anyone who has it until it expires, so it
leaks through the run's logs, the browser's history and anything it is pasted into, and once expired the task's link
is dead. The plugin keeps Airflow's login in front (the UI's JWT cookie or an `Authorization: Bearer` token, checked
by the API server's own `get_user` dependency) and Airflow's authorization (the user must be allowed to read the
`tagflow` DAG's runs, whose artefacts these are), and its links never expire. An anonymous browser is sent to the
login page, which brings it back; an anonymous API client gets 401.

What may be read: only the folders tagflow writes for people to look at, `…/output/…` (models, evaluations,
reports), `…/training/…` and `…/validation/…` (the packed dataset and its manifest), in any bucket. The connection
is Airflow's identity, which on AWS may read far more than tagflow's datasets (the source images, other teams'
prefixes in a shared bucket); any logged-in viewer could read all of it through an open proxy. Staging bundles and
the evaluation cache are internal and stay out. A key with an empty, `.` or `..` segment is refused (400), as
tagflow refuses such prefixes where they enter.

Answers: the object (200); 400 for a key outside those folders or malformed; 404 naming the URI when the bucket or
object is missing; 502 with one line when S3 does not answer or refuses the connection's credentials.
"""

from __future__ import annotations

import html
import mimetypes
import re
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin

from tagflow.dag_id import DAG_ID  # dags/tagflow.py: the objects served are its runs' artefacts

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fastapi import FastAPI, Request
    from fastapi.responses import Response

URL_PREFIX = "/tagflow"
ROUTE = "/s3"
AWS_CONN_ID = "aws_default"
READABLE_FOLDERS = ("output", "training", "validation")
CHUNK = 256 * 1024
CSP = (
    "default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "private, no-store",  # behind a login: no shared cache may keep it
}
# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_READABLE = re.compile(rf"(^|/)({'|'.join(READABLE_FOLDERS)})/")
_UNTYPED = {"", "binary/octet-stream", "application/octet-stream"}
# mimetypes reads the OS's tables, which may lack these; the report's own types must not depend on the machine.
_TYPES = {".html": "text/html; charset=utf-8", ".json": "application/json", ".png": "image/png",
          ".txt": "text/plain; charset=utf-8", ".lst": "text/plain; charset=utf-8"}  # fmt: skip


def view_path(uri: str) -> str:
    """The path, under Airflow's base URL, that shows the object `s3://BUCKET/KEY` (for operator extra links)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return f"{URL_PREFIX}{ROUTE}/{quote(bucket, safe='')}/{quote(key, safe='/')}"


def key_problem(bucket: str, key: str) -> str | None:
    """Why `s3://bucket/key` may not be shown here, or None."""
    from tagflow.errors import quote as quoted
    from tagflow.names import prefix_problem

    if not _BUCKET.fullmatch(bucket):
        return f"bucket {quoted(bucket)}: expected an S3 bucket name (3-63 lower-case letters, digits, '.', '-')"
    problem = prefix_problem(key.rstrip("/"))
    if problem:
        return f"key {quoted(key)} {problem}"
    if not _READABLE.search(key):
        folders = ", ".join(f"…/{f}/…" for f in READABLE_FOLDERS)
        return f"s3://{bucket}/{key}: only tagflow's {folders} objects are served here"
    return None


def content_type(key: str, stored: str | None) -> str:
    """The object's own Content-Type, or one guessed from its key when it has none worth the name."""
    if stored and stored.lower() not in _UNTYPED:
        return stored
    suffix = "." + key.rsplit(".", 1)[-1].lower() if "." in key.rsplit("/", 1)[-1] else ""
    return _TYPES.get(suffix) or mimetypes.guess_type(key)[0] or "application/octet-stream"


def _client():
    """The S3 client for the connection as it is now: made once per version of it (a client takes ~0.2 s to make,
    a report is several requests), anew when someone edits the connection."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return _client_for(S3Hook.get_connection(AWS_CONN_ID).get_uri())


@lru_cache(maxsize=4)
def _client_for(connection_uri: str):
    """A client with few, short retries: a person is waiting for the page (boto3 clients are thread-safe)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.config import Config

    hook = S3Hook(aws_conn_id=AWS_CONN_ID)
    short = Config(connect_timeout=3, read_timeout=30, retries={"mode": "standard", "max_attempts": 2})
    return hook.get_client_type(config=hook.config.merge(short))


def _text(status: int, line: str) -> Response:
    from fastapi.responses import PlainTextResponse

    return PlainTextResponse(line + "\n", status_code=status, headers=SECURITY_HEADERS)


def _s3_failure(err: Exception, uri: str) -> Response:
    """404 for a missing bucket or object, 502 (one line) for anything else S3 or the network did."""
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return _text(404, f"{uri}: no such object")
        if code == "NoSuchBucket":
            return _text(404, f"{uri}: no such bucket {uri.split('/')[2]!r}")
        return _text(502, f"{uri}: S3 answered {code or 'an error'}: {error.get('Message') or err}")
    return _text(502, f"{uri}: S3 did not answer ({type(err).__name__}: {err})")


def _chunks(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


def _listing(client: Any, bucket: str, prefix: str) -> Response:
    """A folder's sub-folders and objects as an HTML table of links (no script; every name escaped)."""
    from fastapi.responses import HTMLResponse

    rows = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for sub in page.get("CommonPrefixes", []):
            name = sub["Prefix"][len(prefix) :]
            rows.append((name, view_path(f"s3://{bucket}/{sub['Prefix']}"), ""))
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if name:
                rows.append((name, view_path(f"s3://{bucket}/{obj['Key']}"), f"{obj['Size']:,}"))
    if not rows:
        return _text(404, f"s3://{bucket}/{prefix}: no such folder (no object under it)")
    title = html.escape(f"s3://{bucket}/{prefix}")
    body = "".join(
        f'<tr><td><a href="{html.escape(href)}">{html.escape(name)}</a></td><td>{size}</td></tr>'
        for name, href, size in rows
    )
    page = (
        f"<!doctype html><meta charset=utf-8><title>{title}</title>"
        "<style>body{font-family:sans-serif}td{padding:2px 12px}td+td{text-align:right}</style>"
        f"<h1>{title}</h1><table><tr><th>name</th><th>bytes</th></tr>{body}</table>"
    )
    return HTMLResponse(page, headers=SECURITY_HEADERS)


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


@cache
def build_app() -> FastAPI:
    """The FastAPI app the API server mounts at /tagflow (built on first use: only the API server needs it)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.api_fastapi.core_api.security import get_user
    from botocore.exceptions import BotoCoreError, ClientError
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import RedirectResponse, StreamingResponse

    app = FastAPI(title="tagflow: S3 objects behind Airflow's login", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def login_first(request: Request, exc: HTTPException) -> Response:
        # Raised only by `get_user` (no token, an expired or invalid one): a browser goes to the login page, which
        # sends it back here; an API client gets the status and one line.
        if exc.status_code in (401, 403) and _wants_html(request):
            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        return _text(exc.status_code, f"{request.url.path}: {exc.detail}; log in to Airflow first")

    @app.get(ROUTE + "/{bucket}/{key:path}", response_model=None)
    def read_object(bucket: str, key: str, user: Any = Depends(get_user)):  # noqa: B008
        details = DagDetails(id=DAG_ID)
        if not get_auth_manager().is_authorized_dag(
            method="GET", access_entity=DagAccessEntity.RUN, details=details, user=user
        ):
            return _text(403, f"user {user.get_name()!r} may not read the runs of the DAG {DAG_ID!r}")
        problem = key_problem(bucket, key)
        if problem:
            return _text(400, problem)
        uri = f"s3://{bucket}/{key}"
        try:
            client = _client()
            if key.endswith("/"):
                return _listing(client, bucket, key)
            obj = client.get_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as err:
            return _s3_failure(err, uri)
        headers = {**SECURITY_HEADERS, "Content-Length": str(obj["ContentLength"])}
        return StreamingResponse(
            _chunks(obj["Body"]), media_type=content_type(key, obj.get("ContentType")), headers=headers
        )

    return app


class TagflowS3ViewPlugin(AirflowPlugin):
    """Registers the app; every Airflow process loads plugins (tasks too, for macros), so FastAPI and the API
    server's modules are imported only when the API server asks for `fastapi_apps`."""

    name = "tagflow_s3_view"

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [{"app": build_app(), "url_prefix": URL_PREFIX, "name": "tagflow S3 objects"}]
