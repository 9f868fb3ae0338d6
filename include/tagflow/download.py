"""Sharded download: mirror the images a list names from S3 into a local folder, fast, whole and resumable.

One shared S3 client (botocore retries) serves a thread pool; each object is fetched with a single GET into memory,
checked, written to a temporary name in its folder and renamed into place, so a file is never seen half-written.
A single GET per small object is the fast path: `download_file` (s3transfer) adds a HEAD and a transfer manager per
object (see bench/bench_download.py).

Bad objects are recorded and skipped: a missing key, an empty object, one larger than `max_bytes` (known from the
listing before the body is fetched), one whose header no image decoder recognises, and one whose transient errors
(connection reset, 5xx, throttling) outlasted botocore's retries. The run fails only when more than
`max_bad_fraction` of the objects are bad, and then says which and why.

Resuming: sizes and ETags come from `known` or from one listing of the source prefix (one request per 1,000 keys),
not a HEAD per object. Each file written is recorded in a sidecar index in the destination folder,

    DEST/%tagflow-download.json   {"version": 1, "objects": {RELPATH: [size, etag, mtime_ns], ...}}

and an object whose local file has the listed size, the recorded ETag and the recorded mtime is not fetched again.
A sidecar rather than extended attributes: xattrs are missing on some filesystems (older tmpfs, many network
mounts), have no `os` API on macOS and are dropped by ordinary copies. The index is merged under a lock and
replaced atomically, so concurrent runs into one folder keep each other's entries; the mtime makes an entry
stale if another run (or a person) rewrote the file after it was recorded. The `%` names (index, lock,
temporaries) can never collide with an image: `paths.local_relpath` writes `%` only as `%XX` or a bare `%`.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import itertools
import json
import logging
import os
import queue
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagflow.errors import InputError, TagflowError, TooManyFailures
from tagflow.paths import is_s3_uri, local_path, local_relpath, source_uri
from tagflow.s3 import DEFAULT_POOL_SIZE, S3Uri, list_objects, make_client

if TYPE_CHECKING:
    from tagflow.s3 import S3Client

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_WORKERS = 32
DEFAULT_MAX_BYTES = 50 * MiB
DEFAULT_MAX_BAD_FRACTION = 0.01
INDEX_NAME = "%tagflow-download.json"
LOCK_NAME = "%tagflow-download.lock"
TMP_PREFIX = "%part-"
PROGRESS_EVERY = 100  # objects between progress callbacks
BODY_ATTEMPTS = 3  # botocore retries the request, not the reading of the body; we retry that ourselves
SHOWN_ERRORS = 20
MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})

ProgressCallback = Callable[[int, int, int], None]  # (objects done, objects in all, bytes fetched)


@dataclass(frozen=True)
class ObjectError:
    """One object that was skipped: the list path, the S3 URI it names, and why."""

    path: str
    uri: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class DownloadReport:
    """What a download did; `to_dict` is the JSON summary (CLI `--json`, Airflow XCom)."""

    total: int
    fetched: int = 0
    already_present: int = 0
    bytes: int = 0
    errors: list[ObjectError] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "fetched": self.fetched,
            "already_present": self.already_present,
            "failed": len(self.errors),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "objects_per_second": round(self.fetched / self.seconds, 1) if self.seconds else None,
            "stopped_early": self.stopped_early,
            "errors": [{"path": e.path, "uri": e.uri, "reason": e.reason} for e in self.errors],
        }


class DownloadFailed(TooManyFailures):
    """Too many objects were bad; `report` holds what was done and every error."""

    def __init__(self, message: str, report: DownloadReport):
        super().__init__(message)
        self.report = report


@dataclass
class _Item:
    path: str
    uri: S3Uri | None
    relpath: str
    expected: tuple[int, str] | None = None  # (size, etag) from `known`, the listing or a HEAD
    error: str | None = None  # known bad before any request


@dataclass
class _Outcome:
    item: _Item
    kind: str  # "fetched" | "present" | "error"
    size: int = 0
    entry: list | None = None  # index entry [size, etag, mtime_ns]
    reason: str = ""


def download(
    paths: Sequence[str],
    dest: Path,
    *,
    source: S3Uri | None = None,
    client: S3Client | None = None,
    workers: int = DEFAULT_WORKERS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    known: Mapping[str, tuple[int, str]] | None = None,
    progress: ProgressCallback | None = None,
    progress_every: int = PROGRESS_EVERY,
) -> DownloadReport:
    """Fetch every object that list paths `paths` name into `dest` (at `paths.local_path(dest, path)`).

    `source` is the prefix relative paths are below; `known` maps list paths to (size, etag) when the caller
    already has them (a shard plan), otherwise the source prefix is listed once and `s3://` paths outside it are
    HEADed. Paths naming the same local file are fetched once; `total` counts distinct files. `progress` is
    called with (done, total, bytes fetched) every `progress_every` objects and at the end. `client` defaults to
    `s3.make_client` with a connection pool of at least `workers`.

    Image check: the header only — Pillow must recognise the format and read a non-zero width and height
    (`Image.open`, no pixel decoding). A truncated or damaged body is caught later by the packer's full decode.

    Raises `DownloadFailed` (a `TooManyFailures`) when bad/total > `max_bad_fraction`, as soon as that is certain;
    the index of files already written is kept, so a re-run fetches only what is missing.
    """
    started = time.monotonic()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    client = client or make_client(pool_size=max(DEFAULT_POOL_SIZE, workers))
    items = _plan(paths, source)
    _resolve_from_listing(client, items, source, known or {})
    report = DownloadReport(total=len(items))
    index = _read_index(dest)
    written: dict[str, list] = {}
    allowed_bad = max_bad_fraction * len(items)
    _init_pillow()
    fetch = _Fetcher(client, dest, max_bytes, index)
    done = 0
    try:
        for outcome in _run_bounded(fetch, items, workers, stop=lambda: len(report.errors) > allowed_bad):
            done += 1
            if outcome.kind == "error":
                uri = str(outcome.item.uri) if outcome.item.uri else ""
                report.errors.append(ObjectError(outcome.item.path, uri, outcome.reason))
            else:
                written[outcome.item.relpath] = outcome.entry or []
                if outcome.kind == "fetched":
                    report.fetched += 1
                    report.bytes += outcome.size
                else:
                    report.already_present += 1
            if progress and (done % progress_every == 0 or done == len(items)):
                progress(done, len(items), report.bytes)
    finally:
        _merge_index(dest, written)
        report.seconds = time.monotonic() - started
    report.stopped_early = done < len(items)
    order = {item.path: n for n, item in enumerate(items)}
    report.errors.sort(key=lambda e: order[e.path])
    if progress and report.stopped_early:
        progress(done, len(items), report.bytes)
    log.info(
        "downloaded %d objects (%d bytes), %d already present, %d failed, in %.1f s",
        report.fetched,
        report.bytes,
        report.already_present,
        len(report.errors),
        report.seconds,
    )
    if report.errors:
        shown = "\n  ".join(map(str, report.errors[:SHOWN_ERRORS]))
        log.warning("skipped %d bad objects; the first:\n  %s", len(report.errors), shown)
    if len(report.errors) > allowed_bad:
        raise DownloadFailed(_failure_message(report, done, max_bad_fraction), report)
    return report


def _plan(paths: Sequence[str], source: S3Uri | None) -> list[_Item]:
    """One item per distinct local file, in list order; unmappable paths become items with an error."""
    if source is None:
        relative = next((p for p in paths if not is_s3_uri(p)), None)
        if relative is not None:
            raise InputError(f"list path {relative!r} is relative but no source prefix was given (--source)")
    items: list[_Item] = []
    seen: dict[str, _Item] = {}
    for path in paths:
        try:
            uri = source_uri(path, source)
            rel = str(local_relpath(path))
        except InputError as err:
            items.append(_Item(path, None, f"\0{len(items)}", error=str(err)))
            continue
        first = seen.get(rel)
        if first is None:
            seen[rel] = item = _Item(path, uri, rel)
            items.append(item)
        elif first.uri != uri:
            error = f"would be stored at {rel}, which list path {first.path!r} ({first.uri}) already uses"
            items.append(_Item(path, uri, f"\0{len(items)}", error=error))
    return items


def _resolve_from_listing(
    client: S3Client, items: list[_Item], source: S3Uri | None, known: Mapping[str, tuple[int, str]]
) -> None:
    """Fill `expected` from `known`, then from one listing of the source prefix; the rest are HEADed later."""
    under_source: list[_Item] = []
    for item in items:
        if item.error or item.uri is None:
            continue
        if item.path in known:
            size, etag = known[item.path]
            item.expected = (int(size), etag.strip('"'))
        elif source is not None and item.uri.bucket == source.bucket and item.uri.key.startswith(source.key):
            under_source.append(item)
    if not under_source:
        return
    prefix = S3Uri(source.bucket, _shared_prefix([i.uri.key for i in under_source]))  # type: ignore[union-attr]
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        listed = list_objects(client, prefix)
    except (BotoCoreError, ClientError) as err:
        raise TagflowError(f"cannot list {prefix} to learn sizes and ETags: {err}") from err
    log.info("listed %d objects under %s", len(listed), prefix)
    for item in under_source:
        found = listed.get(item.uri.key)  # type: ignore[union-attr]
        if found is None:
            item.error = "no such key in S3 (not in the listing of the source prefix)"
        else:
            item.expected = found


def _shared_prefix(keys: list[str]) -> str:
    """The longest string every key starts with (an S3 prefix, not a path): a shard below one folder lists only it."""
    low, high = min(keys), max(keys)
    n = 0
    while n < min(len(low), len(high)) and low[n] == high[n]:
        n += 1
    return low[:n]


def _run_bounded(
    fetch: Callable[[_Item], _Outcome], items: list[_Item], workers: int, stop: Callable[[], bool]
) -> Iterator[_Outcome]:
    """Outcomes in completion order, with at most 2×`workers` items queued; no new work once `stop()` is true."""
    results: queue.SimpleQueue[tuple[_Item, _Outcome | BaseException]] = queue.SimpleQueue()

    def run(item: _Item) -> None:
        try:
            results.put((item, fetch(item)))
        except BaseException as err:  # a bug, not a bad object: re-raised in the calling thread
            results.put((item, err))

    pending = iter(items)
    in_flight = 0
    crash: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tagflow-download") as pool:
        for item in pending:
            pool.submit(run, item)
            in_flight += 1
            if in_flight >= 2 * workers:
                break
        while in_flight:
            _, result = results.get()
            in_flight -= 1
            if isinstance(result, BaseException):
                crash = crash or result
            elif crash is None:
                yield result
            if crash is None and not stop():
                item = next(pending, None)
                if item is not None:
                    pool.submit(run, item)
                    in_flight += 1
    if crash is not None:
        raise crash


class _Skip(Exception):
    """An object found bad while fetching it; the message is the reason recorded."""


class _Fetcher:
    """The work for one object, run in a pool thread: decide, fetch, check, write whole."""

    def __init__(self, client: S3Client, dest: Path, max_bytes: int, index: Mapping[str, list]):
        self.client = client
        self.dest = dest
        self.max_bytes = max_bytes
        self.index = index
        self.made_dirs: set[Path] = set()
        # Temporary names: one random token per run and a counter (no syscall per object); O_EXCL guards the rest.
        self.tmp_token = f"{TMP_PREFIX}{secrets.token_hex(6)}-"
        self.tmp_counter = itertools.count()  # next() on it is atomic; a generator's is not thread-safe

    def __call__(self, item: _Item) -> _Outcome:
        from botocore.exceptions import BotoCoreError, ClientError

        if item.error:
            return _Outcome(item, "error", reason=item.error)
        assert item.uri is not None
        try:
            target = local_path(self.dest, item.path)
            if item.expected is None:
                head = self.client.head_object(Bucket=item.uri.bucket, Key=item.uri.key)
                item.expected = (head["ContentLength"], head["ETag"].strip('"'))
            size, etag = item.expected
            problem = self._size_problem(size)
            if problem:
                return _Outcome(item, "error", reason=problem)
            present = self._present(item.relpath, target, size, etag)
            if present:
                return _Outcome(item, "present", entry=present)
            data, etag = self._get(item.uri)
            problem = self._size_problem(len(data)) or _image_problem(data)
            if problem:
                return _Outcome(item, "error", reason=problem)
            entry = self._write(target, data, etag)
            return _Outcome(item, "fetched", size=len(data), entry=entry)
        except ClientError as err:
            return _Outcome(item, "error", reason=_client_error_reason(err))
        except BotoCoreError as err:
            return _Outcome(item, "error", reason=f"{type(err).__name__} after retries: {err}")
        except (InputError, _Skip) as err:
            return _Outcome(item, "error", reason=str(err))
        except IsADirectoryError:
            return _Outcome(
                item, "error", reason=f"cannot write {item.relpath}: a folder of that name holds other objects"
            )
        except (FileExistsError, NotADirectoryError):
            return _Outcome(
                item, "error", reason=f"cannot write {item.relpath}: a file stands where a folder of its path should be"
            )
        except OSError as err:
            return _Outcome(item, "error", reason=f"cannot write {item.relpath}: {err.strerror}")

    def _size_problem(self, size: int) -> str | None:
        if size == 0:
            return "empty object (0 bytes)"
        if size > self.max_bytes:
            return f"{size} bytes is larger than the limit of {self.max_bytes} bytes"
        return None

    def _present(self, relpath: str, target: Path, size: int, etag: str) -> list | None:
        """The index entry if `target` is the listed object as recorded when we wrote it, else None."""
        entry = self.index.get(relpath)
        if not entry or entry[0] != size or entry[1] != etag:
            return None
        try:
            st = target.stat()
        except OSError:
            return None
        return entry if st.st_size == size and st.st_mtime_ns == entry[2] else None

    def _get(self, uri: S3Uri) -> tuple[bytes, str]:
        """The whole body and its ETag; a body cut off mid-read is fetched again (botocore does not retry it)."""
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        for attempt in range(1, BODY_ATTEMPTS + 1):
            response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            body = response["Body"]
            length = response.get("ContentLength", 0)
            if length > self.max_bytes:  # grew since it was listed: don't read it
                body.close()
                raise _Skip(f"{length} bytes is larger than the limit of {self.max_bytes} bytes")
            try:
                return body.read(), response["ETag"].strip('"')
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError):
                if attempt == BODY_ATTEMPTS:
                    raise
                log.debug("body of %s cut off (attempt %d), fetching again", uri, attempt)
                time.sleep(0.1 * attempt)
        raise AssertionError("unreachable")

    def _write(self, target: Path, data: bytes, etag: str) -> list:
        """Write `data` to `target` whole (temporary name in the same folder, then rename); the index entry."""
        folder = target.parent
        if folder not in self.made_dirs:
            folder.mkdir(parents=True, exist_ok=True)
            self.made_dirs.add(folder)
        tmp = folder / f"{self.tmp_token}{next(self.tmp_counter)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                mtime_ns = os.fstat(fd).st_mtime_ns  # a rename keeps it
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return [len(data), etag, mtime_ns]


def _client_error_reason(err: Any) -> str:
    error = err.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code in MISSING_CODES:
        return "no such key in S3 (404)"
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return f"S3 error {code or status}: {error.get('Message') or err}"


def _init_pillow() -> None:
    """Register Pillow's decoders once, before threads race to do it lazily."""
    from PIL import Image

    Image.init()


def _image_problem(data: bytes) -> str | None:
    """Why `data` is not an image Pillow can decode, judged from its header; None if it looks fine."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except UnidentifiedImageError:
        return "not a decodable image: no image format recognises its header"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"not a decodable image: {err}"
    if width <= 0 or height <= 0:
        return f"not a decodable image: its header gives a size of {width}x{height}"
    return None


def _read_index(dest: Path) -> dict[str, list]:
    """The sidecar index of files written by earlier runs; empty if absent or unreadable (everything refetched)."""
    path = dest / INDEX_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable download index %s (%s): all objects are fetched again", path, err)
        return {}
    return doc.get("objects", {}) if doc.get("version") == 1 else {}


def _merge_index(dest: Path, entries: Mapping[str, list]) -> None:
    """Add `entries` to the on-disk index under an exclusive lock; the file is replaced whole."""
    if not entries:
        return
    with open(dest / LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = _read_index(dest)
        merged.update(entries)
        tmp = dest / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            with open(tmp, "x") as fh:
                json.dump({"version": 1, "objects": merged}, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest / INDEX_NAME)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _failure_message(report: DownloadReport, done: int, max_bad_fraction: float) -> str:
    bad, total = len(report.errors), report.total
    head = f"{bad} of {total} objects failed ({bad / total:.2%}), more than the allowed {max_bad_fraction:.2%}"
    if done < total:
        head += f"; stopped after {done} of {total} objects"
    shown = [f"  {e}" for e in report.errors[:SHOWN_ERRORS]]
    more = [f"  ... and {bad - SHOWN_ERRORS} more"] if bad > SHOWN_ERRORS else []
    return "\n".join([head + ":", *shown, *more])
