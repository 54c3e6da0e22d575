"""RouterService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from modelserve.router.v1 import router_service_pb2 as pb
from modelserve.router.v1 import router_service_pb2_grpc as pb_grpc
from modelserve_router.predict import PredictionInput, Predictor
from modelserve_runtime.auth import current_principal
from modelserve_runtime.convert import numpy_to_tensor, value_from_proto
from modelserve_runtime.errors import DeadlineExceededError


class RouterServicer(pb_grpc.RouterServiceServicer):
    """Translates RouterService calls to the Predictor."""

    def __init__(self, predictor: Predictor, *, default_timeout_s: float) -> None:
        self._predictor = predictor
        self._default_timeout_s = default_timeout_s

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
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
        remaining = context.time_remaining()
        budget = self._default_timeout_s if remaining is None else min(remaining, 3600.0)
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
