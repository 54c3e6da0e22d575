"""A slow shadow version (its Triton model made slow for real) changes neither the primary's
answers nor its latency: shadow copies run beside the caller's request, never in its way;
a copy held past the shadow deadline is logged as DEADLINE_EXCEEDED."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
from router_testing import (
    V1,
    WAIT_S,
    Dependencies,
    deploy,
    probabilities,
    records,
    register_copy,
    request,
    router,
    slow_in_triton,
)

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.type.v1 import prediction_record_pb2

pytestmark = pytest.mark.triton

#: How long Triton holds each request to the shadow's model.
SHADOW_DELAY_S = 1.0
#: Requests timed per endpoint.
CALLS = 20


class TestSlowShadow:
    async def test_slow_shadow_leaves_the_primary_alone(self, dependencies: Dependencies) -> None:
        """With a shadow that Triton holds for a second per request, every primary answer is
        the one given without the shadow and arrives well within half that second, its
        latencies stay within a generous bound of those without the shadow, and every
        shadow copy still completes, logged as slower than any primary call."""
        deps = dependencies
        slow = await register_copy(deps, "fraud-slow")
        loaded = await deps.inference.LoadModelVersion(
            inference_pb.LoadModelVersionRequest(name=slow), timeout=WAIT_S
        )
        assert loaded.model_version.state == inference_pb.MODEL_VERSION_STATE_READY
        await deploy(deps, "shadow-none", V1)
        await deploy(deps, "shadow-slow", V1, shadow=[slow])
        calls = [(f"c-{1001 + i % 20}", 10.0 + i) for i in range(CALLS)]

        async def timed(endpoint: str) -> tuple[list[router_pb.PredictResponse], list[float]]:
            answers, seconds = [], []
            for customer, amount in calls:
                started = time.perf_counter()
                answers.append(await stub.Predict(request(endpoint, customer, amount)))
                seconds.append(time.perf_counter() - started)
            return answers, seconds

        try:
            async with (
                slow_in_triton(deps, slow, queue_delay_us=int(SHADOW_DELAY_S * 1e6)),
                router(deps, shadow_timeout_s=10 * SHADOW_DELAY_S) as (stub, app),
            ):
                for endpoint in ("shadow-none", "shadow-slow"):
                    await stub.Predict(request(endpoint))
                await app.shadows.idle()
                alone, alone_s = await timed("shadow-none")
                shadowed, shadowed_s = await timed("shadow-slow")
                copies_in_flight = app.shadows.in_flight
                await app.shadows.idle()
                await app.prediction_log.flush()
                logged = [await records(deps, a.request_id) for a in shadowed]
        finally:
            await deps.inference.UnloadModelVersion(
                inference_pb.UnloadModelVersionRequest(name=slow), timeout=WAIT_S
            )
        for plain, with_shadow in zip(alone, shadowed, strict=True):
            assert (with_shadow.model_version, with_shadow.degraded) == (V1, False)
            np.testing.assert_array_equal(probabilities(with_shadow), probabilities(plain))
        assert max(shadowed_s) < SHADOW_DELAY_S / 2
        assert statistics.median(shadowed_s) < 3 * statistics.median(alone_s) + 0.05
        # The copies were still held in Triton when the last primary answer had arrived.
        assert copies_in_flight > 0
        copies = [r for found in logged for r in found if r.shadow]
        assert len(copies) == CALLS
        assert {(r.model_version, r.status) for r in copies} == {
            (slow, prediction_record_pb2.PREDICTION_STATUS_OK)
        }
        assert min(r.latency_us for r in copies) / 1e6 > max(shadowed_s)

    async def test_shadow_past_its_deadline_is_logged_not_felt(
        self, dependencies: Dependencies
    ) -> None:
        """A shadow copy that Triton holds past the shadow deadline is logged as a
        DEADLINE_EXCEEDED shadow record, while the caller has had the primary's answer."""
        deps = dependencies
        overdue = await register_copy(deps, "fraud-overdue")
        loaded = await deps.inference.LoadModelVersion(
            inference_pb.LoadModelVersionRequest(name=overdue), timeout=WAIT_S
        )
        assert loaded.model_version.state == inference_pb.MODEL_VERSION_STATE_READY
        await deploy(deps, "shadow-overdue", V1, shadow=[overdue])
        try:
            async with (
                slow_in_triton(deps, overdue, queue_delay_us=int(SHADOW_DELAY_S * 1e6)),
                router(deps, shadow_timeout_s=SHADOW_DELAY_S / 5) as (stub, app),
            ):
                response = await stub.Predict(request("shadow-overdue"))
                await app.shadows.idle()
                await app.prediction_log.flush()
                logged = await records(deps, response.request_id)
        finally:
            await deps.inference.UnloadModelVersion(
                inference_pb.UnloadModelVersionRequest(name=overdue), timeout=WAIT_S
            )
        assert (response.model_version, response.degraded) == (V1, False)
        assert sorted((r.model_version, r.shadow, r.error_code) for r in logged) == sorted(
            [(V1, False, ""), (overdue, True, "DEADLINE_EXCEEDED")]
        )
