"""Helpers the router's integration tests share: the running dependencies, an in-process router
on them, deployments, taking a version out of Triton for real, and Triton's own counts."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from support import eventually, running

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.inference.v1 import inference_service_pb2_grpc as inference_grpc
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve.type.v1 import prediction_record_pb2, tensor_pb2
from modelserve_cli.demo import demo_request
from modelserve_cli.stack import RedisProcess
from modelserve_router.config import RouterSettings
from modelserve_router.server import RouterApp, build_server
from modelserve_runtime.convert import tensor_to_numpy
from modelserve_runtime.errors import DecodedError, decode_rpc_error
from modelserve_runtime.prediction_log import decode_record
from modelserve_triton.runner import TritonRunner

MODEL_ID = "fraud"
V1 = f"models/{MODEL_ID}/versions/1"
V2 = f"models/{MODEL_ID}/versions/2"
STREAM = "test:router-resilience"
DOMAIN = "router.modelserve"
#: The longest a test waits for something that must happen; never a fixed sleep.
WAIT_S = 30.0
#: Declared on deployments so that a failing version still answers (degraded).
DEFAULT = tensor_pb2.Tensor(
    name="probabilities",
    datatype=tensor_pb2.DATA_TYPE_FP32,
    shape=[1, 2],
    contents=tensor_pb2.TensorContents(fp32_contents=[0.5, 0.5]),
)


@dataclass
class Dependencies:
    """Redis, the registry and inference (with its own tritonserver), all real and running."""

    redis: RedisProcess
    registry_target: str
    inference_target: str
    triton_endpoint: str
    registry: registry_grpc.RegistryServiceAsyncStub
    inference: inference_grpc.InferenceServiceAsyncStub


def router_settings(deps: Dependencies, **overrides: Any) -> RouterSettings:
    """A router on the dependencies with the default direct path (Redis, Triton). It polls
    inference rarely, so it keeps believing in a version taken out of Triton behind its back,
    as it would between two polls."""
    values: dict[str, Any] = {
        "registry_target": deps.registry_target,
        "inference_target": deps.inference_target,
        "redis_url": deps.redis.url,
        "prediction_stream": STREAM,
        "ready_poll_ms": 600_000,
        "watch_backoff_max_s": 0.2,
    }
    values.update(overrides)
    return RouterSettings.model_validate(values)


@contextlib.asynccontextmanager
async def router(
    deps: Dependencies, **overrides: Any
) -> AsyncIterator[tuple[router_grpc.RouterServiceAsyncStub, RouterApp]]:
    """A router in this process, and a stub on a channel to it."""
    async with running(build_server, router_settings(deps, **overrides)) as (_, channel, app):
        assert isinstance(app, RouterApp)
        yield router_grpc.RouterServiceStub(channel), app


async def deploy(
    deps: Dependencies,
    endpoint: str,
    version: str,
    *,
    default_outputs: bool = True,
    salt: str = "",
    fallback_version: str = "",
) -> registry_pb.Deployment:
    """Routes all of `endpoint` to `version`, with the declared default outputs."""
    response = await deps.registry.UpdateDeployment(
        registry_pb.UpdateDeploymentRequest(
            deployment=registry_pb.Deployment(
                name=f"deployments/{endpoint}",
                traffic=[registry_pb.TrafficTarget(model_version=version, percent=100)],
                default_outputs=[DEFAULT] if default_outputs else [],
                salt=salt,
                fallback_version=fallback_version,
            ),
            allow_missing=True,
        )
    )
    return response.deployment


def request(
    endpoint: str, customer: str = "c-1001", amount: float = 120.0
) -> router_pb.PredictRequest:
    """A Predict request of the demo model for `endpoint`."""
    predict = demo_request(customer, amount)
    predict.endpoint = endpoint
    return predict


def probabilities(response: router_pb.PredictResponse) -> npt.NDArray[Any]:
    """The `probabilities` output of an answer."""
    tensor = next(o for o in response.outputs if o.name == "probabilities")
    return np.asarray(tensor_to_numpy(tensor))


@contextlib.asynccontextmanager
async def unloaded(deps: Dependencies, version: str) -> AsyncIterator[None]:
    """Takes `version` out of Triton through inference, and loads it back on the way out."""
    await deps.inference.UnloadModelVersion(inference_pb.UnloadModelVersionRequest(name=version))
    try:
        yield
    finally:
        await reload(deps, version)


async def reload(deps: Dependencies, version: str) -> None:
    """Loads `version` back into Triton and checks that it is READY."""
    loaded = await deps.inference.LoadModelVersion(
        inference_pb.LoadModelVersionRequest(name=version)
    )
    assert loaded.model_version.state == inference_pb.MODEL_VERSION_STATE_READY


async def _version_stats(deps: Dependencies, version: str) -> dict[str, Any]:
    triton = TritonRunner(deps.triton_endpoint)
    try:
        stats = await triton.statistics(timeout_s=5)
    finally:
        await triton.close()
    number = version.rsplit("/", 1)[1]
    for model in stats.get("model_stats", []):
        if (model["name"], model["version"]) == (MODEL_ID, number):
            return dict(model)
    return {}


async def triton_requests_after(
    deps: Dependencies, version: str, marker: Callable[[], Awaitable[object]]
) -> int:
    """How many requests Triton itself says it ran successfully on `version`, read once the
    statistics include `marker` (a call that reaches that version). Triton records a request's
    statistics after answering it, so a count read without such a marker may lag behind."""
    sent_ms = int(time.time() * 1000)
    await marker()
    stats: dict[str, Any] = {}

    async def includes_marker() -> bool:
        nonlocal stats
        stats = await _version_stats(deps, version)
        return int(stats.get("last_inference", 0)) >= sent_ms

    await eventually(includes_marker, f"Triton's statistics of {version}", within_s=WAIT_S)
    return int(stats["inference_stats"]["success"].get("count", 0))


async def records(
    deps: Dependencies, request_id: str
) -> list[prediction_record_pb2.PredictionRecord]:
    """The prediction records logged for a request."""
    client = aioredis.Redis.from_url(deps.redis.url)
    try:
        entries = await client.xrange(STREAM)
    finally:
        await client.aclose()
    found = [decode_record(fields) for _, fields in entries]
    return [r for r in found if r.request_id == request_id]


async def refused(call: Any) -> DecodedError:
    """The decoded error of a router call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    error = decode_rpc_error(info.value)
    assert error.domain == DOMAIN, error
    return error


def circuit_state(version: str) -> float | None:
    """The router's circuit-state gauge of a version (0 closed, 1 half-open, 2 open)."""
    return REGISTRY.get_sample_value("modelserve_router_circuit_state", {"model_version": version})
