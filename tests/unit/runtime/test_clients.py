"""How the shared clients turn an upstream service's failure into an error for their caller."""

from __future__ import annotations

import grpc
import pytest

from modelserve_runtime.clients import _translate
from modelserve_runtime.errors import (
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    to_status,
)


def _upstream(error: Exception) -> grpc.aio.AioRpcError:
    """The error a client sees when a modelserve service raised `error`."""
    assert isinstance(error, InvalidArgumentError | NotFoundError)
    status = to_status(error, "inference.modelserve")
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        status.details,
    )


class TestTranslate:
    def test_invalid_argument_passes_through_with_its_violations(self) -> None:
        """A refusal of the caller's input stays INVALID_ARGUMENT and keeps its field violations."""
        upstream = InvalidArgumentError.for_field("inputs[features]", "must be finite")
        translated = _translate(_upstream(upstream), "models/fraud/versions/1")
        assert isinstance(translated, InvalidArgumentError)
        assert translated.violations == [FieldViolation("inputs[features]", "must be finite")]

    def test_not_found_stays_not_found(self) -> None:
        """An unknown upstream resource is NOT_FOUND for the caller too."""
        translated = _translate(_upstream(NotFoundError("no such version")), "v")
        assert isinstance(translated, NotFoundError)

    def test_deadline_passes_through(self) -> None:
        """An upstream deadline is the caller's deadline, not an outage."""
        error = grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "late"
        )
        assert isinstance(_translate(error, "features"), DeadlineExceededError)

    @pytest.mark.parametrize(
        "code",
        [
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.FAILED_PRECONDITION,
        ],
    )
    def test_everything_else_is_unavailable(self, code: grpc.StatusCode) -> None:
        """Other upstream failures are UNAVAILABLE (what the router's fallbacks act on)."""
        error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom")
        translated = _translate(error, "features")
        assert isinstance(translated, UnavailableError)
        assert translated.metadata == {"upstream_code": code.name}
