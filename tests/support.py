"""Helpers the tests share: in-process services on port 0 and error decoding."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc

from modelserve_runtime.channels import create_channel
from modelserve_runtime.server import GrpcServer, ServiceApp

S = TypeVar("S")


@asynccontextmanager
async def running(
    build: Callable[[S], Awaitable[tuple[GrpcServer, Any]]], settings: S
) -> AsyncIterator[tuple[GrpcServer, grpc.aio.Channel, ServiceApp]]:
    """Builds and starts a service in this process; yields it, a channel to it, and its app."""
    grpc_server, app = await build(settings)
    await grpc_server.server.start()
    await app.check_ready()
    await grpc_server.set_serving(True)
    channel = create_channel(f"127.0.0.1:{grpc_server.port}")
    try:
        yield grpc_server, channel, app
    finally:
        await channel.close()
        await grpc_server.server.stop(0)
        await app.close()
