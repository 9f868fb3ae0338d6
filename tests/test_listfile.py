"""The list-file parser: exact error messages, tolerated variants, round trips and fuzzing, im2rec compatibility,
warnings on valid but suspicious lists, and the `parse` verb on arbitrary input."""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tagflow import cli
from tagflow.errors import InputError, ListFileError
from tagflow.listfile import (
    _OTHER_SPACE,
    MAX_KEY_BYTES,
    ListFile,
    _parse,
    concat_lists,
    default_label_names,
    list_warnings,
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
    ("too few labels, a path with a space", b"1\t0\ta b.jpg\n", ["L:1: expected 2 label values, found 1"]),
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
    (
        "tab after the path",
        b"1\t0\t1\ta.jpg\t\n",
        [
            "L:1: the line ends with an empty field (a tab after the path): expected 4 tab-separated fields "
            "(ID, 2 label values, path), found 5"
        ],
    ),
    (
        "tab before the ID",
        b"\t1\t0\t1\ta.jpg\n",
        [
            "L:1: the line starts with an empty field (a tab before the ID): expected 4 tab-separated fields "
            "(ID, 2 label values, path), found 5"
        ],
    ),
    (
        "two tabs in a row",
        b"1\t0\t\t1\ta.jpg\r\n",
        [
            "L:1: column 3 is empty (nothing between two tabs): expected 4 tab-separated fields "
            "(ID, 2 label values, path), found 5"
        ],
    ),
    (
        "several empty fields",
        b"1\t\t0\t \t1\ta.jpg\t\n",
        [
            "L:1: columns 2, 4 are empty (nothing between two tabs); the line ends with an empty field (a tab after "
            "the path): expected 4 tab-separated fields (ID, 2 label values, path), found 7"
        ],
    ),
    (
        "spaces between tab-separated fields",
        b"1 0 1\ta.jpg\n2\t0 1\tb.jpg\n3 0 1 c.jpg\t\n",
        [
            "L:1: the line mixes tabs and spaces between fields (a line with a tab is split at tabs only, so that "
            "its path may contain spaces): expected 4 tab-separated fields (ID, 2 label values, path), found 2",
            "L:2: the line mixes tabs and spaces between fields (a line with a tab is split at tabs only, so that "
            "its path may contain spaces): expected 4 tab-separated fields (ID, 2 label values, path), found 3",
            "L:3: the line mixes tabs and spaces between fields (a line with a tab is split at tabs only, so that "
            "its path may contain spaces): expected 4 tab-separated fields (ID, 2 label values, path), found 2",
        ],
    ),
    (
        "one label and no path",
        b"1 0\n",
        ["L:1: 1 label value and no path after the ID (expected 2 label values, then a path)"],
    ),
    (
        "empty label between tabs",
        b"1\t\t1\ta.jpg\n",
        ["L:1: column 2 is empty (expected a label value 0 or 1)"],
    ),
    (
        "path longer than an S3 key",
        b"1\t0\t1\t" + b"k" * (MAX_KEY_BYTES + 1) + b"\n",
        [
            f"L:1: path {'k' * 200!r}... ({MAX_KEY_BYTES + 1} characters) is longer than an S3 key may be "
            f"({MAX_KEY_BYTES + 1} bytes, at most {MAX_KEY_BYTES})"
        ],
    ),
    (
        "S3 key longer than an S3 key",
        b"1\t0\t1\ts3://bkt/" + "\u00e9".encode() * 513 + b"\n",
        [
            f"L:1: path {('s3://bkt/' + chr(0xE9) * 513)[:200]!r}... (522 characters) is longer than an S3 key "
            f"may be (1026 bytes, at most {MAX_KEY_BYTES})"
        ],
    ),
    (
        "no-break space ends the path",
        b"1\t0\t1\ta.jpg\n2\t1\t1\tb.jpg\n3\t0\t1\tx.jpg\xc2\xa0\n",
        ["L:3: path 'x.jpg\\xa0' ends with U+00A0 (NO-BREAK SPACE); only ASCII spaces and tabs separate fields"],
    ),
    (
        "ideographic space starts a space-separated path",
        "1 0 1 \u3000x.jpg\n".encode(),
        ["L:1: path '\\u3000x.jpg' starts with U+3000 (IDEOGRAPHIC SPACE); only ASCII spaces and tabs separate fields"],
    ),
    (
        "byte-order mark inside the file",
        "1\t0\t1\ta.jpg\n\ufeff2\t0\t1\tb.jpg\n".encode(),
        [
            "L:2: ID '\\ufeff2' starts with U+FEFF (ZERO WIDTH NO-BREAK SPACE); only ASCII spaces and tabs separate "
            "fields"
        ],
    ),
    (
        "em space after a label",
        "1\t0\u2003\t1\ta.jpg\n".encode(),
        [
            "L:1: column 2: label value '0\\u2003' ends with U+2003 (EM SPACE); only ASCII spaces and tabs "
            "separate fields"
        ],
    ),
    (
        "next line (U+0085) ends the path",
        "1 0 1 a.jpg\x85\n".encode(),
        ["L:1: path 'a.jpg\\x85' ends with U+0085 (NEXT LINE); only ASCII spaces and tabs separate fields"],
    ),
    (
        "ideographic space taken for a separator",
        "1 0 1\u3000a.jpg\n".encode(),
        [
            "L:1: expected 2 label values, found 1; U+3000 (IDEOGRAPHIC SPACE) in the line is not a separator "
            "(only ASCII spaces and tabs separate fields)"
        ],
    ),
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
            "L:2: 1 label value and no path after the ID (expected 2 label values, then a path)",
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


# -------------------------------------------------------------- whitespace the format does not define (issue 8)

OTHER_SPACES = sorted(_OTHER_SPACE)


def test_other_whitespace_is_every_non_ascii_space_and_the_invisible_ones():
    every = {chr(c) for c in range(0x80, 0x110000) if chr(c).isspace()}
    assert set(_OTHER_SPACE) == every | {"\u180e", "\u200b", "\u2060", "\ufeff"}


def field_line(field: str, value: str) -> bytes:
    """A valid first line, then one (2 labels) with `field` replaced by `value` (line 2: a byte-order mark that
    starts the file is tolerated)."""
    fields = {"id": "7", "label": "1", "path": "x.jpg"}
    fields[field] = value
    return f"1\t0\t0\ta.jpg\n{fields['id']}\t0\t{fields['label']}\t{fields['path']}\n".encode()


@pytest.mark.parametrize("where", ["starts", "ends"])
@pytest.mark.parametrize("field", ["id", "label", "path"])
@pytest.mark.parametrize("ch", OTHER_SPACES, ids=[f"U+{ord(c):04X}" for c in OTHER_SPACES])
def test_other_whitespace_at_a_field_edge_is_refused_with_its_code_point(ch, field, where):
    plain = {"id": "7", "label": "1", "path": "x.jpg"}[field]
    value = ch + plain if where == "starts" else plain + ch
    data = field_line(field, value)
    name = unicodedata.name(ch, None) or "NEXT LINE"
    what = {"id": "ID", "label": "column 3: label value", "path": "path"}[field]
    expected = [
        f"L:2: {what} {value!r} {where} with U+{ord(ch):04X} ({name}); only ASCII spaces and tabs separate fields"
    ]
    assert errors_of(data) == expected
    with pytest.raises(ListFileError) as info:
        _parse(data, 2, "L", fast=False)
    assert info.value.errors == expected


@pytest.mark.parametrize("ch", OTHER_SPACES, ids=[f"U+{ord(c):04X}" for c in OTHER_SPACES])
def test_other_whitespace_inside_a_path_is_kept_exactly(ch):
    data = f"7\t0\t1\tdir/a{ch}b.jpg\n".encode()
    assert parse_list(data, 2).paths == [f"dir/a{ch}b.jpg"]
    assert _parse(data, 2, "L", fast=False).paths == [f"dir/a{ch}b.jpg"]


def test_only_ascii_spaces_tabs_and_the_cr_before_lf_are_stripped():
    lf = parse_list(b"\xef\xbb\xbf 7 \t 0\t1\t  dir/a b.jpg  \r\n8 1 0 s3://b/k\r\n", 2)
    assert lf.paths == ["dir/a b.jpg", "s3://b/k"]
    assert errors_of(b"7\t0\t1\ta.jpg\x0b\n") == ["L:1: path 'a.jpg\\x0b' contains control character 0x0b"]
    assert errors_of(b"7\x0c\t0\t1\ta.jpg\n") == ["L:1: ID '7\\x0c' is not an integer"]


def test_a_path_of_exactly_an_s3_keys_length_is_accepted_by_both_parsers():
    data = b"1\t0\t1\t/" + b"k" * MAX_KEY_BYTES + b"\r\n2\t0\t1\ts3://bkt/" + b"k" * MAX_KEY_BYTES + b"\n"
    expected = ["k" * MAX_KEY_BYTES, "s3://bkt/" + "k" * MAX_KEY_BYTES]
    assert parse_list(data, 2).paths == expected
    assert _parse(data, 2, "L", fast=False).paths == expected


@pytest.mark.parametrize(
    "line",
    [
        b"%b\t0\t1\ta.jpg\n" % (b"x" * 10_000_000),  # ID
        b"1\t%b\t1\ta.jpg\n" % (b"2" * 10_000_000),  # label
        b"1\t0\t1\t%b\xc2\xa0\n" % (b"p" * 10_000_000),  # path with a no-break space
        b"1\t0\t1\t%b\n" % (b"p" * 10_000_000),  # path longer than a key
        b"1 0 1 %b\n" % (b"p " * 5_000_000),  # space-separated, far too many fields
    ],
    ids=["id", "label", "path-nbsp", "path-long", "fields"],
)
def test_messages_never_echo_a_huge_value(line):
    (message,) = errors_of(line)
    assert len(message) < 600
    assert "characters)" in message or "found" in message


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


# Separators and look-alikes the fuzzers splice in: the format's own, and whitespace it must refuse at an edge.
SPACE_BYTES = [c.encode() for c in ["\t", " ", "\r", "\t\t", "\xa0", "\u2003", "\u3000", "\ufeff", "\x85", "\u2028"]]


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
            data[at:at] = draw(st.one_of(st.binary(min_size=1, max_size=4), st.sampled_from(SPACE_BYTES)))
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
    assert infer_num_labels("7 0 1\x0ba\u00a0b.jpg\n".encode()) == 1  # split where the parser splits: spaces only
    with pytest.raises(ListFileError, match=r"x\.lst:1: cannot tell the label count"):
        infer_num_labels(b"7\ta.jpg\n", name="x.lst")
    data = b"1\t0\t1\ta.jpg\n2\t0\tb.jpg\n"
    with pytest.raises(ListFileError, match=r"x\.lst:2: "):
        parse_list(data, infer_num_labels(data), name="x.lst")


@FUZZ
@given(valid_lists(), st.sampled_from(["\t", " "]), st.data())
def test_other_whitespace_at_any_field_edge_is_refused_on_its_line(case, sep, data):
    ids, labels, paths = case
    paths = [p.replace(" ", "_") for p in paths] if sep == " " else paths
    lines = render(ids, labels, paths, sep, False, False).decode().split("\n")[:-1]
    row = data.draw(st.integers(0, len(lines) - 1))
    fields = lines[row].split(sep)
    col = data.draw(st.integers(0, len(fields) - 1))
    ch = data.draw(st.sampled_from(OTHER_SPACES))
    fields[col] = data.draw(st.sampled_from([ch + fields[col], fields[col] + ch]))
    if row == 0 and col == 0 and fields[0].startswith("\ufeff"):
        return  # the byte-order mark that starts a file is tolerated
    lines[row] = sep.join(fields)
    raw = ("\n".join(lines) + "\n").encode()
    fast, slow = outcome(raw, labels.shape[1], True), outcome(raw, labels.shape[1], False)
    assert fast == slow
    assert fast[0] == "errors"
    assert any(e.startswith(f"L:{row + 1}: ") and f"U+{ord(ch):04X}" in e for e in fast[1]), fast[1]


# ------------------------------------------------------------------------------- label names and writing, whitespace


def test_label_names_keep_the_same_whitespace_rules_as_the_list(tmp_path):
    names = tmp_path / "names.txt"
    names.write_bytes(b"\xef\xbb\xbfred \r\n\tround shape\ntext\r\n")
    assert read_label_names(names, 3) == ["red", "round shape", "text"]
    names.write_bytes("red\xa0\nround\u3000shape\n\u2003text\n".encode())
    with pytest.raises(ListFileError) as info:
        read_label_names(names, 3)
    assert info.value.errors == [
        f"{names}:1: label name 'red\\xa0' ends with U+00A0 (NO-BREAK SPACE); only ASCII spaces and tabs may "
        "surround a name",
        f"{names}:3: label name '\\u2003text' starts with U+2003 (EM SPACE); only ASCII spaces and tabs may "
        "surround a name",
    ]


def test_label_name_messages_are_cut(tmp_path):
    names = tmp_path / "names.txt"
    names.write_bytes(b"a" * 1_000_000 + b"\x01\nb\n")
    with pytest.raises(ListFileError) as info:
        read_label_names(names, 2)
    assert len(str(info.value)) < 500 and "(1000001 characters)" in str(info.value)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("x.jpg\xa0", "path 'x.jpg\\xa0' ends with U+00A0 (NO-BREAK SPACE)"),
        (" x.jpg", "path ' x.jpg' starts or ends with a space"),
        ("a\tb", "path 'a\\tb' contains control character 0x09"),
        ("", "missing path"),
        ("k" * 2000, "is longer than an S3 key may be (2000 bytes, at most 1024)"),
    ],
)
def test_write_list_refuses_what_would_not_read_back_as_itself(tmp_path, path, reason):
    lf = parse_list(b"7\t1\t0\ta.jpg\n", 2)
    with pytest.raises(ValueError, match="cannot be written to a list file") as info:
        write_list(lf, tmp_path / "out.lst", paths=[path])
    assert reason in str(info.value) and len(str(info.value)) < 400
    assert not (tmp_path / "out.lst").exists()


# ------------------------------------------------------------------------------------------------- warnings


def test_a_clean_list_has_no_warnings():
    warnings = list_warnings(parse_list(b"1\t1\t0\ta.jpg\n2\t0\t1\tb.jpg\n", 2, name="L"))
    assert not warnings
    assert warnings.counts() == {"images_without_labels": 0, "labels_without_images": 0, "paths_under_several_ids": 0}
    assert warnings.messages() == []


def test_warnings_count_unlabeled_images_unused_labels_and_shared_paths_with_their_lines():
    data = (
        b"30\t0\t0\t1\ta.jpg\n"  # line 1
        b"10\t0\t0\t0\tb.jpg\n"  # line 2: no label
        b"20\t0\t0\t1\t/a.jpg\n"  # line 3: a.jpg again (leading / dropped)
        b"40\t0\t0\t0\tc.jpg\n"  # line 4: no label
        b"50\t0\t0\t1\ta.jpg\n"  # line 5: a.jpg a third time
    )
    lf = parse_list(data, 3, name="L").sorted_by_id()  # examples keep their file lines through sorting
    warnings = list_warnings(lf, ["red", "round", "text"])
    assert warnings.counts() == {"images_without_labels": 2, "labels_without_images": 2, "paths_under_several_ids": 1}
    assert warnings.to_dict() == {
        **warnings.counts(),
        "unlabeled_examples": [{"id": 10, "line": 2}, {"id": 40, "line": 4}],
        "labels_without_images_names": ["red", "round"],
        "shared_path_examples": [{"path": "a.jpg", "ids": [20, 30, 50], "lines": [3, 1, 5], "count": 3}],
    }
    assert warnings.messages() == [
        "L: 2 of 5 images have no label (every value is 0), e.g. ID 10 (line 2), ID 40 (line 4)",
        "L: 2 of 3 labels are carried by no image: 'red' (column 2), 'round' (column 3)",
        "L: 1 path is listed under several IDs (each ID packs the same image again), e.g. 'a.jpg' under ID 20 "
        "(line 3) and ID 30 (line 1) and ID 50 (line 5)",
    ]


def test_a_list_where_no_image_has_a_label_says_so():
    lf = parse_list(b"".join(b"%d\t0\t0\timg/%d.jpg\n" % (i, i) for i in range(100)), 2, name="L")
    warnings = list_warnings(lf)
    assert warnings.counts() == {"images_without_labels": 100, "labels_without_images": 2, "paths_under_several_ids": 0}
    assert warnings.messages()[0] == (
        "L: none of the 100 images has a label (every value is 0), e.g. ID 0 (line 1), ID 1 (line 2), ID 2 (line 3), "
        "ID 3 (line 4), ID 4 (line 5)"
    )
    assert warnings.messages()[1].startswith("L: 2 of 2 labels are carried by no image: 'label_0' (column 2)")


def test_shared_path_examples_are_bounded_and_cut():
    long = "d/" + "p" * 900
    data = b"".join(b"%d\t1\t%b\n" % (i, long.encode() if i % 2 else b"q%d" % (i % 10)) for i in range(1000))
    warnings = list_warnings(parse_list(data, 1, name="L"))
    assert warnings.paths_under_several_ids == 6  # the long path, and q0, q2, q4, q6, q8
    assert len(warnings.shared_path_examples) == 5
    first = warnings.shared_path_examples[0]
    assert first["path"] == "q0" and first["count"] == 100 and first["ids"] == [0, 10, 20, 30, 40]
    (message,) = warnings.messages()
    assert "and 95 more" in message and "(902 characters)" in message and len(message) < 1500


def test_warnings_of_concatenated_parts_name_ids_without_lines():
    a = parse_list(b"1\t0\ta.jpg\n", 1, name="A")
    b = parse_list(b"2\t1\ta.jpg\n", 1, name="B")
    warnings = list_warnings(concat_lists([a, b], name="AB"))
    assert warnings.to_dict()["unlabeled_examples"] == [{"id": 1}]
    assert warnings.to_dict()["shared_path_examples"] == [{"path": "a.jpg", "ids": [1, 2], "count": 2}]
    assert warnings.messages()[0] == "AB: 1 of 2 images have no label (every value is 0), e.g. ID 1"


def test_warnings_log_each_message_at_warning_level(caplog):
    warnings = list_warnings(parse_list(b"1\t0\ta.jpg\n2\t0\ta.jpg\n", 1, name="L"))
    with caplog.at_level(logging.WARNING, logger="tagflow.listfile"):
        warnings.log()
    assert [r.getMessage() for r in caplog.records] == warnings.messages()
    assert len(caplog.records) == 3 and all(r.levelno == logging.WARNING for r in caplog.records)


@FUZZ
@given(st.integers(1, 6), st.lists(st.tuples(st.integers(0, 63), st.sampled_from("abcdef")), min_size=1, max_size=40))
def test_warning_counts_match_a_plain_count(num_labels, rows):
    masks = [m & (2**num_labels - 1) for m, _ in rows]
    labels = ((np.array(masks, np.int64)[:, None] >> np.arange(num_labels)) & 1).astype(np.uint8)
    paths = [f"{p}.jpg" for _, p in rows]
    lf = ListFile("gen", np.arange(len(rows), dtype=np.int64), labels, paths, "", np.arange(1, len(rows) + 1))
    warnings = list_warnings(lf)
    plain = labels.tolist()
    assert warnings.images_without_labels == sum(1 for r in plain if not any(r))
    assert len(warnings.labels_without_images) == sum(1 for c in zip(*plain, strict=True) if not any(c))
    repeated = [p for p in dict.fromkeys(paths) if paths.count(p) > 1]
    assert warnings.paths_under_several_ids == len(repeated)
    assert [e["path"] for e in warnings.shared_path_examples] == repeated[:5]
    for e in warnings.shared_path_examples:
        rows_of = [i for i, p in enumerate(paths) if p == e["path"]]
        assert e["count"] == len(rows_of) and e["ids"] == rows_of[:5] and e["lines"] == [r + 1 for r in rows_of[:5]]


def test_warnings_take_names_for_every_column():
    with pytest.raises(ValueError, match="1 label names for a list of 2 labels"):
        list_warnings(parse_list(b"1\t0\t1\ta.jpg\n", 2), ["only"])


# --------------------------------------------------------------- the `parse` verb on arbitrary input (hypothesis)

CLI_FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MAX_STDERR = 20_000  # 20 messages of a few hundred characters, whatever the input

near_field = st.one_of(
    st.sampled_from(["0", "1", "2", "", "7", "-1", "01", "9" * 25, "x.jpg", "/a/b.jpg", "s3://b/k.jpg", "s3://b"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
    st.builds("{}{}".format, st.sampled_from(["a.jpg", "1", "0"]), st.sampled_from([c for c in OTHER_SPACES])),
)
near_sep = st.sampled_from(["\t", " ", "  ", "\t\t", " \t", "\xa0", "\u3000", "\ufeff", "\r", "\u2028", ""])


@st.composite
def near_valid_lists(draw) -> tuple[bytes, int]:
    """Lines of roughly the right shape: fields and separators drawn from the valid, the near-valid and the odd."""
    num_labels = draw(st.integers(1, 4))
    lines = []
    for i in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):  # a valid line, so that some lists pass
            lines.append(
                "\t".join(
                    [
                        str(i),
                        *draw(st.lists(st.sampled_from("01"), min_size=num_labels, max_size=num_labels)),
                        f"img/{i}.jpg",
                    ]
                )
            )
            continue
        fields = draw(st.lists(near_field, min_size=1, max_size=num_labels + 3))
        seps = draw(st.lists(near_sep, min_size=len(fields), max_size=len(fields)))
        lines.append("".join(f + s for f, s in zip(fields, seps, strict=True)))
    ending = draw(st.sampled_from(["\n", "\r\n", ""]))
    text = draw(st.sampled_from(["", "\ufeff"])) + "\n".join(lines) + ending
    return text.encode("utf-8", "surrogatepass"), num_labels


def run_parse(capsys, data: bytes, num_labels: int) -> tuple[int, str]:
    """`tagflow parse FILE -n N --out OUT` in this process; checks the outcome every input must have."""
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "in.lst", Path(tmp) / "out.lst"
        path.write_bytes(data)
        capsys.readouterr()
        status = cli.main(["parse", str(path), "-n", str(num_labels), "--out", str(out)])
        stderr = capsys.readouterr().err
        assert status in (0, 2), stderr
        assert "Traceback" not in stderr
        assert len(stderr) <= MAX_STDERR
        if status == 0:
            expected = parse_list(data, num_labels).sorted_by_id()
            assert same(parse_list(out, num_labels), expected)
        else:
            assert stderr.startswith("tagflow: error: ") and not out.exists()
    return status, stderr


@CLI_FUZZ
@given(st.binary(max_size=600), st.integers(1, 5))
def test_parse_verb_on_arbitrary_bytes_exits_0_or_2_with_a_bounded_message(capsys, data, num_labels):
    run_parse(capsys, data, num_labels)


@CLI_FUZZ
@given(near_valid_lists())
def test_parse_verb_on_near_valid_lines_exits_0_or_2_and_its_output_reparses(capsys, case):
    run_parse(capsys, *case)


def test_parse_verb_on_a_huge_path_prints_it_cut(capsys):
    status, stderr = run_parse(capsys, b"1\t0\t1\t" + b"a" * 10_000_000 + b"\n2\t0\t1\tb.jpg\n", 2)
    assert status == 2 and len(stderr) < 500 and "(10000000 characters)" in stderr


def test_parse_verb_accepts_a_valid_list(capsys):
    status, _ = run_parse(capsys, b"2\t0\t1\tb.jpg\n1\t1\t1\ts3://bkt/a b.jpg\n", 2)
    assert status == 0
