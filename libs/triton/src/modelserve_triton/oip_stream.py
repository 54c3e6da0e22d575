"""`ModelStreamInfer`, Triton's bidirectional stream of the Open Inference Protocol, answered
by a service's own ModelInfer.

tritonclient's `start_stream` / `async_stream_infer` (and its aio `stream_infer`) send
requests down one stream and match each answer to its request by `id`. Each request is
answered as a ModelInfer call would answer it, several at once, as each is ready (not
necessarily in order). A request that fails does not end the stream: its answer carries
`error_message` ("[request id: 7] CODE: message", the status ModelInfer would have ended
with) and the request's id, as Triton's own stream does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from tritonclient.grpc import service_pb2

from modelserve_runtime.errors import ModelServeError

log = structlog.get_logger()

#: Requests of one stream answered at once; the stream's next request is read when one ends.
STREAM_IN_FLIGHT = 64


@dataclass(frozen=True, slots=True)
class _Ended:
    """The caller's side of the stream closed (`error` None) or failed."""

    error: BaseException | None = None


def error_response(request: Any, message: str) -> Any:
    """The stream's answer to `request` when it failed with `message`: prefixed with the
    request's id as Triton does (`[request id: 7] ...`), since tritonclient hands a stream's
    error to the caller as a message only."""
    if request.id:
        message = f"[request id: {request.id}] {message}"
    return service_pb2.ModelStreamInferResponse(
        error_message=message,
        infer_response=service_pb2.ModelInferResponse(
            id=request.id, model_name=request.model_name, model_version=request.model_version
        ),
    )


async def stream_infer(
    requests: AsyncIterator[Any],
    answer: Callable[[Any], Awaitable[Any]],
    *,
    max_in_flight: int = STREAM_IN_FLIGHT,
) -> AsyncIterator[Any]:
    """Yields a `ModelStreamInferResponse` for each request of `requests`, as `answer` (the
    service's ModelInfer) gives it, up to `max_in_flight` at once. Ends once the caller has
    closed its side and every answer is sent; a caller's side that fails (or a cancelled
    call) ends it at once, cancelling the answers still running."""
    ready: asyncio.Queue[Any] = asyncio.Queue()
    slots = asyncio.Semaphore(max_in_flight)
    running: set[asyncio.Task[None]] = set()
    started = 0

    async def one(request: Any) -> None:
        try:
            response = service_pb2.ModelStreamInferResponse(infer_response=await answer(request))
        except ModelServeError as exc:
            response = error_response(request, f"{exc.code.name}: {exc.message}")
        except Exception:
            log.exception("stream_request_failed", model=request.model_name, id=request.id)
            response = error_response(request, "INTERNAL: internal error")
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
