"""Keepalive between the project's channels and servers: a client that pings while it holds a
quiet stream (as the router and inference do on WatchDeployments) is not sent GOAWAY for it.

gRPC servers accept a ping only every 5 minutes by default and close the connection ("too many
pings") after a few faster ones, failing the stream and every call beside it. The servers built
by build_grpc_server accept pings as often as `server.min_ping_interval_ms`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.channels import create_channel
from modelserve_runtime.config import ServerSettings, ServiceSettings
from modelserve_runtime.server import GrpcServer, build_grpc_server

#: The client's ping interval in these tests, and how long its stream stays quiet: long enough
#: for four pings, one more than gRPC's default policy lets through before GOAWAY.
KEEPALIVE_MS = 1000
QUIET_S = 4.5


class _Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELSERVE_KEEPALIVETEST_")


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    settings = _Settings(server=ServerSettings(min_ping_interval_ms=KEEPALIVE_MS // 2))
    built = build_grpc_server("keepalivetest", settings, lambda _: [])
    await built.server.start()
    yield built
    await built.server.stop(0)


async def test_a_quiet_stream_with_keepalive_pings_survives(server: GrpcServer) -> None:
    """A health Watch stream stays open and silent through several client pings; afterwards
    a unary call on the same channel succeeds and the stream is still open (nothing to read
    and no error)."""
    target = f"127.0.0.1:{server.port}"
    async with create_channel(target, keepalive_ms=KEEPALIVE_MS, default_timeout_s=30) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(QUIET_S)

        checked = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)

        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        # A closed stream would raise AioRpcError (UNAVAILABLE) here instead of waiting.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(watch.read(), 0.3)
