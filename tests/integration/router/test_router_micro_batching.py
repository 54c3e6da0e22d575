"""Micro-batching on a real Triton: concurrent Predicts for one version reach Triton as fewer,
batched requests, and every caller gets the answer it gets alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from router_testing import (
    V1,
    Dependencies,
    deploy,
    probabilities,
    request,
    router,
    triton_requests_after,
)

pytestmark = pytest.mark.triton

CALLERS = 48


class TestCoalescing:
    @pytest.mark.parametrize(
        "budget",
        [
            {"coalesce_budget_ms": 50},
            {"endpoints": {"coalesced": {"coalesce_budget_ms": 50}}},
        ],
        ids=["router-wide-budget", "endpoint-budget"],
    )
    async def test_concurrent_calls_share_triton_requests_and_keep_their_answers(
        self, dependencies: Dependencies, budget: dict[str, object]
    ) -> None:
        await deploy(dependencies, "coalesced", V1)
        asks = [
            request("coalesced", customer=f"c-{1001 + i % 20}", amount=20.0 + 13.0 * i)
            for i in range(CALLERS)
        ]
        # A budget makes the first caller wait for company: how many ride together would
        # otherwise depend on how the callers' arrivals interleave on a busy machine.
        async with router(dependencies, coalesce=True, **budget) as (stub, _app):
            alone = [probabilities(await stub.Predict(ask)) for ask in asks]

            async def marker() -> None:
                await stub.Predict(asks[0])

            before = await triton_requests_after(dependencies, V1, marker)
            together = await asyncio.gather(*(stub.Predict(ask) for ask in asks))
            after = await triton_requests_after(dependencies, V1, marker)
        for ask, answer, expected in zip(asks, together, alone, strict=True):
            assert answer.model_version == V1
            np.testing.assert_allclose(probabilities(answer), expected, atol=1e-6), ask
        sent = after - before - 1  # the second marker is one request of its own
        assert 1 <= sent < CALLERS, f"{CALLERS} concurrent Predicts became {sent} Triton requests"
