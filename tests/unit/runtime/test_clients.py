"""How the shared clients turn an upstream service's failure into an error for their caller."""

from __future__ import annotations

import grpc
import pytest

from modelserve_runtime.clients import _translate
from modelserve_runtime.errors import (
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
        translated = _translate(_upstream(upstream), "models/fraud/versions/1", 1.0)
        assert isinstance(translated, InvalidArgumentError)
        assert translated.violations == [FieldViolation("inputs[features]", "must be finite")]

    def test_not_found_stays_not_found(self) -> None:
        """An unknown upstream resource is NOT_FOUND for the caller too."""
        translated = _translate(_upstream(NotFoundError("no such version")), "v", 1.0)
        assert isinstance(translated, NotFoundError)

    def test_own_timeout_is_an_upstream_timeout(self) -> None:
        """The call ran on the client's own timeout, not the caller's deadline: a slow
        upstream is UNAVAILABLE (UPSTREAM_TIMEOUT), which the router's fallbacks act on and
        its circuit breaker counts, naming how long it waited."""
        error = grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "late"
        )
        translated = _translate(error, "features", 0.5)
        assert isinstance(translated, UnavailableError)
        assert translated.reason == "UPSTREAM_TIMEOUT"
        assert translated.metadata == {"upstream_code": "DEADLINE_EXCEEDED", "timeout_s": "0.500"}
        assert translated.message == "features: no answer within 0.500s (late)"

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
        translated = _translate(error, "features", 1.0)
        assert isinstance(translated, UnavailableError)
        assert translated.metadata == {"upstream_code": code.name}
