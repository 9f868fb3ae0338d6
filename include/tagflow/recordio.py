"""MXNet RecordIO: the `.rec` / `.idx` pair that im2rec writes and SageMaker's image-classification algorithm reads.

Byte layout of a `.rec` file (dmlc-core `recordio.h`, all integers little-endian). A file is a sequence of records;
each record is one or more *parts*:

    uint32  magic    0xCED7230A
    uint32  lrecord  cflag << 29 | length      (cflag: top 3 bits, length: low 29 bits, length < 2**29)
    bytes   data     `length` bytes
    bytes   pad      zeros up to the next 4-byte boundary

A payload is written as one part with cflag 0, unless it holds the magic number at a 4-byte-aligned offset: then the
writer (dmlc `RecordIOWriter::WriteRecord`) cuts the payload at each such aligned occurrence and drops those 4 bytes,
writing the pieces as parts with cflag 1 (first), 2 (middle) and 3 (last); the reader joins the pieces with the magic
between them. Only the last part can need padding, because every cut is at an aligned offset. `RecordWriter` writes
exactly these bytes, so its output is byte-identical to MXNet's `MXRecordIO.write` for any payload.

Image payload (MXNet `recordio.pack`, im2rec `--pack-label`), little-endian:

    IRHeader 'IfQQ'  flag: uint32 = number of labels N, label: float32 = 0, id: uint64 = image ID, id2: uint64 = 0
    float32[N]       the labels (multi-hot 0/1)
    bytes            the encoded image (JPEG or PNG)

With flag 0 the single label is the header's `label` field and no float32 array follows (im2rec without
`--pack-label`); `unpack_payload` reads both forms, `pack_payload` always writes flag = N.

The `.idx` file has one line per record, `key\\toffset\\n`, with key = image ID and offset = the byte position of the
record's first part in the `.rec` file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_LENGTH = (1 << 29) - 1  # the 29-bit length field
_LENGTH_MASK = (1 << 29) - 1
_PART = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
IR_SIZE = _IR.size  # 24 bytes
MAX_KEY = (1 << 64) - 1
_PAD = b"\0\0\0"


class IRHeader(NamedTuple):
    """MXNet's image-record header; with flag > 0, `label` is 0 and the labels follow the header."""

    flag: int
    label: float
    id: int
    id2: int


def _padding(length: int) -> int:
    return -length % 4


def encode_record(payload: bytes | bytearray | memoryview) -> bytes:
    """The bytes dmlc's RecordIOWriter writes for one payload (module docstring), padding included."""
    data = bytes(payload)
    size = len(data)
    if size > MAX_LENGTH:
        raise ValueError(f"payload of {size} bytes exceeds the RecordIO limit of {MAX_LENGTH} bytes")
    pieces: list[bytes] = []
    dptr = 0
    hit = data.find(MAGIC_BYTES)
    while hit >= 0:
        if hit % 4 == 0:
            pieces.append(_PART.pack(MAGIC, (1 if dptr == 0 else 2) << 29 | (hit - dptr)))
            pieces.append(data[dptr:hit])
            dptr = hit + 4
            hit = data.find(MAGIC_BYTES, dptr)
        else:
            hit = data.find(MAGIC_BYTES, hit + 1)
    if dptr == 0:
        return b"".join((_PART.pack(MAGIC, size), data, _PAD[: _padding(size)]))
    pieces.append(_PART.pack(MAGIC, 3 << 29 | (size - dptr)))
    pieces.append(data[dptr:])
    pieces.append(_PAD[: _padding(size)])
    return b"".join(pieces)


def pack_payload(image_id: int, labels: np.ndarray | Sequence[float], image_bytes: bytes) -> bytes:
    """An image record's payload: IRHeader(flag=N, label=0, id=image_id, id2=0), N float32 labels, the image."""
    values = np.asarray(labels, dtype=np.float32).reshape(-1)
    if values.size == 0:
        raise ValueError(f"image {image_id}: no labels (expected at least one)")
    if not 0 <= image_id <= MAX_KEY:
        raise ValueError(f"image ID {image_id} is outside the uint64 range")
    return _IR.pack(values.size, 0.0, image_id, 0) + values.tobytes() + image_bytes


def unpack_payload(payload: bytes | memoryview) -> tuple[IRHeader, np.ndarray, bytes]:
    """Split an image payload into its header, float32 labels and encoded image (both flag forms)."""
    if len(payload) < IR_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    header = IRHeader(*_IR.unpack_from(payload))
    if header.flag == 0:
        return header, np.array([header.label], dtype=np.float32), bytes(payload[IR_SIZE:])
    end = IR_SIZE + 4 * header.flag
    if len(payload) < end:
        raise ValueError(f"payload of {len(payload)} bytes is too short for flag={header.flag} labels")
    labels = np.frombuffer(bytes(payload[IR_SIZE:end]), dtype=np.float32)
    return header, labels, bytes(payload[end:])


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def _named(path: Path) -> Iterator[None]:
    """Name the final file in an OSError from writing it (a failed write names no file, a failed open its
    `.partial` name), so a message can say which output could not be written."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err


class RecordWriter:
    """Write a `.rec`/`.idx` pair, whole or not at all.

    Records go to `<name>.partial` files that are renamed onto the final names when the `with` block exits cleanly
    (`.rec` first, then `.idx`); on an exception they are deleted. With `deferred=True` a clean exit leaves the
    complete `.partial` files for the caller to `commit()` (or `discard()`) together with other writers' files.
    Every record is validated first: keys are unique uint64 values, payloads fit in 29 bits, and image records
    (`write_image`) all carry the same number of labels, which `ImageRecordIter(label_width=N)` requires.
    An OSError while writing (disk full, read-only file system) names the final file it was writing.
    """

    def __init__(self, rec_path: Path | str, idx_path: Path | str, *, deferred: bool = False):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        self.deferred = deferred
        self.count = 0
        self.label_width: int | None = None
        self._keys: set[int] = set()
        self._offset = 0
        self._rec: BinaryIO | None = None
        self._idx: BinaryIO | None = None

    def __enter__(self) -> RecordWriter:
        with _named(self.rec_path):
            self._rec = open(_partial(self.rec_path), "wb", buffering=1 << 20)  # closed in __exit__
        try:
            with _named(self.idx_path):
                self._idx = open(_partial(self.idx_path), "wb", buffering=1 << 16)
        except BaseException:
            self._rec.close()
            self.discard()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._rec is not None and self._idx is not None
        try:
            for f, path in ((self._rec, self.rec_path), (self._idx, self.idx_path)):
                with _named(path):
                    f.close()  # flushes: a full disk may show only here
        except BaseException:
            for f in (self._rec, self._idx):
                with contextlib.suppress(OSError):  # a close that failed to flush tries (and fails) again
                    f.close()
            self.discard()
            raise
        if exc_type is not None:
            self.discard()
        elif not self.deferred:
            self.commit()

    def commit(self) -> None:
        """Rename the complete `.partial` files onto the final names (`.rec` first, then `.idx`)."""
        os.replace(_partial(self.rec_path), self.rec_path)
        os.replace(_partial(self.idx_path), self.idx_path)
        log.debug("wrote %d records (%d bytes) to %s", self.count, self._offset, self.rec_path)

    def discard(self) -> None:
        """Delete the `.partial` files, if any; the final names are left as they were."""
        _partial(self.rec_path).unlink(missing_ok=True)
        _partial(self.idx_path).unlink(missing_ok=True)

    def _where(self) -> str:
        return f"{self.rec_path}, record #{self.count}"

    def write(self, key: int, payload: bytes) -> int:
        """Append one record under `key`; returns its offset in the `.rec` file."""
        if self._rec is None or self._idx is None:
            raise ValueError(f"{self.rec_path}: RecordWriter must be used as a context manager (`with`)")
        if isinstance(key, bool) or not isinstance(key, int | np.integer) or not 0 <= key <= MAX_KEY:
            raise ValueError(f"{self._where()}: key {key!r} is not an integer in 0..2**64-1")
        key = int(key)
        if key in self._keys:
            raise ValueError(f"{self._where()}: duplicate key {key}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ValueError(f"{self._where()} (key {key}): payload is {type(payload).__name__}, expected bytes")
        if len(payload) > MAX_LENGTH:
            raise ValueError(
                f"{self._where()} (key {key}): payload of {len(payload)} bytes exceeds the RecordIO limit "
                f"of {MAX_LENGTH} bytes"
            )
        record = encode_record(payload)
        offset = self._offset
        with _named(self.rec_path):
            self._rec.write(record)
        with _named(self.idx_path):
            self._idx.write(b"%d\t%d\n" % (key, offset))
        self._keys.add(key)
        self._offset += len(record)
        self.count += 1
        return offset

    def write_image(self, image_id: int, labels: np.ndarray | Sequence[float], image_bytes: bytes) -> int:
        """Append an image record (`pack_payload`) keyed by its image ID; returns its offset."""
        values = np.asarray(labels, dtype=np.float32).reshape(-1)
        if values.size == 0:
            raise ValueError(f"{self._where()} (image {image_id}): no labels")
        if self.label_width is not None and values.size != self.label_width:
            raise ValueError(
                f"{self._where()} (image {image_id}): {values.size} labels, expected {self.label_width} "
                "like the records before it"
            )
        if not np.isfinite(values).all():
            raise ValueError(f"{self._where()} (image {image_id}): labels contain NaN or infinity")
        if not image_bytes:
            raise ValueError(f"{self._where()} (image {image_id}): empty image data")
        if isinstance(image_id, bool) or not isinstance(image_id, int | np.integer) or not 0 <= image_id <= MAX_KEY:
            raise ValueError(f"{self._where()}: image ID {image_id!r} is not an integer in 0..2**64-1")
        offset = self.write(int(image_id), pack_payload(int(image_id), values, image_bytes))
        self.label_width = values.size
        return offset


def read_index(idx_path: Path | str) -> dict[int, int]:
    """The `.idx` file as {key: offset}, in file order; malformed lines raise ValueError naming the line."""
    index: dict[int, int] = {}
    with open(idx_path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split(b"\t")
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (IndexError, ValueError):
                raise ValueError(f"{idx_path}:{lineno}: expected 'KEY<TAB>OFFSET', got {line[:80]!r}") from None
            if len(fields) != 2 or key < 0 or offset < 0 or offset % 4:
                raise ValueError(f"{idx_path}:{lineno}: expected 'KEY<TAB>OFFSET', got {line[:80]!r}")
            if key in index:
                raise ValueError(f"{idx_path}:{lineno}: duplicate key {key}")
            index[key] = offset
    return index


class RecordReader:
    """Read a `.rec` file sequentially (`iter`) or by key through its `.idx` (`read`)."""

    def __init__(self, rec_path: Path | str, idx_path: Path | str | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self.index: dict[int, int] = read_index(self.idx_path) if self.idx_path is not None else {}
        self._f: BinaryIO = open(self.rec_path, "rb")  # noqa: SIM115 - closed by close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def keys(self) -> list[int]:
        """The keys in `.idx` order."""
        return list(self.index)

    def _read_at_current(self) -> bytes | None:
        f = self._f
        start = f.tell()
        chunks: list[bytes] = []
        expect_more = False
        while True:
            where = f.tell()
            head = f.read(8)
            if not head and not expect_more:
                return None
            if len(head) != 8:
                raise ValueError(f"{self.rec_path}: truncated record header at byte {where}")
            magic, lrec = _PART.unpack(head)
            if magic != MAGIC:
                raise ValueError(f"{self.rec_path}: bad magic 0x{magic:08x} at byte {where} (expected 0x{MAGIC:08x})")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if cflag > 3 or (cflag in (0, 1)) == expect_more:
                raise ValueError(
                    f"{self.rec_path}: unexpected part flag {cflag} at byte {where} (record starting at {start})"
                )
            data = f.read(length + _padding(length))
            if len(data) != length + _padding(length):
                raise ValueError(f"{self.rec_path}: record at byte {where} is truncated")
            chunks.append(data[:length])
            if cflag in (0, 3):
                return MAGIC_BYTES.join(chunks)
            expect_more = True

    def read_at(self, offset: int) -> bytes:
        """The payload of the record starting at byte `offset`."""
        self._f.seek(offset)
        payload = self._read_at_current()
        if payload is None:
            raise ValueError(f"{self.rec_path}: no record at byte {offset} (end of file)")
        return payload

    def read(self, key: int) -> bytes:
        """The payload stored under `key` (needs the `.idx`)."""
        try:
            offset = self.index[key]
        except KeyError:
            raise KeyError(f"{self.idx_path or self.rec_path}: no key {key}") from None
        return self.read_at(offset)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(offset, payload) for every record, in file order."""
        self._f.seek(0)
        while True:
            offset = self._f.tell()
            payload = self._read_at_current()
            if payload is None:
                return
            yield offset, payload


def merge_records(parts: Sequence[tuple[Path, Path]], rec_out: Path, idx_out: Path) -> int:
    """Concatenate (rec, idx) pairs into one pair with the offsets rewritten; returns the number of records.

    Streams the `.rec` files (constant memory), so shards of any size merge. Keys must be unique across all parts.
    The output is written whole or not at all (`.partial` names, renamed at the end).
    """
    rec_out, idx_out = Path(rec_out), Path(idx_out)
    seen: dict[int, Path] = {}
    base = 0
    count = 0
    try:
        with open(_partial(rec_out), "wb") as rec_f, open(_partial(idx_out), "wb") as idx_f:
            for rec_path, idx_path in parts:
                size = os.path.getsize(rec_path)
                if size % 4:
                    raise ValueError(f"{rec_path}: size {size} is not a multiple of 4; not a RecordIO file")
                index = read_index(idx_path)
                lines = []
                for key, offset in index.items():
                    if offset >= size:
                        raise ValueError(f"{idx_path}: key {key} points at byte {offset}, past the end of {rec_path}")
                    if key in seen:
                        raise ValueError(f"{idx_path}: key {key} is also in {seen[key]}")
                    seen[key] = Path(idx_path)
                    lines.append(b"%d\t%d\n" % (key, base + offset))
                with open(rec_path, "rb") as src:
                    if size and src.read(4) != MAGIC_BYTES:
                        raise ValueError(f"{rec_path}: does not start with the RecordIO magic number")
                    src.seek(0)
                    shutil.copyfileobj(src, rec_f, 1 << 22)
                idx_f.writelines(lines)
                base += size
                count += len(index)
        os.replace(_partial(rec_out), rec_out)
        os.replace(_partial(idx_out), idx_out)
    except BaseException:
        _partial(rec_out).unlink(missing_ok=True)
        _partial(idx_out).unlink(missing_ok=True)
        raise
    log.info("merged %d parts (%d records, %d bytes) into %s", len(parts), count, base, rec_out)
    return count
