"""Helpers for the registry tests: tiny real ONNX models, upload streams, file listings."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import RegistryApp
from modelserve_runtime.auth import ApiKeyRecord, Role, new_api_key
from modelserve_runtime.errors import DecodedError, decode_rpc_error


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


DOMAIN = "registry.modelserve"
Metadata = tuple[tuple[str, str], ...]


async def failure(call: Awaitable[object]) -> DecodedError:
    """The decoded error of a call that must fail, checked to come from the registry."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    error = decode_rpc_error(info.value)
    assert error.domain == DOMAIN
    return error


async def create_model(
    stub: pb_grpc.RegistryServiceAsyncStub,
    model_id: str = "fraud",
    *,
    metadata: Metadata = (),
    reason: str = "",
) -> pb.Model:
    """Creates `models/{model_id}`."""
    response = await stub.CreateModel(
        pb.CreateModelRequest(
            model_id=model_id, model=pb.Model(description="card fraud"), reason=reason
        ),
        metadata=metadata,
    )
    return response.model


async def upload_version(
    stub: pb_grpc.RegistryServiceAsyncStub,
    data: bytes | None = None,
    *,
    parent: str = "models/fraud",
    metadata: Metadata = (),
) -> pb.ModelVersion:
    """Uploads `data` (a fresh tiny model by default) as a new version of `parent`."""
    requests = upload_requests(data if data is not None else tiny_onnx(), parent=parent)
    response = await stub.CreateModelVersion(stream(requests), metadata=metadata)
    return response.model_version


async def set_traffic(
    stub: pb_grpc.RegistryServiceAsyncStub,
    name: str,
    *targets: tuple[str, int],
    reason: str = "",
    metadata: Metadata = (),
) -> pb.Deployment:
    """Sets a deployment's traffic (creating it), returning the deployment."""
    response = await stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(
            deployment=pb.Deployment(
                name=name,
                traffic=[pb.TrafficTarget(model_version=v, percent=p) for v, p in targets],
            ),
            allow_missing=True,
            reason=reason,
        ),
        metadata=metadata,
    )
    return response.deployment


@dataclass
class AuthRegistry:
    """A registry with auth on, a stub, and a key per principal."""

    stub: pb_grpc.RegistryServiceAsyncStub
    channel: grpc.aio.Channel
    keys: dict[str, str]

    def bearer(self, principal: str) -> Metadata:
        return (("authorization", f"Bearer {self.keys[principal]}"),)


#: The principals of an auth-enabled test registry and their roles.
PRINCIPALS: dict[str, set[Role]] = {
    "pia": {Role.PREDICT},
    "vera": {Role.VIEWER},
    "dan": {Role.DEPLOYER},
    "april": {Role.APPROVER},
    "ada": {Role.ADMIN},
    "sam": {Role.DEPLOYER, Role.APPROVER},
}
#: Cheap scrypt for tests; production keys use the default cost.
TEST_SCRYPT_N = 16


def principal_keys() -> tuple[dict[str, str], list[ApiKeyRecord]]:
    """A fresh key for each of PRINCIPALS, and the records a registry keeps of them."""
    keys: dict[str, str] = {}
    records = []
    for principal, roles in PRINCIPALS.items():
        key, record = new_api_key(principal, roles, n=TEST_SCRYPT_N)
        keys[principal] = key
        records.append(record)
    return keys, records


#: The principal that holds each single role.
ROLE_HOLDER = {
    Role.PREDICT: "pia",
    Role.VIEWER: "vera",
    Role.DEPLOYER: "dan",
    Role.APPROVER: "april",
    Role.ADMIN: "ada",
}
