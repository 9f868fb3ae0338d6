"""RecordIO framing, image payloads, the writer's validation, the reader, merging — and byte-identity with MXNet."""

from __future__ import annotations

import base64
import errno
import json
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagflow.recordio import (
    IR_SIZE,
    MAGIC,
    MAGIC_BYTES,
    RecordReader,
    RecordWriter,
    encode_record,
    merge_records,
    pack_payload,
    read_index,
    unpack_payload,
)

M = MAGIC_BYTES


def _bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# Payloads that exercise every branch of dmlc's escaping: the magic at aligned offsets (start, middle, end,
# back to back, the whole payload), at unaligned offsets (no escaping), and every padding length.
PAYLOADS = [
    b"",
    b"a",
    b"ab",
    b"abc",
    b"abcd",
    b"abcde",
    M,
    M + b"x",
    b"abcd" + M,
    b"abcd" + M + b"ef",
    M * 3,
    M + M + b"xyz",
    b"abcd" + M + b"efgh" + M + b"ij",
    b"x" + M,
    b"ab" + M + b"cd",
    b"abc" + M + M,  # offsets 3 and 7: both unaligned, nothing to escape
    b"abc" + M + b"d" + M,  # offsets 3 and 8: the second is aligned
    _bytes(1, 4096) + M + _bytes(2, 1001),
    _bytes(3, 4097) + M + _bytes(4, 999),
    _bytes(5, 20_000),
]


def _records(path) -> list[bytes]:
    with RecordReader(path) as reader:
        return [payload for _, payload in reader]


def test_layout_of_a_plain_record():
    assert encode_record(b"abcde") == M + struct.pack("<I", 5) + b"abcde" + b"\0\0\0"
    assert encode_record(b"abcd") == M + struct.pack("<I", 4) + b"abcd"
    assert encode_record(b"") == M + struct.pack("<I", 0)


def test_layout_of_an_escaped_record():
    # magic at aligned offset 4: part 1 (cflag 1) "abcd", part 2 (cflag 3) "ef" + 2 bytes of padding
    expected = M + struct.pack("<I", 1 << 29 | 4) + b"abcd" + M + struct.pack("<I", 3 << 29 | 2) + b"ef\0\0"
    assert encode_record(b"abcd" + M + b"ef") == expected
    # magic twice from offset 0: empty first part, empty middle part (cflag 2), empty last part
    expected = M + struct.pack("<I", 1 << 29) + M + struct.pack("<I", 2 << 29) + M + struct.pack("<I", 3 << 29)
    assert encode_record(M * 2) == expected
    # unaligned magic is left alone
    assert encode_record(b"ab" + M + b"cd") == M + struct.pack("<I", 8) + b"ab" + M + b"cd"


def test_payloads_round_trip_through_writer_and_reader(tmp_path):
    with RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
        offsets = [writer.write(key, payload) for key, payload in enumerate(PAYLOADS)]
    assert _records(tmp_path / "a.rec") == PAYLOADS
    assert read_index(tmp_path / "a.idx") == dict(enumerate(offsets))
    with RecordReader(tmp_path / "a.rec", tmp_path / "a.idx") as reader:
        assert reader.keys() == list(range(len(PAYLOADS)))
        for key in reversed(range(len(PAYLOADS))):
            assert reader.read(key) == PAYLOADS[key]
        assert [offset for offset, _ in reader] == offsets


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=13), st.just(M)), max_size=12))
def test_any_payload_round_trips_and_leaves_no_aligned_magic_inside_parts(pieces):
    payload = b"".join(pieces)
    encoded = encode_record(payload)
    assert len(encoded) % 4 == 0
    # Walk the parts: every aligned magic in the stream must be a part header (that is what makes .rec splittable).
    pos, parts = 0, []
    while pos < len(encoded):
        magic, lrec = struct.unpack_from("<II", encoded, pos)
        assert magic == MAGIC
        length = lrec & ((1 << 29) - 1)
        data = encoded[pos + 8 : pos + 8 + length]
        aligned = [i for i in range(0, len(data) - 3, 4) if data[i : i + 4] == M]
        assert aligned == []
        parts.append((lrec >> 29, data))
        pos += 8 + length + (-length % 4)
    flags = [flag for flag, _ in parts]
    assert flags == [0] or (flags[0] == 1 and flags[-1] == 3 and set(flags[1:-1]) <= {2})
    assert M.join(data for _, data in parts) == payload


@pytest.mark.mxnet
def test_writer_is_byte_identical_to_mxnet(tmp_path, mxnet_records):
    image_payloads = [pack_payload(10 + i, [1, 0, 1], _bytes(i, 300 + i)) for i in range(4)]
    payloads = PAYLOADS + image_payloads
    keys = [3 * i + 7 for i in range(len(payloads))]
    request = {"records": [[k, base64.b64encode(p).decode()] for k, p in zip(keys, payloads, strict=True)]}
    result = mxnet_records("write", str(tmp_path / "mx.rec"), str(tmp_path / "mx.idx"), stdin=json.dumps(request))
    assert result == {"written": len(payloads)}

    with RecordWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as writer:
        for key, payload in zip(keys, payloads, strict=True):
            writer.write(key, payload)

    assert (tmp_path / "ours.rec").read_bytes() == (tmp_path / "mx.rec").read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "mx.idx").read_bytes()
    # and our reader reads what MXNet wrote
    with RecordReader(tmp_path / "mx.rec", tmp_path / "mx.idx") as reader:
        assert [reader.read(k) for k in keys] == payloads


def test_image_payload_round_trip():
    labels = np.array([0, 1, 1, 0, 1], dtype=np.uint8)
    payload = pack_payload(2**40 + 5, labels, b"\xff\xd8jpeg")
    assert struct.unpack_from("<IfQQ", payload) == (5, 0.0, 2**40 + 5, 0)
    header, got, image = unpack_payload(payload)
    assert (header.flag, header.label, header.id, header.id2) == (5, 0.0, 2**40 + 5, 0)
    assert got.dtype == np.float32 and got.tolist() == [0, 1, 1, 0, 1]
    assert image == b"\xff\xd8jpeg"
    assert len(payload) == IR_SIZE + 5 * 4 + 6


def test_unpack_reads_the_single_label_form():
    payload = struct.pack("<IfQQ", 0, 3.0, 9, 0) + b"img"
    header, labels, image = unpack_payload(payload)
    assert header.flag == 0 and labels.tolist() == [3.0] and image == b"img"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"short", "shorter than the 24-byte IRHeader"),
        (struct.pack("<IfQQ", 3, 0.0, 1, 0) + b"\0" * 8, "too short for flag=3 labels"),
    ],
)
def test_unpack_rejects_truncated_payloads(payload, message):
    with pytest.raises(ValueError, match=message):
        unpack_payload(payload)


def test_pack_payload_rejects_bad_input():
    with pytest.raises(ValueError, match="no labels"):
        pack_payload(1, [], b"x")
    with pytest.raises(ValueError, match="outside the uint64 range"):
        pack_payload(-1, [1], b"x")


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([(1, b"a"), (1, b"b")], r"record #1: duplicate key 1"),
        ([(-1, b"a")], r"record #0: key -1 is not an integer"),
        ([(2**64, b"a")], r"key 18446744073709551616 is not an integer"),
        ([(True, b"a")], r"key True is not an integer"),
        ([(1.0, b"a")], r"key 1.0 is not an integer"),
        ([(1, "text")], r"record #0 \(key 1\): payload is str, expected bytes"),
    ],
)
def test_writer_rejects_bad_records(tmp_path, records, message):
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with pytest.raises(ValueError, match=message) as caught, RecordWriter(rec, idx) as writer:
        for key, payload in records:
            writer.write(key, payload)
    assert str(rec) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # whole or absent: nothing left behind


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([(1, [1, 0], b"j"), (2, [1, 0, 1], b"j")], r"record #1 \(image 2\): 3 labels, expected 2"),
        ([(1, [np.nan, 0], b"j")], r"image 1\): labels contain NaN"),
        ([(1, [], b"j")], r"image 1\): no labels"),
        ([(1, [1], b"")], r"image 1\): empty image data"),
        ([(-5, [1], b"j")], r"image ID -5 is not an integer"),
    ],
)
def test_writer_rejects_bad_images(tmp_path, images, message):
    with pytest.raises(ValueError, match=message), RecordWriter(tmp_path / "x.rec", tmp_path / "x.idx") as writer:
        for image_id, labels, data in images:
            writer.write_image(image_id, labels, data)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_output(tmp_path):
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with RecordWriter(rec, idx) as writer:
        writer.write(1, b"old")
    before = rec.read_bytes(), idx.read_bytes()
    with pytest.raises(RuntimeError), RecordWriter(rec, idx) as writer:
        writer.write(2, b"new")
        raise RuntimeError("crash mid-way")
    assert (rec.read_bytes(), idx.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx", "x.rec"]


def test_a_deferred_writer_commits_only_when_asked(tmp_path):
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    with RecordWriter(rec, idx, deferred=True) as writer:
        writer.write(1, b"one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx.partial", "x.rec.partial"]
    writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx", "x.rec"]
    with RecordReader(rec, idx) as reader:
        assert reader.read(1) == b"one"
    with RecordWriter(rec, idx, deferred=True) as writer:
        writer.write(2, b"two")
    writer.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx", "x.rec"]
    with RecordReader(rec, idx) as reader:
        assert reader.keys() == [1]


def test_a_write_error_names_the_file(tmp_path):
    """A full disk (/dev/full answers every write with ENOSPC) shows on the final name; nothing is left behind."""
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    (tmp_path / "x.rec.partial").symlink_to("/dev/full")
    with pytest.raises(OSError) as caught, RecordWriter(rec, idx) as writer:
        for key in range(1000):
            writer.write(key, bytes(4096))  # more than the 1 MiB buffer: the write itself fails
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(rec))
    assert list(tmp_path.iterdir()) == []


def test_writer_outside_with_block_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="context manager"):
        RecordWriter(tmp_path / "x.rec", tmp_path / "x.idx").write(1, b"a")


def _write(path_stem, items) -> tuple:
    rec, idx = path_stem.with_suffix(".rec"), path_stem.with_suffix(".idx")
    with RecordWriter(rec, idx) as writer:
        for key, payload in items:
            writer.write(key, payload)
    return rec, idx


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda b: b[:-2], "truncated"),
        (lambda b: b[:5], "truncated record header at byte 0"),
        (lambda b: b"\0" * 4 + b[4:], "bad magic 0x00000000 at byte 0"),
        (lambda b: b[:4] + struct.pack("<I", 2 << 29 | 4) + b[8:], "unexpected part flag 2 at byte 0"),
    ],
)
def test_reader_reports_corruption(tmp_path, corrupt, message):
    rec, _ = _write(tmp_path / "x", [(1, b"abcdefgh")])
    rec.write_bytes(corrupt(rec.read_bytes()))
    with pytest.raises(ValueError, match=message), RecordReader(rec) as reader:
        list(reader)


def test_reader_missing_key(tmp_path):
    rec, idx = _write(tmp_path / "x", [(1, b"a")])
    with RecordReader(rec, idx) as reader, pytest.raises(KeyError, match="no key 2"):
        reader.read(2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"1\t0\nfoo\n", r"x.idx:2: expected 'KEY<TAB>OFFSET', got b'foo\\n'"),
        (b"1\t0\n1\t8\n", r"x.idx:2: duplicate key 1"),
        (b"1\t6\n", r"x.idx:1: expected"),
        (b"1\t0\t9\n", r"x.idx:1: expected"),
    ],
)
def test_read_index_rejects_malformed_lines(tmp_path, text, message):
    (tmp_path / "x.idx").write_bytes(text)
    with pytest.raises(ValueError, match=message):
        read_index(tmp_path / "x.idx")


def test_merge_equals_writing_everything_at_once(tmp_path):
    items = [(100 + i, p) for i, p in enumerate(PAYLOADS)]
    parts = [
        _write(tmp_path / "p0", items[:7]),
        _write(tmp_path / "p1", []),
        _write(tmp_path / "p2", items[7:15]),
        _write(tmp_path / "p3", items[15:]),
    ]
    count = merge_records(parts, tmp_path / "all.rec", tmp_path / "all.idx")
    whole_rec, whole_idx = _write(tmp_path / "whole", items)
    assert count == len(items)
    assert (tmp_path / "all.rec").read_bytes() == whole_rec.read_bytes()
    assert (tmp_path / "all.idx").read_bytes() == whole_idx.read_bytes()


def test_merge_rejects_duplicate_keys_and_writes_nothing(tmp_path):
    a = _write(tmp_path / "a", [(1, b"x"), (2, b"y")])
    b = _write(tmp_path / "b", [(3, b"z"), (2, b"w")])
    with pytest.raises(ValueError, match=r"b.idx: key 2 is also in .*a.idx"):
        merge_records([a, b], tmp_path / "all.rec", tmp_path / "all.idx")
    assert not list(tmp_path.glob("all*"))


def test_merge_rejects_an_index_past_the_end(tmp_path):
    rec, idx = _write(tmp_path / "a", [(1, b"x")])
    idx.write_bytes(b"1\t400\n")
    with pytest.raises(ValueError, match="key 1 points at byte 400, past the end"):
        merge_records([(rec, idx)], tmp_path / "all.rec", tmp_path / "all.idx")
