"""Helpers for the registry tests: tiny real ONNX models, upload streams, file listings."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import RegistryApp


def tiny_onnx(
    *, weight: float = 1.0, input_name: str = "features", output_name: str = "probabilities"
) -> bytes:
    """A real ONNX model: `output = input @ W`, input FP32 [N, 3], output FP32 [N, 2]."""
    weights = numpy_helper.from_array(np.full((3, 2), weight, dtype=np.float32), name="W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "W"], [output_name])],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 2])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def signature(
    input_name: str = "features",
    output_name: str = "probabilities",
    *,
    input_type: tensor_pb2.DataType.ValueType = tensor_pb2.DATA_TYPE_FP32,
) -> pb.Signature:
    """The signature that matches `tiny_onnx` with the same names."""
    return pb.Signature(
        inputs=[tensor_pb2.TensorSpec(name=input_name, datatype=input_type, shape=[-1, 3])],
        outputs=[
            tensor_pb2.TensorSpec(
                name=output_name, datatype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2]
            )
        ],
    )


def upload_requests(
    data: bytes,
    *,
    parent: str = "models/fraud",
    sha256: str | None = None,
    chunk_bytes: int = 64,
    sig: pb.Signature | None = None,
    description: str = "",
) -> list[pb.CreateModelVersionRequest]:
    """An upload stream: the metadata, then `data` in chunks of `chunk_bytes`."""
    metadata = pb.ModelVersionUpload(
        parent=parent,
        model_version=pb.ModelVersion(
            description=description,
            format=pb.ARTIFACT_FORMAT_ONNX,
            signature=sig if sig is not None else signature(),
        ),
        sha256=sha256 if sha256 is not None else hashlib.sha256(data).hexdigest(),
    )
    return [
        pb.CreateModelVersionRequest(upload=metadata),
        *(
            pb.CreateModelVersionRequest(chunk=data[i : i + chunk_bytes])
            for i in range(0, len(data), chunk_bytes)
        ),
    ]


async def stream(
    requests: Sequence[pb.CreateModelVersionRequest],
) -> AsyncIterator[pb.CreateModelVersionRequest]:
    """The requests as the async iterator a client-streaming call takes."""
    for request in requests:
        yield request


def files_under(root: Path) -> list[Path]:
    """Every regular file below `root`."""
    return sorted(p for p in root.rglob("*") if p.is_file())


@dataclass
class RunningRegistry:
    """A started registry service and a stub on a channel to it."""

    stub: pb_grpc.RegistryServiceAsyncStub
    app: RegistryApp
    settings: RegistrySettings
