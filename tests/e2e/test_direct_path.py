"""The router's default data path: features straight from Redis, inference straight to Triton."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
from otlp_receiver import OtlpReceiver
from support import eventually, expected_probabilities

from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_cli.demo import DemoDeployment, demo_request, deploy_demo
from modelserve_cli.stack import Stack, StackOptions
from modelserve_runtime.channels import create_channel


@pytest.fixture(scope="module")
async def direct(
    otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Stack, DemoDeployment]]:
    """A stack with the router's default settings and the demo model deployed."""
    stack = Stack(
        StackOptions(
            run_dir=tmp_path_factory.mktemp("direct"),
            otlp_endpoint=otlp.grpc_endpoint,
            triton_trace_endpoint=otlp.http_endpoint,
        )
    )
    await stack.start()
    try:
        yield stack, await deploy_demo(stack.targets)
    finally:
        await stack.stop()


class TestDirectPath:
    async def test_answer_and_trace(
        self, direct: tuple[Stack, DemoDeployment], otlp: OtlpReceiver
    ) -> None:
        """The direct path answers like onnxruntime, and Triton's spans hang under the router's
        triton.infer span (a call to Triton's HTTP endpoint) with no feature or inference hop
        in between."""
        stack, demo = direct
        request = demo_request("c-1011", 777.0)
        async with create_channel(stack.targets["router"]) as channel:
            router = router_grpc.RouterServiceStub(channel)
            # The first request also asks inference where the version is served.
            await router.Predict(request)
            response = await router.Predict(request)
        probabilities = next(o for o in response.outputs if o.name == "probabilities")
        np.testing.assert_allclose(
            np.asarray(probabilities.contents.fp32_contents),
            expected_probabilities(demo, request),
            atol=1e-5,
        )

        # As in test_predict: the first of this Predict and those sent while waiting whose
        # trace is complete is checked (Triton leaves an odd request's spans unexported).
        traces = [response.trace_id]

        def linked(trace_id: str) -> bool:
            spans = otlp.trace(trace_id)
            client = {
                s.span_id for s in spans if s.name == "triton.infer" and s.service == "router"
            }
            return any(s.service == "triton" and s.parent_span_id in client for s in spans)

        async with create_channel(stack.targets["router"]) as channel:
            router = router_grpc.RouterServiceStub(channel)

            async def another() -> None:
                traces.append((await router.Predict(demo_request("c-1012", 5.0))).trace_id)

            await eventually(
                lambda: any(linked(t) for t in traces),
                "a Triton span under the router's triton.infer span",
                nudge=another,
                explain=lambda: otlp.describe(response.trace_id, stack.triton_log_path),
            )
        trace_id = next(t for t in traces if linked(t))
        assert {s.service for s in otlp.trace(trace_id)} == {"router", "triton"}
        # The router called Triton's HTTP endpoint, its default (TRITON_PROTOCOL=http).
        (client,) = [s for s in otlp.trace(trace_id) if s.name == "triton.infer"]
        assert ("rpc.system", "http") in client.attributes
