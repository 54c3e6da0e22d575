"""A model that hangs, on both of the router's model paths: the model call gives up after
`inference_timeout_s`, counted for each request from when it queued for the call (behind a
coalesced call in flight), and the deployment's fallback chain answers within the caller's
deadline, as for any other failure of the model."""

from __future__ import annotations

import asyncio

import pytest
from router_testing import (
    WAIT_S,
    Dependencies,
    deploy,
    register_copy,
    request,
    router,
    slow_in_triton,
)

from modelserve.inference.v1 import inference_service_pb2 as inference_pb

pytestmark = pytest.mark.triton

#: How long Triton holds each request of the hung version: longer than anything below.
HANG_S = 5.0
TIMEOUT_S = 0.6
#: The callers' deadline: one model timeout and a margin, less than two timeouts.
CALLER_S = 1.1
CALLERS = 6


@pytest.fixture(scope="module")
async def hung(dependencies: Dependencies) -> str:
    """A copy of the demo model, READY in inference, that no other test routes to."""
    version = await register_copy(dependencies, "fraud-hang")
    loaded = await dependencies.inference.LoadModelVersion(
        inference_pb.LoadModelVersionRequest(name=version), timeout=WAIT_S
    )
    assert loaded.model_version.state == inference_pb.MODEL_VERSION_STATE_READY
    return version


class TestAHungModel:
    @pytest.mark.parametrize(
        ("model_runner", "coalesce", "reason"),
        [
            # Coalesced, the first caller's call goes out and the other five queue behind
            # it; each request's time runs from when it queued, so the router's own clock
            # ends every one of them first.
            ("triton", True, "UPSTREAM_TIMEOUT"),
            ("service", True, "UPSTREAM_TIMEOUT"),
            # Each request its own call: the HTTP client's timeout to Triton, or gRPC's
            # deadline on the call to inference.
            ("triton", False, "TRITON_UNAVAILABLE"),
            ("service", False, "UPSTREAM_TIMEOUT"),
        ],
    )
    async def test_the_fallback_answers_every_caller_within_its_deadline(
        self,
        dependencies: Dependencies,
        hung: str,
        model_runner: str,
        coalesce: bool,
        reason: str,
    ) -> None:
        """Triton holds the version's requests. Every caller gets the declared default
        outputs (degraded, the reason naming the timeout) before its deadline, which is
        shorter than two model timeouts: one for a call in flight and one for a call queued
        behind it. Through inference as directly to Triton: a hop that runs out of its own
        time is UNAVAILABLE, never DEADLINE_EXCEEDED, which would skip the fallbacks."""
        deps = dependencies
        endpoint = f"hang-{model_runner}-{coalesce}".lower()
        await deploy(deps, endpoint, hung)
        async with (
            slow_in_triton(deps, hung, queue_delay_us=int(HANG_S * 1e6)),
            router(
                deps,
                model_runner=model_runner,
                coalesce=coalesce,
                inference_timeout_s=TIMEOUT_S,
            ) as (stub, _),
        ):
            answers = await asyncio.gather(
                *(
                    stub.Predict(request(endpoint, f"c-{1001 + i}"), timeout=CALLER_S)
                    for i in range(CALLERS)
                )
            )
        for answer in answers:
            assert (answer.degraded, answer.route_reason, answer.model_version) == (
                True,
                "default_output",
                "",
            ), answer
            assert answer.degraded_reason.endswith("answered by the declared default outputs")
        reasons = {a.degraded_reason.split(";")[0] for a in answers}
        assert reasons == {f"{hung} failed: {reason}"}
