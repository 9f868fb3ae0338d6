"""Errors a person can act on.

Every error tagflow raises on bad input derives from `TagflowError`; its message names the file, line, key or value
and what was expected. The CLI prints the message (no traceback) and exits with `exit_code`.
"""

from __future__ import annotations

import errno
import os


class TagflowError(Exception):
    """A failure caused by input or environment, with a message meant for a person."""

    exit_code = 1


class InputError(TagflowError):
    """Bad user input (a list file, a flag, a hyperparameter): exit status 2."""

    exit_code = 2


class ListFileError(InputError):
    """A list file failed validation; `errors` holds every `LIST:LINE: what is wrong` message found."""

    MAX_SHOWN = 20

    def __init__(self, errors: list[str]):
        self.errors = errors
        shown = errors[: self.MAX_SHOWN]
        more = len(errors) - len(shown)
        tail = [f"... and {more} more error(s) ({len(errors)} in all)"] if more else []
        super().__init__("\n".join([*shown, *tail]))


class TooManyFailures(TagflowError):
    """More objects or images failed than the allowed fraction; the message lists which and why."""


def check_bad_fraction(errors: list[dict[str, str]], total: int, limit: float, what: str = "images") -> None:
    """Raise TooManyFailures when more than `limit` of `total` items failed, listing the first 20 and why.

    `errors` are dicts with at least `path` and `reason`. Below the limit the failures are the caller's to report.
    """
    if not total or len(errors) / total <= limit:
        return
    shown = "\n".join(f"  {quote(e.get('path'))}: {e.get('reason')}" for e in errors[:20])
    more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
    raise TooManyFailures(
        f"{len(errors)} of {total} {what} ({len(errors) / total:.2%}) could not be used, above the allowed "
        f"{limit:.2%}:\n{shown}{more}"
    )


QUOTE_LIMIT = 200


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` for a message, cut to `limit` characters with the full length said: a message never echoes
    unbounded input (a 10 MB path is shown as its first 200 characters and "(10000000 characters)")."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


# OS errors that mean the path given is wrong (exit 2); any other (disk full, I/O error) is a failure (exit 1).
_BAD_PATH_ERRNOS = frozenset(
    {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS,
     errno.ENAMETOOLONG, errno.ELOOP, errno.EXDEV}
)  # fmt: skip
_REASONS = {
    errno.EEXIST: "it already exists",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error",
}


def os_error_exit_code(err: OSError) -> int:
    """2 when an OS error means the path a person gave is wrong (exists, not a folder, no permission, read-only),
    1 for failures of the machine (disk full, I/O error, a refused connection)."""
    return 2 if err.errno in _BAD_PATH_ERRNOS else 1


def os_error_reason(err: OSError) -> str:
    """An OSError in words, without its (possibly huge) file name: the caller names the file."""
    return _REASONS.get(err.errno or 0) or (err.strerror or str(err) or type(err).__name__).lower()


def os_failure(doing: str, err: OSError) -> TagflowError:
    """`DOING: reason` as InputError (exit 2) when the path given is wrong (read-only, no permission, a file in the
    way) or as TagflowError (exit 1) when the machine failed (disk full, quota, I/O error)."""
    kind = InputError if os_error_exit_code(err) == 2 else TagflowError
    return kind(f"{doing}: {os_error_reason(err)}")


def describe_os_error(err: OSError) -> str:
    """One line for an OS error: the path(s) it concerns and what is wrong, e.g. `'out': a part of the path is a
    file, not a folder`; never a traceback."""
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    where = " → ".join(quote(os.fsdecode(p)) for p in paths)
    return f"{where}: {os_error_reason(err)}" if where else os_error_reason(err)
