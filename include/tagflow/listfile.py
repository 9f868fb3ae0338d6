"""The list file: which images exist and their multi-hot labels, validated before any download.

Seed format, one line per image, no header::

    ID  l1 l2 ... lN  PATH

`ID` is a non-negative integer (at most 2**63-1), each `l` is `0` or `1`, `PATH` is `s3://bucket/key` or a key
relative to a source prefix (a leading `/` is tolerated and dropped). Fields are separated by tabs when a line has
any tab (so a path may contain spaces), otherwise by runs of spaces; ASCII spaces around a field are ignored, as
MXNet's im2rec does. CRLF line ends, a trailing newline and a UTF-8 byte-order mark at the file's start are
tolerated. Nothing else is stripped: a field that starts or ends with other whitespace (U+00A0 NO-BREAK SPACE,
U+3000, U+FEFF, U+2028, ...) is refused with its code point, since stripping it would name a different S3 object
and keeping it is almost always a copy-paste accident. A path may not contain control characters (tab, CR, ...),
which no list format here could carry, and is at most 1024 bytes (S3's key limit).

Every problem is collected as `LIST:LINE: what is wrong` (LINE 1-based) and raised together as `ListFileError`;
parsing never raises anything else on bad bytes. Quoted values are cut (`tagflow.errors.quote`). What is valid but
probably a mistake (images without a label, labels no image carries, one path under several IDs) is not an error:
`list_warnings` counts it.

Speed (the seed lists are 155,000 lines x 334 labels, 109 MB; goal 0.5 s): a fast path takes the well-formed
lines in bulk with numpy, never touching a line in Python: find the newlines, read each ID from a small window at
the line start, gather every line's fixed-width label section `l<sep>l<sep>...` and check it as 2-byte pairs, and
gather the paths into one buffer that is screened and decoded at once. Bulk steps run block by block through
small reused buffers (fresh 100 MB temporaries cost more in page faults than the arithmetic). Any line the fast
path does not take verbatim goes through `_parse_line`, the reference parser, which also writes the error
messages; both give identical results (the tests compare them on fuzzed input). bench/bench_parse.py measures it.

`write_list` writes the normalized form `ID<TAB>l1<TAB>...<TAB>lN<TAB>PATH<LF>`, which is also the `.lst` format
MXNet's im2rec reads (it splits on tabs and reads labels as floats).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from tagflow.errors import InputError, ListFileError, quote
from tagflow.s3 import read_location

log = logging.getLogger(__name__)

MAX_ID = 2**63 - 1
_BLOCK_BYTES = 1 << 18  # bulk steps work through buffers of this size (cache-sized, reused)
_MAX_FAST_ID_DIGITS = 18  # any 18-digit number fits in int64; longer IDs take the checked path
_BOM = b"\xef\xbb\xbf"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_KEY_BYTES = 1024  # S3's limit on an object key (UTF-8)
# Whitespace beyond the ASCII separators: every non-ASCII character str.isspace() accepts (tests check the list),
# and the invisible ones that are not Unicode whitespace but read as nothing (U+180E, U+200B, U+2060, U+FEFF).
_OTHER_SPACE = frozenset(
    "\x85\xa0\u1680\u180e\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u200b"
    "\u2028\u2029\u202f\u205f\u2060\u3000\ufeff"
)
_OTHER_SPACE_RE = re.compile("[" + "".join(sorted(_OTHER_SPACE)) + "]")
_NOT_A_SEPARATOR = "only ASCII spaces and tabs separate fields"


@dataclass(frozen=True, eq=False)
class ListFile:
    """A parsed list file: row i is image `ids[i]` with labels `labels[i]` stored at `paths[i]`."""

    name: str
    ids: np.ndarray  # int64, shape (n,)
    labels: np.ndarray  # uint8 0/1, shape (n, num_labels)
    paths: list[str]  # normalized: leading '/' dropped from relative keys; s3:// URIs as written
    sha256: str  # of the raw bytes parsed
    lines: np.ndarray | None = None  # int64 1-based line of each row in the file; None if rows come from several

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_labels(self) -> int:
        return int(self.labels.shape[1])

    @property
    def is_sorted(self) -> bool:
        """True if IDs ascend strictly (the canonical order every later stage uses)."""
        return bool(np.all(self.ids[1:] > self.ids[:-1]))

    def sorted_by_id(self) -> ListFile:
        """A new ListFile in ascending ID order: the canonical order for shards, packing and manifests."""
        order = np.argsort(self.ids, kind="stable")
        return ListFile(
            name=self.name,
            ids=self.ids[order],
            labels=self.labels[order],
            paths=[self.paths[i] for i in order.tolist()],
            sha256=self.sha256,
            lines=None if self.lines is None else self.lines[order],
        )

    def subset(self, start: int, stop: int) -> ListFile:
        """Rows [start, stop), e.g. one shard of a plan (arrays are views, not copies)."""
        lines = None if self.lines is None else self.lines[start:stop]
        return ListFile(
            self.name, self.ids[start:stop], self.labels[start:stop], self.paths[start:stop], self.sha256, lines
        )

    def label_counts(self) -> np.ndarray:
        """How many images carry each label (int64, one entry per column)."""
        return self.labels.sum(axis=0, dtype=np.int64)


def parse_list(source: bytes | str | Path, num_labels: int, *, name: str | None = None) -> ListFile:
    """Parse and validate a list file in the seed format (module docstring); rows stay in file order.

    `source` is the file's content (bytes) or its path (str or Path). `name` is what error messages call the file
    (default: the path, or "<list>" for bytes). Raises `ListFileError` with every problem found, or `InputError`
    if the file cannot be read.
    """
    if num_labels < 1:
        raise InputError(f"the number of labels must be at least 1, got {num_labels}")
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        name = name or "<list>"
    else:
        path = Path(source)
        name = name or str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path}: cannot read the list file ({exc.strerror or exc})") from None
    lf = _parse(data, num_labels, name)
    log.debug("parsed %s: %d images x %d labels", name, len(lf), num_labels)
    return lf


def concat_lists(parts: list[ListFile], *, name: str) -> ListFile:
    """Several list files as one (e.g. a list's daily partitions), in the order given.

    An image ID may appear in only one of them; a repeat names both files. The result's sha256 covers each part's
    name and content hash, so the same partitions give the same digest.
    """
    if not parts:
        raise InputError(f"{name}: no list file to read")
    seen: dict[int, str] = {}
    problems: list[str] = []
    for part in parts:
        for image_id in part.ids.tolist():
            first = seen.setdefault(image_id, part.name)
            if first != part.name:
                problems.append(f"{part.name}: ID {image_id} is already listed in {first}; each image is listed once")
    if problems:
        raise ListFileError(problems)
    digest = hashlib.sha256("\n".join(f"{p.name}\t{p.sha256}" for p in parts).encode()).hexdigest()
    return ListFile(
        name=name,
        ids=np.concatenate([p.ids for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        paths=[path for p in parts for path in p.paths],
        sha256=digest,
    )


# ---------------------------------------------------------------------------------------------------- parsing


def infer_num_labels(data: bytes, *, name: str = "<list>") -> int:
    """The label count a list's first line implies (fields − 2), for verbs that only need the paths.

    Every line is then validated against it by `parse_list`, so a file whose lines disagree still fails there.
    """
    first = data[len(_BOM) :] if data.startswith(_BOM) else data
    line = first.split(b"\n", 1)[0].removesuffix(b"\r")
    fields = line.split(b"\t") if b"\t" in line else [f for f in line.split(b" ") if f]  # as `_parse_line` splits
    if len(fields) < 3:
        raise ListFileError(
            [
                f"{name}:1: cannot tell the label count: expected 'ID<TAB>label...<TAB>path', "
                f"found {len(fields)} field(s); pass --num-labels"
            ]
        )
    return len(fields) - 2


def _line_bounds(data: bytes, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive, before the \\n) of every line; a final \\n ends the last line, a BOM is skipped."""
    # In blocks through one reused buffer: a whole-file boolean temporary costs more in page faults than compares.
    found, buf = [], np.empty(_BLOCK_BYTES, bool)
    for at in range(0, len(arr), _BLOCK_BYTES):
        part = arr[at : at + _BLOCK_BYTES]
        hit = np.equal(part, ord("\n"), out=buf[: len(part)])
        found.append(np.flatnonzero(hit) + at)
    newlines = np.concatenate(found) if found else np.zeros(0, np.int64)
    if data.endswith(b"\n"):
        starts = np.concatenate([[0], newlines[:-1] + 1])
        ends = newlines
    else:
        starts = np.concatenate([[0], newlines + 1])
        ends = np.concatenate([newlines, [len(data)]])
    if data.startswith(_BOM):
        starts[0] = len(_BOM)
    return starts.astype(np.int64), ends.astype(np.int64)


def _parse(data: bytes, num_labels: int, name: str, *, fast: bool = True) -> ListFile:
    """Parse `data`; `fast=False` sends every line through the reference parser (tests compare the two)."""
    digest = hashlib.sha256(data).hexdigest()
    if not data or data.isspace() or data in (_BOM, _BOM + b"\n", _BOM + b"\r\n"):
        raise ListFileError(
            [f"{name}:1: the file is empty (expected one line per image: ID, {num_labels} label values, path)"]
        )
    arr = np.frombuffer(data, np.uint8)
    starts, ends = _line_bounds(data, arr)
    n = len(starts)
    if fast:
        ok, ids, labels, paths = _fast(data, arr, starts, ends, num_labels, b"\t" if b"\t" in data else b" ")
    else:
        ok = np.zeros(n, bool)
        ids, labels, paths = np.zeros(0, np.int64), np.zeros((0, num_labels), np.uint8), []

    errors: list[tuple[int, str]] = []
    slow = np.flatnonzero(~ok)
    if len(slow):
        # Merge the reference parser's rows for the lines the fast path left out, keeping file order.
        rows_ok = ok.copy()
        has_id = ok.copy()  # lines whose ID parsed, even if something else on them is wrong
        all_ids = np.zeros(n, np.int64)
        all_labels = np.zeros((n, num_labels), np.uint8)
        all_paths: list[str] = [""] * n
        fast_rows = np.flatnonzero(ok)
        all_ids[fast_rows] = ids
        all_labels[fast_rows] = labels
        for row, path in zip(fast_rows.tolist(), paths, strict=True):
            all_paths[row] = path
        for row in slow.tolist():
            start = int(starts[row])
            image_id, row_labels, path, line_errors = _parse_line(data[start : ends[row]], num_labels, start)
            if image_id is not None:
                all_ids[row] = image_id
                has_id[row] = True
            if line_errors:
                errors.extend((row, msg) for msg in line_errors)
            else:
                all_labels[row], all_paths[row] = row_labels, path
                rows_ok[row] = True
        with_id = np.flatnonzero(has_id)
        errors.extend(_duplicates(all_ids[with_id], with_id))
        valid = np.flatnonzero(rows_ok)
        ids, labels = all_ids[valid], all_labels[valid]
        paths = [all_paths[row] for row in valid.tolist()]
    else:
        errors.extend(_duplicates(ids, None))

    if errors:
        errors.sort(key=lambda e: e[0])  # stable: a line's own messages keep their column order
        raise ListFileError([f"{name}:{row + 1}: {msg}" for row, msg in errors])
    # Every line is a row (an empty line is an error), so row r is line r + 1.
    return ListFile(name=name, ids=ids, labels=labels, paths=paths, sha256=digest, lines=np.arange(1, len(ids) + 1))


def _fast(
    data: bytes, arr: np.ndarray, starts: np.ndarray, ends: np.ndarray, num_labels: int, sep: bytes
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Bulk-parse the lines that are well formed verbatim: `ID sep (l sep)*N PATH` with single separators.

    Returns (ok mask over lines, ids, labels, paths) for the ok lines. A line not accepted here is not
    necessarily wrong (extra spaces, CR in the middle, odd ID); it goes to the reference parser.
    """
    n, size = len(starts), len(arr)
    width = 2 * num_labels  # "l<sep>" per label, including the separator before the path
    window = _MAX_FAST_ID_DIGITS + 2
    empty = np.zeros(0, np.int64), np.zeros((0, num_labels), np.uint8), []
    if size < window + width:
        return np.zeros(n, bool), *empty

    # ID: up to 18 ASCII digits, then the separator, found in a small window at each line start.
    ok = (ends - starts >= width + 3) & (starts + window <= size)
    head = sliding_window_view(arr, window)[np.minimum(starts, size - window)]
    is_sep = head == sep[0]
    pos = is_sep.argmax(axis=1)
    digits = head[:, :_MAX_FAST_ID_DIGITS] - np.uint8(ord("0"))  # a non-digit wraps above 9
    in_id = np.arange(_MAX_FAST_ID_DIGITS) < pos[:, None]
    ok &= is_sep[np.arange(n), pos] & (pos >= 1) & (pos <= _MAX_FAST_ID_DIGITS) & np.all((digits <= 9) | ~in_id, axis=1)
    ids = np.zeros(n, np.int64)
    for col in range(int(pos[ok].max(initial=0))):
        ids = np.where(in_id[:, col], ids * 10 + digits[:, col], ids)

    # Labels: gather each line's fixed-width section "l<sep>...l<sep>" block by block; check it as byte pairs.
    first = starts + pos + 1
    path_start = first + width
    ok &= (path_start < ends) & (ends - path_start <= MAX_KEY_BYTES)  # longer: the reference parser measures the key
    source = np.where(ok, first, 0)
    sections = sliding_window_view(arr, width)
    pair = ord("1") | (sep[0] << 8)  # little-endian uint16 of b"1<sep>"; x | 1 == pair iff x is b"0<sep>"/b"1<sep>"
    labels = np.empty((n, num_labels), np.uint8)
    step = max(8, _BLOCK_BYTES // width) // 8 * 8  # rows per block, a multiple of 8 so a block is whole uint64s
    ors, hits = np.empty(step * width // 8, np.uint64), np.empty(step * width // 8, bool)
    for at in range(0, n, step):
        block = sections[source[at : at + step]]  # gathers each line's label section
        m = len(block)
        pairs = block.view("<u2")
        if m == step:  # whole block at once, four pairs per uint64; row by row only if something is off
            words = block.reshape(-1).view("<u8")
            np.bitwise_or(words, 0x0001000100010001, out=ors)
            if not np.equal(ors, pair * 0x0001000100010001, out=hits).all():
                ok[at : at + m] &= ((pairs | 1) == pair).all(axis=1)
        else:
            ok[at : at + m] &= ((pairs | 1) == pair).all(axis=1)
        np.bitwise_and(pairs, 1, out=labels[at : at + m], casting="unsafe")

    # Paths: joined by \n (no line holds one), screened and decoded at once; anything odd gets the per-path check.
    rows = np.flatnonzero(ok)
    if not rows.size:
        return ok, *empty
    # Gather each path and the byte after it (its line's \n) into one buffer: the paths, each ending in \n.
    path_begin = path_start[rows]
    spans = ends[rows] - path_begin + 1
    after = np.cumsum(spans)
    index = np.repeat(path_begin - (after - spans), spans)
    index += np.arange(len(index))
    np.minimum(index, size - 1, out=index)  # the last line may have no \n
    buffer = arr[index]
    buffer[after - 1] = ord("\n")
    odd = bool(np.any(buffer >= 0x7F) or np.any((buffer < 0x20) & (buffer != ord("\n")) & (buffer != ord("\r"))))
    body = b"\n" + buffer.tobytes()  # every path framed by \n
    if b"\r" in body:
        body = body.replace(b"\r\n", b"\n")  # CRLF line ends
        odd = odd or b"\r" in body
    norm = body
    while b"\n/" in norm:
        norm = norm.replace(b"\n/", b"\n")  # leading slashes of relative keys
    suspect = (
        odd  # not ASCII, or a control character
        or b"\n\n" in norm
        or b"\n " in body
        or b" \n" in body
        or (sep == b" " and b" " in body)
        or b"\ns3:" in norm
    )
    if suspect:
        good = np.array([_path_ok(raw, sep) for raw in body[1:-1].split(b"\n")], bool)
        if not good.all():
            ok[rows[~good]] = False
            norm = b"\n".join([b"", *(p for p, g in zip(norm[1:-1].split(b"\n"), good, strict=True) if g), b""])
    paths = norm[1:-1].decode("utf-8").split("\n") if ok.any() else []
    if ok.all():
        return ok, ids, labels, paths
    return ok, ids[ok], labels[ok], paths


def _path_ok(raw: bytes, sep: bytes) -> bool:
    """Whether the reference parser would take `raw`, the rest of a line after its last label, as it is."""
    try:
        path = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if path != path.strip(" ") or (sep == b" " and " " in path):
        return False
    return _path_problem(path) is None


def _s3_problem(path: str) -> str | None:
    """Why `path` (starting with "s3:") is not a usable `s3://BUCKET/KEY`, or None."""
    if not path.startswith("s3://"):
        return None  # a relative key that merely starts with "s3:" is a key like any other
    bucket, _, key = path[len("s3://") :].partition("/")
    if not bucket or not key:
        return "expected s3://BUCKET/KEY"
    return None


def _code_point(ch: str) -> str:
    """`U+00A0 (NO-BREAK SPACE)`: how messages name a character a person cannot see."""
    name = unicodedata.name(ch, None) or {"\x85": "NEXT LINE"}.get(ch)
    return f"U+{ord(ch):04X}" + (f" ({name})" if name else "")


def _edge_space(value: str) -> str | None:
    """`starts with U+00A0 (NO-BREAK SPACE)` if `value` begins or ends with whitespace other than ASCII space/tab."""
    if value[:1] in _OTHER_SPACE:
        return f"starts with {_code_point(value[0])}"
    if value[-1:] in _OTHER_SPACE:
        return f"ends with {_code_point(value[-1])}"
    return None


def _foreign_space(text: str) -> str | None:
    """A hint naming the first non-ASCII whitespace in `text`, which a reader may take for a separator."""
    found = _OTHER_SPACE_RE.search(text)
    return (
        None if found is None else f"{_code_point(found.group())} in the line is not a separator ({_NOT_A_SEPARATOR})"
    )


def _path_problem(path: str) -> str | None:
    """Why `path`, a list line's last field without its surrounding ASCII spaces, is not a usable path, or None."""
    if not path:
        return "missing path (the last field is empty)"
    if edge := _edge_space(path):
        return f"path {quote(path)} {edge}; {_NOT_A_SEPARATOR}"
    if control := _CONTROL.search(path):
        return f"path {quote(path)} contains control character 0x{ord(control.group()):02x}"
    norm = path.lstrip("/")
    if not norm:
        return f"path {quote(path)} names no file"
    if norm.startswith("s3:") and (problem := _s3_problem(norm)):
        return f"path {quote(path)} is not a valid S3 URI ({problem})"
    key = norm[len("s3://") :].partition("/")[2] if norm.startswith("s3://") else norm
    if len(key) * 4 > MAX_KEY_BYTES and (size := len(key.encode("utf-8"))) > MAX_KEY_BYTES:
        return f"path {quote(path)} is longer than an S3 key may be ({size} bytes, at most {MAX_KEY_BYTES})"
    return None


def _empty_fields(fields: list[str]) -> str | None:
    """What is empty on a tab-separated line whose field count is wrong (a stray tab), or None."""
    empty = [col for col, f in enumerate(fields, start=1) if not f]
    if not empty:
        return None
    said = []
    if empty[0] == 1:
        said.append("the line starts with an empty field (a tab before the ID)")
    middle = [col for col in empty if 1 < col < len(fields)]
    if middle:
        shown = ", ".join(map(str, middle[:5])) + (f" and {len(middle) - 5} more" if len(middle) > 5 else "")
        said.append(
            f"column{'s' if len(middle) > 1 else ''} {shown} {'are' if len(middle) > 1 else 'is'} empty "
            "(nothing between two tabs)"
        )
    if empty[-1] == len(fields):
        said.append("the line ends with an empty field (a tab after the path)")
    return "; ".join(said)


def _parse_line(
    raw: bytes, num_labels: int, line_offset: int
) -> tuple[int | None, np.ndarray | None, str | None, list[str]]:
    """The reference parser for one line (without its \\n): (id, labels, path, errors).

    `errors` lists the line's problems in column order; the ID is returned whenever it parsed (duplicates are
    reported even on lines with other errors), labels and path only if the line is entirely valid.
    """
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = line_offset + exc.start
        return None, None, None, [f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte offset {offset} of the file"]
    if not text.strip(" \t"):
        return None, None, None, [f"empty line (expected ID, {num_labels} label values, path)"]
    tabbed = "\t" in text
    fields = [f.strip(" ") for f in text.split("\t")] if tabbed else [f for f in text.split(" ") if f]

    # The field count first: a stray tab or a space between tab-separated fields explains a bad ID better than
    # "missing ID" or "not an integer" does.
    shape: str | None = None
    id_explained = False  # the shape message already says why the first field is no ID
    rest = fields[1:]
    if len(rest) != num_labels + 1:
        expected = f"expected {num_labels + 2} tab-separated fields (ID, {num_labels} label values, path)"
        if not rest:
            shape = f"nothing after the ID (expected {num_labels} label values, then a path)"
        elif len(rest) == num_labels and all(v in ("0", "1") for v in rest):
            shape = f"missing path after the {num_labels} label values"
        elif len(rest) < num_labels and all(v in ("0", "1") for v in rest):
            some = f"{len(rest)} label value{'s' if len(rest) > 1 else ''}"
            shape = f"{some} and no path after the ID (expected {num_labels} label values, then a path)"
        elif tabbed and any(" " in f for f in fields[: min(num_labels + 1, len(fields) - 1)]):  # not in the path
            shape = (
                "the line mixes tabs and spaces between fields (a line with a tab is split at tabs only, so that "
                f"its path may contain spaces): {expected}, found {len(fields)}"
            )
            id_explained = True
        elif tabbed and (empty := _empty_fields(fields)):
            shape = f"{empty}: {expected}, found {len(fields)}"
            id_explained = not fields[0]
        else:
            found = len(rest) - 1
            hint = " (a path containing spaces needs tab-separated fields)" if not tabbed and found > num_labels else ""
            if foreign := _foreign_space(text):
                hint += f"; {foreign}"
            shape = f"expected {num_labels} label values, found {found}{hint}"

    errors: list[str] = []
    id_text = fields[0]
    value: int | None = None
    if id_text.isascii() and id_text.isdigit() and len(id_text.lstrip("0")) <= 19 and int(id_text) <= MAX_ID:
        value = int(id_text)  # (length first: int() refuses strings over 4,300 digits)
    elif id_explained:
        pass
    elif edge := _edge_space(id_text):
        errors.append(f"ID {quote(id_text)} {edge}; {_NOT_A_SEPARATOR}")
    elif id_text.isascii() and id_text.isdigit():
        errors.append(f"ID {quote(id_text)} is too large (at most {MAX_ID})")
    elif id_text.startswith("-") and id_text[1:].isascii() and id_text[1:].isdigit():
        errors.append(f"ID {quote(id_text)} is negative (expected an integer >= 0)")
    elif not id_text:
        errors.append("missing ID (expected an integer >= 0 as the first field)")
    else:
        errors.append(f"ID {quote(id_text)} is not an integer")
    if shape:
        return value, None, None, [*errors, shape]

    values = rest[:num_labels]
    bad = [(col, v) for col, v in enumerate(values, start=2) if v not in ("0", "1")]
    if bad:
        col, v = bad[0]
        more = f" (and {len(bad) - 1} more on this line)" if len(bad) > 1 else ""
        if not v:
            errors.append(f"column {col} is empty (expected a label value 0 or 1){more}")
        elif edge := _edge_space(v):
            errors.append(f"column {col}: label value {quote(v)} {edge}; {_NOT_A_SEPARATOR}{more}")
        else:
            errors.append(f"column {col}: label value {quote(v)} is not 0 or 1{more}")

    path = rest[num_labels]
    if problem := _path_problem(path):
        errors.append(problem)
    if errors:
        return value, None, None, errors
    return value, np.array([v == "1" for v in values], np.uint8), path.lstrip("/"), []


def _duplicates(ids: np.ndarray, rows: np.ndarray | None) -> list[tuple[int, str]]:
    """`duplicate ID` errors on every repeat, naming the line of the first occurrence (`rows`: line of each id)."""
    if len(ids) < 2:
        return []
    ordered = np.sort(ids)
    if not np.any(ordered[1:] == ordered[:-1]):
        return []
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    repeat = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
    if not len(repeat):
        return []
    line_of = (lambda i: int(rows[i])) if rows is not None else int
    errors = []
    first = None
    for k in repeat.tolist():
        if first is None or ordered[first] != ordered[k]:
            first = k - 1
        errors.append((line_of(order[k]), f"duplicate ID {ordered[k]} (first on line {line_of(order[first]) + 1})"))
    return errors


# ------------------------------------------------------------------------------------------------ warnings

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class ListWarnings:
    """What a valid list holds that is probably a mistake: counts, and a few examples to find them by.

    `examples` name images by ID and, when the list knows them, file line (`ListFile.lines`).
    """

    name: str
    images: int
    num_labels: int
    images_without_labels: int  # every label value 0
    unlabeled_examples: list[dict[str, Any]]  # {"id", "line"?}
    labels_without_images: list[str]  # names of the labels no image carries, in column order
    label_columns: list[int]  # their 1-based columns in the list file (label k is column k + 2)
    paths_under_several_ids: int  # distinct paths listed more than once
    shared_path_examples: list[dict[str, Any]]  # {"path", "ids", "lines"?, "count"}

    def counts(self) -> dict[str, int]:
        """The figures a manifest records."""
        return {
            "images_without_labels": self.images_without_labels,
            "labels_without_images": len(self.labels_without_images),
            "paths_under_several_ids": self.paths_under_several_ids,
        }

    def __bool__(self) -> bool:
        return any(self.counts().values())

    def to_dict(self) -> dict[str, Any]:
        """Counts and examples, JSON-ready (the CLI's `--json` summary)."""
        return {
            **self.counts(),
            "unlabeled_examples": self.unlabeled_examples,
            "labels_without_images_names": self.labels_without_images,
            "shared_path_examples": self.shared_path_examples,
        }

    def messages(self) -> list[str]:
        """One `LIST: what looks wrong, e.g. where` sentence per kind of warning (quoted values cut)."""
        out = []
        if n := self.images_without_labels:
            where = ", ".join(_where(e) for e in self.unlabeled_examples)
            head = (
                f"none of the {self.images} images has a label (every value is 0)"
                if n == self.images
                else f"{n} of {self.images} images have no label (every value is 0)"
            )
            out.append(f"{self.name}: {head}, e.g. {where}")
        if unused := self.labels_without_images:
            shown = ", ".join(
                f"{quote(n)} (column {c})" for n, c in zip(unused[:10], self.label_columns[:10], strict=True)
            )
            more = f" and {len(unused) - 10} more" if len(unused) > 10 else ""
            out.append(f"{self.name}: {len(unused)} of {self.num_labels} labels are carried by no image: {shown}{more}")
        if n := self.paths_under_several_ids:
            shown = "; ".join(
                f"{quote(e['path'])} under {' and '.join(_where(x) for x in _rows_of(e))}"
                + (f" and {e['count'] - len(e['ids'])} more" if e["count"] > len(e["ids"]) else "")
                for e in self.shared_path_examples
            )
            out.append(
                f"{self.name}: {n} path{'s are' if n > 1 else ' is'} listed under several IDs (each ID packs the "
                f"same image again), e.g. {shown}"
            )
        return out

    def log(self) -> None:
        """Each message at WARNING level (the DAG's task log)."""
        for message in self.messages():
            log.warning("%s", message)


def _where(example: dict[str, Any]) -> str:
    return f"ID {example['id']}" + (f" (line {example['line']})" if "line" in example else "")


def _rows_of(example: dict[str, Any]) -> list[dict[str, Any]]:
    lines = example.get("lines") or [None] * len(example["ids"])
    return [{"id": i, **({"line": line} if line else {})} for i, line in zip(example["ids"], lines, strict=True)]


def list_warnings(lf: ListFile, label_names: list[str] | None = None) -> ListWarnings:
    """Count what `lf` holds that is valid but probably a mistake (vectorized: 25-50 ms at 155,000 x 334).

    `label_names` names the columns in messages (default `label_0`...). Call it once per list, for example right
    after parsing; `manifest.build` records its `counts()`.
    """
    names = label_names or default_label_names(lf.num_labels)
    if len(names) != lf.num_labels:
        raise ValueError(f"{len(names)} label names for a list of {lf.num_labels} labels")
    n = len(lf)

    def example(row: int) -> dict[str, Any]:
        return {"id": int(lf.ids[row]), **({"line": int(lf.lines[row])} if lf.lines is not None else {})}

    # max over uint8 rows and columns is the cheapest "any" numpy has here (no bool temporaries).
    unlabeled = np.flatnonzero(lf.labels.max(axis=1) == 0) if n else np.zeros(0, np.int64)
    carried = lf.labels.max(axis=0) if n else np.zeros(lf.num_labels, np.uint8)
    unused = np.flatnonzero(carried == 0).tolist()

    # Each row's first row with the same path: a dict built and read at C speed, no Python loop over rows; only
    # when a set (a third of the cost) shows that some path repeats.
    shared_firsts = np.zeros(0, np.int64)
    if len(set(lf.paths)) != n:
        first_of = dict(zip(reversed(lf.paths), range(n - 1, -1, -1), strict=True))
        first = np.fromiter(map(first_of.__getitem__, lf.paths), np.int64, n)
        shared_firsts = np.unique(first[first != np.arange(n)])  # one entry per repeated path, in row order
    shared_examples = []
    for head in shared_firsts[:MAX_EXAMPLES].tolist():
        rows = np.flatnonzero(first == head)
        shown = rows[:MAX_EXAMPLES].tolist()
        entry: dict[str, Any] = {"path": lf.paths[head], "ids": lf.ids[shown].tolist(), "count": len(rows)}
        if lf.lines is not None:
            entry["lines"] = lf.lines[shown].tolist()
        shared_examples.append(entry)

    return ListWarnings(
        name=lf.name,
        images=n,
        num_labels=lf.num_labels,
        images_without_labels=len(unlabeled),
        unlabeled_examples=[example(r) for r in unlabeled[:MAX_EXAMPLES].tolist()],
        labels_without_images=[names[k] for k in unused],
        label_columns=[k + 2 for k in unused],
        paths_under_several_ids=len(shared_firsts),
        shared_path_examples=shared_examples,
    )


# ------------------------------------------------------------------------------------------ label names, writing


def default_label_names(num_labels: int) -> list[str]:
    """Names used when no label-names file is given: label_0 ... label_{N-1} (column order)."""
    return [f"label_{i}" for i in range(num_labels)]


def read_label_names(path: Path, num_labels: int) -> list[str]:
    """Label names from a file, one per line in column order; exactly `num_labels` distinct, non-empty names.

    Raises `ListFileError` (`FILE:LINE: what is wrong`) or `InputError` if the file cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the label-names file ({exc.strerror or exc})") from None
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    errors, names, seen = [], [], {}
    for i, raw in enumerate(lines, start=1):
        try:
            name = raw.removesuffix(b"\r").decode("utf-8").strip(" \t")  # as list fields: only ASCII space and tab
        except UnicodeDecodeError as exc:
            errors.append(f"{path}:{i}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})")
            continue
        if not name:
            errors.append(f"{path}:{i}: empty label name")
        elif edge := _edge_space(name):
            errors.append(
                f"{path}:{i}: label name {quote(name)} {edge}; only ASCII spaces and tabs may surround a name"
            )
        elif _CONTROL.search(name):
            errors.append(f"{path}:{i}: label name {quote(name)} contains a control character")
        elif name in seen:
            errors.append(f"{path}:{i}: duplicate label name {quote(name)} (first on line {seen[name]})")
        else:
            seen[name] = i
        names.append(name)
    if len(lines) != num_labels:
        errors.append(f"{path}:{len(lines)}: {len(lines)} label names, expected {num_labels} (one per line)")
    if errors:
        raise ListFileError(errors)
    return names


def write_list(lf: ListFile, path: Path, *, paths: list[str] | None = None) -> None:
    """Write the normalized list `ID<TAB>l1<TAB>...<TAB>lN<TAB>PATH<LF>` atomically (temp file, then rename).

    `paths` replaces the list's paths (for example local files for im2rec); each must read back as itself, so
    none may be empty, start or end with a space or other whitespace, contain a control character or exceed an S3
    key's length.
    """
    path = Path(path)
    out_paths = lf.paths if paths is None else paths
    if len(out_paths) != len(lf):
        raise ValueError(f"{len(out_paths)} paths given for a list of {len(lf)} images")
    for p in out_paths:
        problem = f"path {quote(p)} starts or ends with a space" if p != p.strip(" ") else _path_problem(p)
        if problem:
            raise ValueError(f"cannot be written to a list file: {problem}")
    cells = np.full((len(lf), 2 * lf.num_labels), ord("\t"), np.uint8)
    cells[:, ::2] = lf.labels + ord("0")
    width = cells.shape[1]
    block = cells.tobytes()
    parts = []
    for k, (image_id, p) in enumerate(zip(lf.ids.tolist(), out_paths, strict=True)):
        parts.append(b"%d\t%b%b\n" % (image_id, block[k * width : (k + 1) * width], p.encode("utf-8")))
    payload = b"".join(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_label_names(location: str | None, num_labels: int, client=None) -> list[str]:
    """Label names from a file or `s3://` object (one per line, column order); numbered names when None."""
    if not location:
        return default_label_names(num_labels)
    data, name = read_location(location, client)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labels.txt"
        path.write_bytes(data)
        try:
            return read_label_names(path, num_labels)
        except InputError as err:
            raise type(err)(str(err).replace(str(path), name)) from None
