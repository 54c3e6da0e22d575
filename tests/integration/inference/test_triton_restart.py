"""Triton killed with SIGKILL under a running inference service: noticed, restarted, reloaded."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference_testing import (
    V1,
    V2,
    RunningInference,
    assert_answers_as,
    held,
    infer,
    infer_request,
    load,
    refused,
    triton_ready,
)
from support import eventually
from tritonclient.grpc.aio import InferenceServerClient

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve_demo import fraud

pytestmark = pytest.mark.triton

SERVICE = "modelserve.inference.v1.InferenceService"
#: How long Triton may take to come back with both versions reloaded and warmed.
RECOVERY_LIMIT_S = 60.0


@pytest.fixture
async def health_changes(
    inference_service: RunningInference,
) -> AsyncIterator[list[health_pb2.HealthCheckResponse.ServingStatus.ValueType]]:
    """Every health status of the InferenceService that its Watch stream reports, in order."""
    seen: list[health_pb2.HealthCheckResponse.ServingStatus.ValueType] = []
    # The channel's default 5 s deadline would end the stream before Triton is back.
    call = health_pb2_grpc.HealthStub(inference_service.channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=4 * RECOVERY_LIMIT_S
    )

    async def record() -> None:
        async for response in call:
            seen.append(response.status)

    task = asyncio.create_task(record())
    await eventually(lambda: bool(seen), "the first health status", within_s=RECOVERY_LIMIT_S)
    yield seen
    call.cancel()
    task.cancel()


def _running(pid: int) -> bool:
    """Whether the process still runs; a killed stub may linger as a zombie until init reaps it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TestTritonRestart:
    async def test_sigkill_is_survived_without_anyone_calling(
        self,
        inference_service: RunningInference,
        health_changes: list[health_pb2.HealthCheckResponse.ServingStatus.ValueType],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """After kill -9 of tritonserver the service turns NOT_SERVING, lists both versions
        LOADING with the reason, refuses Infer with UNAVAILABLE, then restarts Triton on the same
        endpoint and serves both versions READY again by itself."""
        stub = inference_service.stub
        await load(stub, V1)
        endpoint = (await load(stub, V2)).triton_endpoint
        triton = inference_service.app.triton
        assert triton is not None and triton.pid is not None
        old_pid = triton.pid
        old_group = [old_pid, *(p.pid for p in psutil.Process(old_pid).children(recursive=True))]
        assert len(old_group) > 1, "the python-backend stubs run beside tritonserver"

        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)

        async def down() -> bool:
            states = {v.state for v in await held(stub)}
            return states == {pb.MODEL_VERSION_STATE_LOADING}

        await eventually(down, "both versions LOADING", within_s=RECOVERY_LIMIT_S)
        during = await held(stub)
        error = await refused(stub.Infer(infer_request(V1)))

        async def back() -> bool:
            states = {v.state for v in await held(stub)}
            return states == {pb.MODEL_VERSION_STATE_READY}

        await eventually(back, "both versions READY again", within_s=RECOVERY_LIMIT_S)
        recovered_s = time.monotonic() - killed_at
        after = await held(stub)

        assert all(v.reason.startswith("triton restarting: ") for v in during)
        assert all(v.triton_endpoint == "" for v in during)
        assert error.code is grpc.StatusCode.UNAVAILABLE
        assert error.reason == "VERSION_NOT_READY"
        assert [(v.name, v.triton_endpoint, v.reason) for v in after] == [
            (V1, endpoint, ""),
            (V2, endpoint, ""),
        ]
        assert triton.pid != old_pid
        assert not [pid for pid in old_group if _running(pid)]
        assert await triton_ready(endpoint, 1) and await triton_ready(endpoint, 2)
        assert_answers_as(await infer(stub, infer_request(V1)), fraud_models[V1])
        assert_answers_as(await infer(stub, infer_request(V2)), fraud_models[V2])
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await eventually(
            lambda: health_changes[-1] == serving,
            "health SERVING",
            within_s=RECOVERY_LIMIT_S,
        )
        assert health_changes == [serving, not_serving, serving]
        assert inference_service.app.supervisor.restarts == 1
        assert recovered_s < RECOVERY_LIMIT_S
        print(f"triton restart to READY (two versions, warmed): {recovered_s:.2f} s")

    async def test_open_inference_protocol_reports_the_outage(
        self, inference_service: RunningInference
    ) -> None:
        """While Triton is down the facade says the server and the model are not ready, then
        ready again once the versions are reloaded."""
        await load(inference_service.stub, V1)
        client = InferenceServerClient(inference_service.target)
        triton = inference_service.app.triton
        assert triton is not None and triton.pid is not None
        readiness: list[tuple[bool, bool]] = []

        async def ready() -> bool:
            readiness.append(
                (await client.is_server_ready(), await client.is_model_ready("fraud", "1"))
            )
            return readiness[-1] == (True, True)

        try:
            os.kill(triton.pid, signal.SIGKILL)
            await eventually(
                lambda: not inference_service.app.versions.triton_up,
                "outage",
                within_s=RECOVERY_LIMIT_S,
            )
            await eventually(ready, "ready again", within_s=RECOVERY_LIMIT_S)
        finally:
            await client.close()

        assert (False, False) in readiness
        assert readiness[-1] == (True, True)
