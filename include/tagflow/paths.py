"""Where a list-file path lives: as an S3 object, and as a file under a local folder.

A list line names its image either as `s3://bucket/key` or as a key relative to a source prefix (a leading `/` is
tolerated, as in the seed's lists). Locally the image is stored at `local_relpath(path)` below the download folder,
which is also the `--root` the packer reads from.

S3 keys may contain `..`, `.`, empty segments, `%` and control bytes, which AWS accepts. The local path must never
escape its folder and two keys must never share a file, so each segment is percent-encoded where it would be unsafe:
`..` → `%2E%2E`, `.` → `%2E`, an empty segment → `%`, `%` → `%25`, bytes below 0x20 and 0x7F → `%XX`.
The mapping is injective, so every key keeps its own file.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from tagflow.errors import InputError, quote
from tagflow.s3 import S3Uri

MAX_SEGMENT_BYTES = 255  # a longer name fails on common Linux filesystems


def is_s3_uri(path: str) -> bool:
    return path.startswith("s3://")


def source_uri(path: str, source: S3Uri | None) -> S3Uri:
    """The S3 object a list path names: itself if it is an `s3://` URI, else a key below `source`."""
    if is_s3_uri(path):
        return S3Uri.parse(path)
    if source is None:
        raise InputError(f"{quote(path)} is relative but no source prefix was given (--source s3://BUCKET/PREFIX)")
    return source.join(path.lstrip("/")) if path.strip("/") else S3Uri(source.bucket, source.key)


def _encode_segment(segment: str) -> str:
    if segment in ("", ".", ".."):
        return {"": "%", ".": "%2E", "..": "%2E%2E"}[segment]
    out = []
    for ch in segment:
        code = ord(ch)
        if ch == "%" or code < 0x20 or code == 0x7F:
            out.append(f"%{code:02X}")
        else:
            out.append(ch)
    encoded = "".join(out)
    if (size := len(encoded.encode("utf-8"))) > MAX_SEGMENT_BYTES:
        raise InputError(f"path segment {quote(segment)} is longer than {MAX_SEGMENT_BYTES} bytes ({size} encoded)")
    return encoded


def local_relpath(path: str) -> PurePosixPath:
    """The path, relative to the download folder, where the image named by list path `path` is stored.

    `s3://bucket/key` is stored as `bucket/key`; a relative path as itself (leading `/` dropped). Unsafe segments
    are encoded (module docstring), so the result has no `..`, is never absolute and never empty.
    """
    if is_s3_uri(path):
        uri = S3Uri.parse(path)
        raw = f"{uri.bucket}/{uri.key}"
    else:
        raw = path.lstrip("/")
    if not raw:
        raise InputError(f"{quote(path)} names no file")
    return PurePosixPath(*(_encode_segment(seg) for seg in raw.split("/")))


def local_path(root: Path, path: str) -> Path:
    """`root / local_relpath(path)`, checked to lie inside `root`."""
    full = root / local_relpath(path)
    if not full.resolve().is_relative_to(root.resolve()):
        raise InputError(f"{quote(path)} would be stored outside {root} (through a symbolic link inside it)")
    return full
