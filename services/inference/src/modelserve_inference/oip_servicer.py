"""The Open Inference Protocol (KServe v2 `inference.GRPCInferenceService`) over ModelVersions.

Built from the generated code that tritonclient ships, so Triton and KServe clients work
unchanged against this service. A model is named as inside Triton (`fraud`) and a version
by its number ("1"); an empty version means the newest READY one. Model control, shared
memory, streaming and statistics are not offered here: they stay UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import (
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from modelserve_inference.models import HeldVersion, ModelVersions, VersionState
from modelserve_runtime.errors import FieldViolation, InvalidArgumentError, NotFoundError

#: The name this facade answers ServerMetadata with.
SERVER_NAME = "modelserve-inference"
SERVICE_NAME = "inference.GRPCInferenceService"

#: Where each datatype's values sit in InferTensorContents, when sent without raw contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _tensor_metadata(spec: Any) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


def _input_array(tensor: Any, raw: bytes | None) -> npt.NDArray[Any]:
    """One input tensor of a ModelInferRequest as an array of its declared datatype and shape."""
    where = f"inputs[{tensor.name}]"
    dtype = triton_to_np_dtype(tensor.datatype) if tensor.datatype in _CONTENTS_FIELD else None
    if dtype is None:
        raise InvalidArgumentError.for_field(
            f"{where}.datatype", f"unsupported datatype {tensor.datatype!r}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgumentError.for_field(f"{where}.shape", "dimensions must be >= 0")
    count = int(np.prod(shape)) if shape else 1
    values: npt.NDArray[Any]
    if raw is not None:
        if tensor.datatype == "BYTES":
            values = np.asarray(deserialize_bytes_tensor(raw), dtype=np.object_)
        elif len(raw) != count * np.dtype(dtype).itemsize:
            raise InvalidArgumentError.for_field(
                f"{where}.contents",
                f"shape {list(shape)} of {tensor.datatype} needs"
                f" {count * np.dtype(dtype).itemsize} bytes, got {len(raw)}",
            )
        else:
            values = np.frombuffer(raw, dtype=dtype)
    else:
        field = _CONTENTS_FIELD[tensor.datatype]
        values = np.asarray(list(getattr(tensor.contents, field)), dtype=dtype)
    if values.size != count:
        raise InvalidArgumentError.for_field(
            f"{where}.contents", f"shape {list(shape)} needs {count} values, got {values.size}"
        )
    return values.reshape(shape)


def request_inputs(request: Any) -> dict[str, npt.NDArray[Any]]:
    """The request's input tensors by name, from `raw_input_contents` or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgumentError.for_field(
            "raw_input_contents",
            f"{len(raw)} raw contents for {len(request.inputs)} inputs; send one per input",
        )
    if not request.inputs:
        raise InvalidArgumentError.for_field("inputs", "at least one input tensor is required")
    arrays: dict[str, npt.NDArray[Any]] = {}
    duplicates: list[FieldViolation] = []
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            duplicates.append(FieldViolation(f"inputs[{tensor.name}]", "named more than once"))
            continue
        arrays[tensor.name] = _input_array(tensor, raw[index] if raw else None)
    if duplicates:
        raise InvalidArgumentError.from_violations(duplicates)
    return arrays


def infer_response(request: Any, held: HeldVersion, outputs: dict[str, npt.NDArray[Any]]) -> Any:
    """Outputs as Triton sends them: tensor metadata plus raw little-endian contents."""
    response = service_pb2.ModelInferResponse(
        model_name=held.model, model_version=str(held.version), id=request.id
    )
    for name, array in outputs.items():
        datatype = np_to_triton_dtype(array.dtype)
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == "BYTES":
            response.raw_output_contents.append(serialize_byte_tensor(array).item())
        else:
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return response


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
        if any("classification" in o.parameters for o in request.outputs):
            raise InvalidArgumentError.for_field(
                "outputs.parameters", "classification outputs are not supported"
            )
        inputs = request_inputs(request)
        outputs = await self._versions.infer(
            held.name,
            inputs,
            [o.name for o in request.outputs],
            deadline_s=context.time_remaining(),
            exact_dtypes=True,
        )
        return infer_response(request, held, outputs)
