"""Remote mode: Triton run by someone else dies and comes back; the service reloads by itself."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator

import pytest
from inference_testing import (
    V1,
    RunningInference,
    assert_answers_as,
    held,
    infer,
    infer_request,
    load,
)
from support import eventually

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve_demo import fraud
from modelserve_inference.config import InferenceSettings
from modelserve_triton.process import TritonOptions, TritonServer

pytestmark = pytest.mark.triton

LIMIT_S = 60.0


@pytest.fixture(scope="module")
async def remote_triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TritonServer]:
    """A tritonserver that the inference service does not own."""
    server = TritonServer(TritonOptions(work_dir=tmp_path_factory.mktemp("remote-triton")))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def inference_settings(registry_target: str, remote_triton: TritonServer) -> InferenceSettings:
    """A remote-mode service on the test's Triton, probing it every 100 ms."""
    return InferenceSettings(
        triton_mode="remote",
        triton_url=remote_triton.grpc_endpoint,
        registry_target=registry_target,
        triton_poll_interval_s=0.1,
    )


async def _states(service: RunningInference) -> set[int]:
    return {v.state for v in await held(service.stub)}


class TestRemoteTritonRestart:
    async def test_reloads_once_the_remote_triton_is_back(
        self,
        inference_service: RunningInference,
        remote_triton: TritonServer,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A remote Triton that dies is noticed by probing (versions LOADING); the service waits
        and, once Triton answers again, reloads the version and serves it READY."""
        await load(inference_service.stub, V1)
        assert remote_triton.pid is not None
        os.kill(remote_triton.pid, signal.SIGKILL)

        async def in_state(state: int) -> bool:
            return await _states(inference_service) == {state}

        await eventually(
            lambda: in_state(pb.MODEL_VERSION_STATE_LOADING), "the outage noticed", within_s=LIMIT_S
        )
        await remote_triton.restart()
        await eventually(
            lambda: in_state(pb.MODEL_VERSION_STATE_READY), "the version reloaded", within_s=LIMIT_S
        )

        assert_answers_as(await infer(inference_service.stub, infer_request(V1)), fraud_models[V1])
        assert inference_service.app.triton is None
        assert inference_service.app.supervisor.restarts == 1
