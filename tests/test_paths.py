from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tagflow.errors import InputError
from tagflow.paths import local_path, local_relpath, source_uri
from tagflow.s3 import S3Uri


@pytest.mark.parametrize(
    ("list_path", "expected"),
    [
        ("a/b.jpg", "a/b.jpg"),
        ("/a/b.jpg", "a/b.jpg"),
        ("s3://bkt/x/y.png", "bkt/x/y.png"),
        ("../x.jpg", "%2E%2E/x.jpg"),
        ("a/../../b", "a/%2E%2E/%2E%2E/b"),
        ("a/./b", "a/%2E/b"),
        ("a//b", "a/%/b"),
        ("100%.jpg", "100%25.jpg"),
        ("tab\there.jpg", "tab%09here.jpg"),
        ("nul\x00.jpg", "nul%00.jpg"),
    ],
)
def test_local_relpath_encodes_unsafe_segments(list_path, expected):
    assert local_relpath(list_path) == PurePosixPath(expected)


def test_source_uri_joins_relative_paths_and_keeps_absolute_uris():
    src = S3Uri.parse("s3://raw/designs/images/")
    assert source_uri("/a/1.jpg", src) == S3Uri("raw", "designs/images/a/1.jpg")
    assert source_uri("s3://other/k.jpg", src) == S3Uri("other", "k.jpg")
    with pytest.raises(InputError, match="no source prefix"):
        source_uri("a/1.jpg", None)


def test_empty_path_is_rejected():
    with pytest.raises(InputError, match="names no file"):
        local_relpath("/")


def test_symlink_inside_root_cannot_lead_outside(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(InputError, match="outside"):
        local_path(root, "link/escape.jpg")


segment = st.text(alphabet=st.characters(blacklist_characters="/", codec="utf-8"), max_size=12)
key = st.lists(segment, min_size=1, max_size=5).map("/".join).filter(lambda k: k.lstrip("/"))


@given(key)
def test_any_key_stays_inside_root(k):
    rel = local_relpath(k)
    assert not rel.is_absolute()
    assert ".." not in rel.parts and "." not in rel.parts
    full = Path("/srv/root") / rel
    assert full.is_relative_to("/srv/root")


@given(key, key)
def test_mapping_is_injective(a, b):
    if a.lstrip("/") != b.lstrip("/"):
        assert local_relpath(a) != local_relpath(b)


HUGE = "p" * 10_000_000


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: source_uri(HUGE, None), "is relative but no source prefix was given"),
        (lambda: local_relpath("a/" + HUGE), "path segment 'ppp"),
        (lambda: S3Uri.parse(HUGE), "expected an S3 URI of the form s3://BUCKET/KEY"),
        (lambda: S3Uri.parse("s3:///" + HUGE), "the S3 URI has no bucket name"),
    ],
    ids=["no-source", "long-segment", "not-a-uri", "no-bucket"],
)
def test_messages_cut_a_huge_value_and_say_its_length(call, expected):
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert expected in message
    assert len(message) < 400 and "characters)" in message


def test_long_segment_message_says_its_encoded_size():
    with pytest.raises(InputError, match=r"longer than 255 bytes \(300 encoded\)"):
        local_relpath("dir/" + "%" * 100)
