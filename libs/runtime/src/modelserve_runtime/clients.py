"""Typed clients for the services that other services call: registry, feature, inference."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from modelserve.feature.v1 import feature_service_pb2 as feature_pb
from modelserve.feature.v1 import feature_service_pb2_grpc as feature_grpc
from modelserve.feature.v1 import feature_view_pb2
from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.inference.v1 import inference_service_pb2_grpc as inference_grpc
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve_runtime.errors import (
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    decode_rpc_error,
)


def _translate(error: grpc.aio.AioRpcError, what: str, timeout_s: float) -> Exception:
    """An upstream failure in our caller's terms.

    NOT_FOUND stays NOT_FOUND; INVALID_ARGUMENT (with its field violations) passes through,
    since it is about the caller's request; anything else is UNAVAILABLE, which the router's
    fallbacks act on. That includes DEADLINE_EXCEEDED: these calls run on our own timeout
    (`timeout_s`), not the caller's deadline, so it means the upstream was too slow, reason
    UPSTREAM_TIMEOUT (a proxy's 504), and the caller may still have time for a fallback.
    """
    code = error.code()
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFoundError(error.details() or f"{what} not found", metadata={"resource": what})
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        decoded = decode_rpc_error(error)
        return InvalidArgumentError(
            decoded.message or f"{what}: invalid argument",
            violations=decoded.violations,
            reason=decoded.reason or None,
            metadata=decoded.metadata,
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UnavailableError(
            f"{what}: no answer within {timeout_s:.3f}s ({error.details() or 'deadline exceeded'})",
            reason="UPSTREAM_TIMEOUT",
            metadata={"upstream_code": code.name, "timeout_s": f"{timeout_s:.3f}"},
        )
    return UnavailableError(
        f"{what}: upstream answered {code.name}: {error.details()}",
        reason="UPSTREAM_UNAVAILABLE",
        metadata={"upstream_code": code.name},
    )


class RegistryClient:
    """The registry calls that router and inference make."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 5.0) -> None:
        self._stub = registry_grpc.RegistryServiceStub(channel)
        self._timeout = timeout_s

    async def get_deployment(self, name: str) -> registry_pb.Deployment:
        """The deployment `deployments/{id}`."""
        try:
            response = await self._stub.GetDeployment(
                registry_pb.GetDeploymentRequest(name=name), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, name, self._timeout) from exc
        return response.deployment

    async def get_model_version(self, name: str) -> registry_pb.ModelVersion:
        """The version `models/{m}/versions/{v}`."""
        try:
            response = await self._stub.GetModelVersion(
                registry_pb.GetModelVersionRequest(name=name), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, name, self._timeout) from exc
        return response.model_version

    async def watch_deployments(
        self, after_sequence: int, name: str = "", *, timeout_s: float = 3600.0
    ) -> AsyncIterator[registry_pb.DeploymentRevision]:
        """Every deployment revision after `after_sequence` (the current one of each deployment
        when 0), then each new one as it is made; `name` watches one deployment.

        The registry never ends the stream, so it runs until the caller stops reading or
        `timeout_s` passes (the channel's default deadline would cut it short); then, or when
        the registry goes away, UnavailableError: the caller resumes after the last
        `sequence` it saw."""
        call = self._stub.WatchDeployments(
            registry_pb.WatchDeploymentsRequest(name=name, after_sequence=after_sequence),
            timeout=timeout_s,
        )
        try:
            async for message in call:
                yield message.revision
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, name or "deployments", timeout_s) from exc
        finally:
            call.cancel()
        raise UnavailableError(
            "the registry ended the deployment watch", reason="UPSTREAM_UNAVAILABLE"
        )

    async def read_artifact(self, name: str, *, timeout_s: float = 60.0) -> bytes:
        """The whole artifact of a version."""
        parts: list[bytes] = []
        try:
            async for chunk in self._stub.ReadModelVersionArtifact(
                registry_pb.ReadModelVersionArtifactRequest(name=name), timeout=timeout_s
            ):
                parts.append(chunk.chunk)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, name, timeout_s) from exc
        return b"".join(parts)


class FeatureClient:
    """FeatureService reads."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 1.0) -> None:
        self._stub = feature_grpc.FeatureServiceStub(channel)
        self._timeout = timeout_s

    async def get_online_features(
        self, request: feature_pb.GetOnlineFeaturesRequest
    ) -> feature_pb.GetOnlineFeaturesResponse:
        """One GetOnlineFeatures call."""
        try:
            return await self._stub.GetOnlineFeatures(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, "features", self._timeout) from exc

    async def get_feature_view(self, name: str) -> feature_view_pb2.FeatureView:
        """The view `featureViews/{id}`."""
        try:
            response = await self._stub.GetFeatureView(
                feature_pb.GetFeatureViewRequest(name=name), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, name, self._timeout) from exc
        return response.feature_view


class InferenceClient:
    """InferenceService calls."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 2.0) -> None:
        self._stub = inference_grpc.InferenceServiceStub(channel)
        self._timeout = timeout_s

    async def infer(self, request: inference_pb.InferRequest) -> inference_pb.InferResponse:
        """One Infer call."""
        try:
            return await self._stub.Infer(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, request.name, self._timeout) from exc

    async def list_model_versions(self) -> list[inference_pb.LoadedModelVersion]:
        """Every version inference holds."""
        try:
            response = await self._stub.ListModelVersions(
                inference_pb.ListModelVersionsRequest(), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, "model versions", self._timeout) from exc
        return list(response.model_versions)


class RegistryAdminClient:
    """The registry calls that register models and deploy them (CLI, bootstrap, tests)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float = 60.0) -> None:
        self._stub = registry_grpc.RegistryServiceStub(channel)
        self._timeout = timeout_s

    async def create_model(
        self,
        model_id: str,
        description: str = "",
        *,
        validation_set: registry_pb.ValidationSet | None = None,
    ) -> registry_pb.Model:
        """Creates `models/{model_id}`, with the validation set its versions are scored on."""
        model = registry_pb.Model(description=description)
        if validation_set is not None:
            model.validation_set.CopyFrom(validation_set)
        response = await self._stub.CreateModel(
            registry_pb.CreateModelRequest(model_id=model_id, model=model),
            timeout=self._timeout,
        )
        return response.model

    async def upload_model_version(
        self,
        parent: str,
        version: registry_pb.ModelVersion,
        artifact: bytes,
        *,
        chunk_bytes: int = 1024 * 1024,
    ) -> registry_pb.ModelVersion:
        """Uploads an artifact in chunks as a new version of `parent` (`models/{model}`)."""
        import hashlib

        digest = hashlib.sha256(artifact).hexdigest()

        async def messages() -> AsyncIterator[registry_pb.CreateModelVersionRequest]:
            yield registry_pb.CreateModelVersionRequest(
                upload=registry_pb.ModelVersionUpload(
                    parent=parent, model_version=version, sha256=digest
                )
            )
            for start in range(0, len(artifact), chunk_bytes):
                yield registry_pb.CreateModelVersionRequest(
                    chunk=artifact[start : start + chunk_bytes]
                )

        response = await self._stub.CreateModelVersion(messages(), timeout=self._timeout)
        return response.model_version

    async def set_traffic(self, endpoint: str, traffic: dict[str, int]) -> registry_pb.Deployment:
        """Creates or updates `deployments/{endpoint}` to send `percent` to each version."""
        response = await self._stub.UpdateDeployment(
            registry_pb.UpdateDeploymentRequest(
                deployment=registry_pb.Deployment(
                    name=f"deployments/{endpoint}",
                    traffic=[
                        registry_pb.TrafficTarget(model_version=v, percent=p)
                        for v, p in traffic.items()
                    ],
                ),
                allow_missing=True,
            ),
            timeout=self._timeout,
        )
        return response.deployment
