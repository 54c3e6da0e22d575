"""A caller's request id travels as the `x-request-id` header of every call the router makes
for the request, so it must be a header value: up to 128 visible ASCII characters. Anything
else is INVALID_ARGUMENT naming the field, before any work or record; it used to fail the
request's own calls and come back as INTERNAL."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from router_testing import V1, Dependencies, deploy, records, refused, request, router_settings
from support import running
from tritonclient.grpc import service_pb2, service_pb2_grpc

from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_demo import fraud
from modelserve_router.predict import MAX_REQUEST_ID_LENGTH
from modelserve_router.server import build_server

pytestmark = pytest.mark.triton

ENDPOINT = "request-ids"
BAD_IDS = ["é-1", "a\x00b", "with space", "tab\there", "x" * (MAX_REQUEST_ID_LENGTH + 1)]


def _infer(request_id: str) -> service_pb2.ModelInferRequest:
    rows = np.ones((1, len(fraud.FEATURE_REFS)), np.float32)
    infer = service_pb2.ModelInferRequest(model_name=ENDPOINT, id=request_id)
    infer.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    infer.outputs.add(name="probabilities")
    infer.raw_input_contents.append(rows.tobytes())
    return infer


class TestRequestIds:
    async def test_ids_that_cannot_be_a_header_are_refused_before_any_work(
        self, dependencies: Dependencies
    ) -> None:
        deps = dependencies
        await deploy(deps, ENDPOINT, V1)
        longest = "~" * MAX_REQUEST_ID_LENGTH
        async with running(build_server, router_settings(deps)) as (_, channel, _app):
            stub = router_grpc.RouterServiceStub(channel)
            oip = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            by_predict = []
            for bad in BAD_IDS:
                predict = request(ENDPOINT)
                predict.request_id = bad
                by_predict.append(await refused(stub.Predict(predict, timeout=10)))
            by_oip = await refused(oip.ModelInfer(_infer("é-2"), timeout=10))
            good = request(ENDPOINT)
            good.request_id = longest
            answered = await stub.Predict(good, timeout=10)
            oip_answered = await oip.ModelInfer(_infer("oip-ok-1"), timeout=10)

            bad_then_good = []
            for request_id in ("é-3", "stream-ok-1"):
                item = request(ENDPOINT)
                item.request_id = request_id
                bad_then_good.append(router_pb.PredictStreamRequest(request=item))
            streamed = [r async for r in stub.PredictStream(iter(bad_then_good), timeout=10)]

        for error in (*by_predict, by_oip):
            assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for e in by_predict for v in e.violations] == ["request_id"] * len(BAD_IDS)
        assert "visible ASCII" in by_predict[0].violations[0].description
        assert "at most 128" in by_predict[-1].violations[0].description
        assert [v.field for v in by_oip.violations] == ["id"]
        # Refused before routing: nothing was logged under the refused ids.
        for bad in (*BAD_IDS, "é-2", "é-3"):
            assert await records(deps, bad) == []

        assert answered.request_id == longest
        assert [r.model_version for r in await records(deps, longest)] == [V1]
        assert oip_answered.id == "oip-ok-1"

        by_id = {r.request_id: r for r in streamed}
        assert by_id["é-3"].WhichOneof("result") == "error"
        assert by_id["é-3"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert [v.field for v in by_id["é-3"].error.field_violations] == ["request_id"]
        assert by_id["stream-ok-1"].response.model_version == V1
