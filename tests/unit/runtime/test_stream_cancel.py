"""A streaming call the caller cancels ends inside its own call scope: the servicer's stream
is closed at once, in the call's context (its cleanup sees the call's request id), the call is
logged once as CANCELLED, and nothing is left for the event loop to report. Before, the
interceptor's wrapper was an async generator that gRPC abandoned on cancellation; Python
closed it later from another task, where restoring the call's context variables raised
(`Task exception was never retrieved`), and the servicer's own stream was never closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import structlog
from pydantic_settings import SettingsConfigDict
from support import eventually

from modelserve.router.v1 import router_service_pb2 as pb
from modelserve.router.v1 import router_service_pb2_grpc as pb_grpc
from modelserve_runtime.channels import create_channel
from modelserve_runtime.config import ServiceSettings
from modelserve_runtime.server import build_grpc_server

METHOD = "/modelserve.router.v1.RouterService/PredictStream"


class _Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELSERVE_STREAMTEST_")


#: Big enough that a few answers fill the connection's flow-control window.
PADDING = "x" * 256 * 1024


class _Endless(pb_grpc.RouterServiceServicer):
    """Answers the first request of a stream, then (`flood`) answers on and on, faster than
    a caller that stopped reading takes them, or waits; notes the context its stream was
    closed in."""

    def __init__(self) -> None:
        self.closed_in: list[dict[str, Any]] = []
        self.flood = False

    async def PredictStream(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        try:
            async for item in request_iterator:
                yield pb.PredictStreamResponse(request_id=item.request.request_id)
                while self.flood:  # cancelled while gRPC waits to send one of these
                    yield pb.PredictStreamResponse(request_id=PADDING)
            await asyncio.Event().wait()  # the caller's side is closed; wait to be cancelled
        finally:
            self.closed_in.append(structlog.contextvars.get_contextvars())


@pytest.fixture
async def served() -> AsyncIterator[tuple[_Endless, pb_grpc.RouterServiceAsyncStub]]:
    servicer = _Endless()

    def register(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_RouterServiceServicer_to_server(servicer, server)
        return [pb.DESCRIPTOR.services_by_name["RouterService"].full_name]

    grpc_server = build_grpc_server("streamtest", _Settings(), register)
    await grpc_server.server.start()
    channel = create_channel(f"127.0.0.1:{grpc_server.port}")
    try:
        yield servicer, pb_grpc.RouterServiceStub(channel)
    finally:
        await channel.close()
        await grpc_server.server.stop(0)


@pytest.mark.parametrize("flood", [False, True], ids=["waiting", "sending"])
async def test_a_cancelled_stream_ends_in_its_own_scope(
    served: tuple[_Endless, pb_grpc.RouterServiceAsyncStub], flood: bool
) -> None:
    """Cancelled while the servicer waits, or while gRPC waits to send its answer."""
    servicer, stub = served
    servicer.flood = flood
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        with structlog.testing.capture_logs() as logs:
            for n in range(3):
                call = stub.PredictStream(
                    iter([pb.PredictStreamRequest(request=pb.PredictRequest(request_id=f"r{n}"))]),
                    metadata=(("x-request-id", f"call-{n}"),),
                    timeout=30,
                )
                first = await call.read()
                assert isinstance(first, pb.PredictStreamResponse)
                assert first.request_id == f"r{n}"
                call.cancel()
            await eventually(
                lambda: len(servicer.closed_in) == 3, "every cancelled stream closed by the server"
            )
            await eventually(
                lambda: len([e for e in logs if e["event"] == "rpc"]) == 3,
                "one rpc line per cancelled call",
            )
    finally:
        loop.set_exception_handler(previous)
    assert [c.get("request_id") for c in servicer.closed_in] == ["call-0", "call-1", "call-2"]
    assert {c.get("rpc") for c in servicer.closed_in} == {METHOD}
    lines = [e for e in logs if e["event"] == "rpc"]
    assert [(e["method"], e["code"]) for e in lines] == [(METHOD, "CANCELLED")] * 3
    assert reported == []
