"""Names tagflow accepts where they enter (CLI, trigger form, operators), checked before any file or S3 action.

A name becomes a folder (`.tagflow/endpoints/NAME`), a SageMaker resource or an S3 prefix, so a name that is not of
its kind is refused with the rule it breaks (`InputError`, exit status 2), never cleaned up into another one.

- Endpoint names follow SageMaker's rule: 1-63 letters, digits and inner hyphens (what InvokeEndpoint accepts).
- Job names: SageMaker's `[a-zA-Z0-9](-*[a-zA-Z0-9])*`, at most 63 (training) or 32 (tuning) characters.
- Dataset prefixes (`s3://BUCKET/PREFIX`, where tagflow writes): no empty, `.` or `..` segment, no control
  character, at most 900 characters (S3 keys are 1,024 bytes and the layout adds folders below the prefix).
"""

from __future__ import annotations

import re

from tagflow.errors import InputError, quote

SAGEMAKER_NAME = r"[a-zA-Z0-9](-*[a-zA-Z0-9])*"
ENDPOINT_NAME_MAX = 63
ENDPOINT_NAME_PATTERN = rf"^[a-zA-Z0-9](-*[a-zA-Z0-9]){{0,{ENDPOINT_NAME_MAX - 1}}}$"
ENDPOINT_NAME_RULE = "expected 1-63 letters, digits and inner hyphens (a SageMaker endpoint name)"
PREFIX_MAX = 900
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_endpoint_name(name: str, where: str = "endpoint name") -> str:
    """`name` if it is a valid endpoint name; InputError naming `where` and the rule otherwise."""
    if not isinstance(name, str) or not re.fullmatch(ENDPOINT_NAME_PATTERN, name):
        raise InputError(f"{where} {quote(name)}: {ENDPOINT_NAME_RULE}")
    return name


def check_job_name(name: str, max_len: int, where: str = "job name") -> str:
    """`name` if it is a valid SageMaker job name of at most `max_len` characters; InputError otherwise."""
    if not isinstance(name, str) or not (1 <= len(name) <= max_len and re.fullmatch(SAGEMAKER_NAME, name)):
        raise InputError(
            f"{where} {quote(name)}: expected 1-{max_len} letters, digits and inner hyphens (a SageMaker job name)"
        )
    return name


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` (the key part of a dataset URI, without the bucket) cannot hold a dataset, or None."""
    if len(prefix) > PREFIX_MAX:
        return f"is {len(prefix)} characters long; at most {PREFIX_MAX} leave room for the dataset's keys"
    if control := _CONTROL.search(prefix):
        return f"contains control character 0x{ord(control.group()):02x}"
    segments = prefix.strip("/").split("/") if prefix.strip("/") else []
    for segment in segments:
        if segment in (".", ".."):
            return f"has a {segment!r} segment; S3 keys are not paths, so '.' and '..' would name other objects"
        if not segment:
            return "has an empty segment ('//'); expected segments separated by single slashes"
    return None


def check_dataset_uri(uri: str, where: str = "dataset") -> str:
    """`uri` if it is an `s3://BUCKET/PREFIX` tagflow may write a dataset under; InputError with the rule otherwise."""
    from tagflow.s3 import S3Uri

    parsed = S3Uri.parse(uri)
    problem = prefix_problem(parsed.key)
    if problem:
        raise InputError(f"{where} {quote(uri)}: the prefix {problem}")
    return uri
