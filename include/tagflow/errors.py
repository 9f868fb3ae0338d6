"""Errors a person can act on.

Every error tagflow raises on bad input derives from `TagflowError`; its message names the file, line, key or value
and what was expected. The CLI prints the message (no traceback) and exits with `exit_code`.
"""

from __future__ import annotations


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
    shown = "\n".join(f"  {e.get('path')}: {e.get('reason')}" for e in errors[:20])
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
