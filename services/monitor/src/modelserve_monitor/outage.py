"""A Redis failure inside a MonitorService call answers UNAVAILABLE, not INTERNAL.

Every figure the monitor answers with is read from Redis, so while Redis is down (or a
Sentinel failover is under way) a call can only fail; the caller should retry, and the log
should not fill with tracebacks. Runs inside the error interceptor, which maps the
UnavailableError raised here to its status.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import redis.asyncio as redis

from modelserve_runtime.errors import UnavailableError


@asynccontextmanager
async def _redis_outage() -> AsyncIterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise UnavailableError(f"redis: {exc}", reason="REDIS_UNAVAILABLE") from exc


class RedisOutageInterceptor(grpc.aio.ServerInterceptor):
    """Turns `redis.RedisError` escaping a unary or server-streaming handler into
    UnavailableError (`REDIS_UNAVAILABLE`); other handlers pass through unchanged."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        if not handler.response_streaming:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async with _redis_outage():
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        streaming = handler.unary_stream
        if not inspect.isasyncgenfunction(streaming):
            # A handler that writes with context.write (the health service's Watch).
            return handler

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with _redis_outage():
                async for response in streaming(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
