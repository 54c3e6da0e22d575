"""The Connect protocol on a service's HTTP port, driven by connect-python's client (an
implementation of the protocol that is not ours) and by plain HTTP, against test servicers
for our own protos run through the real server interceptors."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import struct
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import grpc
import pytest
from connectrpc.client import ConnectClient, ResponseMetadata
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from support import connect_method, eventually

from modelserve.feature.v1 import feature_service_pb2 as feature_pb
from modelserve.feature.v1 import feature_service_pb2_grpc as feature_grpc
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_runtime.config import ServerSettings, ServiceSettings
from modelserve_runtime.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from modelserve_runtime.server import GrpcServer, build_grpc_server

ROUTER = router_pb.DESCRIPTOR.services_by_name["RouterService"]
FEATURE = feature_pb.DESCRIPTOR.services_by_name["FeatureService"]


class _Router(router_grpc.RouterServiceServicer):
    """Predict echoes the endpoint, says what its context saw, or holds (until `released`,
    which no test sets: only the caller's deadline ends the call) or refuses as the
    endpoint's name asks; PredictStream answers each request with its id."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.released = asyncio.Event()

    async def Predict(
        self, request: router_pb.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb.PredictResponse:
        self.seen.append(
            {"remaining": context.time_remaining(), "metadata": context.invocation_metadata()}
        )
        if request.endpoint == "slow":
            await self.released.wait()
        if request.endpoint == "missing":
            raise NotFoundError("endpoint 'missing' is not deployed", metadata={"endpoint": "x"})
        if request.endpoint == "busy":
            raise ResourceExhaustedError("fraud is at its limit", retry_delay_s=2.5)
        if request.endpoint == "bad":
            raise InvalidArgumentError.for_field("entities.customer", "expected an entity id")
        await context.send_initial_metadata((("x-answered-by", "router-1"),))
        context.set_trailing_metadata((("x-cost", "7"), ("x-blob-bin", b"\x00\xff")))
        return router_pb.PredictResponse(
            model_version=request.endpoint, request_id=request.request_id
        )

    async def PredictStream(
        self,
        request_iterator: AsyncIterator[router_pb.PredictStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[router_pb.PredictStreamResponse]:
        async for item in request_iterator:
            yield router_pb.PredictStreamResponse(request_id=item.request.request_id)


class _Feature(feature_grpc.FeatureServiceServicer):
    async def BulkWriteFeatures(
        self,
        request_iterator: AsyncIterator[feature_pb.BulkWriteFeaturesRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> feature_pb.BulkWriteFeaturesResponse:
        batches = values = 0
        async for batch in request_iterator:
            batches += 1
            values += sum(len(w.values) for w in batch.writes)
        return feature_pb.BulkWriteFeaturesResponse(batches=batches, values_written=values)


@pytest.fixture
async def served() -> AsyncIterator[tuple[GrpcServer, _Router, str]]:
    router = _Router()

    def register(server: grpc.aio.Server) -> Sequence[str]:
        router_grpc.add_RouterServiceServicer_to_server(router, server)
        feature_grpc.add_FeatureServiceServicer_to_server(_Feature(), server)
        return [ROUTER.full_name, FEATURE.full_name]

    settings = ServiceSettings(server=ServerSettings(http_port=0, max_message_bytes=64 * 1024))
    built = build_grpc_server("router", settings, register)
    assert built.http is not None
    await built.http.start()
    try:
        yield built, router, f"http://127.0.0.1:{built.http.port}"
    finally:
        await built.http.stop()


def _predict(endpoint: str, request_id: str = "r-1") -> router_pb.PredictRequest:
    return router_pb.PredictRequest(endpoint=endpoint, request_id=request_id)


@pytest.mark.parametrize("proto_json", [False, True])
async def test_unary_call_with_metadata_both_ways(
    served: tuple[GrpcServer, _Router, str], proto_json: bool
) -> None:
    """A Connect client's call, as protobuf and as JSON, gzipped by the client: the answer,
    the servicer's initial metadata as headers and its trailing metadata as trailers; the
    client's headers reach the servicer as metadata, `-bin` ones decoded."""
    _, router, base = served
    client = ConnectClient(base, proto_json=proto_json)
    with ResponseMetadata() as meta:
        answer = await client.execute_unary(
            request=_predict("fraud"),
            method=connect_method(ROUTER, "Predict"),
            headers={"x-request-id": "req-42", "x-tag-bin": base64.b64encode(b"\x01\x02").decode()},
        )
    assert answer == router_pb.PredictResponse(model_version="fraud", request_id="r-1")
    assert meta.headers()["x-answered-by"] == "router-1"
    assert meta.trailers()["x-cost"] == "7"
    assert base64.b64decode(meta.trailers()["x-blob-bin"] + "==") == b"\x00\xff"
    metadata = dict(router.seen[-1]["metadata"])
    assert metadata["x-request-id"] == "req-42"
    assert metadata["x-tag-bin"] == b"\x01\x02"
    assert router.seen[-1]["remaining"] is None


async def test_refusal_is_connects_error_with_the_status_details(
    served: tuple[GrpcServer, _Router, str],
) -> None:
    """INVALID_ARGUMENT is a 400 with code, message and the BadRequest naming the field,
    readable by a Connect client and by a person (`debug`)."""
    _, _, base = served
    with pytest.raises(ConnectError) as raised:
        await ConnectClient(base).execute_unary(
            request=_predict("bad"), method=connect_method(ROUTER, "Predict")
        )
    assert raised.value.code is Code.INVALID_ARGUMENT
    assert "expected an entity id" in str(raised.value)
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in raised.value.details)
    assert bad_request.field_violations[0].field == "entities.customer"

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/modelserve.router.v1.RouterService/Predict", json={"endpoint": "missing"}
        ) as response,
    ):
        status, error = response.status, await response.json()
    assert status == 404
    assert error["code"] == "not_found"
    assert error["message"] == "endpoint 'missing' is not deployed"
    info = next(d for d in error["details"] if d["type"] == "google.rpc.ErrorInfo")
    assert info["debug"]["reason"] == "NOT_FOUND"
    assert info["debug"]["metadata"] == {"endpoint": "x"}
    assert "=" not in info["value"]
    decoded = error_details_pb2.ErrorInfo.FromString(
        base64.b64decode(info["value"] + "=" * (-len(info["value"]) % 4))
    )
    assert decoded.domain == "router.modelserve"


async def test_timeout_is_the_deadline(served: tuple[GrpcServer, _Router, str]) -> None:
    """`Connect-Timeout-Ms` is the servicer's `time_remaining()` and, once past, cancels the
    call, which the servicer would hold forever: deadline_exceeded (504)."""
    _, router, base = served
    client = ConnectClient(base)
    await client.execute_unary(
        request=_predict("fraud"), method=connect_method(ROUTER, "Predict"), timeout_ms=5000
    )
    assert 3.0 < router.seen[-1]["remaining"] <= 5.0
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/modelserve.router.v1.RouterService/Predict",
            json={"endpoint": "slow"},
            headers={"Connect-Timeout-Ms": "300"},
        ) as response,
    ):
        status, error = response.status, await response.json()
    assert time.monotonic() - started < 5
    assert (status, error["code"]) == (504, "deadline_exceeded")


async def test_client_stream_and_bidi_stream(served: tuple[GrpcServer, _Router, str]) -> None:
    """Client streaming (many batches, one answer) and a bidirectional stream sent whole, as
    an HTTP/1.1 client sends it, each over Connect's enveloped stream."""
    _, _, base = served
    client = ConnectClient(base, proto_json=True)

    async def batches() -> AsyncIterator[feature_pb.BulkWriteFeaturesRequest]:
        for n in range(3):
            write = feature_pb.EntityFeatureWrite()
            write.values["a"].double_value = float(n)
            write.values["b"].double_value = float(n)
            yield feature_pb.BulkWriteFeaturesRequest(writes=[write])

    answer = await client.execute_client_stream(
        request=batches(), method=connect_method(FEATURE, "BulkWriteFeatures")
    )
    assert (answer.batches, answer.values_written) == (3, 6)

    async def requests() -> AsyncIterator[router_pb.PredictStreamRequest]:
        for n in range(4):
            yield router_pb.PredictStreamRequest(request=_predict("fraud", f"r-{n}"))

    answers = [
        item.request_id
        async for item in client.execute_bidi_stream(
            request=requests(), method=connect_method(ROUTER, "PredictStream")
        )
    ]
    assert answers == ["r-0", "r-1", "r-2", "r-3"]


async def test_server_stream_ends_with_the_deadline(
    served: tuple[GrpcServer, _Router, str],
) -> None:
    """Health's Watch (a stream that never ends by itself) streams SERVING, then the
    deadline ends it with deadline_exceeded in the end message."""
    _, _, base = served
    client = ConnectClient(base)
    seen = []
    with pytest.raises(ConnectError) as raised:
        async for item in client.execute_server_stream(
            request=health_pb2.HealthCheckRequest(),
            method=connect_method(health_pb2.DESCRIPTOR.services_by_name["Health"], "Watch"),
            timeout_ms=500,
        ):
            seen.append(item.status)
    assert seen == [health_pb2.HealthCheckResponse.SERVING]
    assert raised.value.code is Code.DEADLINE_EXCEEDED


def _envelope(flags: int, data: bytes) -> bytes:
    return struct.pack(">BI", flags, len(data)) + data


def _envelopes(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        out.append((flags, body[5 : 5 + length]))
        body = body[5 + length :]
    return out


async def test_a_unary_method_over_the_stream_content_type(
    served: tuple[GrpcServer, _Router, str],
) -> None:
    """A unary method called with `application/connect+json`: one envelope in, the answer
    and the end message out; two requests where one is due are refused in the end message."""
    _, _, base = served
    url = f"{base}/modelserve.router.v1.RouterService/Predict"
    headers = {"Content-Type": "application/connect+json"}
    one = _envelope(0, b'{"endpoint": "fraud", "requestId": "r-9"}')
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=one, headers=headers) as response:
            ok = (response.status, _envelopes(await response.read()))
            answered_by = response.headers.get("x-answered-by")
        async with session.post(url, data=one + one, headers=headers) as response:
            twice = (response.status, _envelopes(await response.read()))
    assert ok[0] == 200
    assert answered_by == "router-1"
    assert [flags for flags, _ in ok[1]] == [0, 2]
    assert json.loads(ok[1][0][1]) == {"modelVersion": "fraud", "requestId": "r-9"}
    assert json.loads(ok[1][1][1]) == {"metadata": {"x-cost": ["7"], "x-blob-bin": ["AP8"]}}
    assert twice[0] == 200
    [(flags, end)] = twice[1]
    assert flags == 2
    error = json.loads(end)["error"]
    assert error["code"] == "invalid_argument"
    assert "expected one message, got more" in error["message"]


@pytest.mark.parametrize(
    ("headers", "body", "status", "expected"),
    [
        ({"Content-Type": "text/plain"}, b"{}", 415, None),
        (
            {"Content-Type": "application/json", "Connect-Protocol-Version": "2"},
            b"{}",
            400,
            ("invalid_argument", "Connect-Protocol-Version: expected 1, got '2'"),
        ),
        (
            {"Content-Type": "application/json", "Connect-Timeout-Ms": "soon"},
            b"{}",
            400,
            ("invalid_argument", "Connect-Timeout-Ms: expected a whole number"),
        ),
        (
            {"Content-Type": "application/json", "Content-Encoding": "br"},
            b"{}",
            501,
            ("unimplemented", "Content-Encoding: 'br' is not supported; supported: gzip"),
        ),
        (
            {"Content-Type": "application/json"},
            b"{not json",
            400,
            ("invalid_argument", "expected modelserve.router.v1.PredictRequest as JSON"),
        ),
        (
            {"Content-Type": "application/proto"},
            b"\xff\xff\xff",
            400,
            ("invalid_argument", "expected modelserve.router.v1.PredictRequest as protobuf"),
        ),
        (
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            b"not gzip",
            400,
            ("invalid_argument", "Content-Encoding: the body is not gzip"),
        ),
        (
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            gzip.compress(b" " * (65 * 1024)),
            429,
            ("resource_exhausted", "larger than this server's limit of 65536"),
        ),
        (
            {"Content-Type": "application/json"},
            b" " * (65 * 1024),
            429,
            ("resource_exhausted", "larger than this server's limit of 65536"),
        ),
    ],
)
async def test_bad_requests_are_refused_clearly(
    served: tuple[GrpcServer, _Router, str],
    headers: dict[str, str],
    body: bytes,
    status: int,
    expected: tuple[str, str] | None,
) -> None:
    """Every refusal of the protocol: the HTTP status and Connect's code, and a message
    naming the header or what the body should have been; the servicer never runs."""
    _, router, base = served
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/modelserve.router.v1.RouterService/Predict", data=body, headers=headers
        ) as response,
    ):
        answer = (response.status, response.headers.get("Accept-Post"), await response.read())
    assert answer[0] == status
    assert router.seen == []
    if expected is None:
        assert answer[1] is not None
        assert "application/json" in answer[1]
        assert "application/proto" in answer[1]
        return
    error = json.loads(answer[2])
    assert error["code"] == expected[0]
    assert expected[1] in error["message"]


async def test_large_answers_are_gzipped_when_accepted(
    served: tuple[GrpcServer, _Router, str],
) -> None:
    """An answer of 1 KiB or more goes gzipped to a caller whose Accept-Encoding lists gzip,
    as it is to one that does not."""
    _, _, base = served
    url = f"{base}/modelserve.router.v1.RouterService/Predict"
    request = {"endpoint": "fraud", "requestId": "x" * 2000}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(url, json=request, headers={"Accept-Encoding": "gzip"}) as r:
            zipped = (r.headers.get("Content-Encoding"), await r.read())
        async with session.post(url, json=request, headers={"Accept-Encoding": "identity"}) as r:
            plain = (r.headers.get("Content-Encoding"), await r.read())
    assert zipped[0] == "gzip"
    assert plain[0] is None
    assert json.loads(gzip.decompress(zipped[1])) == json.loads(plain[1])
    assert json.loads(plain[1])["requestId"] == "x" * 2000


@pytest.mark.parametrize("allowed", [("https://app.example",), ("*",)])
async def test_browsers_of_allowed_origins_get_cors(allowed: tuple[str, ...]) -> None:
    """With `server.http_cors_origins`, a preflight from an allowed origin is answered (POST
    and GET, the headers it asks for), and the answer names the origin and exposes its
    headers, trailers and refusals included; another origin's preflight is refused."""
    router = _Router()

    def register(server: grpc.aio.Server) -> Sequence[str]:
        router_grpc.add_RouterServiceServicer_to_server(router, server)
        return [ROUTER.full_name]

    settings = ServiceSettings(server=ServerSettings(http_port=0, http_cors_origins=allowed))
    built = build_grpc_server("router", settings, register)
    assert built.http is not None
    await built.http.start()
    url = f"http://127.0.0.1:{built.http.port}/modelserve.router.v1.RouterService/Predict"
    origin = {"Origin": "https://app.example"}
    asking = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,connect-protocol-version,x-api-key",
    }
    try:
        async with aiohttp.ClientSession() as session:
            async with session.options(url, headers={**origin, **asking}) as response:
                preflight = (response.status, dict(response.headers))
            async with session.post(url, json={"endpoint": "fraud"}, headers=origin) as response:
                answered = (response.status, dict(response.headers))
            async with session.post(url, json={"endpoint": "bad"}, headers=origin) as response:
                refused = (response.status, dict(response.headers))
            async with session.options(
                url, headers={"Origin": "https://evil.example", **asking}
            ) as response:
                other = (response.status, dict(response.headers))
    finally:
        await built.http.stop()
    assert preflight[0] == 204
    assert preflight[1]["Access-Control-Allow-Origin"] == "https://app.example"
    assert preflight[1]["Access-Control-Allow-Methods"] == "POST, GET"
    assert preflight[1]["Access-Control-Allow-Headers"] == asking["Access-Control-Request-Headers"]
    assert answered[0] == 200
    assert answered[1]["Access-Control-Allow-Origin"] == "https://app.example"
    exposed = answered[1]["Access-Control-Expose-Headers"].lower().split(", ")
    assert {"x-answered-by", "trailer-x-cost", "trailer-x-blob-bin"} <= set(exposed)
    assert refused[0] == 400
    assert refused[1]["Access-Control-Allow-Origin"] == "https://app.example"
    if allowed == ("*",):
        assert other[0] == 204
        assert other[1]["Access-Control-Allow-Origin"] == "https://evil.example"
    else:
        assert other[0] == 403
        assert "Access-Control-Allow-Origin" not in other[1]


async def test_without_cors_origins_a_preflight_is_not_answered(
    served: tuple[GrpcServer, _Router, str],
) -> None:
    """No `server.http_cors_origins`: no CORS headers, a preflight is a 405."""
    _, _, base = served
    url = f"{base}/modelserve.router.v1.RouterService/Predict"
    origin = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with aiohttp.ClientSession() as session:
        async with session.options(url, headers=origin) as response:
            preflight = (response.status, dict(response.headers))
        async with session.post(url, json={"endpoint": "fraud"}, headers=origin) as response:
            answered = dict(response.headers)
    assert preflight[0] == 405
    assert "Access-Control-Allow-Origin" not in preflight[1]
    assert "Access-Control-Allow-Origin" not in answered


async def test_the_in_flight_limit_holds_on_the_http_port() -> None:
    """`server.max_concurrent_rpcs` on the HTTP port too: with one call in flight and a limit
    of 1, the next is refused at once with resource_exhausted (429), its servicer never run;
    once the first ends, calls go through again."""
    router = _Router()

    def register(server: grpc.aio.Server) -> Sequence[str]:
        router_grpc.add_RouterServiceServicer_to_server(router, server)
        return [ROUTER.full_name]

    settings = ServiceSettings(server=ServerSettings(http_port=0, max_concurrent_rpcs=1))
    built = build_grpc_server("router", settings, register)
    assert built.http is not None
    await built.http.start()
    url = f"http://127.0.0.1:{built.http.port}/modelserve.router.v1.RouterService/Predict"
    try:
        async with aiohttp.ClientSession() as session:

            async def post(endpoint: str, **headers: str) -> tuple[int, Any]:
                async with session.post(url, json={"endpoint": endpoint}, headers=headers) as r:
                    return r.status, await r.json()

            slow = asyncio.create_task(post("slow", **{"Connect-Timeout-Ms": "1500"}))
            await eventually(lambda: len(router.seen) == 1, "the slow call in its servicer")
            refused = await post("fraud")
            ran_meanwhile = len(router.seen)
            slow_answer = await slow
            after = await post("fraud")
    finally:
        await built.http.stop()
    assert refused[0] == 429
    assert refused[1]["code"] == "resource_exhausted"
    assert "server.max_concurrent_rpcs" in refused[1]["message"]
    assert ran_meanwhile == 1
    assert slow_answer[0] == 504
    assert after[0] == 200


async def test_a_retry_delay_is_retry_after_too(served: tuple[GrpcServer, _Router, str]) -> None:
    """A refusal whose status carries a RetryInfo of 2.5 s: the detail in Connect's error,
    and `Retry-After: 3` for HTTP clients and proxies that read no details."""
    _, _, base = served
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/modelserve.router.v1.RouterService/Predict", json={"endpoint": "busy"}
        ) as response,
    ):
        status, retry, error = (
            response.status,
            response.headers.get("Retry-After"),
            await response.json(),
        )
    assert (status, retry, error["code"]) == (429, "3", "resource_exhausted")
    (detail,) = [d for d in error["details"] if d["type"] == "google.rpc.RetryInfo"]
    assert detail["debug"] == {"retryDelay": "2.500s"}
