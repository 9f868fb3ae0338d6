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
