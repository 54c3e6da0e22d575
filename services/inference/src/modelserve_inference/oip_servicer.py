"""The Open Inference Protocol (KServe v2 `inference.GRPCInferenceService`) over ModelVersions.

Built from the generated code that tritonclient ships, so Triton and KServe clients work
unchanged against this service. A model is named as inside Triton (`fraud`) and a version
by its number ("1"); an empty version means the newest READY one. Model control, shared
memory, streaming and statistics are not offered here: they stay UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from modelserve_inference.models import ModelVersions, VersionState
from modelserve_runtime.errors import NotFoundError
from modelserve_triton.oip import refuse_classification

#: The name this facade answers ServerMetadata with.
SERVER_NAME = "modelserve-inference"
SERVICE_NAME = "inference.GRPCInferenceService"


def _tensor_metadata(spec: Any) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


# The generated servicer is untyped (tritonclient ships no stubs), hence the ignore.
class OpenInferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Answers the Open Inference Protocol from the versions this service holds."""

    def __init__(self, versions: ModelVersions) -> None:
        self._versions = versions

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return service_pb2.ServerReadyResponse(ready=self._versions.triton_up)

    async def ServerMetadata(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version="v1")

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

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        held = self._versions.resolve(request.model_name, request.model_version)
        refuse_classification(request)
        # The request goes to Triton as it came (raw tensors checked, not decoded), and
        # Triton's answer comes back as it is, outputs shaped as the signature says.
        return await self._versions.infer_request(
            held, request, deadline_s=context.time_remaining()
        )
