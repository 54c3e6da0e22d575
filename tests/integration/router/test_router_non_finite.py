"""A version whose signature lets its input take NaN and infinity, through the router:
Predict passes a caller's NaN feature to it, and so does the Open Inference Protocol a NaN
tensor; the demo version's input, which does not allow them, still refuses both."""

from __future__ import annotations

import math

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from router_testing import (
    V1,
    WAIT_S,
    Dependencies,
    deploy,
    probabilities,
    records,
    register_copy,
    reload,
    request,
    router,
    router_settings,
)
from support import running
from tritonclient.grpc import service_pb2, service_pb2_grpc

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve_demo import fraud
from modelserve_router.server import build_server
from modelserve_runtime.errors import decode_rpc_error

pytestmark = pytest.mark.triton


class TestNonFiniteInputs:
    async def test_nan_reaches_an_input_that_takes_it_and_only_that(
        self, dependencies: Dependencies
    ) -> None:
        deps = dependencies
        takes = await register_copy(deps, "fraud-takes-nan", allow_non_finite=True)
        await reload(deps, takes)
        await deploy(deps, "takes-nan", takes)
        await deploy(deps, "refuses-nan", V1)
        rows = np.full((1, len(fraud.FEATURE_REFS)), np.nan, np.float32)
        try:
            async with router(deps) as (stub, _):
                answered = await stub.Predict(request("takes-nan", amount=math.nan))
                with pytest.raises(grpc.aio.AioRpcError) as predict_refused:
                    await stub.Predict(request("refuses-nan", amount=math.nan))
            async with running(build_server, router_settings(deps)) as (_, channel, _app):
                oip = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                raw = await oip.ModelInfer(_infer("takes-nan", rows), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as oip_refused:
                    await oip.ModelInfer(_infer("refuses-nan", rows), timeout=10)
        finally:
            # The package's inference is shared: other tests list what it holds READY.
            await deps.inference.UnloadModelVersion(
                inference_pb.UnloadModelVersionRequest(name=takes), timeout=WAIT_S
            )

        # The demo model is a tree ensemble: NaN takes each tree's missing-value branch.
        (record,) = await records(deps, answered.request_id)
        assert math.isnan(record.features["request:amount"].double_value)
        answer = probabilities(answered)
        assert np.isfinite(answer).all() and answer.sum() == pytest.approx(1.0, abs=1e-5)
        session = ort.InferenceSession(
            fraud.train(seed=0).onnx_bytes, providers=["CPUExecutionProvider"]
        )
        (want,) = session.run(["probabilities"], {"features": rows})
        got = np.frombuffer(raw.raw_output_contents[0], np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, atol=1e-6)
        by_predict = decode_rpc_error(predict_refused.value)
        assert by_predict.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [(v.field, v.description) for v in by_predict.violations] == [
            ("features.amount", "must be a finite number")
        ]
        by_oip = decode_rpc_error(oip_refused.value)
        assert by_oip.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [(v.field, v.description) for v in by_oip.violations] == [
            ("inputs[features]", "contains NaN or infinity")
        ]


def _infer(endpoint: str, rows: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=endpoint)
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.outputs.add(name="probabilities")
    request.raw_input_contents.append(rows.tobytes())
    return request
