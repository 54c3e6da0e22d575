"""Triton killed under the router: while inference notices, restarts Triton and loads the
deployed version again, every request is answered, by the deployment's declared default
outputs and marked degraded; then the model answers again, without anyone calling anything.

Last of the e2e files on purpose: the stack's Triton is a new process after it.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pytest
from stack_router import stack_router_settings
from support import eventually, running

from modelserve.monitor.v1 import monitor_service_pb2 as monitor_pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as monitor_grpc
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_cli.demo import DemoDeployment, demo_request
from modelserve_cli.stack import Stack
from modelserve_router.server import build_server
from modelserve_runtime.channels import create_channel
from modelserve_runtime.prediction_log import DEFAULT_STREAM

pytestmark = pytest.mark.triton

ENDPOINT = "fraud-outage"
#: Triton's restart and the model's reload and warmup, on a busy two-core machine.
RECOVERY_S = 180.0


def _tritonserver(stack: Stack) -> psutil.Process:
    """The tritonserver that the stack's inference service runs."""
    inference = psutil.Process(stack.processes["inference"].pid)
    found = [p for p in inference.children(recursive=True) if p.name() == "tritonserver"]
    assert len(found) == 1, found
    return found[0]


def _probabilities(response: router_pb.PredictResponse) -> list[float]:
    return list(
        next(o for o in response.outputs if o.name == "probabilities").contents.fp32_contents
    )


class TestTritonKilled:
    async def test_degraded_answers_then_the_model_again(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        default = tensor_pb2.Tensor(
            name="probabilities",
            datatype=tensor_pb2.DATA_TYPE_FP32,
            shape=[1, 2],
            contents=tensor_pb2.TensorContents(fp32_contents=[0.5, 0.5]),
        )
        async with create_channel(stack.targets["registry"], default_timeout_s=60) as channel:
            await registry_grpc.RegistryServiceStub(channel).UpdateDeployment(
                registry_pb.UpdateDeploymentRequest(
                    deployment=registry_pb.Deployment(
                        name=f"deployments/{ENDPOINT}",
                        traffic=[
                            registry_pb.TrafficTarget(model_version=demo.model_version, percent=100)
                        ],
                        default_outputs=[default],
                    ),
                    allow_missing=True,
                )
            )
        settings = stack_router_settings(
            stack,
            # The stack's own prediction log, which its monitor counts.
            DEFAULT_STREAM,
            # Probe the version again soon after it failed, so recovery shows quickly.
            circuit_breaker={"failure_threshold": 3, "cool_down_s": 0.5},
        )
        request = demo_request("c-1002", 75.0)
        request.endpoint = ENDPOINT
        async with running(build_server, settings) as (_, router_channel, _):
            stub = router_grpc.RouterServiceStub(router_channel)
            before = await stub.Predict(request)
            assert (before.model_version, before.degraded) == (demo.model_version, False)
            killed = _tritonserver(stack)
            os.kill(killed.pid, signal.SIGKILL)
            answers: list[router_pb.PredictResponse] = []

            async def answered_again() -> bool:
                # A request that fails fails the test: every one must be answered.
                answer = await stub.Predict(request)
                answers.append(answer)
                return any(a.degraded for a in answers) and not answer.degraded

            await eventually(
                answered_again,
                "degraded answers while Triton is away, then the model's again",
                within_s=RECOVERY_S,
                every_s=0.05,
            )
        degraded = [a for a in answers if a.degraded]
        assert {a.route_reason for a in degraded} == {"default_output"}, degraded[:3]
        assert all(a.degraded_reason.startswith(demo.model_version) for a in degraded)
        assert all(_probabilities(a) == [0.5, 0.5] for a in degraded)
        after = answers[-1]
        assert (after.model_version, after.route_reason) == (demo.model_version, "single_target")
        np.testing.assert_allclose(_probabilities(after), _probabilities(before), rtol=1e-6)
        assert _tritonserver(stack).pid != killed.pid
        # The monitor charges every request to the version it was routed to, the degraded
        # answers included, though no version answered them: the figures a rollout gate reads.
        async with create_channel(stack.targets["monitor"]) as channel:
            monitor = monitor_grpc.MonitorServiceStub(channel)

            async def counted() -> bool:
                stats = await monitor.GetEndpointStats(
                    monitor_pb.GetEndpointStatsRequest(endpoint=ENDPOINT)
                )
                figures = {v.model_version: v for v in stats.versions}
                mine = figures.get(demo.model_version)
                return mine is not None and mine.request_count == len(answers) + 1

            await eventually(counted, "every request counted by the monitor", within_s=60)
            stats = await monitor.GetEndpointStats(
                monitor_pb.GetEndpointStatsRequest(endpoint=ENDPOINT)
            )
        assert [v.model_version for v in stats.versions] == [demo.model_version]
        assert stats.versions[0].degraded_count == len(degraded)
        assert stats.versions[0].error_count == 0
