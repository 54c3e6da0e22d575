"""Domain exceptions and their one translation into gRPC status with google.rpc details."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field of a request: its path and what was expected."""

    field: str
    description: str


class ModelServeError(Exception):
    """Base of every error that a caller may see; subclasses choose the status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        # When set, how long the caller should wait before retrying: a google.rpc.RetryInfo.
        self.retry_delay_s = retry_delay_s


class InvalidArgumentError(ModelServeError):
    """The request is malformed; `violations` name each bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: Sequence[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)

    @classmethod
    def from_violations(cls, violations: Sequence[FieldViolation]) -> InvalidArgumentError:
        """An error listing every violation, each also spelled out in the message."""
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(message, violations=violations)

    @classmethod
    def for_field(cls, field_path: str, description: str) -> InvalidArgumentError:
        """An error about a single field, with the field named in the message too."""
        return cls(
            f"{field_path}: {description}", violations=[FieldViolation(field_path, description)]
        )


class NotFoundError(ModelServeError):
    """A named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExistsError(ModelServeError):
    """A resource with that name exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPreconditionError(ModelServeError):
    """The system is not in a state where the request can run."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class UnavailableError(ModelServeError):
    """A dependency cannot be reached right now; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class ResourceExhaustedError(ModelServeError):
    """A limit was hit (size, rate, concurrency)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(ModelServeError):
    """The work did not finish within the caller's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class AbortedError(ModelServeError):
    """A concurrent change won; reading again and retrying may succeed."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class DataLossError(ModelServeError):
    """Stored data is not what it must be (corrupted, or written by something else); retrying
    will not help until someone repairs it."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class UnauthenticatedError(ModelServeError):
    """The caller did not prove who it is."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(ModelServeError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


@dataclass(frozen=True, slots=True)
class DecodedError:
    """What a client can read back from a modelserve error status."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)
    retry_delay_s: float | None = None
    """The delay of the status's RetryInfo, when it has one."""


def to_status(error: ModelServeError, domain: str) -> grpc.Status:
    """Builds the status, with one ErrorInfo and BadRequest field violations, for an error."""
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata)
    )
    details.append(info)
    if isinstance(error, InvalidArgumentError) and error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    if error.retry_delay_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, round(error.retry_delay_s * 1e9)))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    proto = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def internal_status(message: str = "internal error") -> grpc.Status:
    """The status for an unexpected failure: a fixed message, never a traceback."""
    proto = status_pb2.Status(code=code_pb2.INTERNAL, message=message)
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def decode_rpc_error(error: grpc.RpcError) -> DecodedError:
    """Reads the code, message, ErrorInfo and field violations from a failed call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else ""
    decoded = DecodedError(code=code, message=details or "")
    if not isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        return decoded
    status = _status_from_trailers(error)
    if status is None:
        return decoded
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            decoded = DecodedError(
                code=decoded.code,
                message=decoded.message,
                reason=info.reason,
                domain=info.domain,
                metadata=dict(info.metadata),
                violations=decoded.violations,
            )
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            decoded.violations.extend(
                FieldViolation(v.field, v.description) for v in bad.field_violations
            )
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            decoded = replace(decoded, retry_delay_s=retry.retry_delay.ToNanoseconds() / 1e9)
    return decoded


def _status_from_trailers(error: grpc.RpcError) -> status_pb2.Status | None:
    trailers: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for item in trailers or ():
        key, value = item[0], item[1]
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None
