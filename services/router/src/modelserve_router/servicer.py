"""RouterService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from modelserve.router.v1 import router_service_pb2 as pb
from modelserve.router.v1 import router_service_pb2_grpc as pb_grpc
from modelserve_router.predict import PredictionInput, Predictor, request_budget
from modelserve_runtime.auth import current_principal
from modelserve_runtime.convert import numpy_to_tensor, value_from_proto
from modelserve_runtime.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ModelServeError,
)
from modelserve_runtime.streams import answer_each

#: The ErrorInfo domain of the router's errors.
DOMAIN = "router.modelserve"


class RouterServicer(pb_grpc.RouterServiceServicer):
    """Translates RouterService calls to the Predictor."""

    def __init__(self, predictor: Predictor, *, default_timeout_s: float) -> None:
        self._predictor = predictor
        self._default_timeout_s = default_timeout_s

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
        return await self._predict(request, context, streamed=False)

    async def PredictStream(
        self,
        request_iterator: AsyncIterator[pb.PredictStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        async def answer(item: pb.PredictStreamRequest) -> pb.PredictStreamResponse:
            request = item.request
            # The id names the answer, so a request without one gets it here, not deeper.
            if not request.request_id:
                request.request_id = uuid.uuid4().hex
            response = await self._predict(request, context, streamed=True)
            return pb.PredictStreamResponse(request_id=response.request_id, response=response)

        async for response in answer_each(
            request_iterator,
            answer,
            _failed,
            span_name="modelserve.router.v1.RouterService/PredictStream request",
        ):
            yield response

    async def _predict(
        self,
        request: pb.PredictRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        streamed: bool,
    ) -> pb.PredictResponse:
        """One Predict within its budget (`request_budget`)."""
        prediction = PredictionInput(
            endpoint=request.endpoint,
            entities=dict(request.entities),
            features={k: value_from_proto(v) for k, v in request.features.items()},
            event_time=(
                request.context.event_time.ToDatetime(tzinfo=None)
                if request.context.HasField("event_time")
                else None
            ),
            user_agent=request.context.user_agent,
            query=request.context.query,
            request_id=request.request_id,
            user_id=request.user_id,
            principal=current_principal(),
        )
        budget = request_budget(
            context.time_remaining(), self._default_timeout_s, streamed=streamed
        )
        try:
            async with asyncio.timeout(budget):
                result = await self._predictor.predict(prediction)
        except TimeoutError:
            raise DeadlineExceededError(
                f"prediction did not finish within {budget:.3f}s",
                metadata={"budget_s": f"{budget:.3f}"},
            ) from None
        return pb.PredictResponse(
            outputs=[numpy_to_tensor(name, array) for name, array in result.outputs.items()],
            model_version=result.model_version,
            request_id=result.request_id,
            route_reason=result.route_reason,
            trace_id=result.trace_id,
            degraded=result.degraded,
            degraded_reason=result.degraded_reason,
        )


def _failed(
    item: pb.PredictStreamRequest, error: ModelServeError | None
) -> pb.PredictStreamResponse:
    """A stream's answer to a request that failed, with what a failed Predict's status
    carries (an unexpected error: INTERNAL with a fixed message, as Predict's)."""
    if error is None:
        failure = pb.PredictError(
            code=grpc.StatusCode.INTERNAL.value[0], message="internal error", domain=DOMAIN
        )
    else:
        failure = pb.PredictError(
            code=error.code.value[0],
            message=error.message,
            reason=error.reason,
            domain=DOMAIN,
            metadata=error.metadata,
            field_violations=[
                pb.FieldViolation(field=v.field, description=v.description)
                for v in (error.violations if isinstance(error, InvalidArgumentError) else ())
            ],
        )
        if error.retry_delay_s is not None:
            failure.retry_delay.FromNanoseconds(max(0, round(error.retry_delay_s * 1e9)))
    return pb.PredictStreamResponse(request_id=item.request.request_id, error=failure)
