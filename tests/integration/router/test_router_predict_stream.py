"""`PredictStream`: many Predict requests down one call, each answered as Predict answers it,
with its own id, error, rate-limit draw and prediction record."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from router_testing import (
    DOMAIN,
    V1,
    Dependencies,
    deploy,
    probabilities,
    records,
    refused,
    request,
    router_settings,
)
from support import eventually, running

from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_router.server import build_server
from modelserve_runtime.auth import Role, new_api_key
from modelserve_runtime.channels import create_channel
from modelserve_runtime.predict_stream import PredictFailed, PredictStreamClient

pytestmark = pytest.mark.triton

#: Cheap scrypt for tests; production keys use the default cost.
TEST_SCRYPT_N = 16
ENDPOINT = "predict-stream"


def _predictions(version: str) -> float:
    """The router's count of the endpoint's requests answered by `version` (not degraded)."""
    labels = {
        "endpoint": ENDPOINT,
        "routed_version": version,
        "model_version": version,
        "code": "OK",
        "degraded": "false",
    }
    return REGISTRY.get_sample_value("modelserve_router_predictions_total", labels) or 0.0


def _stream_requests() -> list[router_pb.PredictStreamRequest]:
    """34 good requests (one without an id) and one without an endpoint (nor an id)."""
    items = []
    for i in range(35):
        predict = request(ENDPOINT, customer=f"c-{1001 + i % 20}", amount=10.0 + i)
        predict.request_id = "" if i in (3, 5) else f"p{i}"
        if i == 5:
            predict.endpoint = ""
        items.append(router_pb.PredictStreamRequest(request=predict))
    return items


class TestPredictStream:
    async def test_each_request_is_answered_as_predict_answers_it(
        self, dependencies: Dependencies
    ) -> None:
        """With auth on and a burst of 30: 30 requests of the stream are answered as unary
        Predict answers them, each under its id (a request without one gets one, and its
        record is logged under it); the bad one, without an id too, gets one and INVALID_ARGUMENT
        naming `endpoint`; the
        four over the burst get RATE_LIMITED with a retry delay; the stream goes on through
        all of it, each request served is counted on /metrics, and without a key the stream is
        refused at once."""
        deps = dependencies
        await deploy(deps, ENDPOINT, V1)
        streamer, streamer_record = new_api_key("sam", {Role.PREDICT}, n=TEST_SCRYPT_N)
        checker, checker_record = new_api_key("cat", {Role.PREDICT}, n=TEST_SCRYPT_N)
        settings = router_settings(
            deps,
            auth={
                "enabled": True,
                "keys": [streamer_record.model_dump(), checker_record.model_dump()],
            },
            rate_limit={"requests_per_s": 0.01, "burst": 30},
        )
        items = _stream_requests()

        async def sent() -> AsyncIterator[router_pb.PredictStreamRequest]:
            for item in items:
                yield item

        async with running(build_server, settings) as (server, _, _app):
            target = f"127.0.0.1:{server.port}"
            counted_before = _predictions(V1)
            async with create_channel(target, api_key=streamer) as channel:
                stub = router_grpc.RouterServiceStub(channel)
                answers = [a async for a in stub.PredictStream(sent())]
            counted = _predictions(V1) - counted_before
            async with create_channel(target) as keyless:
                call = router_grpc.RouterServiceStub(keyless).PredictStream(iter(()))
                unauthenticated = await refused(call.read())
            served = {a.request_id: a.response for a in answers if a.HasField("response")}
            failed = {a.request_id: a.error for a in answers if a.HasField("error")}
            async with create_channel(target, api_key=checker) as channel:
                stub = router_grpc.RouterServiceStub(channel)
                unary = {
                    request_id: await stub.Predict(items[int(request_id[1:])].request)
                    for request_id in sorted(served)
                    if request_id.startswith("p")
                }

        assert len(answers) == 35
        assert len(served) == 30
        # Every request routed counts, one by one, though the stream is one RPC.
        assert counted == 30
        (made,) = [request_id for request_id in served if not request_id.startswith("p")]
        assert len(made) == 32 and int(made, 16) >= 0
        for request_id, response in served.items():
            assert response.request_id == request_id
            assert response.model_version == V1
        for request_id, response in unary.items():
            np.testing.assert_allclose(
                probabilities(served[request_id]), probabilities(response), rtol=0, atol=1e-6
            )

        (unnamed,) = [request_id for request_id in failed if not request_id.startswith("p")]
        assert len(unnamed) == 32 and unnamed != made
        bad = failed.pop(unnamed)
        assert (bad.code, bad.reason, bad.domain) == (
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            "INVALID_ARGUMENT",
            DOMAIN,
        )
        assert [v.field for v in bad.field_violations] == ["endpoint"]
        assert len(failed) == 4
        for error in failed.values():
            assert (error.code, error.reason) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                "RATE_LIMITED",
            )
            assert dict(error.metadata) == {"principal": "sam"}
            assert error.retry_delay.ToTimedelta().total_seconds() > 0
        assert (unauthenticated.code, unauthenticated.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_MISSING",
        )

        async def logged() -> bool:
            return len(await records(deps, made)) == 1

        await eventually(logged, "the record of the request the router named")


class TestPredictStreamClient:
    async def test_concurrent_predicts_share_one_stream(self, dependencies: Dependencies) -> None:
        """`PredictStreamClient`: eight concurrent predicts over one stream with five tokens
        left: five answers, three PredictFailed RATE_LIMITED with the retry delay; a request
        without an endpoint raises INVALID_ARGUMENT naming it; a request without an id is
        given one. When the stream's deadline passes, the next predict opens a new one; once the
        router stops, a predict raises the stream's error."""
        deps = dependencies
        await deploy(deps, ENDPOINT, V1)
        settings = router_settings(
            deps,
            rate_limit={"requests_per_s": 0.01, "burst": 7},
            server={"grace_period_s": 0.2},
        )
        unnamed = request(ENDPOINT)
        unnamed.request_id = ""
        async with contextlib.AsyncExitStack() as exits:
            server, _, _ = await exits.enter_async_context(running(build_server, settings))
            channel = create_channel(f"127.0.0.1:{server.port}")
            client = PredictStreamClient(channel, timeout_s=2)
            await client.__aenter__()
            try:
                bad = request(ENDPOINT)
                bad.endpoint = ""
                with pytest.raises(PredictFailed) as invalid:
                    await client.predict(bad)
                first = await client.predict(request(ENDPOINT))
                # The stream's deadline passes: the next predict goes down a new stream.
                await eventually(lambda: client.stream_ended, "the first stream's end")
                again = await client.predict(request(ENDPOINT, amount=99.0))
                outcomes = await asyncio.gather(
                    client.predict(unnamed),
                    *(client.predict(request(ENDPOINT, amount=float(i))) for i in range(7)),
                    return_exceptions=True,
                )
                await exits.aclose()  # the router stops
                # Once the client has seen its stream end (a predict sent before that would get
                # the ending stream's error instead), the next predict opens a new stream.
                await eventually(lambda: client.stream_ended, "the second stream's end")
                with pytest.raises(grpc.aio.AioRpcError):
                    await client.predict(request(ENDPOINT))
            finally:
                await client.close()
                await channel.close()

        assert invalid.value.error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in invalid.value.error.violations] == ["endpoint"]
        answers = [o for o in outcomes if isinstance(o, router_pb.PredictResponse)]
        refusals = [o for o in outcomes if isinstance(o, PredictFailed)]
        assert (len(answers), len(refusals)) == (5, 3), outcomes
        assert {a.model_version for a in answers} == {V1}
        for refusal in refusals:
            assert (refusal.error.code, refusal.error.reason) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "RATE_LIMITED",
            )
            assert refusal.error.retry_delay_s is not None and refusal.error.retry_delay_s > 0
        assert len(unnamed.request_id) == 32
        assert (first.model_version, again.model_version) == (V1, V1)
        assert (
            client.streams_opened == 3
        )  # the first, the second, and one the stopped router refused
