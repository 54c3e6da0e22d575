"""The router's HTTP port: the Open Inference Protocol's HTTP/REST binding (an endpoint is the
model, routed as over gRPC: canary split, sticky routing key, pins, the prediction log), and
Predict as JSON and over Connect, behind the same API keys and rate limits, with the caller's
trace continued."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http.aio as triton_http
from connectrpc.client import ConnectClient
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format
from router_testing import (
    V1,
    V2,
    WAIT_S,
    Dependencies,
    deploy,
    probabilities,
    records,
    request,
    router_settings,
    slow_in_triton,
)
from structlog.testing import capture_logs
from support import connect_method, eventually, running
from tritonclient.http import InferInput

from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_cli.stack import free_port
from modelserve_demo import fraud
from modelserve_router.server import RouterApp, build_server
from modelserve_runtime.auth import Role, new_api_key
from modelserve_runtime.discovery import StaticDiscovery
from modelserve_runtime.server import serve

pytestmark = pytest.mark.triton

ROWS = fraud.make_dataset(4, seed=7)[0]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
#: Cheap scrypt for tests; production keys use the default cost.
TEST_SCRYPT_N = 16


@pytest.fixture(scope="module")
def sessions() -> dict[str, ort.InferenceSession]:
    """onnxruntime here on each version's bytes (version n is trained with seed n - 1)."""
    return {
        name: ort.InferenceSession(
            fraud.train(seed=seed).onnx_bytes, providers=["CPUExecutionProvider"]
        )
        for seed, name in enumerate((V1, V2))
    }


def _probabilities(sessions: dict[str, ort.InferenceSession], version: str) -> Any:
    return np.asarray(sessions[version].run(["probabilities"], {"features": ROWS})[0])


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": list(ROWS.shape),
                "data": ROWS.tolist(),
            }
        ],
        **extra,
    }


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with session.post(url, json=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


class TestRouting:
    async def test_split_sticky_pinned_and_logged(
        self, dependencies: Dependencies, sessions: dict[str, ort.InferenceSession]
    ) -> None:
        """A 50/50 endpoint over HTTP: requests without a key reach both versions; a routing
        key keeps one version; a pinned version answers as itself; each answer is the
        version's own, says how it was routed, continues the caller's trace, and is in the
        prediction log under its id."""
        deps = dependencies
        await deploy(deps, "http-split", {V1: 50, V2: 50}, routing_key="customer")
        settings = router_settings(deps, server={"http_port": 0})
        async with (
            running(build_server, settings) as (server, _, app),
            aiohttp.ClientSession() as session,
        ):
            assert isinstance(app, RouterApp)
            assert server.http is not None
            url = f"http://127.0.0.1:{server.http.port}/v2/models/http-split"
            spread = [await _post(session, f"{url}/infer", _body()) for _ in range(24)]
            sticky = [
                await _post(session, f"{url}/infer", _body(parameters={"routing_key": "c-42"}))
                for _ in range(8)
            ]
            pinned = await _post(session, f"{url}/versions/2/infer", _body())
            traced = await _post(
                session, f"{url}/infer", _body(id="http-traced"), traceparent=TRACEPARENT
            )
            await app.prediction_log.flush()
            logged = await records(deps, "http-traced")
            async with session.get(f"{url}/config") as response:
                config = (response.status, await response.json())
        versions = {answer["model_version"] for _, _, answer in spread}
        assert versions == {"1", "2"}
        for status, _, answer in [*spread, *sticky, pinned, traced]:
            assert status == 200, answer
            got = next(o for o in answer["outputs"] if o["name"] == "probabilities")
            version = V1 if answer["model_version"] == "1" else V2
            np.testing.assert_allclose(
                np.asarray(got["data"]).reshape(got["shape"]),
                _probabilities(sessions, version),
                rtol=0,
                atol=1e-5,
            )
        assert len({answer["model_version"] for _, _, answer in sticky}) == 1
        assert {answer["parameters"]["route_reason"] for _, _, answer in sticky} == {"sticky"}
        assert (pinned[2]["model_version"], pinned[2]["parameters"]["route_reason"]) == (
            "2",
            "pinned",
        )
        assert traced[2]["id"] == "http-traced"
        assert traced[2]["parameters"]["trace_id"] == TRACE_ID
        assert [(r.trace_id, r.endpoint) for r in logged] == [(TRACE_ID, "http-split")]
        # Triton's model configuration has no sense for an endpoint: not implemented.
        assert config == (501, {"error": "method not implemented"})


class TestKeysAndLimits:
    async def test_keys_and_the_rate_limit(self, dependencies: Dependencies) -> None:
        """Auth on: health answers without a key; inference without a key or with a wrong
        one is 401 saying so; with a key, tritonclient.http's headers carry it, and past the
        key's burst the router answers 429 with Retry-After."""
        deps = dependencies
        await deploy(deps, "http-keys", V1)
        key, record = new_api_key("hana", {Role.PREDICT}, n=TEST_SCRYPT_N)
        settings = router_settings(
            deps,
            server={"http_port": 0},
            auth={"enabled": True, "keys": [record.model_dump()]},
            rate_limit={"requests_per_s": 0.01, "burst": 3},
        )
        async with (
            running(build_server, settings) as (server, _, _app),
            aiohttp.ClientSession() as session,
        ):
            assert server.http is not None
            base = f"http://127.0.0.1:{server.http.port}"
            async with session.get(f"{base}/v2/health/live") as live:
                live_status = live.status
            url = f"{base}/v2/models/http-keys/infer"
            missing = await _post(session, url, _body())
            wrong = await _post(session, url, _body(), **{"x-api-key": "ms_nope.nope"})
            client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http.port}")
            try:
                features = InferInput("features", list(ROWS.shape), "FP32")
                features.set_data_from_numpy(ROWS)
                served = [
                    await client.infer("http-keys", [features], headers={"x-api-key": key})
                    for _ in range(3)
                ]
            finally:
                await client.close()
            over = await _post(session, url, _body(), authorization=f"Bearer {key}")
            async with session.get(
                f"{base}/v2/models/http-keys/stats", headers={"x-api-key": key}
            ) as response:
                statistics = (response.status, await response.json())
        assert live_status == 200
        assert missing[0] == 401
        assert missing[1]["Grpc-Status"] == "UNAUTHENTICATED"
        assert "an API key is required" in missing[2]["error"]
        assert wrong[0] == 401
        assert "the API key is not valid" in wrong[2]["error"]
        assert [s.get_response()["model_version"] for s in served] == ["1", "1", "1"]
        assert over[0] == 429
        assert over[1]["Grpc-Status"] == "RESOURCE_EXHAUSTED"
        assert int(over[1]["Retry-After"]) >= 1
        assert "hana" in over[2]["error"]
        # Outside every role's table, as over gRPC.
        assert statistics[0] == 403
        assert "is not open to any role" in statistics[1]["error"]


class TestCallerGone:
    async def test_a_caller_that_hangs_up_cancels_its_call(
        self, dependencies: Dependencies
    ) -> None:
        """A caller that closes its connection while Triton still holds its request ends
        the router's call at once: it is logged CANCELLED (not answered or timed out later),
        and its in-flight slot is free for the next caller."""
        deps = dependencies
        await deploy(deps, "http-gone", V1)
        settings = router_settings(
            deps, server={"http_port": 0}, endpoints={"http-gone": {"max_in_flight": 1}}
        )
        async with (
            running(build_server, settings) as (server, _, app),
            slow_in_triton(deps, V1, queue_delay_us=1_000_000),
        ):
            assert isinstance(app, RouterApp)
            assert server.http is not None
            url = f"http://127.0.0.1:{server.http.port}/v2/models/http-gone/infer"
            with capture_logs() as logs:
                async with aiohttp.ClientSession() as session:
                    posting = asyncio.ensure_future(session.post(url, json=_body()))
                    await eventually(
                        lambda: app.predictor.in_flight("http-gone") == 1,
                        "the request in flight",
                        within_s=WAIT_S,
                    )
                    posting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await posting
                # The session is closed: so is the connection.
                await eventually(
                    lambda: any(e["event"] == "rpc" for e in logs),
                    "the call's rpc line",
                    within_s=WAIT_S,
                )
            in_flight_after = app.predictor.in_flight("http-gone")
        calls = [(e["method"], e["code"]) for e in logs if e["event"] == "rpc"]
        assert calls == [("/inference.GRPCInferenceService/ModelInfer", "CANCELLED")]
        assert in_flight_after == 0


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        status, _, _ = await _post(session, url, _body())
    except aiohttp.ClientError:
        return False
    return status == 200


class TestStopping:
    @pytest.mark.parametrize("grace_s", [5.0, 0.0])
    async def test_a_stop_lets_calls_in_flight_finish_and_takes_no_new_ones(
        self, dependencies: Dependencies, grace_s: float
    ) -> None:
        """A stop (SIGTERM's event) while Triton holds an HTTP call: within the grace period
        the call is answered (with none, it is cut at once, as gRPC cuts its calls), the
        service stops, and its HTTP port takes no connection after."""
        deps = dependencies
        await deploy(deps, "http-drain", V1)
        http_port = free_port()
        settings = router_settings(
            deps,
            server={"port": free_port(), "http_port": http_port, "grace_period_s": grace_s},
            # A limit, so that the router counts the endpoint's calls in flight.
            endpoints={"http-drain": {"max_in_flight": 4}},
        )
        stop = asyncio.Event()
        apps: list[RouterApp] = []
        url = f"http://127.0.0.1:{http_port}/v2/models/http-drain/infer"
        async with slow_in_triton(deps, V1, queue_delay_us=700_000):
            serving = asyncio.create_task(
                serve(
                    "router",
                    settings,
                    build_server,
                    discovery=StaticDiscovery({}),
                    stop_event=stop,
                    on_serving=lambda app: apps.append(cast(RouterApp, app)),
                )
            )
            try:
                await eventually(lambda: bool(apps), "the router serving", within_s=WAIT_S)
                async with aiohttp.ClientSession() as session:
                    await eventually(
                        lambda: _answers(session, url), "an answer for http-drain", within_s=WAIT_S
                    )
                    in_flight = asyncio.ensure_future(_post(session, url, _body()))
                    await eventually(
                        lambda: apps[0].predictor.in_flight("http-drain") == 1,
                        "the call in flight",
                        within_s=WAIT_S,
                    )
                    stop.set()
                    answered = await asyncio.gather(in_flight, return_exceptions=True)
                await asyncio.wait_for(serving, 30)
            finally:
                stop.set()
                await asyncio.wait_for(serving, 30)
        if grace_s:
            ((status, _, answer),) = answered
            assert (status, answer["model_version"]) == (200, "1"), answer
        else:
            assert isinstance(answered[0], aiohttp.ServerDisconnectedError), answered
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as session:
                await _post(session, url, _body())


async def _keyed_router(deps: Dependencies, endpoint: str) -> tuple[str, Any]:
    """`endpoint` deployed on V1, and settings of a router with an HTTP port and auth on; the
    key of a caller who may predict."""
    await deploy(deps, endpoint, V1)
    key, record = new_api_key("ines", {Role.PREDICT}, n=TEST_SCRYPT_N)
    settings = router_settings(
        deps, server={"http_port": 0}, auth={"enabled": True, "keys": [record.model_dump()]}
    )
    return key, settings


class TestPredictOverHttp:
    async def test_predict_as_json(self, dependencies: Dependencies) -> None:
        """`POST /v1/endpoints/<endpoint>:predict` with a PredictRequest as JSON (protobuf's
        mapping) answers what the gRPC Predict answers for the same request, features read
        from Redis; a bad body, an endpoint the path contradicts, a missing entity or a
        missing key are refused with their fields named."""
        deps = dependencies
        key, settings = await _keyed_router(deps, "http-predict")
        predict = request("http-predict", customer="c-1003", amount=812.5)
        body = json_format.MessageToDict(predict)
        del body["endpoint"]
        no_customer = {k: v for k, v in body.items() if k != "entities"}
        async with (
            running(build_server, settings) as (server, channel, _app),
            aiohttp.ClientSession() as session,
        ):
            assert server.http is not None
            url = f"http://127.0.0.1:{server.http.port}/v1/endpoints/http-predict:predict"
            by_grpc = await router_grpc.RouterServiceStub(channel).Predict(
                predict, metadata=(("x-api-key", key),)
            )
            answered = await _post(session, url, body, **{"x-api-key": key})
            refusals = {
                "not a PredictRequest": await _post(
                    session, url, {"endpoint_id": "x"}, **{"x-api-key": key}
                ),
                "another endpoint": await _post(
                    session, url, {**body, "endpoint": "elsewhere"}, **{"x-api-key": key}
                ),
                "no customer": await _post(session, url, no_customer, **{"x-api-key": key}),
                "no key": await _post(session, url, body),
            }
        status, _, answer = answered
        assert status == 200, answer
        by_http = json_format.ParseDict(answer, router_pb.PredictResponse())
        assert (by_http.model_version, by_http.route_reason) == (V1, "single_target")
        np.testing.assert_allclose(probabilities(by_http), probabilities(by_grpc), atol=1e-6)
        assert len(by_http.request_id) == 32 and by_http.request_id != by_grpc.request_id
        codes = {what: (r[0], r[2]["error"]) for what, r in refusals.items()}
        assert codes["not a PredictRequest"][0] == 400
        assert (
            "body: expected modelserve.router.v1.PredictRequest as JSON"
            in (codes["not a PredictRequest"][1])
        )
        assert codes["another endpoint"] == (
            400,
            "endpoint: the path says 'http-predict', the body 'elsewhere'",
        )
        assert codes["no customer"][0] == 400
        assert "entities.customer" in codes["no customer"][1]
        assert codes["no key"][0] == 401


class TestConnect:
    async def test_predict_and_predict_stream_over_connect(
        self, dependencies: Dependencies
    ) -> None:
        """A Connect client (connect-python, protobuf) calls Predict and PredictStream on the
        router's HTTP port: the answers gRPC gives for the same requests, features read from
        Redis, the caller's trace continued, its API key checked."""
        deps = dependencies
        key, settings = await _keyed_router(deps, "connect-predict")
        predict = request("connect-predict", customer="c-1003", amount=812.5)
        service = router_pb.DESCRIPTOR.services_by_name["RouterService"]
        headers = {"x-api-key": key, "traceparent": TRACEPARENT}

        async def stream() -> AsyncIterator[router_pb.PredictStreamRequest]:
            for n in range(3):
                item = router_pb.PredictRequest()
                item.CopyFrom(predict)
                item.request_id = f"s-{n}"
                yield router_pb.PredictStreamRequest(request=item)

        async with running(build_server, settings) as (server, channel, _app):
            assert server.http is not None
            client = ConnectClient(f"http://127.0.0.1:{server.http.port}")
            by_grpc = await router_grpc.RouterServiceStub(channel).Predict(
                predict, metadata=(("x-api-key", key),)
            )
            by_connect = await client.execute_unary(
                request=predict, method=connect_method(service, "Predict"), headers=headers
            )
            streamed = [
                item
                async for item in client.execute_bidi_stream(
                    request=stream(),
                    method=connect_method(service, "PredictStream"),
                    headers={"x-api-key": key},
                )
            ]
            with pytest.raises(ConnectError) as refused:
                await client.execute_unary(
                    request=predict, method=connect_method(service, "Predict")
                )
        assert (by_connect.model_version, by_connect.route_reason) == (V1, "single_target")
        assert by_connect.trace_id == TRACE_ID
        np.testing.assert_allclose(probabilities(by_connect), probabilities(by_grpc), atol=1e-6)
        assert sorted(item.request_id for item in streamed) == ["s-0", "s-1", "s-2"]
        for item in streamed:
            np.testing.assert_allclose(
                probabilities(item.response), probabilities(by_grpc), atol=1e-6
            )
        assert refused.value.code is Code.UNAUTHENTICATED
