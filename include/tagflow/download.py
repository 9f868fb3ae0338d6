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
stale if another run (or a person) rewrote the file after it was recorded.

The index is rewritten once, at the end of a run. So that a run killed before then (SIGKILL, OOM, a lost worker)
loses nothing, each run also appends to its own journal as files land:

    DEST/%tagflow-download.journals/TOKEN.jsonl   one JSON array per line:
        ["f", RELPATH, size, etag, mtime_ns]      a file renamed into place (its index entry)
        ["t", RELFOLDER]                          written before the run's first temporary file in that folder

A line is written with one `write` after the rename, so a killed process never leaves a line for a file that is not
whole (a torn last line is ignored), and the journal is fsync'd every `JOURNAL_SYNC_EVERY` lines. The run holds an
exclusive `flock` on its journal; the next run (under the index lock) treats a journal nobody holds as a dead run's:
it folds the entries into the index, deletes that run's leftover `%part-TOKEN-*` temporaries in the folders the
journal names, and removes the journal. A finished run merges its entries into the index and removes its journal.
The `%` names (index, lock, journals, temporaries) can never collide with an image: `paths.local_relpath` writes
`%` only as `%XX` or a bare `%`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import itertools
import json
import logging
import os
import queue
import secrets
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagflow.errors import InputError, TagflowError, TooManyFailures, os_error_reason, os_failure, quote
from tagflow.paths import is_s3_uri, local_path, local_relpath, source_uri
from tagflow.s3 import DEFAULT_POOL_SIZE, S3Uri, list_objects, make_client

if TYPE_CHECKING:
    from PIL import Image

    from tagflow.s3 import S3Client

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_WORKERS = 32
DEFAULT_MAX_BYTES = 50 * MiB
DEFAULT_MAX_BAD_FRACTION = 0.01
INDEX_NAME = "%tagflow-download.json"
LOCK_NAME = "%tagflow-download.lock"
TMP_PREFIX = "%part-"
JOURNAL_DIR = "%tagflow-download.journals"
JOURNAL_SYNC_EVERY = 256  # journal lines between fsyncs: what an OS crash (not a killed process) can lose
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
        return f"{quote(self.path)}: {self.reason}"


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
    dest = ensure_folder(Path(dest), "download destination")
    client = client or make_client(pool_size=max(DEFAULT_POOL_SIZE, workers))
    items = _plan(paths, source)
    _resolve_from_listing(client, items, source, known or {})
    report = DownloadReport(total=len(items))
    index, journal = _open_run(dest)
    written: dict[str, list] = {}
    allowed_bad = max_bad_fraction * len(items)
    _init_pillow()
    fetch = _Fetcher(client, dest, max_bytes, index, journal)
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
        _close_run(dest, journal, written)
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
            raise InputError(f"list path {quote(relative)} is relative but no source prefix was given (--source)")
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
            error = (
                f"would be stored at {quote(rel)}, which list path {quote(first.path)} ({quote(first.uri)}) "
                "already uses"
            )
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
        raise TagflowError(f"cannot list {quote(prefix)} to learn sizes and ETags: {quote(err)}") from err
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

    def __init__(self, client: S3Client, dest: Path, max_bytes: int, index: Mapping[str, list], journal: _Journal):
        self.client = client
        self.dest = dest
        self.max_bytes = max_bytes
        self.index = index
        self.journal = journal
        self.made_dirs: set[Path] = set()
        # Temporary names: the run's token and a counter (no syscall per object); O_EXCL guards the rest.
        self.tmp_token = f"{TMP_PREFIX}{journal.token}-"
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
            self.journal.landed(item.relpath, entry)
            return _Outcome(item, "fetched", size=len(data), entry=entry)
        except ClientError as err:
            return _Outcome(item, "error", reason=_client_error_reason(err))
        except BotoCoreError as err:
            return _Outcome(item, "error", reason=f"{type(err).__name__} after retries: {quote(err)}")
        except (InputError, _Skip) as err:
            return _Outcome(item, "error", reason=str(err))
        except IsADirectoryError:
            reason = f"cannot write {quote(item.relpath)}: a folder of that name holds other objects"
            return _Outcome(item, "error", reason=reason)
        except (FileExistsError, NotADirectoryError):
            reason = f"cannot write {quote(item.relpath)}: a file stands where a folder of its path should be"
            return _Outcome(item, "error", reason=reason)
        except OSError as err:
            if err.errno in DEST_ERRNOS:  # the folder, not this object: stop the run (what landed is journaled)
                raise os_failure(f"cannot write {quote(str(self.dest / item.relpath))}", err) from None
            return _Outcome(item, "error", reason=f"cannot write {quote(item.relpath)}: {os_error_reason(err)}")

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
            self.journal.temporaries_in(folder.relative_to(self.dest))
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


def open_header(data: bytes) -> Image.Image:
    """Identify `data` and read its header as `PIL.Image.open` does (lazily: no pixel is decoded), but without
    Pillow's own decompression-bomb check, which warns on stderr above 89 M pixels and raises above 179 M whatever
    the caller's limit is (it is one process-wide setting). Callers apply their own limit to `.size`: the packer's
    is `PackParams.max_pixels`; the downloader stores any size and leaves that judgement to the packer.

    Raises `PIL.UnidentifiedImageError` (an OSError) when no format recognises the header, as `Image.open` does.
    """
    from PIL import Image, UnidentifiedImageError

    Image.init()  # every plugin registered, once
    prefix = data[:16]
    for name in list(Image.ID):
        factory, accept = Image.OPEN[name]
        try:
            accepted = accept(prefix) if accept else True
            if accepted and not isinstance(accepted, str):  # a str says why not
                return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # not this format, as in Image.open
    raise UnidentifiedImageError("no image format recognises its header")


def _image_problem(data: bytes) -> str | None:
    """Why `data` is not an image Pillow can decode, judged from its header; None if it looks fine."""
    try:
        with open_header(data) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        return f"not a decodable image: {err}"
    if width <= 0 or height <= 0:
        return f"not a decodable image: its header gives a size of {width}x{height}"
    return None


# --- the destination folder ------------------------------------------------------------------------------------

# Errors about the folder rather than one object: the run stops with a message instead of failing every object.
DEST_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def ensure_folder(path: Path, role: str) -> Path:
    """Create folder `path` (and its parents) if missing and check it can be written to.

    Raises InputError naming the path, its `role` ("download destination", "pack output folder") and what is wrong:
    a file stands there or on its path, permission denied, read-only file system, disk full.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(
            f"{role} {quote(str(path))} exists but is not a folder: expected a folder, or a name to create one"
        ) from None
    except NotADirectoryError:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        where = f": {quote(str(blocker))} is a file" if blocker else ""
        raise InputError(f"cannot create {role} {quote(str(path))}{where}; expected folders along its path") from None
    except OSError as err:
        raise os_failure(f"cannot create {role} {quote(str(path))}", err) from None
    if not os.access(path, os.W_OK | os.X_OK):
        reason = "the file system is read-only" if _read_only(path) else "permission denied"
        raise InputError(f"{role} {quote(str(path))} is not writable: {reason}")
    return path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# --- the index and the per-run journal -------------------------------------------------------------------------


class _Journal:
    """This run's append-only record of files landed (module docstring); written from the pool threads."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.token = secrets.token_hex(6)
        self.path = dest / JOURNAL_DIR / f"{self.token}.jsonl"
        self.path.parent.mkdir(exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.path, flags, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # held until close: a journal nobody holds belongs to a dead run
        self.lines = itertools.count(1)

    def _append(self, record: list) -> None:
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
        try:
            os.write(self.fd, line + b"\n")  # one write per line: O_APPEND keeps lines from different threads whole
            if next(self.lines) % JOURNAL_SYNC_EVERY == 0:
                os.fsync(self.fd)
        except OSError as err:
            raise os_failure(f"cannot write {quote(str(self.path))}", err) from None

    def landed(self, relpath: str, entry: list) -> None:
        """`relpath` is in place, whole; `entry` is its index entry [size, etag, mtime_ns]."""
        self._append(["f", relpath, *entry])

    def temporaries_in(self, folder: Path) -> None:
        """This run is about to create temporary files in `folder` (relative to the destination)."""
        self._append(["t", str(folder)])

    def close(self, remove: bool) -> None:
        try:
            if remove:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


def _read_journal(path: Path) -> tuple[dict[str, list], set[str]]:
    """A journal's file entries and temporary folders; a torn or foreign line (a killed write) is skipped."""
    entries: dict[str, list] = {}
    folders: set[str] = set()
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                record = json.loads(raw.decode("utf-8", "surrogateescape"))
            except ValueError:
                continue
            if isinstance(record, list) and len(record) == 5 and record[0] == "f":
                entries[record[1]] = record[2:]
            elif isinstance(record, list) and len(record) == 2 and record[0] == "t":
                folders.add(record[1])
    return entries, folders


@contextlib.contextmanager
def _index_lock(dest: Path) -> Iterator[None]:
    try:
        lock = open(dest / LOCK_NAME, "a")  # noqa: SIM115 - closed below, after the flock is released
    except OSError as err:
        raise os_failure(f"download destination {quote(str(dest))} is not writable", err) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _open_run(dest: Path) -> tuple[dict[str, list], _Journal]:
    """The index with every journal's entries, dead runs folded in and cleaned up, and this run's new journal."""
    with _index_lock(dest):
        index = _read_index(dest)
        dead: list[Path] = []
        for path in sorted((dest / JOURNAL_DIR).glob("*.jsonl")):
            with open(path, "rb") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    alive = True  # a run still going: use its entries, leave its journal alone
                else:
                    alive = False
                entries, folders = _read_journal(path)
            index.update(entries)
            if not alive:
                dead.append(path)
                for folder in folders:
                    if Path(folder).is_absolute() or ".." in Path(folder).parts:
                        continue  # never written by a run; not followed
                    for tmp in (dest / folder).glob(f"{TMP_PREFIX}{path.stem}-*"):
                        tmp.unlink(missing_ok=True)
        if dead:
            log.info("resuming from %d interrupted run(s) in %s", len(dead), dest)
            try:
                _write_index(dest, index)
            except OSError as err:
                raise os_failure(f"cannot write {quote(str(dest / INDEX_NAME))}", err) from None
            for path in dead:
                path.unlink(missing_ok=True)
        try:
            journal = _Journal(dest)
        except OSError as err:
            raise os_failure(f"cannot write the download journal in {quote(str(dest / JOURNAL_DIR))}", err) from None
    return index, journal


def _close_run(dest: Path, journal: _Journal, entries: Mapping[str, list]) -> None:
    """Merge this run's entries into the index and remove its journal; if that fails, the journal stays for the
    next run to fold in."""
    try:
        with _index_lock(dest):
            if entries:
                merged = _read_index(dest)
                merged.update(entries)
                _write_index(dest, merged)
            journal.close(remove=True)
            with contextlib.suppress(OSError):  # only when empty: another run may be starting its own
                (dest / JOURNAL_DIR).rmdir()
    except (OSError, InputError) as err:
        journal.close(remove=False)
        log.warning("could not update the download index in %s (%s); the next run resumes from the journal", dest, err)


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


def _write_index(dest: Path, objects: Mapping[str, list]) -> None:
    """Replace the index whole (temporary name, fsync, rename); the caller holds the index lock."""
    tmp = dest / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    try:
        with open(tmp, "x") as fh:
            json.dump({"version": 1, "objects": objects}, fh, separators=(",", ":"))
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
