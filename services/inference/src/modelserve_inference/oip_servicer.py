"""The Open Inference Protocol (KServe v2 `inference.GRPCInferenceService`) over ModelVersions.

Built from the generated code that tritonclient ships, so Triton and KServe clients work
unchanged against this service. A model is named as inside Triton (`fraud`) and a version
by its number ("1"); an empty version means the newest READY one. Besides the protocol's
own calls it answers Triton's ModelStreamInfer (each request as ModelInfer answers it),
ModelConfig and ModelStatistics (Triton's own answers, for versions this service holds) and
RepositoryIndex (the versions held, in Triton's terms). Model control stays with
LoadModelVersion and the registry's deployments, and shared memory has no sense across the
network hop: those calls stay UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from modelserve_inference.models import ModelVersions, VersionState
from modelserve_runtime.errors import InvalidArgumentError, NotFoundError, UnavailableError
from modelserve_triton.errors import TritonError
from modelserve_triton.oip import refuse_classification, server_metadata
from modelserve_triton.oip_stream import ModelInferCalls

#: The name this facade answers ServerMetadata with.
SERVER_NAME = "modelserve-inference"
SERVICE_NAME = "inference.GRPCInferenceService"


def _tensor_metadata(spec: Any) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


# The generated servicer is untyped (tritonclient ships no stubs), hence the ignore.
class OpenInferenceServicer(
    ModelInferCalls,
    service_pb2_grpc.GRPCInferenceServiceServicer,  # type: ignore[misc]
):
    """Answers the Open Inference Protocol from the versions this service holds."""

    def __init__(self, versions: ModelVersions, triton: TritonIntrospection) -> None:
        self._versions = versions
        self._triton = triton

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return service_pb2.ServerReadyResponse(ready=self._versions.triton_up)

    async def ServerMetadata(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        # ModelConfig, ModelStatistics, and request parameters, which go to Triton as sent.
        # Not model_repository: the index is served, loading and unloading are not.
        return server_metadata(SERVER_NAME, ("model_configuration", "statistics", "parameters"))

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            held = self._versions.resolve(request.name, request.version)
        except NotFoundError:
            # As Triton answers: a model it does not hold is simply not ready.
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=held.state is VersionState.READY)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        held = self._versions.resolve(request.name, request.version)
        versions = (
            [request.version]
            if request.version
            else [
                str(v.version)
                for v in self._versions.list()
                if v.model == held.model and v.state is VersionState.READY
            ]
        )
        return service_pb2.ModelMetadataResponse(
            name=held.model,
            versions=versions,
            platform="onnxruntime_onnx",
            inputs=[_tensor_metadata(s) for s in held.inputs],
            outputs=[_tensor_metadata(s) for s in held.outputs],
        )

    async def _infer(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any], streamed: bool
    ) -> Any:
        # A stream's requests, too, wait for Triton at most INFER_TIMEOUT_S (`_timeout`).
        held = self._versions.resolve(request.model_name, request.model_version)
        refuse_classification(request)
        # The request goes to Triton as it came (raw tensors checked, not decoded), and
        # Triton's answer comes back as it is, outputs shaped as the signature says.
        return await self._versions.infer_request(
            held, request, deadline_s=context.time_remaining()
        )

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        held = self._versions.resolve(request.name, request.version)
        try:
            return await self._triton.config_response(
                held.model, request.version, timeout_s=context.time_remaining()
            )
        except TritonError as exc:
            raise _unanswered("the config of", held.model, exc) from exc

    async def ModelStatistics(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        model = ""
        if request.name:
            # NOT_FOUND for a model or version this service does not hold, as ModelInfer.
            model = self._versions.resolve(request.name, request.version).model
        elif request.version:
            raise InvalidArgumentError.for_field("version", "needs a model name")
        try:
            return await self._triton.statistics_response(
                model, request.version, timeout_s=context.time_remaining()
            )
        except TritonError as exc:
            raise _unanswered("the statistics of", model or "every model", exc) from exc

    async def RepositoryIndex(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        index = service_pb2.RepositoryIndexResponse()
        for held in self._versions.list():
            if request.ready and held.state is not VersionState.READY:
                continue
            index.models.add(
                name=held.model,
                version=str(held.version),
                state=_TRITON_STATES[held.state],
                reason=held.reason,
            )
        return index


#: Triton's words for the states of a version (its repository index API).
_TRITON_STATES = {
    VersionState.LOADING: "LOADING",
    VersionState.WARMING: "LOADING",
    VersionState.READY: "READY",
    VersionState.FAILED: "UNAVAILABLE",
    VersionState.UNLOADING: "UNLOADING",
}


class TritonIntrospection(Protocol):
    """What the facade asks Triton itself: its answers to ModelConfig and ModelStatistics."""

    async def config_response(
        self, model_name: str, version: str = "", *, timeout_s: float | None = None
    ) -> Any: ...

    async def statistics_response(
        self, model_name: str = "", version: str = "", *, timeout_s: float | None = None
    ) -> Any: ...


def _unanswered(what: str, model: str, exc: TritonError) -> UnavailableError:
    return UnavailableError(
        f"triton did not give {what} {model}: {exc}", reason="TRITON_UNAVAILABLE"
    )
