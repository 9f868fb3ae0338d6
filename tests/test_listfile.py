"""The list-file parser: exact error messages, tolerated variants, round trips and fuzzing, im2rec compatibility."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tagflow.errors import InputError, ListFileError
from tagflow.listfile import (
    ListFile,
    _parse,
    default_label_names,
    parse_list,
    read_label_names,
    write_list,
)

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def errors_of(data: bytes, num_labels: int = 2) -> list[str]:
    with pytest.raises(ListFileError) as info:
        parse_list(data, num_labels, name="L")
    return info.value.errors


def same(a: ListFile, b: ListFile) -> bool:
    return (
        np.array_equal(a.ids, b.ids)
        and np.array_equal(a.labels, b.labels)
        and a.paths == b.paths
        and a.labels.dtype == b.labels.dtype == np.uint8
        and a.ids.dtype == b.ids.dtype == np.int64
    )


# ------------------------------------------------------------------------------------------------ error table

MALFORMED = [
    ("empty", b"", ["L:1: the file is empty (expected one line per image: ID, 2 label values, path)"]),
    ("blank", b"\n \r\n", ["L:1: the file is empty (expected one line per image: ID, 2 label values, path)"]),
    (
        "empty line",
        b"1\t0\t1\ta.jpg\n\n2\t0\t1\tb.jpg\n",
        ["L:2: empty line (expected ID, 2 label values, path)"],
    ),
    ("too few labels", b"1\t0\ta.jpg\n", ["L:1: expected 2 label values, found 1"]),
    ("too many labels", b"1\t0\t1\t1\ta.jpg\n", ["L:1: expected 2 label values, found 3"]),
    (
        "space in space-separated path",
        b"1 0 1 my file.jpg\n",
        ["L:1: expected 2 label values, found 3 (a path containing spaces needs tab-separated fields)"],
    ),
    ("label 2", b"1\t0\t2\ta.jpg\n", ["L:1: column 3: label value '2' is not 0 or 1"]),
    (
        "two bad labels",
        b"1\tx\t1.0\ta.jpg\n",
        ["L:1: column 2: label value 'x' is not 0 or 1 (and 1 more on this line)"],
    ),
    ("ID not integer", b"a1\t0\t1\ta.jpg\n", ["L:1: ID 'a1' is not an integer"]),
    ("ID float", b"1.5 0 1 a.jpg\n", ["L:1: ID '1.5' is not an integer"]),
    ("ID plus sign", b"+1 0 1 a.jpg\n", ["L:1: ID '+1' is not an integer"]),
    ("ID non-ASCII digits", "\u0661\u0662\t0\t1\ta.jpg\n".encode(), ["L:1: ID '\u0661\u0662' is not an integer"]),
    ("ID negative", b"-1\t0\t1\ta.jpg\n", ["L:1: ID '-1' is negative (expected an integer >= 0)"]),
    (
        "ID too large",
        b"9223372036854775808\t0\t1\ta.jpg\n",
        ["L:1: ID '9223372036854775808' is too large (at most 9223372036854775807)"],
    ),
    ("ID missing", b"\t0\t1\ta.jpg\n", ["L:1: missing ID (expected an integer >= 0 as the first field)"]),
    ("duplicate ID", b"5\t0\t1\ta\n6\t0\t1\tb\n5\t1\t1\tc\n", ["L:3: duplicate ID 5 (first on line 1)"]),
    (
        "duplicate ID, other spelling",
        b"5\t0\t1\ta\n05\t0\t1\tb\n5\t1\t1\tc\n",
        ["L:2: duplicate ID 5 (first on line 1)", "L:3: duplicate ID 5 (first on line 1)"],
    ),
    (
        "duplicate ID on a line with another error",
        b"5\t0\t7\ta\n5\t0\t1\tb\n",
        ["L:1: column 3: label value '7' is not 0 or 1", "L:2: duplicate ID 5 (first on line 1)"],
    ),
    ("path missing", b"1\t0\t1\n", ["L:1: missing path after the 2 label values"]),
    ("path field empty", b"1\t0\t1\t\n", ["L:1: missing path (the last field is empty)"]),
    ("only an ID", b"7\n", ["L:1: nothing after the ID (expected 2 label values, then a path)"]),
    ("path only slashes", b"1\t0\t1\t//\n", ["L:1: path '//' names no file"]),
    (
        "path control character",
        b"1\t0\t1\ta\x01b.jpg\n",
        ["L:1: path 'a\\x01b.jpg' contains control character 0x01"],
    ),
    (
        "CR inside a path",
        b"1\t0\t1\ta\rb.jpg\r\n",
        ["L:1: path 'a\\rb.jpg' contains control character 0x0d"],
    ),
    (
        "S3 URI without key",
        b"1\t0\t1\ts3://bucket\n",
        ["L:1: path 's3://bucket' is not a valid S3 URI (expected s3://BUCKET/KEY)"],
    ),
    (
        "S3 URI without bucket",
        b"1 0 1 s3:///key.jpg\n",
        ["L:1: path 's3:///key.jpg' is not a valid S3 URI (expected s3://BUCKET/KEY)"],
    ),
    (
        "not UTF-8",
        b"1\t0\t1\ta.jpg\n2\t0\t1\t\xff.jpg\n",
        ["L:2: not valid UTF-8: byte 0xff at byte offset 18 of the file"],
    ),
    (
        "several lines, in line order",
        b"1\t0\t1\ta\n2\t0\n3\t0\t1\tc\nx\t0\t1\td\n3\t1\t1\te\n",
        [
            "L:2: expected 2 label values, found 0",
            "L:4: ID 'x' is not an integer",
            "L:5: duplicate ID 3 (first on line 3)",
        ],
    ),
    (
        "ID and label errors on one line",
        b"-2\t0\t3\ta\n",
        ["L:1: ID '-2' is negative (expected an integer >= 0)", "L:1: column 3: label value '3' is not 0 or 1"],
    ),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_input_reports_exact_errors(data: bytes, expected: list[str]):
    assert errors_of(data) == expected
    with pytest.raises(ListFileError) as info:  # the reference parser alone says exactly the same
        _parse(data, 2, "L", fast=False)
    assert info.value.errors == expected


def test_error_in_a_large_file_is_found_by_the_fast_path_and_reported_exactly():
    lines = [b"%d\t0\t1\t0\t1\timg/%d.jpg\n" % (i, i) for i in range(1000)]
    lines[500] = b"500\t0\t1\t2\t1\timg/500.jpg\n"
    lines[700] = b"3\t0\t1\t0\t1\timg/700.jpg\n"
    assert errors_of(b"".join(lines), 4) == [
        "L:501: column 4: label value '2' is not 0 or 1",
        "L:701: duplicate ID 3 (first on line 4)",
    ]


def test_many_errors_are_all_collected_and_the_message_shows_twenty():
    data = b"".join(b"%d\t0\t9\tp%d\n" % (i, i) for i in range(25))
    with pytest.raises(ListFileError) as info:
        parse_list(data, 2, name="L")
    assert len(info.value.errors) == 25
    shown = str(info.value).splitlines()
    assert shown[0] == "L:1: column 3: label value '9' is not 0 or 1"
    assert len(shown) == 21
    assert shown[-1] == "... and 5 more error(s) (25 in all)"


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "seed.lst"
    path.write_bytes(b"1\t0\t1\n")
    with pytest.raises(ListFileError) as info:
        parse_list(path, 2)
    assert info.value.errors == [f"{path}:1: missing path after the 2 label values"]
    assert info.value.exit_code == 2


def test_unreadable_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read the list file"):
        parse_list(tmp_path / "missing.lst", 2)


# ------------------------------------------------------------------------------------------ tolerated variants


@pytest.mark.parametrize(
    "data",
    [
        b"3\t0\t1\tdir/a b.jpg\n1\t1\t0\ts3://bkt/k/c.jpg\n",  # tabs; a path with a space
        b"3\t0\t1\tdir/a b.jpg\r\n1\t1\t0\ts3://bkt/k/c.jpg\r\n",  # CRLF
        b"3\t0\t1\tdir/a b.jpg\n1\t1\t0\ts3://bkt/k/c.jpg",  # no trailing newline
        b"\xef\xbb\xbf3\t0\t1\tdir/a b.jpg\n1\t1\t0\ts3://bkt/k/c.jpg\n",  # UTF-8 byte-order mark
        b"3\t0\t1\t/dir/a b.jpg\n1\t1\t0\ts3://bkt/k/c.jpg\n",  # leading slash
        b"3 \t 0\t1 \t dir/a b.jpg \n1\t1\t0\ts3://bkt/k/c.jpg\n",  # spaces around tab-separated fields
    ],
)
def test_tolerated_variants_give_the_same_list(data: bytes):
    lf = parse_list(data, 2, name="L")
    assert lf.ids.tolist() == [3, 1]
    assert lf.labels.tolist() == [[0, 1], [1, 0]]
    assert lf.paths == ["dir/a b.jpg", "s3://bkt/k/c.jpg"]
    assert lf.sha256 == __import__("hashlib").sha256(data).hexdigest()


@pytest.mark.parametrize(
    "data",
    [
        b"3 0 1 /dir/a.jpg\n1 1 0 s3://bkt/c.jpg\n",
        b"3   0  1    /dir/a.jpg   \r\n  1 1 0 s3://bkt/c.jpg",
        b"3 0 1 dir/a.jpg\n1\t1\t0\ts3://bkt/c.jpg\n",  # mixed lines
    ],
)
def test_space_separated(data: bytes):
    lf = parse_list(data, 2)
    assert (lf.ids.tolist(), lf.labels.tolist(), lf.paths) == (
        [3, 1],
        [[0, 1], [1, 0]],
        ["dir/a.jpg", "s3://bkt/c.jpg"],
    )


def test_sorted_by_id_and_label_counts():
    lf = parse_list(b"30\t1\t1\tc\n10\t0\t1\ta\n20\t0\t1\tb\n", 2)
    assert not lf.is_sorted
    ordered = lf.sorted_by_id()
    assert ordered.is_sorted
    assert ordered.ids.tolist() == [10, 20, 30]
    assert ordered.paths == ["a", "b", "c"]
    assert ordered.labels.tolist() == [[0, 1], [0, 1], [1, 1]]
    assert lf.ids.tolist() == [30, 10, 20]  # the original is untouched
    assert lf.label_counts().tolist() == [1, 3]
    assert len(ordered.subset(1, 3)) == 2 and ordered.subset(1, 3).paths == ["b", "c"]


# ---------------------------------------------------------------------------------------- properties (hypothesis)

path_chars = st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\t")
relative_path = st.text(path_chars, min_size=1, max_size=30).filter(
    lambda p: p == p.strip() and p.lstrip("/") == p and not p.startswith("s3:")
)
s3_path = st.builds("s3://{}/{}".format, st.from_regex(r"[a-z0-9][a-z0-9.-]{1,20}", fullmatch=True), relative_path)


@st.composite
def valid_lists(draw) -> tuple[list[int], np.ndarray, list[str]]:
    num_labels = draw(st.integers(1, 12))
    n = draw(st.integers(1, 40))
    ids = draw(st.lists(st.integers(0, 2**63 - 1), min_size=n, max_size=n, unique=True))
    masks = draw(st.lists(st.integers(0, 2**num_labels - 1), min_size=n, max_size=n))  # one draw per row
    labels = ((np.array(masks, np.int64)[:, None] >> np.arange(num_labels)) & 1).astype(np.uint8)
    paths = draw(st.lists(st.one_of(relative_path, s3_path), min_size=n, max_size=n))
    return ids, labels, paths


@FUZZ
@given(valid_lists())
def test_any_valid_list_round_trips_through_write_list(case):
    ids, labels, paths = case
    original = ListFile("gen", np.array(ids, np.int64), labels, paths, "")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "list.lst"
        write_list(original, out)
        parsed = parse_list(out, labels.shape[1])
        assert same(parsed, original)
        assert same(_parse(out.read_bytes(), labels.shape[1], "gen", fast=False), original)


def render(ids, labels, paths, sep: str, crlf: bool, slash: bool) -> bytes:
    lines = []
    for i, row, p in zip(ids, labels.tolist(), paths, strict=True):
        p = "/" + p if slash and not p.startswith("s3://") else p
        lines.append(sep.join([str(i), *map(str, row), p]))
    return ("\r\n" if crlf else "\n").join(lines).encode() + (b"\r\n" if crlf else b"\n")


@FUZZ
@given(valid_lists(), st.sampled_from(["\t", " "]), st.booleans(), st.booleans())
def test_any_valid_list_in_any_accepted_spelling_parses(case, sep, crlf, slash):
    ids, labels, paths = case
    if sep == " ":
        paths = [p.replace(" ", "_") for p in paths]
        if any(p != p.strip() or not p.strip() for p in paths):
            return
    parsed = parse_list(render(ids, labels, paths, sep, crlf, slash), labels.shape[1])
    assert same(parsed, ListFile("gen", np.array(ids, np.int64), labels, paths, ""))


def outcome(data: bytes, num_labels: int, fast: bool):
    try:
        lf = _parse(data, num_labels, "L", fast=fast)
    except ListFileError as exc:
        return ("errors", exc.errors)
    return ("ok", lf.ids.tolist(), lf.labels.tolist(), lf.paths)


@st.composite
def corrupted(draw) -> tuple[bytes, int]:
    ids, labels, paths = draw(valid_lists())
    data = bytearray(render(ids, labels, paths, draw(st.sampled_from(["\t", " "])), draw(st.booleans()), False))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate line"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.sampled_from([0, 9, 10, 13, 32, ord("0"), ord("1"), ord("2"), ord("/"), 0xFF, 0xC3]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "duplicate line":
            lines = bytes(data).split(b"\n")
            k = draw(st.integers(0, len(lines) - 1))
            lines.insert(k, lines[k])
            data = bytearray(b"\n".join(lines))
    return bytes(data), labels.shape[1]


@FUZZ
@given(corrupted())
def test_corruption_is_parsed_or_rejected_and_fast_path_agrees(case):
    data, num_labels = case
    fast, slow = outcome(data, num_labels, True), outcome(data, num_labels, False)
    assert fast == slow
    if fast[0] == "errors":
        assert fast[1] and all(e.startswith("L:") for e in fast[1])


@FUZZ
@given(st.binary(max_size=400), st.integers(1, 5))
def test_arbitrary_bytes_never_crash(data, num_labels):
    assert outcome(data, num_labels, True) == outcome(data, num_labels, False)


# ------------------------------------------------------------------------------------ label names and writing


def test_label_names(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("red\r\nround shape\ntext\n")
    assert read_label_names(names, 3) == ["red", "round shape", "text"]
    assert default_label_names(3) == ["label_0", "label_1", "label_2"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"a\nb\n", ["{p}:2: 2 label names, expected 3 (one per line)"]),
        (b"a\n\nc\n", ["{p}:2: empty label name"]),
        (b"a\nb\na\n", ["{p}:3: duplicate label name 'a' (first on line 1)"]),
        (b"a\n\xffb\nc\n", ["{p}:2: not valid UTF-8 (byte 0xff)"]),
    ],
)
def test_label_names_errors(tmp_path, content, expected):
    names = tmp_path / "names.txt"
    names.write_bytes(content)
    with pytest.raises(ListFileError) as info:
        read_label_names(names, 3)
    assert info.value.errors == [e.format(p=names) for e in expected]


def test_write_list_is_the_normalized_form_and_replaces_atomically(tmp_path):
    lf = parse_list(b"7 1 0 /a/b.jpg\r\n3 0 1 s3://bkt/c.jpg\r\n", 2)
    out = tmp_path / "out.lst"
    out.write_bytes(b"old")
    write_list(lf, out)
    assert out.read_bytes() == b"7\t1\t0\ta/b.jpg\n3\t0\t1\ts3://bkt/c.jpg\n"
    write_list(lf, out, paths=["x.jpg", "y z.jpg"])
    assert out.read_bytes() == b"7\t1\t0\tx.jpg\n3\t0\t1\ty z.jpg\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.lst"]  # no temporary left behind
    with pytest.raises(ValueError, match="cannot be written"):
        write_list(lf, out, paths=["ok.jpg", "bad\tname.jpg"])
    with pytest.raises(ValueError, match="1 paths given for a list of 2 images"):
        write_list(lf, out, paths=["ok.jpg"])


def test_written_list_is_read_by_mxnet_im2rec(tmp_path, mxnet_python):
    lf = parse_list(b"12\t1\t0\t1\tdir/a b.jpg\n5\t0\t0\t1\ts3://bkt/c.jpg\n", 3)
    out = tmp_path / "data.lst"
    write_list(lf, out)
    script = (
        "import json, os, sys, mxnet\n"
        "sys.path.insert(0, os.path.join(os.path.dirname(mxnet.__file__), 'tools'))\n"
        "from im2rec import read_list\n"
        "print(json.dumps(list(read_list(sys.argv[1]))))\n"
    )
    result = subprocess.run([mxnet_python, "-c", script, out], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [[12, "dir/a b.jpg", 1.0, 0.0, 1.0], [5, "s3://bkt/c.jpg", 0.0, 0.0, 1.0]]


def test_infer_num_labels_counts_the_first_line_and_parse_checks_the_rest():
    from tagflow.listfile import infer_num_labels

    assert infer_num_labels(b"7\t0\t1\t1\ta.jpg\n") == 3
    assert infer_num_labels(b"\xef\xbb\xbf7 0 1 a.jpg\r\n8 1 0 b.jpg\r\n") == 2
    with pytest.raises(ListFileError, match=r"x\.lst:1: cannot tell the label count"):
        infer_num_labels(b"7\ta.jpg\n", name="x.lst")
    data = b"1\t0\t1\ta.jpg\n2\t0\tb.jpg\n"
    with pytest.raises(ListFileError, match=r"x\.lst:2: "):
        parse_list(data, infer_num_labels(data), name="x.lst")
