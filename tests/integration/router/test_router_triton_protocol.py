"""The router's direct path over each of Triton's endpoints (`TRITON_PROTOCOL`): HTTP by
default, gRPC on request; the same answers either way."""

from __future__ import annotations

import numpy as np
import pytest
from router_testing import V1, Dependencies, deploy, probabilities, request, router

from modelserve_triton.http import TritonHttpRunner
from modelserve_triton.runner import TritonRunner

pytestmark = pytest.mark.triton


async def test_both_protocols_answer_alike(dependencies: Dependencies) -> None:
    """The same requests get the same answers with TRITON_PROTOCOL http and grpc, and the
    router's Triton client is the one the setting names."""
    await deploy(dependencies, "protocols", V1)
    asks = [request("protocols", customer=f"c-{1001 + i}", amount=10.0 + 7.0 * i) for i in range(5)]
    answers = {}
    clients = {}
    for protocol in ("http", "grpc"):
        async with router(dependencies, triton_protocol=protocol) as (stub, app):
            answers[protocol] = [probabilities(await stub.Predict(ask)) for ask in asks]
            assert app.direct is not None
            clients[protocol] = {type(c) for c in app.direct._runners.values()}

    assert clients == {"http": {TritonHttpRunner}, "grpc": {TritonRunner}}
    for over_http, over_grpc in zip(answers["http"], answers["grpc"], strict=True):
        np.testing.assert_allclose(over_http, over_grpc, rtol=0, atol=1e-6)
