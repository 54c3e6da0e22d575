"""The HTTP port as `build_grpc_server` makes it from the handlers a service registers: the
Open Inference Protocol only where the protocol is served, Connect everywhere."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import aiohttp
import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from modelserve_runtime.config import ConfigError, ServerSettings, ServiceSettings
from modelserve_runtime.interceptors import ServiceInterceptor
from modelserve_runtime.server import build_grpc_server


def _settings(http_port: int) -> ServiceSettings:
    return ServiceSettings(server=ServerSettings(http_port=http_port))


def _register_protocol(server: grpc.aio.Server) -> Sequence[str]:
    # The generated base servicer: every method answers UNIMPLEMENTED.
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        service_pb2_grpc.GRPCInferenceServiceServicer(), server
    )
    return ["inference.GRPCInferenceService"]


async def test_a_method_the_servicer_lacks_is_501() -> None:
    """The binding runs the servicer's own handler through the interceptors: a method it
    does not implement is UNIMPLEMENTED, which HTTP says as 501 with the protocol's error."""
    built = build_grpc_server("inference", _settings(0), _register_protocol)
    assert built.http is not None
    await built.http.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{built.http.port}/v2/health/live") as response,
        ):
            answer = (response.status, response.headers["Grpc-Status"], await response.json())
    finally:
        await built.http.stop()
    assert answer == (501, "UNIMPLEMENTED", {"error": "method not implemented"})


async def test_a_taken_port_fails_the_start_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"server.http_port: cannot bind 127.0.0.1:{port}"):
            build_grpc_server("inference", _settings(port), _register_protocol)


async def test_a_service_without_the_protocol_serves_connect_only() -> None:
    """A service that does not host the Open Inference Protocol gets an HTTP port too, with
    Connect only: its /v2 routes are unknown, and the answer says what the port speaks."""
    built = build_grpc_server("feature", _settings(0), lambda server: [])
    assert built.http is not None
    await built.http.start()
    base = f"http://127.0.0.1:{built.http.port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/v2/health/live") as response:
                unknown = (response.status, await response.json())
            async with session.post(
                f"{base}/grpc.health.v1.Health/Check",
                json={},
                headers={"Connect-Protocol-Version": "1"},
            ) as response:
                health = (response.status, await response.json())
    finally:
        await built.http.stop()
    assert unknown[0] == 404
    assert "this port speaks Connect (POST /<package.Service>/<Method>" in unknown[1]["error"]
    assert "Open Inference Protocol" not in unknown[1]["error"]
    # Health starts SERVING in grpcio's servicer until the service says otherwise.
    assert health == (200, {"status": "SERVING"})


async def test_both_bindings_keep_their_wrapped_handlers() -> None:
    """Calls over gRPC and over HTTP, in turn, each reuse their binding's wrapped handler:
    neither evicts the other's, so no call pays for wrapping its handler again."""
    built = build_grpc_server("inference", _settings(0), _register_protocol)
    assert built.http is not None
    await built.server.start()
    await built.http.start()
    interceptor = next(i for i in built.interceptors if isinstance(i, ServiceInterceptor))
    live = "/inference.GRPCInferenceService/ServerLive"
    seen = []
    try:
        async with (
            aiohttp.ClientSession() as session,
            grpc.aio.insecure_channel(f"127.0.0.1:{built.port}") as channel,
        ):
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(3):
                async with session.get(f"http://127.0.0.1:{built.http.port}/v2/health/live"):
                    pass
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ServerLive(service_pb2.ServerLiveRequest())
                seen.append({k: v[1] for k, v in interceptor._wrapped.items() if k[0] == live})
    finally:
        await built.http.stop()
        await built.server.stop(0)
    assert len(seen[0]) == 2
    assert seen[0] == seen[1] == seen[2]
