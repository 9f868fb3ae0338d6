"""Where the endpoint may fetch a model from, and fetching it: S3 presigned URLs on the configured S3 endpoint or
AWS S3, or file:// archives under the model root for loopback clients; a bounded streaming download (no redirects,
size and time limits, the signature never shown) and a checked extraction (tarfile's data filter, a size limit,
the members of an image-classification model). See ic_serve's docstring, "Model sources".
"""

from __future__ import annotations

import gzip
import ipaddress
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ic_artifacts import MODEL_MEMBERS, MODEL_PREFIX
from ic_errors import RequestError

MAX_ARCHIVE_BYTES = 2 * 1024**3  # a model.tar.gz larger than this is refused (413) before or while downloading
MAX_EXTRACTED_BYTES = 4 * 1024**3  # and so is one whose members add up to more (a gzip bomb)
DOWNLOAD_SOCKET_TIMEOUT_S = 60  # no byte from the model's server for this long fails the load
DOWNLOAD_DEADLINE_S = 1200  # nor may the whole download take longer
# AWS S3's hosts: s3.amazonaws.com, s3.REGION.amazonaws.com, BUCKET.s3.REGION.amazonaws.com, s3-REGION..., .com.cn
AWS_S3_HOST = re.compile(r"(?:[a-z0-9][a-z0-9.-]*\.)?s3(?:[.-][a-z0-9-]+)*\.amazonaws\.com(?:\.cn)?")


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


def origin(url: str) -> str | None:
    """`scheme://host:port` of an http(s) URL (host lower-cased, default port explicit), None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.username is not None:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{port or (443 if scheme == 'https' else 80)}"


def source_refusal(
    url: str, s3_origins: frozenset[str], model_root: Path | None, client: str
) -> tuple[int, str] | None:
    """Why the server will not fetch a model from `url` for a client at address `client` (status, message), or None.
    Accepted: S3 presigned GET URLs on `s3_origins` or an AWS S3 host (https), and file:// archives under
    `model_root` from loopback clients (see the module docstring)."""
    shown = shown_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if not is_loopback(client):
            return HTTPStatus.FORBIDDEN, "a file:// model_url names a file on the server's machine: loopback only"
        if model_root is None:
            return HTTPStatus.FORBIDDEN, "this server loads no local archives (it has no --model-root)"
        if parts.netloc not in ("", "localhost"):
            return HTTPStatus.BAD_REQUEST, f"model_url {shown[:200]!r}: a file:// URL names no host"
        path = Path(os.path.realpath(unquote(parts.path)))
        if not path.is_relative_to(model_root):
            return HTTPStatus.FORBIDDEN, f"model_url {shown[:200]!r}: local archives are loaded from {model_root} only"
        return None
    where = origin(url)
    if where is None:
        return (
            HTTPStatus.BAD_REQUEST,
            f"model_url {shown[:200]!r}: expected an S3 presigned URL (http or https) or file://",
        )
    host = urlsplit(where).hostname or ""
    aws = where.startswith("https://") and where.endswith(":443") and AWS_S3_HOST.fullmatch(host)
    if where not in s3_origins and not aws:
        allowed = ", ".join(sorted(s3_origins)) or "none configured"
        return (
            HTTPStatus.FORBIDDEN,
            f"model_url {shown[:200]!r}: models are fetched from the S3 endpoint ({allowed}) or AWS S3 only",
        )
    if "X-Amz-Signature" not in parse_qs(parts.query):
        return HTTPStatus.BAD_REQUEST, f"model_url {shown[:200]!r}: expected an S3 presigned URL (X-Amz-Signature)"
    return None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect ends the download (as an HTTP error): a model comes from the URL that was accepted, nowhere else."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib's signature
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def download(url: str, dest: Path, limit: int = MAX_ARCHIVE_BYTES) -> int:
    """Stream `url` into `dest`; RequestError 413 over `limit` bytes, 502 when the transfer fails, 504 past the
    deadline. Returns the byte count. The upstream's error body is never repeated: only its status and the object."""
    shown = shown_url(url)
    started = time.monotonic()
    try:
        response = _OPENER.open(url, timeout=DOWNLOAD_SOCKET_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()
        raise RequestError(HTTPStatus.BAD_GATEWAY, f"GET {shown} answered HTTP {err.code}") from None
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


def _private_data(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """tarfile's "data" filter, and the extracted files for this user only (tarfile sets modes with chmod, which
    the umask does not narrow)."""
    member = tarfile.data_filter(member, path)
    return member if member.mode is None else member.replace(mode=member.mode & 0o700, deep=False)


def extract(archive: Path, dest: Path, source: str, limit: int = MAX_EXTRACTED_BYTES) -> None:
    """Unpack a model.tar.gz into `dest` (tarfile's "data" filter: no absolute paths, links out or devices) and
    check it holds an image-classification model; RequestError 422 (or 413 over `limit` bytes) otherwise."""
    total = 0
    try:
        fh = archive.open("rb")
    except OSError:  # missing, unreadable or a folder: one answer, which says nothing of what is there
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{source}: the model archive cannot be read") from None
    try:
        with fh, tarfile.open(fileobj=fh) as tar:
            for member in tar:
                total += member.size
                if total > limit:
                    raise RequestError(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{source}: the archive unpacks to over {limit} bytes"
                    )
                tar.extract(member, dest, filter=_private_data)
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
