"""The endpoint's request error, shared by its parts (ic_serve, ic_sources, ic_predictor)."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server rejects with `status` and a message saying what was expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
