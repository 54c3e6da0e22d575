"""The error of a failed call to Triton (in its own module: the codecs raise it too)."""

from __future__ import annotations


class TritonError(Exception):
    """A call to Triton failed; ``status`` is the gRPC status, e.g. "StatusCode.UNAVAILABLE"."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"[{self.status}] {self.message}" if self.status else self.message
