"""Bidirectional streams of requests, each answered as its unary RPC would answer it.

Triton's `ModelStreamInfer` (on the inference facade and the router) and the router's
`PredictStream` take many requests down one call and answer each as soon as it is ready:
several at once, within a bound, so that one slow request does not hold up the others and a
stream cannot run more work than its bound. A request that fails is answered with its error
and the stream goes on.

Each request is traced on its own: a new trace per request whose root span links to the
stream's span, as Triton traces each request of its own streams. Under the stream's span a
stream that lives for hours would make one trace of millions of spans, and the trace id
answered with a request would find every other request's spans too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace

from modelserve_runtime.errors import ModelServeError
from modelserve_runtime.tracing import tracer

log = structlog.get_logger()

Request = TypeVar("Request")
Response = TypeVar("Response")

#: Requests of one stream answered at once; the stream's next request is read when one ends.
STREAM_IN_FLIGHT = 64


@dataclass(frozen=True, slots=True)
class _Ended:
    """The caller's side of the stream closed (`error` None) or failed."""

    error: BaseException | None = None


async def answer_each(
    requests: AsyncIterator[Request],
    answer: Callable[[Request], Awaitable[Response]],
    failed: Callable[[Request, ModelServeError | None], Response],
    *,
    max_in_flight: int = STREAM_IN_FLIGHT,
    span_name: str = "stream.request",
) -> AsyncIterator[Response]:
    """Yields `answer(request)` for each of `requests`, up to `max_in_flight` at once, each
    as soon as it is ready. A request whose answer raises a ModelServeError is answered with
    `failed(request, error)`; one that raises anything else with `failed(request, None)`
    (logged: an internal error, whose details stay here). Ends once the caller has closed
    its side and every answer is sent; a caller's side that fails (or a cancelled call)
    ends it at once, cancelling the answers still running. Each answer runs in a trace of its
    own, under a root span `span_name` linked to the stream's span."""
    ready: asyncio.Queue[Response | _Ended] = asyncio.Queue()
    slots = asyncio.Semaphore(max_in_flight)
    running: set[asyncio.Task[None]] = set()
    started = 0

    stream = trace.get_current_span().get_span_context()
    links = [trace.Link(stream)] if stream.is_valid else []

    async def one(request: Request) -> None:
        try:
            with tracer().start_as_current_span(
                span_name,
                context=otel_context.Context(),  # no parent: a trace of its own
                kind=trace.SpanKind.SERVER,
                links=links,
            ):
                response = await answer(request)
        except ModelServeError as exc:
            response = failed(request, exc)
        except Exception:
            log.exception("stream_request_failed")
            response = failed(request, None)
        finally:
            slots.release()
        ready.put_nowait(response)

    async def read() -> None:
        nonlocal started
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(one(request), name="stream-request")
                running.add(task)
                task.add_done_callback(running.discard)
                started += 1
        except BaseException as exc:  # the caller's side failed, or the call was cancelled
            ready.put_nowait(_Ended(exc))
            raise
        ready.put_nowait(_Ended())

    reader = asyncio.create_task(read(), name="stream-reader")
    sent = 0
    ended = False
    try:
        # `started` is final once the reader has ended; every request started is answered.
        while not (ended and sent == started):
            item = await ready.get()
            if isinstance(item, _Ended):
                if item.error is not None:
                    raise item.error
                ended = True
            else:
                sent += 1
                yield item
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, *running, return_exceptions=True)
