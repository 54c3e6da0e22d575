"""`ModelStreamInfer`, Triton's bidirectional stream of the Open Inference Protocol, answered
by a service's own ModelInfer.

tritonclient's `start_stream` / `async_stream_infer` (and its aio `stream_infer`) send
requests down one stream and match each answer to its request by `id`. Each request is
answered as a ModelInfer call would answer it, several at once, as each is ready (not
necessarily in order; `modelserve_runtime.streams`). A request that fails does not end the
stream: its answer carries `error_message` ("[request id: 7] CODE: message", the status
ModelInfer would have ended with) and the request's id, as Triton's own stream does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from modelserve_runtime.errors import ModelServeError
from modelserve_runtime.streams import STREAM_IN_FLIGHT, answer_each


def _error_response(request: Any, message: str) -> Any:
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


def _failed(request: Any, error: ModelServeError | None) -> Any:
    if error is None:
        return _error_response(request, "INTERNAL: internal error")
    return _error_response(request, f"{error.code.name}: {error.message}")


def stream_infer(
    requests: AsyncIterator[Any],
    answer: Callable[[Any], Awaitable[Any]],
    *,
    max_in_flight: int = STREAM_IN_FLIGHT,
) -> AsyncIterator[Any]:
    """A `ModelStreamInferResponse` for each request of `requests`, as `answer` (the
    service's ModelInfer) gives it, up to `max_in_flight` at once (see `answer_each`)."""

    async def answered(request: Any) -> Any:
        return service_pb2.ModelStreamInferResponse(infer_response=await answer(request))

    return answer_each(
        requests,
        answered,
        _failed,
        max_in_flight=max_in_flight,
        span_name="inference.GRPCInferenceService/ModelStreamInfer request",
    )


class ModelInferCalls:
    """`ModelInfer` and `ModelStreamInfer` of an Open Inference Protocol servicer, both over
    its `_infer(request, context, streamed)`: a stream's requests are each answered as
    ModelInfer answers them; `streamed` says that the call's deadline is the stream's, not
    the request's own."""

    async def _infer(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any], streamed: bool
    ) -> Any:
        raise NotImplementedError

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await self._infer(request, context, False)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async def answer(request: Any) -> Any:
            return await self._infer(request, context, True)

        async for response in stream_infer(request_iterator, answer):
            yield response
