"""What a training channel holds: its .rec file, record count and label matrix, read from the record headers alone.

Plain Python and numpy (no MXNet), so a job whose `num_classes` or `num_training_samples` does not match its data
fails before the network is built. RecordIO layout (MXNet `dmlc-core` recordio, as `tagflow.recordio` writes it):
each part is `uint32 magic 0xced7230a`, `uint32 lrec` (top 3 bits: 0 whole record, 1 first, 2 middle, 3 last part;
low 29 bits: length), the bytes, zero padding to 4. A record's payload starts with the IRHeader `<IfQQ`
(flag, label, id, id2); flag > 0 means `flag` float32 labels follow the header, flag 0 means the one label is `label`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = 0xCED7230A
_HEAD = struct.Struct("<II")
_IRHEADER = struct.Struct("<IfQQ")


class DataError(ValueError):
    """A channel is missing, empty or does not match the hyperparameters; the message says which and how."""


@dataclass
class Channel:
    """One channel's RecordIO file and what its headers say."""

    name: str
    rec: Path
    idx: Path | None
    labels: np.ndarray  # (records, label_width) float32

    @property
    def count(self) -> int:
        return int(self.labels.shape[0])

    @property
    def label_width(self) -> int:
        return int(self.labels.shape[1]) if self.labels.size else 0


def find_rec(channel_dir: Path, name: str) -> tuple[Path, Path | None]:
    """The one .rec file under `channel_dir` (searched recursively) and its .idx beside it, if any."""
    if not channel_dir.is_dir():
        raise DataError(f"channel {name!r}: {channel_dir} does not exist; the job needs a {name!r} channel")
    recs = sorted(p for p in channel_dir.rglob("*.rec") if p.is_file())
    if len(recs) != 1:
        found = ", ".join(str(p.relative_to(channel_dir)) for p in recs) or "none"
        raise DataError(f"channel {name!r}: expected exactly one .rec file in {channel_dir}, found {found}")
    rec = recs[0]
    idx = rec.with_suffix(".idx")
    return rec, idx if idx.is_file() else None


def _payload_heads(path: Path, want: int):
    """Yield the first `want` bytes (or fewer) of every record's payload, seeking past the rest."""
    with path.open("rb") as fh:
        offset = 0
        pending: bytes | None = None
        while True:
            head = fh.read(_HEAD.size)
            if not head:
                break
            if len(head) < _HEAD.size:
                raise DataError(f"{path}: truncated record header at byte {offset}")
            magic, lrec = _HEAD.unpack(head)
            if magic != MAGIC:
                raise DataError(f"{path}: bad RecordIO magic {magic:#x} at byte {offset}; is this a RecordIO file?")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            padded = length + (-length % 4)
            take = min(length, want)
            data = fh.read(take)
            if len(data) < take:
                raise DataError(f"{path}: record at byte {offset} is truncated")
            fh.seek(padded - take, 1)
            offset += _HEAD.size + padded
            if cflag == 0:
                yield data
            elif cflag == 1:
                pending = data
            elif pending is not None:
                # a continued record: the magic that split it belongs to the payload
                if len(pending) < want:
                    pending = (pending + struct.pack("<I", MAGIC) + data)[:want]
                if cflag == 3:
                    yield pending
                    pending = None


def scan(channel_dir: Path, name: str, max_labels: int = 100_000) -> Channel:
    """Read every record header of the channel's .rec file: the record count and each record's labels."""
    rec, idx = find_rec(channel_dir, name)
    rows: list[np.ndarray] = []
    for head in _payload_heads(rec, _IRHEADER.size + 4 * max_labels):
        if len(head) < _IRHEADER.size:
            raise DataError(f"{rec}: record {len(rows)} is shorter than its header")
        flag, label, _, _ = _IRHEADER.unpack_from(head)
        if flag == 0:
            rows.append(np.array([label], np.float32))
        else:
            if len(head) < _IRHEADER.size + 4 * flag:
                raise DataError(f"{rec}: record {len(rows)} announces {flag} labels but is shorter")
            rows.append(np.frombuffer(head, np.float32, flag, _IRHEADER.size))
    if not rows:
        raise DataError(f"channel {name!r}: {rec} holds no records")
    widths = sorted({len(r) for r in rows})
    if len(widths) != 1:
        raise DataError(f"channel {name!r}: records in {rec} carry different numbers of labels: {widths}")
    return Channel(name, rec, idx, np.stack(rows))
