"""Helpers the inference tests share: the demo model's versions, requests, reference answers."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_demo import fraud
from modelserve_inference.config import InferenceSettings
from modelserve_inference.server import InferenceApp
from modelserve_runtime.convert import TRITON_NAMES, numpy_to_tensor, tensor_to_numpy
from modelserve_runtime.errors import DecodedError, decode_rpc_error
from modelserve_runtime.server import GrpcServer
from modelserve_triton.model_config import TensorSpec
from modelserve_triton.runner import TritonRunner

MODEL_ID = "fraud"
V1 = f"models/{MODEL_ID}/versions/1"
V2 = f"models/{MODEL_ID}/versions/2"
DOMAIN = "inference.modelserve"
#: Four payments that neither version was trained on.
ROWS = fraud.make_dataset(4, seed=7)[0]
_DATATYPES = {name: code for code, name in TRITON_NAMES.items()}


@dataclass
class RunningInference:
    """An inference service running in this process."""

    server: GrpcServer
    channel: grpc.aio.Channel
    app: InferenceApp
    stub: pb_grpc.InferenceServiceAsyncStub

    @property
    def target(self) -> str:
        """`host:port` of the service."""
        return f"127.0.0.1:{self.server.port}"


def local_settings(
    tmp_path_factory: pytest.TempPathFactory, registry_target: str, **overrides: Any
) -> InferenceSettings:
    """A local-mode service on `registry_target` polling Triton often, with `overrides`."""
    return InferenceSettings(
        triton_mode="local",
        triton_work_dir=tmp_path_factory.mktemp("triton"),
        registry_target=registry_target,
        triton_poll_interval_s=0.1,
        triton_stats_interval_s=0.1,
        **overrides,
    )


def spec_proto(spec: TensorSpec) -> tensor_pb2.TensorSpec:
    """A signature tensor as the registry's API spells it."""
    return tensor_pb2.TensorSpec(
        name=spec.name, datatype=_DATATYPES[spec.datatype], shape=list(spec.shape)
    )


def reference(
    model: fraud.TrainedModel, rows: npt.NDArray[Any] = ROWS
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Labels and probabilities of onnxruntime in this process, on the bytes that were uploaded."""
    session = ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"features": rows})
    return np.asarray(labels), np.asarray(probabilities)


def infer_request(
    name: str, *inputs: tensor_pb2.Tensor, output_names: tuple[str, ...] = ()
) -> pb.InferRequest:
    """An InferRequest; the four ROWS as `features` unless inputs are given."""
    return pb.InferRequest(
        name=name,
        inputs=list(inputs) or [numpy_to_tensor("features", ROWS)],
        output_names=list(output_names),
    )


async def infer(
    stub: pb_grpc.InferenceServiceAsyncStub, request: pb.InferRequest, **kwargs: Any
) -> dict[str, npt.NDArray[Any]]:
    """The outputs of one Infer call, as arrays."""
    response = await stub.Infer(request, **kwargs)
    assert response.name == request.name
    return {t.name: tensor_to_numpy(t) for t in response.outputs}


def assert_answers_as(outputs: dict[str, npt.NDArray[Any]], model: fraud.TrainedModel) -> None:
    """The outputs are onnxruntime's for ROWS on this model."""
    labels, probabilities = reference(model)
    assert set(outputs) == {"label", "probabilities"}
    np.testing.assert_allclose(outputs["probabilities"], probabilities, rtol=0, atol=1e-5)
    # The signature says label is [-1]; Triton's [N, 1] answer is given back that shape.
    assert outputs["label"].shape == (len(ROWS),)
    np.testing.assert_array_equal(outputs["label"], labels)


async def load(stub: pb_grpc.InferenceServiceAsyncStub, name: str) -> pb.LoadedModelVersion:
    """Loads a version and checks that it is READY."""
    response = await stub.LoadModelVersion(pb.LoadModelVersionRequest(name=name))
    assert response.model_version.state == pb.MODEL_VERSION_STATE_READY, response
    return response.model_version


async def held(stub: pb_grpc.InferenceServiceAsyncStub) -> list[pb.LoadedModelVersion]:
    """What the service lists."""
    return list((await stub.ListModelVersions(pb.ListModelVersionsRequest())).model_versions)


async def triton_ready(endpoint: str, version: int) -> bool:
    """What the Triton at `endpoint` itself says about that version of the model."""
    triton = TritonRunner(endpoint)
    try:
        return await triton.is_model_ready(MODEL_ID, version, timeout_s=5)
    finally:
        await triton.close()


async def refused(call: Awaitable[object]) -> DecodedError:
    """The decoded error of a call that must fail with an inference error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    error = decode_rpc_error(info.value)
    assert error.domain == DOMAIN
    return error
