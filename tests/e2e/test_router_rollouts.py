"""Rollouts through the router on the running stack: sticky A/B across paths and restarts, shadow
copies that are logged and never returned, a blue-green flip under load, and the last good
snapshot serving while the registry is away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import onnx
import pytest
import redis.asyncio as redis
import tritonclient.grpc.aio
from onnx import TensorProto, helper, numpy_helper
from stack_router import stack_router_settings
from support import eventually, expected_probabilities, running

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.inference.v1 import inference_service_pb2_grpc as inference_grpc
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve.type.v1 import prediction_record_pb2, tensor_pb2
from modelserve_cli.demo import MODEL_ID, DemoDeployment, demo_request
from modelserve_cli.stack import Stack
from modelserve_router.server import RouterApp, build_server
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import RegistryAdminClient
from modelserve_runtime.prediction_log import decode_record

AB = "fraud-ab"
TWIN = "fraud-twin"
BROKEN = "fraud-broken"


def unloadable_onnx(width: int) -> bytes:
    """A graph with the demo model's inputs and outputs that passes onnx.checker (and so the
    registry) but that onnxruntime refuses: its MatMul's inner dimensions disagree."""
    weights = numpy_helper.from_array(np.ones((width + 1, 2), dtype=np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["probabilities"]),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ],
        "unloadable",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2]),
        ],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


SHADOWED = "fraud-shadowed"
STREAM = "test:router-rollouts"
#: The longest a test waits for something that must happen; never a fixed sleep.
WAIT_S = 20.0


@dataclass
class Rollout:
    """The stack, three versions of the demo model and a channel to the registry."""

    stack: Stack
    demo: DemoDeployment
    ready: str
    """A second READY version (same artifact as the demo's, so the same answers)."""
    not_loaded: str
    """A version inference cannot load: every call to it fails."""
    registry: registry_grpc.RegistryServiceAsyncStub
    channel: grpc.aio.Channel
    """To the registry."""


@pytest.fixture(scope="module")
async def rollout(stack: Stack, demo: DemoDeployment) -> AsyncIterator[Rollout]:
    """Versions 2 (loaded) and 3 (not loaded) of the demo model, endpoint `fraud-ab` split 50/50
    between the demo version and version 2, sticky by customer, and `fraud-shadowed` answering
    from the demo version with both new versions as shadows."""
    async with (
        create_channel(stack.targets["registry"], default_timeout_s=60) as channel,
        create_channel(stack.targets["inference"], default_timeout_s=120) as inference,
    ):
        admin = RegistryAdminClient(channel)
        template = registry_pb.ModelVersion(
            format=registry_pb.ARTIFACT_FORMAT_ONNX,
            signature=(
                await registry_grpc.RegistryServiceStub(channel).GetModelVersion(
                    registry_pb.GetModelVersionRequest(name=demo.model_version)
                )
            ).model_version.signature,
        )
        ready = (
            await admin.upload_model_version(
                f"models/{MODEL_ID}", template, demo.trained.onnx_bytes
            )
        ).name
        # A version that can never be READY: the registry accepts its graph, Triton's
        # onnxruntime refuses to load it. In a model of its own, so its failed loads (retried
        # by inference with backoff) never touch the demo model.
        await admin.create_model(BROKEN, "loads in no Triton")
        width = template.signature.inputs[0].shape[-1]
        not_loaded = (
            await admin.upload_model_version(f"models/{BROKEN}", template, unloadable_onnx(width))
        ).name
        loaded = await inference_grpc.InferenceServiceStub(inference).LoadModelVersion(
            inference_pb.LoadModelVersionRequest(name=ready)
        )
        assert loaded.model_version.state == inference_pb.MODEL_VERSION_STATE_READY
        stub = registry_grpc.RegistryServiceStub(channel)
        await update(
            stub,
            registry_pb.Deployment(
                name=f"deployments/{AB}",
                traffic=[
                    registry_pb.TrafficTarget(model_version=demo.model_version, percent=50),
                    registry_pb.TrafficTarget(model_version=ready, percent=50),
                ],
                routing_key="customer",
                salt="e2e",
            ),
        )
        await update(
            stub,
            registry_pb.Deployment(
                name=f"deployments/{SHADOWED}",
                traffic=[registry_pb.TrafficTarget(model_version=demo.model_version, percent=100)],
                shadow=[ready, not_loaded],
            ),
        )
        yield Rollout(stack, demo, ready, not_loaded, stub, channel)


async def update(
    stub: registry_grpc.RegistryServiceAsyncStub, deployment: registry_pb.Deployment
) -> None:
    # wait_for_ready: after the registry restarts, a channel may still be backing off.
    await stub.UpdateDeployment(
        registry_pb.UpdateDeploymentRequest(deployment=deployment, allow_missing=True),
        wait_for_ready=True,
    )


@contextlib.asynccontextmanager
async def router(
    stack: Stack, **overrides: object
) -> AsyncIterator[tuple[router_grpc.RouterServiceAsyncStub, RouterApp]]:
    """A router in this process, and a stub on a channel to it."""
    async with running(build_server, stack_router_settings(stack, STREAM, **overrides)) as (
        _,
        channel,
        app,
    ):
        assert isinstance(app, RouterApp)
        yield router_grpc.RouterServiceStub(channel), app


def ab_request(customer: str) -> router_pb.PredictRequest:
    request = demo_request(customer, 50.0)
    request.endpoint = AB
    return request


async def records(stack: Stack, request_id: str) -> list[prediction_record_pb2.PredictionRecord]:
    client = redis.Redis.from_url(stack.redis.url)
    try:
        entries = await client.xrange(STREAM)
    finally:
        await client.aclose()
    found = [decode_record(fields) for _, fields in entries]
    return [r for r in found if r.request_id == request_id]


class TestStickyAssignment:
    async def test_same_arm_across_requests_paths_and_restarts(self, rollout: Rollout) -> None:
        """Each customer gets the same version from the direct-path router, from the stack's
        service-path router and from a restarted router, both arms are used, and the answer
        says `sticky`."""
        customers = [f"c-{1000 + i}" for i in range(40)]
        async with router(rollout.stack) as (stub, _):
            first = {c: await stub.Predict(ab_request(c)) for c in customers}
        assert {r.route_reason for r in first.values()} == {"sticky"}
        assert {r.model_version for r in first.values()} == {
            rollout.demo.model_version,
            rollout.ready,
        }
        async with router(rollout.stack) as (stub, _):
            restarted = {c: (await stub.Predict(ab_request(c))).model_version for c in customers}
        assignment = {c: r.model_version for c, r in first.items()}
        assert restarted == assignment
        async with create_channel(rollout.stack.targets["router"]) as channel:
            service_path = router_grpc.RouterServiceStub(channel)

            async def same_on_service_path() -> bool:
                # That router learns from inference's state stream that the version is READY.
                answers = {c: await service_path.Predict(ab_request(c)) for c in customers}
                return {c: a.model_version for c, a in answers.items()} == assignment

            await eventually(
                same_on_service_path, "the service path's sticky assignment", within_s=WAIT_S
            )


class TestShadow:
    async def test_shadow_outputs_are_logged_never_returned(self, rollout: Rollout) -> None:
        """The caller gets the primary's answer while a READY shadow's output and a failing
        shadow's error are logged as shadow records of the same request."""
        request = demo_request("c-1003", 250.0)
        request.endpoint = SHADOWED
        async with router(rollout.stack) as (stub, app):
            response = await stub.Predict(request)
            await app.shadows.idle()
            await app.prediction_log.flush()
        assert (response.model_version, response.route_reason) == (
            rollout.demo.model_version,
            "single_target",
        )
        probabilities = next(o for o in response.outputs if o.name == "probabilities")
        np.testing.assert_allclose(
            np.asarray(probabilities.contents.fp32_contents),
            expected_probabilities(rollout.demo, request),
            atol=1e-5,
        )
        logged = {r.model_version: r for r in await records(rollout.stack, response.request_id)}
        primary = logged[rollout.demo.model_version]
        assert (primary.shadow, primary.status) == (
            False,
            prediction_record_pb2.PREDICTION_STATUS_OK,
        )
        good = logged[rollout.ready]
        assert (good.shadow, good.route_reason, good.status) == (
            True,
            "shadow",
            prediction_record_pb2.PREDICTION_STATUS_OK,
        )
        assert list(good.outputs) == list(primary.outputs)
        bad = logged[rollout.not_loaded]
        assert (bad.shadow, bad.status, bad.error_code) == (
            True,
            prediction_record_pb2.PREDICTION_STATUS_ERROR,
            "FAILED_PRECONDITION",
        )

    async def test_full_shadow_capacity_drops_copies_not_requests(self, rollout: Rollout) -> None:
        """With room for one shadow copy, concurrent requests all answer and the copies that
        find no room are dropped and counted."""
        request = demo_request("c-1004", 80.0)
        request.endpoint = SHADOWED
        async with router(rollout.stack, shadow_max_in_flight=1) as (stub, app):
            answers = await asyncio.gather(*(stub.Predict(request) for _ in range(10)))
            await app.shadows.idle()
            assert app.shadows.dropped >= 10
        assert {a.model_version for a in answers} == {rollout.demo.model_version}


class TestSnapshot:
    async def test_blue_green_flip_under_load_and_registry_outage(self, rollout: Rollout) -> None:
        """A flip of the whole traffic reaches the router with no failed request; while the
        registry is down predictions go on from the last snapshot; a change made once it is
        back is picked up."""
        stack = rollout.stack
        blue, green = rollout.demo.model_version, rollout.ready
        flip = f"deployments/{AB}-flip"
        await update(
            rollout.registry,
            registry_pb.Deployment(
                name=flip, traffic=[registry_pb.TrafficTarget(model_version=blue, percent=100)]
            ),
        )
        request = demo_request("c-1001", 20.0)
        request.endpoint = f"{AB}-flip"
        async with router(stack) as (stub, _):
            assert (await stub.Predict(request)).model_version == blue
            seen: list[str] = []
            failures: list[grpc.aio.AioRpcError] = []
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    try:
                        seen.append((await stub.Predict(request)).model_version)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc)

            workers = [asyncio.create_task(load()) for _ in range(4)]
            await update(
                rollout.registry,
                registry_pb.Deployment(
                    name=flip,
                    traffic=[registry_pb.TrafficTarget(model_version=green, percent=100)],
                ),
            )

            async def flipped() -> bool:
                return seen[-8:] == [green] * 8

            await eventually(flipped, "the flip to green", within_s=WAIT_S)
            stop.set()
            await asyncio.gather(*workers)
            assert failures == []

            registry = stack.processes["registry"]
            registry.terminate()
            await asyncio.to_thread(registry.wait, 15)
            try:
                for _ in range(5):
                    assert (await stub.Predict(request)).model_version == green
            finally:
                stack.spawn("registry")
                await stack.wait_serving("registry")
            async with create_channel(stack.targets["registry"]) as channel:
                await update(
                    registry_grpc.RegistryServiceStub(channel),
                    registry_pb.Deployment(
                        name=flip,
                        traffic=[registry_pb.TrafficTarget(model_version=blue, percent=100)],
                    ),
                )

            async def back_to_blue() -> bool:
                return (await stub.Predict(request)).model_version == blue

            await eventually(
                back_to_blue, "the change made after the registry came back", within_s=WAIT_S
            )


class TestFallbacks:
    async def test_fallback_version_then_default_outputs(self, rollout: Rollout) -> None:
        """When the chosen version fails in inference, the fallback version answers, and with
        no fallback the declared default outputs do; both are marked degraded with the reason,
        in the answer and in the log."""
        default = tensor_pb2.Tensor(
            name="probabilities",
            datatype=tensor_pb2.DATA_TYPE_FP32,
            shape=[1, 2],
            contents=tensor_pb2.TensorContents(fp32_contents=[0.5, 0.5]),
        )
        # The chosen version is the demo artifact as a model of its own, so that taking it out
        # of Triton (behind inference's back) leaves the fallback, a version of the demo
        # model, serving.
        admin = RegistryAdminClient(rollout.channel)
        await admin.create_model(TWIN, "the demo model under another name")
        template = await rollout.registry.GetModelVersion(
            registry_pb.GetModelVersionRequest(name=rollout.demo.model_version)
        )
        twin = (
            await admin.upload_model_version(
                f"models/{TWIN}",
                registry_pb.ModelVersion(
                    format=registry_pb.ARTIFACT_FORMAT_ONNX,
                    signature=template.model_version.signature,
                ),
                rollout.demo.trained.onnx_bytes,
            )
        ).name
        chosen = registry_pb.TrafficTarget(model_version=twin, percent=100)
        await update(
            rollout.registry,
            registry_pb.Deployment(
                name="deployments/fraud-fallback",
                traffic=[chosen],
                fallback_version=rollout.demo.model_version,
            ),
        )
        await update(
            rollout.registry,
            registry_pb.Deployment(
                name="deployments/fraud-default", traffic=[chosen], default_outputs=[default]
            ),
        )
        with_fallback = demo_request("c-1006", 60.0)
        with_fallback.endpoint = "fraud-fallback"
        with_default = demo_request("c-1006", 60.0)
        with_default.endpoint = "fraud-default"
        async with create_channel(
            rollout.stack.targets["inference"], default_timeout_s=120
        ) as channel:
            inference = inference_grpc.InferenceServiceStub(channel)
            held: list[inference_pb.LoadedModelVersion] = []

            async def twin_ready() -> bool:
                listed = await inference.ListModelVersions(inference_pb.ListModelVersionsRequest())
                held[:] = [
                    v
                    for v in listed.model_versions
                    if v.name == twin and v.state == inference_pb.MODEL_VERSION_STATE_READY
                ]
                return bool(held)

            await eventually(twin_ready, f"inference to load {twin} for its deployments")
        # Taken out of Triton behind inference's back, the version is still READY in
        # inference's state stream, so the router keeps choosing it and it fails for real.
        async with router(rollout.stack) as (stub, app):
            for request in (with_fallback, with_default):
                assert (await stub.Predict(request)).model_version == twin
            triton = tritonclient.grpc.aio.InferenceServerClient(held[0].triton_endpoint)
            try:
                await triton.unload_model(held[0].triton_model_name)
            finally:
                await triton.close()
            fell_back = await stub.Predict(with_fallback)
            defaulted = await stub.Predict(with_default)
            await app.prediction_log.flush()
        # Nothing references the twin afterwards, so inference lets it go.
        for name in ("deployments/fraud-fallback", "deployments/fraud-default"):
            await update(
                rollout.registry,
                registry_pb.Deployment(
                    name=name,
                    traffic=[
                        registry_pb.TrafficTarget(
                            model_version=rollout.demo.model_version, percent=100
                        )
                    ],
                ),
            )
        assert (fell_back.model_version, fell_back.route_reason) == (
            rollout.demo.model_version,
            "fallback",
        )
        assert fell_back.degraded
        assert twin in fell_back.degraded_reason
        assert "answered by fallback" in fell_back.degraded_reason
        np.testing.assert_allclose(
            np.asarray(
                next(
                    o for o in fell_back.outputs if o.name == "probabilities"
                ).contents.fp32_contents
            ),
            expected_probabilities(rollout.demo, with_fallback),
            atol=1e-5,
        )
        assert (defaulted.model_version, defaulted.route_reason) == ("", "default_output")
        assert defaulted.degraded and "default outputs" in defaulted.degraded_reason
        assert list(defaulted.outputs) == [default]
        logged = await records(rollout.stack, fell_back.request_id)
        assert [(r.model_version, r.degraded, r.status) for r in logged] == [
            (rollout.demo.model_version, True, prediction_record_pb2.PREDICTION_STATUS_OK)
        ]
        assert logged[0].degraded_reason == fell_back.degraded_reason
