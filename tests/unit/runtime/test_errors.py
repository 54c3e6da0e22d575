"""Domain errors to gRPC status and back, through a real server with the standard interceptors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import structlog
from pydantic_settings import SettingsConfigDict

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve_runtime.channels import create_channel
from modelserve_runtime.config import ServiceSettings
from modelserve_runtime.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    ModelServeError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    decode_rpc_error,
)
from modelserve_runtime.server import build_grpc_server

SERVICE = "errtest"
METHOD = "/modelserve.feature.v1.FeatureService/GetOnlineFeatures"


class _Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELSERVE_ERRTEST_")


class _Raising(pb_grpc.FeatureServiceServicer):
    """Raises the exception registered under the first entity id, or answers when there is none."""

    def __init__(self) -> None:
        self.errors: dict[str, Exception] = {}

    async def GetOnlineFeatures(
        self, request: pb.GetOnlineFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetOnlineFeaturesResponse:
        error = self.errors.get(request.entities[0].entity_id) if request.entities else None
        if error is not None:
            raise error
        return pb.GetOnlineFeaturesResponse()


@pytest.fixture
async def served() -> AsyncIterator[tuple[_Raising, pb_grpc.FeatureServiceAsyncStub]]:
    """A real server on port 0 with the raising servicer, and a stub on a real channel to it."""
    servicer = _Raising()

    def register(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_FeatureServiceServicer_to_server(servicer, server)
        return [pb.DESCRIPTOR.services_by_name["FeatureService"].full_name]

    grpc_server = build_grpc_server(SERVICE, _Settings(), register)
    await grpc_server.server.start()
    channel = create_channel(f"127.0.0.1:{grpc_server.port}")
    try:
        yield servicer, pb_grpc.FeatureServiceStub(channel)
    finally:
        await channel.close()
        await grpc_server.server.stop(0)


async def _fail(
    served: tuple[_Raising, pb_grpc.FeatureServiceAsyncStub], error: Exception
) -> grpc.aio.AioRpcError:
    """Makes the server raise `error` for one call and returns what the client got."""
    servicer, stub = served
    servicer.errors["boom"] = error
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetOnlineFeatures(
            pb.GetOnlineFeaturesRequest(entities=[pb.EntityKey(entity_type="t", entity_id="boom")])
        )
    return info.value


class TestErrorStatus:
    async def test_invalid_argument_carries_error_info_and_every_violation(
        self, served: tuple[_Raising, pb_grpc.FeatureServiceAsyncStub]
    ) -> None:
        """InvalidArgumentError becomes INVALID_ARGUMENT with ErrorInfo and both field violations."""
        violations = [
            FieldViolation("entities[0].entity_id", "must not be empty"),
            FieldViolation("features", "at least one feature is required"),
        ]
        error = await _fail(
            served,
            InvalidArgumentError(
                "two problems", violations=violations, reason="BAD_REQUEST", metadata={"n": "2"}
            ),
        )
        decoded = decode_rpc_error(error)
        assert decoded.code is grpc.StatusCode.INVALID_ARGUMENT
        assert decoded.message == "two problems"
        assert (decoded.domain, decoded.reason) == (f"{SERVICE}.modelserve", "BAD_REQUEST")
        assert decoded.metadata == {"n": "2"}
        assert decoded.violations == violations

    async def test_not_found_carries_error_info(
        self, served: tuple[_Raising, pb_grpc.FeatureServiceAsyncStub]
    ) -> None:
        """NotFoundError becomes NOT_FOUND with its default reason and metadata."""
        error = await _fail(served, NotFoundError("no model m", metadata={"model": "m"}))
        decoded = decode_rpc_error(error)
        assert decoded.code is grpc.StatusCode.NOT_FOUND
        assert (decoded.domain, decoded.reason) == (f"{SERVICE}.modelserve", "NOT_FOUND")
        assert decoded.metadata == {"model": "m"}
        assert decoded.violations == []

    @pytest.mark.parametrize(
        ("error_type", "code"),
        [
            (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
            (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
            (UnavailableError, grpc.StatusCode.UNAVAILABLE),
            (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
            (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
            (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
            (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
        ],
    )
    async def test_each_domain_error_has_its_own_code(
        self,
        served: tuple[_Raising, pb_grpc.FeatureServiceAsyncStub],
        error_type: type[ModelServeError],
        code: grpc.StatusCode,
    ) -> None:
        """Every domain error reaches the client as the status code that means what it says."""
        decoded = decode_rpc_error(await _fail(served, error_type("nope")))
        assert decoded.code is code
        assert decoded.reason == code.name

    async def test_unexpected_exception_is_internal_and_hidden(
        self, served: tuple[_Raising, pb_grpc.FeatureServiceAsyncStub]
    ) -> None:
        """An unexpected exception is INTERNAL for the caller, its detail only in the log."""
        with structlog.testing.capture_logs() as logs:
            error = await _fail(served, RuntimeError("secret stack detail"))
        decoded = decode_rpc_error(error)
        assert decoded.code is grpc.StatusCode.INTERNAL
        assert "secret" not in (error.details() or "")
        trailers = error.trailing_metadata() or ()
        assert all(
            b"secret" not in (v if isinstance(v, bytes) else v.encode()) for _, v in trailers
        )
        (logged,) = [e for e in logs if e["event"] == "rpc_internal_error"]
        assert logged["method"] == METHOD
        assert logged["log_level"] == "error"
        # The exception itself goes to the log, with its traceback.
        assert isinstance(logged["exc_info"], RuntimeError)
        assert logged["exc_info"].__traceback__ is not None

    async def test_one_summary_line_per_call(
        self, served: tuple[_Raising, pb_grpc.FeatureServiceAsyncStub]
    ) -> None:
        """Each call writes one `rpc` line with its method, final code and latency."""
        _, stub = served
        with structlog.testing.capture_logs() as logs:
            await stub.GetOnlineFeatures(pb.GetOnlineFeaturesRequest())
            await _fail(served, NotFoundError("gone"))
            await _fail(served, RuntimeError("bug"))
        lines = [e for e in logs if e["event"] == "rpc"]
        assert [(e["method"], e["code"]) for e in lines] == [
            (METHOD, "OK"),
            (METHOD, "NOT_FOUND"),
            (METHOD, "INTERNAL"),
        ]
        assert all(e["latency_ms"] >= 0 for e in lines)

    async def test_unimplemented_method_is_unimplemented(
        self, served: tuple[_Raising, pb_grpc.FeatureServiceAsyncStub]
    ) -> None:
        """A method the servicer does not implement answers UNIMPLEMENTED, not INTERNAL."""
        _, stub = served
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.WriteFeatures(pb.WriteFeaturesRequest())
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
