"""InferenceService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_inference.models import HeldVersion, ModelVersions, ServingConfig, VersionState
from modelserve_inference.registry_source import triton_spec
from modelserve_runtime.convert import TRITON_NAMES, numpy_to_tensor, tensor_to_numpy
from modelserve_runtime.errors import InvalidArgumentError
from modelserve_triton.model_config import CPU, GPU, TensorSpec

_STATES = {
    "LOADING": pb.MODEL_VERSION_STATE_LOADING,
    "WARMING": pb.MODEL_VERSION_STATE_WARMING,
    "READY": pb.MODEL_VERSION_STATE_READY,
    "FAILED": pb.MODEL_VERSION_STATE_FAILED,
    "UNLOADING": pb.MODEL_VERSION_STATE_UNLOADING,
}
_DATATYPES = {name: code for code, name in TRITON_NAMES.items()}
_STATE_OF = {code: VersionState(name) for name, code in _STATES.items()}
_DEVICES = {CPU: pb.INSTANCE_DEVICE_CPU, GPU: pb.INSTANCE_DEVICE_GPU}
_DEVICE_NAMES = {code: name for name, code in _DEVICES.items()}


def _spec(spec: TensorSpec) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(
        name=spec.name,
        datatype=_DATATYPES[spec.datatype],
        shape=list(spec.shape),
        allow_non_finite=spec.allow_non_finite,
    )


def held_to_proto(
    held: HeldVersion, triton_endpoint: str, triton_http_endpoint: str = ""
) -> pb.LoadedModelVersion:
    """A held version as the API shows it: with the Triton endpoints (gRPC, HTTP) that serve
    it when READY."""
    ready = held.state.value == "READY"
    config = held.config
    return pb.LoadedModelVersion(
        name=held.name,
        state=_STATES[held.state.value],
        reason=held.reason,
        triton_endpoint=triton_endpoint if ready else "",
        triton_http_endpoint=triton_http_endpoint if ready else "",
        triton_model_name=held.model,
        triton_model_version=held.version,
        inputs=[_spec(s) for s in held.inputs],
        outputs=[_spec(s) for s in held.outputs],
        device=_DEVICES.get(held.device, pb.INSTANCE_DEVICE_UNSPECIFIED),
        gpus=list(held.gpus),
        max_batch_size=config.max_batch_size if config is not None else 0,
        instance_count=config.instance_count if config is not None else 0,
        max_queue_size=config.max_queue_size if config is not None else 0,
    )


def held_from_proto(message: pb.LoadedModelVersion) -> HeldVersion:
    """A version as another inference process shows it (`held_to_proto`'s inverse, less the
    artifact, which stays with the process that loaded it)."""
    config = None
    if message.max_batch_size:
        config = ServingConfig(
            max_batch_size=message.max_batch_size,
            instance_count=message.instance_count,
            max_queue_size=message.max_queue_size,
            device=_DEVICE_NAMES.get(message.device, CPU),
            gpus=tuple(message.gpus),
        )
    return HeldVersion(
        name=message.name,
        model=message.triton_model_name,
        version=message.triton_model_version,
        state=_STATE_OF[message.state],
        inputs=tuple(triton_spec(s) for s in message.inputs),
        outputs=tuple(triton_spec(s) for s in message.outputs),
        reason=message.reason,
        config=config,
    )


class VersionControl(Protocol):
    """What LoadModelVersion and UnloadModelVersion act on: the reconcile loop (which pins
    the version) or, with reconcile off, ModelVersions itself."""

    async def load(self, name: str) -> HeldVersion:
        """Loads the version; answers it READY or FAILED."""
        ...

    async def unload(self, name: str) -> None:
        """Unloads the version."""
        ...


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Translates InferenceService calls to ModelVersions and the version control."""

    def __init__(self, versions: ModelVersions, control: VersionControl | None = None) -> None:
        self._versions = versions
        self._control: VersionControl = control or versions

    def _shown(self, held: HeldVersion) -> pb.LoadedModelVersion:
        versions = self._versions
        return held_to_proto(held, versions.triton_endpoint, versions.triton_http_endpoint)

    async def LoadModelVersion(
        self, request: pb.LoadModelVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadModelVersionResponse:
        held = await self._control.load(request.name)
        return pb.LoadModelVersionResponse(model_version=self._shown(held))

    async def UnloadModelVersion(
        self, request: pb.UnloadModelVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnloadModelVersionResponse:
        await self._control.unload(request.name)
        return pb.UnloadModelVersionResponse()

    async def WatchModelStates(
        self, request: pb.WatchModelStatesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchModelStatesResponse]:
        watch = self._versions.watch()
        try:
            yield pb.WatchModelStatesResponse(
                model_versions=[self._shown(h) for h in watch.initial], initial=True
            )
            async for change in watch:
                yield pb.WatchModelStatesResponse(
                    model_versions=[self._shown(h) for h in change.changed],
                    removed_names=list(change.removed),
                )
        finally:
            self._versions.feed.close_watch(watch)

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelVersionsResponse:
        return pb.ListModelVersionsResponse(
            model_versions=[self._shown(h) for h in self._versions.list()]
        )

    async def Infer(
        self, request: pb.InferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.InferResponse:
        if not request.inputs:
            raise InvalidArgumentError.for_field("inputs", "at least one input tensor is required")
        inputs = {t.name: tensor_to_numpy(t, f"inputs[{i}]") for i, t in enumerate(request.inputs)}
        outputs = await self._versions.infer(
            request.name,
            inputs,
            list(request.output_names),
            deadline_s=context.time_remaining(),
        )
        return pb.InferResponse(
            name=request.name,
            outputs=[numpy_to_tensor(name, array) for name, array in outputs.items()],
        )
