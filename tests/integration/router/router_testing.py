"""Helpers the router's integration tests share: the running dependencies, an in-process router
on them, deployments, changing what Triton holds behind inference's back (a version taken out,
a model made slow), and Triton's own counts."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
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
from modelserve_demo import fraud
from modelserve_router.config import RouterSettings
from modelserve_router.server import RouterApp, build_server
from modelserve_runtime.clients import RegistryAdminClient, RegistryClient
from modelserve_runtime.convert import tensor_to_numpy
from modelserve_runtime.errors import DecodedError, decode_rpc_error
from modelserve_runtime.prediction_log import decode_record
from modelserve_triton.model_config import TensorSpec, model_files
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
    registry_channel: grpc.aio.Channel


_DATATYPES = {"FP32": tensor_pb2.DATA_TYPE_FP32, "INT64": tensor_pb2.DATA_TYPE_INT64}


def _spec(spec: TensorSpec) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(
        name=spec.name, datatype=_DATATYPES[spec.datatype], shape=list(spec.shape)
    )


async def register_demo_model(admin: RegistryAdminClient, versions: int = 2) -> None:
    """`models/fraud` in a registry, with versions 1, 2, ... of the demo model (trained with
    seeds 0, 1, ...), as inference's Triton holds them."""
    await admin.create_model(MODEL_ID, "demo fraud model")
    for seed in range(versions):
        trained = fraud.train(seed=seed)
        version = await admin.upload_model_version(
            f"models/{MODEL_ID}",
            registry_pb.ModelVersion(
                format=registry_pb.ARTIFACT_FORMAT_ONNX,
                signature=registry_pb.Signature(
                    inputs=[_spec(s) for s in trained.inputs],
                    outputs=[_spec(s) for s in trained.outputs],
                    feature_refs=list(trained.feature_refs),
                ),
            ),
            trained.onnx_bytes,
        )
        assert version.name == f"models/{MODEL_ID}/versions/{seed + 1}"


def router_settings(deps: Dependencies, **overrides: Any) -> RouterSettings:
    """A router on the dependencies with the default direct path (Redis, Triton)."""
    values: dict[str, Any] = {
        "registry_target": deps.registry_target,
        "inference_target": deps.inference_target,
        "redis_url": deps.redis.url,
        "prediction_stream": STREAM,
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
    version: str | Mapping[str, int],
    *,
    default_outputs: bool = True,
    salt: str = "",
    fallback_version: str = "",
    shadow: Sequence[str] = (),
    hybrid: registry_pb.HybridLookup | None = None,
    routing_key: str = "",
) -> registry_pb.Deployment:
    """Routes all of `endpoint` to `version` (or splits it by the percent of each version,
    sticky by `routing_key` when set), with the declared default outputs."""
    traffic = {version: 100} if isinstance(version, str) else version
    response = await deps.registry.UpdateDeployment(
        registry_pb.UpdateDeploymentRequest(
            deployment=registry_pb.Deployment(
                name=f"deployments/{endpoint}",
                traffic=[
                    registry_pb.TrafficTarget(model_version=v, percent=p)
                    for v, p in traffic.items()
                ],
                default_outputs=[DEFAULT] if default_outputs else [],
                salt=salt,
                fallback_version=fallback_version,
                shadow=list(shadow),
                hybrid=hybrid,
                routing_key=routing_key,
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


async def register_copy(
    deps: Dependencies, model_id: str, of: str = V1, *, allow_non_finite: bool = False
) -> str:
    """Registers `of`'s artifact and signature as version 1 of a new model `model_id` (in
    Triton a model of its own, whose config no test of the demo model shares); with
    `allow_non_finite`, its first input takes NaN and infinity."""
    template = await deps.registry.GetModelVersion(registry_pb.GetModelVersionRequest(name=of))
    template.model_version.signature.inputs[0].allow_non_finite = allow_non_finite
    artifact = await RegistryClient(deps.registry_channel).read_artifact(of)
    admin = RegistryAdminClient(deps.registry_channel)
    await admin.create_model(model_id, f"a copy of {of}")
    version = await admin.upload_model_version(
        f"models/{model_id}",
        registry_pb.ModelVersion(
            format=registry_pb.ARTIFACT_FORMAT_ONNX, signature=template.model_version.signature
        ),
        artifact,
    )
    return version.name


async def reload(deps: Dependencies, version: str) -> None:
    """Loads `version` back into Triton and checks that it is READY."""
    loaded = await deps.inference.LoadModelVersion(
        inference_pb.LoadModelVersionRequest(name=version)
    )
    assert loaded.model_version.state == inference_pb.MODEL_VERSION_STATE_READY


async def _reload_in_triton(
    deps: Dependencies,
    model_id: str,
    versions: list[str],
    changed: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """Loads `model_id` into Triton again, straight through Triton's API, with the config
    `changed` makes of the one Triton runs it with now, and the artifacts of `versions`;
    returns the config it ran with before."""
    registry = RegistryClient(deps.registry_channel)
    files = model_files(
        {int(v.rsplit("/", 1)[1]): await registry.read_artifact(v) for v in versions}
    )
    triton = TritonRunner(deps.triton_endpoint)
    try:
        before = await triton.model_config(model_id, timeout_s=WAIT_S)
        await triton.load(model_id, changed(copy.deepcopy(before)), files, timeout_s=WAIT_S)
    finally:
        await triton.close()
    return before


@contextlib.asynccontextmanager
async def unloaded(deps: Dependencies, version: str) -> AsyncIterator[None]:
    """Takes `version` out of Triton behind inference's back (Triton reloads the demo model
    without it), so inference still reports it READY and the router keeps calling it, as
    between a failure in Triton and inference noticing; puts it back on the way out."""
    others = [int(v.rsplit("/", 1)[1]) for v in (V1, V2) if v != version]

    def without(config: dict[str, Any]) -> dict[str, Any]:
        config["version_policy"] = {"specific": {"versions": others}}
        return config

    before = await _reload_in_triton(deps, MODEL_ID, [V1, V2], without)
    try:
        yield
    finally:
        await _reload_in_triton(deps, MODEL_ID, [V1, V2], lambda _: before)


@contextlib.asynccontextmanager
async def slow_in_triton(
    deps: Dependencies, model_version: str, *, queue_delay_us: int
) -> AsyncIterator[None]:
    """Makes Triton hold every request to `model_version`'s model (all its versions) up to
    `queue_delay_us` (its dynamic batcher waits that long for a batch that never fills),
    behind inference's back; the delay is taken off on the way out."""
    model_id = model_version.split("/")[1]

    def slow(config: dict[str, Any]) -> dict[str, Any]:
        config.setdefault("dynamic_batching", {})["max_queue_delay_microseconds"] = queue_delay_us
        return config

    # Every version Triton holds of the model, or the reload would drop the others.
    versions = [v for v in (V1, V2) if v.split("/")[1] == model_id and v != model_version]
    versions.append(model_version)
    before = await _reload_in_triton(deps, model_id, versions, slow)
    try:
        yield
    finally:
        await _reload_in_triton(deps, model_id, versions, lambda _: before)


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
    return int(stats.get("inference_stats", {}).get("success", {}).get("count", 0))


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
