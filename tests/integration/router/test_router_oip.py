"""The Open Inference Protocol on the router, driven by tritonclient exactly as it drives
Triton: an endpoint is the model, routed as Predict routes it (canary weights, sticky key,
pins, shadow copies, fallbacks, limits, API keys, the prediction log), with the caller's
tensors passed to the version as they are."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from importlib.metadata import version as installed_version
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
from router_testing import (
    DEFAULT,
    DOMAIN,
    V1,
    V2,
    WAIT_S,
    Dependencies,
    circuit_state,
    records,
    request,
    router_settings,
    unloaded,
)
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from support import eventually, running
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve.type.v1 import prediction_record_pb2
from modelserve_cli.artifacts import onnx_signature
from modelserve_demo import fraud
from modelserve_router.routing import sticky_point
from modelserve_router.server import RouterApp, build_server
from modelserve_runtime.auth import Role, new_api_key
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import RegistryAdminClient
from modelserve_runtime.errors import DecodedError, decode_rpc_error

pytestmark = pytest.mark.triton

ROWS = fraud.make_dataset(4, seed=7)[0]
#: A caller's W3C trace, which the router continues (no tracer provider is set in tests, so
#: the router's spans take the caller's trace id and record nothing).
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
#: Cheap scrypt for tests; production keys use the default cost.
TEST_SCRYPT_N = 16


@pytest.fixture(scope="module")
def sessions() -> dict[str, ort.InferenceSession]:
    """onnxruntime in this process on the bytes the registry holds for each version (the
    package fixture trains version n with seed n - 1)."""
    return {
        name: ort.InferenceSession(
            fraud.train(seed=seed).onnx_bytes, providers=["CPUExecutionProvider"]
        )
        for seed, name in enumerate((V1, V2))
    }


def reference(
    sessions: dict[str, ort.InferenceSession], version: str, rows: npt.NDArray[Any] = ROWS
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Labels and probabilities of a version in onnxruntime here."""
    labels, probabilities = sessions[version].run(["label", "probabilities"], {"features": rows})
    return np.asarray(labels), np.asarray(probabilities)


async def deploy(
    deps: Dependencies,
    endpoint: str,
    traffic: dict[str, int],
    *,
    routing_key: str = "",
    shadow: Sequence[str] = (),
    fallback_version: str = "",
    default_outputs: bool = False,
) -> None:
    """Sets the endpoint's deployment in the registry."""
    await deps.registry.UpdateDeployment(
        registry_pb.UpdateDeploymentRequest(
            deployment=registry_pb.Deployment(
                name=f"deployments/{endpoint}",
                traffic=[
                    registry_pb.TrafficTarget(model_version=v, percent=p)
                    for v, p in traffic.items()
                ],
                routing_key=routing_key,
                shadow=list(shadow),
                fallback_version=fallback_version,
                default_outputs=[DEFAULT] if default_outputs else [],
            ),
            allow_missing=True,
        )
    )


@contextlib.asynccontextmanager
async def oip_router(deps: Dependencies, **overrides: Any) -> AsyncIterator[tuple[str, RouterApp]]:
    """A router in this process: its address and its app."""
    async with running(build_server, router_settings(deps, **overrides)) as (server, _, app):
        assert isinstance(app, RouterApp)
        yield f"127.0.0.1:{server.port}", app


@contextlib.asynccontextmanager
async def client(target: str) -> AsyncIterator[InferenceServerClient]:
    """tritonclient's asyncio client pointed at the router instead of Triton."""
    triton = InferenceServerClient(target)
    try:
        yield triton
    finally:
        await triton.close()


def inputs(rows: npt.NDArray[Any], name: str = "features") -> list[triton_grpc.InferInput]:
    """Rows as tritonclient sends them: raw_input_contents."""
    tensor = triton_grpc.InferInput(
        name, list(rows.shape), triton_grpc.np_to_triton_dtype(rows.dtype)
    )
    tensor.set_data_from_numpy(rows)
    return [tensor]


def parameters(result: Any) -> dict[str, Any]:
    """The response's parameters as plain values."""
    return {
        key: getattr(value, value.WhichOneof("parameter_choice"))
        for key, value in result.get_response().parameters.items()
    }


def typed_request(endpoint: str, rows: npt.NDArray[Any]) -> Any:
    """A ModelInferRequest with its values in typed contents instead of raw bytes."""
    infer = service_pb2.ModelInferRequest(model_name=endpoint)
    tensor = infer.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    tensor.contents.fp32_contents.extend(rows.reshape(-1).tolist())
    return infer


async def refused_oip(call: Any) -> DecodedError:
    """The decoded error of a raw-stub OIP call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    error = decode_rpc_error(info.value)
    assert error.domain == DOMAIN, error
    return error


def assert_answers_as(
    result: Any, sessions: dict[str, ort.InferenceSession], version: str, rows: Any = ROWS
) -> None:
    labels, probabilities = reference(sessions, version, rows)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("label"), labels)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TestClientsUnchanged:
    async def test_asyncio_client(
        self, dependencies: Dependencies, sessions: dict[str, ort.InferenceSession]
    ) -> None:
        """tritonclient.grpc.aio gets the endpoint's health, metadata (the version's
        signature) and onnxruntime's answer, with the answering version as model name and
        version and how it was chosen as response parameters."""
        deps = dependencies
        await deploy(deps, "oip-aio", {V1: 100})
        async with oip_router(deps) as (target, _), client(target) as triton:
            result = await triton.infer("oip-aio", inputs(ROWS), headers=TRACEPARENT)
            live = await triton.is_server_live()
            ready = await triton.is_server_ready()
            server = await triton.get_server_metadata()
            assert (server.version, list(server.extensions)) == (
                installed_version("modelserve"),
                ["parameters"],
            )
            model_ready = await triton.is_model_ready("oip-aio")
            unknown_ready = await triton.is_model_ready("oip-nowhere")
            metadata = await triton.get_model_metadata("oip-aio")
        assert (live, ready, server.name, model_ready, unknown_ready) == (
            True,
            True,
            "modelserve-router",
            True,
            False,
        )
        assert (metadata.name, list(metadata.versions)) == ("oip-aio", ["1"])
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("features", "FP32", [-1, len(fraud.FEATURE_REFS)])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("label", "INT64", [-1]),
            ("probabilities", "FP32", [-1, 2]),
        ]
        assert_answers_as(result, sessions, V1)
        response = result.get_response()
        assert (response.model_name, response.model_version) == ("fraud", "1")
        assert len(response.id) == 32
        answered = parameters(result)
        assert (answered["route_reason"], answered["degraded"]) == ("single_target", False)
        assert answered["trace_id"] == TRACE_ID

    async def test_synchronous_client(
        self, dependencies: Dependencies, sessions: dict[str, ort.InferenceSession]
    ) -> None:
        """tritonclient.grpc's blocking client, as most Triton users write it, works
        unchanged, the requested outputs only."""
        deps = dependencies
        await deploy(deps, "oip-sync", {V2: 100})
        async with oip_router(deps) as (target, _):

            def call() -> Any:
                triton = triton_grpc.InferenceServerClient(target)
                try:
                    answer = triton.infer(
                        "oip-sync",
                        inputs(ROWS),
                        outputs=[triton_grpc.InferRequestedOutput("probabilities")],
                        request_id="sync-1",
                    )
                    # After the call, which made the router read the endpoint.
                    assert triton.is_server_ready()
                    assert triton.is_model_ready("oip-sync")
                    return answer
                finally:
                    triton.close()

            result = await asyncio.to_thread(call)
        response = result.get_response()
        assert [o.name for o in response.outputs] == ["probabilities"]
        assert (response.model_version, response.id) == ("2", "sync-1")
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), reference(sessions, V2)[1], rtol=0, atol=1e-5
        )

    async def test_raw_and_typed_inputs_give_onnxruntime_answer(
        self, dependencies: Dependencies, sessions: dict[str, ort.InferenceSession]
    ) -> None:
        """Rows sent as raw bytes and as typed contents both get onnxruntime's answer on the
        same rows to 1e-5; typed inputs get typed outputs back."""
        deps = dependencies
        await deploy(deps, "oip-forms", {V1: 100})
        async with oip_router(deps) as (target, _), client(target) as triton:
            raw = await triton.infer("oip-forms", inputs(ROWS))
            async with create_channel(target) as channel:
                typed = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    typed_request("oip-forms", ROWS)
                )
        labels, probabilities = reference(sessions, V1)
        assert_answers_as(raw, sessions, V1)
        assert not typed.raw_output_contents
        by_name = {o.name: o for o in typed.outputs}
        typed_probabilities = np.asarray(
            by_name["probabilities"].contents.fp32_contents, dtype=np.float32
        ).reshape(list(by_name["probabilities"].shape))
        np.testing.assert_allclose(typed_probabilities, probabilities, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(list(by_name["label"].contents.int64_contents), labels)
        np.testing.assert_array_equal(typed_probabilities, raw.as_numpy("probabilities"))


async def register_narrow_model(deps: Dependencies) -> str:
    """Version 1 of model `oip-narrow`: a classifier of 3 columns named `columns`, a
    signature unlike the demo model's (never loaded in Triton)."""
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(64, 3)).astype(np.float32)
    classifier = LogisticRegression().fit(rows, (rows[:, 0] > 0).astype(np.int64))
    data = convert_sklearn(
        classifier,
        initial_types=[("columns", FloatTensorType([None, 3]))],
        options={id(classifier): {"zipmap": False}},
    ).SerializeToString()
    async with create_channel(deps.registry_target) as channel:
        admin = RegistryAdminClient(channel)
        await admin.create_model("oip-narrow", "a model of another signature")
        version = await admin.upload_model_version(
            "models/oip-narrow",
            registry_pb.ModelVersion(
                format=registry_pb.ARTIFACT_FORMAT_ONNX, signature=onnx_signature(data, [])
            ),
            data,
        )
    return version.name


class TestMetadata:
    async def test_the_stable_versions_signature(self, dependencies: Dependencies) -> None:
        """ModelMetadata shows the signature of the version with the largest share (the
        stable one of a canary), or of the version a `version` names; a number that two
        models share is INVALID_ARGUMENT, and the versions listed are then full names."""
        deps = dependencies
        narrow = await register_narrow_model(deps)
        await deploy(deps, "oip-meta-stable", {V1: 90, narrow: 10})
        await deploy(deps, "oip-meta-canary", {V1: 10, narrow: 90})
        async with oip_router(deps) as (target, _), client(target) as triton:
            stable = await triton.get_model_metadata("oip-meta-stable")
            canary = await triton.get_model_metadata("oip-meta-canary")
            named = await triton.get_model_metadata("oip-meta-stable", narrow)
            with pytest.raises(InferenceServerException) as info:
                await triton.get_model_metadata("oip-meta-stable", "1")
            narrow_ready = await triton.is_model_ready("oip-meta-stable", narrow)

        def signature(metadata: Any) -> list[tuple[str, str, list[int]]]:
            return [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs]

        assert signature(stable) == [("features", "FP32", [-1, len(fraud.FEATURE_REFS)])]
        assert signature(canary) == signature(named) == [("columns", "FP32", [-1, 3])]
        assert list(stable.versions) == [V1, narrow]
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "send the full name" in info.value.message()
        # Registered, never loaded: not READY in inference.
        assert narrow_ready is False


class TestRouting:
    async def test_canary_split_shows_over_requests(self, dependencies: Dependencies) -> None:
        """With traffic 90/10, about a tenth of 600 requests are answered by the canary,
        each answer naming its version and `weighted`."""
        deps = dependencies
        await deploy(deps, "oip-canary", {V1: 90, V2: 10})
        answers: list[Any] = []
        async with oip_router(deps) as (target, _), client(target) as triton:
            for _ in range(12):
                answers += await asyncio.gather(
                    *(triton.infer("oip-canary", inputs(ROWS[:1])) for _ in range(50))
                )
        versions = [a.get_response().model_version for a in answers]
        # Binomial(600, 0.1): mean 60, sd 7.3; these bounds are 4.5 sd away.
        assert 27 <= versions.count("2") <= 93, versions.count("2")
        assert versions.count("1") + versions.count("2") == 600
        assert {parameters(a)["route_reason"] for a in answers} == {"weighted"}

    async def test_sticky_by_the_routing_key_parameter(self, dependencies: Dependencies) -> None:
        """The request parameter `routing_key` is hashed as Predict hashes the deployment's
        routing key: each key gets the same version every time, the one its hash picks, and
        a request without it is split by weight."""
        deps = dependencies
        await deploy(deps, "oip-sticky", {V1: 50, V2: 50}, routing_key="customer")
        keys = [f"c-{n}" for n in range(1001, 1021)]
        expected = {k: V1 if sticky_point("oip-sticky", k) * 100 < 50 else V2 for k in keys}
        assert set(expected.values()) == {V1, V2}
        got: dict[str, set[tuple[str, str]]] = {k: set() for k in keys}
        async with oip_router(deps) as (target, _), client(target) as triton:
            for _ in range(3):
                for key in keys:
                    answer = await triton.infer(
                        "oip-sticky", inputs(ROWS[:1]), parameters={"routing_key": key}
                    )
                    got[key].add(
                        (answer.get_response().model_version, parameters(answer)["route_reason"])
                    )
            unkeyed = await triton.infer("oip-sticky", inputs(ROWS[:1]))
        assert got == {k: {(expected[k].rsplit("/", 1)[1], "sticky")} for k in keys}
        assert parameters(unkeyed)["route_reason"] == "weighted"

    async def test_model_version_pins_a_version_of_the_deployment(
        self, dependencies: Dependencies, sessions: dict[str, ort.InferenceSession]
    ) -> None:
        """`model_version` pins a version the deployment routes to, even at 0 %, by number or
        full name (`pinned`); a version it does not route to is NOT_FOUND and not ready."""
        deps = dependencies
        await deploy(deps, "oip-pin", {V1: 100, V2: 0})
        async with oip_router(deps) as (target, _), client(target) as triton:
            by_number = await triton.infer("oip-pin", inputs(ROWS), model_version="2")
            by_name = await triton.infer("oip-pin", inputs(ROWS), model_version=V2)
            unpinned = await triton.infer("oip-pin", inputs(ROWS))
            pinned_ready = await triton.is_model_ready("oip-pin", "2")
            unknown_ready = await triton.is_model_ready("oip-pin", "7")
            pinned_metadata = await triton.get_model_metadata("oip-pin", "2")
            with pytest.raises(InferenceServerException) as info:
                await triton.infer("oip-pin", inputs(ROWS), model_version="7")
        for answer in (by_number, by_name):
            assert_answers_as(answer, sessions, V2)
            assert answer.get_response().model_version == "2"
            assert parameters(answer)["route_reason"] == "pinned"
        assert (unpinned.get_response().model_version, parameters(unpinned)["route_reason"]) == (
            "1",
            "single_target",
        )
        assert (pinned_ready, unknown_ready) == (True, False)
        assert [t.name for t in pinned_metadata.inputs] == ["features"]
        assert info.value.status() == "StatusCode.NOT_FOUND"
        assert "serves no version '7'" in info.value.message()


class TestPredictionLog:
    async def test_record_and_shadow_copy(
        self, dependencies: Dependencies, sessions: dict[str, ort.InferenceSession]
    ) -> None:
        """A request appends its record (the OIP id as request id, its trace id, the row as
        the version's features, the outputs) and its shadow version's copy, marked shadow,
        whose answer never reaches the caller."""
        deps = dependencies
        await deploy(deps, "oip-shadow", {V1: 100}, shadow=[V2])
        row = ROWS[1:2]
        async with oip_router(deps) as (target, app), client(target) as triton:
            answer = await triton.infer(
                "oip-shadow", inputs(row), request_id="oip-shadow-1", headers=TRACEPARENT
            )
            await app.shadows.idle()
            await app.prediction_log.flush()
        assert answer.get_response().model_version == "1"
        logged = {r.shadow: r for r in await records(deps, "oip-shadow-1")}
        assert sorted(logged) == [False, True]
        served, shadow = logged[False], logged[True]
        assert (served.model_version, served.route_reason, served.status, served.endpoint) == (
            V1,
            "single_target",
            prediction_record_pb2.PREDICTION_STATUS_OK,
            "oip-shadow",
        )
        assert served.trace_id == parameters(answer)["trace_id"] == TRACE_ID
        assert sorted(served.features) == sorted(fraud.FEATURE_REFS)
        np.testing.assert_allclose(
            [served.features[r].double_value for r in fraud.FEATURE_REFS], row[0], rtol=1e-6
        )
        assert (shadow.model_version, shadow.route_reason, shadow.status) == (
            V2,
            "shadow",
            prediction_record_pb2.PREDICTION_STATUS_OK,
        )
        shadow_probabilities = next(t for t in shadow.outputs if t.name == "probabilities")
        np.testing.assert_allclose(
            np.asarray(shadow_probabilities.contents.fp32_contents).reshape(1, 2),
            reference(sessions, V2, row)[1],
            rtol=0,
            atol=1e-5,
        )

    async def test_request_without_id_gets_one(self, dependencies: Dependencies) -> None:
        """A request without an `id` is answered with a generated one, under which its
        record is logged."""
        deps = dependencies
        await deploy(deps, "oip-no-id", {V1: 100})
        async with oip_router(deps) as (target, app), client(target) as triton:
            answer = await triton.infer("oip-no-id", inputs(ROWS))
            await app.prediction_log.flush()
        request_id = answer.get_response().id
        logged = await records(deps, request_id)
        assert [(r.endpoint, r.model_version) for r in logged] == [("oip-no-id", V1)]
        assert len(logged[0].outputs[0].shape) and logged[0].outputs[0].shape[0] == len(ROWS)


class TestFallbacks:
    async def test_fallback_version_answers_marked_degraded(
        self, dependencies: Dependencies, sessions: dict[str, ort.InferenceSession]
    ) -> None:
        """With the chosen version out of Triton, the fallback version answers: it is the
        response's model version, and the parameters say `fallback`, degraded, and why."""
        deps = dependencies
        await deploy(deps, "oip-fallback", {V2: 100}, fallback_version=V1)
        async with oip_router(deps) as (target, app), client(target) as triton:
            async with unloaded(deps, V2):
                answer = await triton.infer("oip-fallback", inputs(ROWS), request_id="oip-fb-1")
            await app.prediction_log.flush()
        assert_answers_as(answer, sessions, V1)
        assert answer.get_response().model_version == "1"
        answered = parameters(answer)
        assert (answered["route_reason"], answered["degraded"]) == ("fallback", True)
        assert answered["degraded_reason"].startswith(f"{V2} failed: TRITON_UNAVAILABLE")
        assert answered["degraded_reason"].endswith(f"answered by fallback {V1}")
        logged = await records(deps, "oip-fb-1")
        # Answered by V1, routed to V2: the monitor counts the degraded request for V2.
        assert [
            (r.model_version, r.routed_version, r.route_reason, r.degraded) for r in logged
        ] == [(V1, V2, "fallback", True)]

    async def test_declared_default_answers_each_row(self, dependencies: Dependencies) -> None:
        """With no fallback version, the declared default outputs answer every row of the
        batch, the endpoint as model name and no version; outputs it does not declare are
        left out."""
        deps = dependencies
        await deploy(deps, "oip-default", {V2: 100}, default_outputs=True)
        async with (
            oip_router(deps) as (target, _),
            client(target) as triton,
            unloaded(deps, V2),
        ):
            answer = await triton.infer("oip-default", inputs(ROWS))
        response = answer.get_response()
        assert (response.model_name, response.model_version) == ("oip-default", "")
        assert [o.name for o in response.outputs] == ["probabilities"]
        np.testing.assert_array_equal(
            answer.as_numpy("probabilities"), np.full((len(ROWS), 2), 0.5, dtype=np.float32)
        )
        answered = parameters(answer)
        assert (answered["route_reason"], answered["degraded"]) == ("default_output", True)


class TestBadInput:
    async def test_each_mistake_is_named(self, dependencies: Dependencies) -> None:
        """An unknown endpoint is NOT_FOUND; a wrong tensor name, datatype or shape, a NaN,
        an unknown output and raw bytes that do not fill the shape are INVALID_ARGUMENT naming
        the field, never answered by the declared default; the router serves on."""
        deps = dependencies
        await deploy(deps, "oip-bad", {V1: 100}, default_outputs=True)
        nan_rows = ROWS.copy()
        nan_rows[2, 3] = np.nan
        short = service_pb2.ModelInferRequest(model_name="oip-bad")
        short.inputs.add(name="features", datatype="FP32", shape=list(ROWS.shape))
        short.raw_input_contents.append(ROWS[:3].tobytes())
        async with (
            oip_router(deps) as (target, _),
            client(target) as triton,
            create_channel(target) as channel,
        ):
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def refused(endpoint: str, rows: Any, **kwargs: Any) -> InferenceServerException:
                with pytest.raises(InferenceServerException) as info:
                    await triton.infer(endpoint, rows, **kwargs)
                return info.value

            unknown = await refused("oip-nowhere", inputs(ROWS))
            name = await refused("oip-bad", inputs(ROWS, "feats"))
            datatype = await refused("oip-bad", inputs(ROWS.astype(np.float64)))
            shape = await refused("oip-bad", inputs(np.ascontiguousarray(ROWS[:, :7])))
            nan = await refused("oip-bad", inputs(nan_rows))
            output = await refused(
                "oip-bad", inputs(ROWS), outputs=[triton_grpc.InferRequestedOutput("score")]
            )
            decoded_name = await refused_oip(stub.ModelInfer(typed_request("oip-bad", ROWS[:, :7])))
            decoded_short = await refused_oip(stub.ModelInfer(short))
            decoded_unknown = await refused_oip(stub.ModelInfer(typed_request("oip-nowhere", ROWS)))
            still = await triton.infer("oip-bad", inputs(ROWS))
        assert unknown.status() == "StatusCode.NOT_FOUND"
        assert decoded_unknown.code is grpc.StatusCode.NOT_FOUND
        for error in (name, datatype, shape, nan, output):
            assert error.status() == "StatusCode.INVALID_ARGUMENT", error
        assert "inputs[feats]: not an input of models/fraud/versions/1" in name.message()
        assert "inputs[features]: required by models/fraud/versions/1" in name.message()
        assert "inputs[features].datatype: expected FP32, got FP64" in datatype.message()
        assert "inputs[features].shape: expected [-1, 8], got [4, 7]" in shape.message()
        assert "inputs[features]: contains NaN or infinity" in nan.message()
        assert "outputs[score]: not an output of models/fraud/versions/1" in output.message()
        assert (decoded_name.code, [v.field for v in decoded_name.violations]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ["inputs[features].shape"],
        )
        assert [v.field for v in decoded_short.violations] == ["inputs[features].contents"]
        assert parameters(still)["route_reason"] == "single_target"


class TestTritonRefusals:
    async def test_a_batch_triton_refuses_is_the_callers_error(
        self, dependencies: Dependencies
    ) -> None:
        """Rows beyond Triton's max batch size are refused by Triton itself: the caller gets
        INVALID_ARGUMENT `TRITON_REFUSED_INPUT`, not a degraded answer from the declared
        default, and the version's circuit breaker does not count it."""
        deps = dependencies
        await deploy(deps, "oip-big", {V1: 100}, default_outputs=True)
        big = np.ascontiguousarray(np.tile(ROWS, (100, 1)))  # 400 rows > max batch 256
        async with oip_router(deps) as (target, _), create_channel(target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            errors = [
                await refused_oip(stub.ModelInfer(typed_request("oip-big", big))) for _ in range(6)
            ]
            still = await stub.ModelInfer(typed_request("oip-big", ROWS))
        assert {(e.code, e.reason) for e in errors} == {
            (grpc.StatusCode.INVALID_ARGUMENT, "TRITON_REFUSED_INPUT")
        }
        assert still.model_name == "fraud"
        assert circuit_state(V1) in (None, 0.0)


class TestLimitsAndKeys:
    async def test_keys_and_the_callers_bucket_shared_with_predict(
        self, dependencies: Dependencies
    ) -> None:
        """With auth on, liveness and readiness answer without a key, ModelInfer without one
        is UNAUTHENTICATED, and a key's one token bucket counts its Predict and ModelInfer
        calls alike: over its burst, ModelInfer is RATE_LIMITED."""
        deps = dependencies
        await deploy(deps, "oip-keys", {V1: 100})
        await deploy(deps, "oip-keys-predict", {V1: 100})
        key, record = new_api_key("dana", {Role.VIEWER}, n=TEST_SCRYPT_N)
        headers = {"x-api-key": key}
        async with (
            oip_router(
                deps,
                auth={"enabled": True, "keys": [record.model_dump()]},
                rate_limit={"requests_per_s": 0.01, "burst": 3},
            ) as (target, _),
            client(target) as triton,
            create_channel(target) as channel,
        ):
            live = await triton.is_server_live()
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            missing = await refused_oip(stub.ModelInfer(typed_request("oip-keys", ROWS)))
            predicted = await router_grpc.RouterServiceStub(channel).Predict(
                request("oip-keys-predict"), metadata=tuple(headers.items())
            )
            served = [
                await triton.infer("oip-keys", inputs(ROWS), headers=headers) for _ in range(2)
            ]
            over = await refused_oip(
                stub.ModelInfer(typed_request("oip-keys", ROWS), metadata=tuple(headers.items()))
            )
            # Without a key, once the router routes by a deployment.
            ready = await triton.is_server_ready()
        assert (live, ready) == (True, True)
        assert (missing.code, missing.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_MISSING",
        )
        assert predicted.model_version == V1
        assert [a.get_response().model_version for a in served] == ["1", "1"]
        assert (over.code, over.reason, over.metadata) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
            {"principal": "dana"},
        )

    async def test_endpoint_in_flight_limit(
        self, dependencies: Dependencies, sessions: dict[str, ort.InferenceSession]
    ) -> None:
        """With one request of the endpoint allowed in flight, concurrent ModelInfer calls
        beyond it are refused with ENDPOINT_OVERLOADED and its retry delay while the others
        get onnxruntime's answer."""
        deps = dependencies
        await deploy(deps, "oip-in-flight", {V1: 100})
        rows = fraud.make_dataset(128, seed=11)[0]
        outcomes: list[Any] = []
        async with (
            oip_router(
                deps,
                endpoints={"oip-in-flight": {"max_in_flight": 1, "in_flight_retry_after_s": 0.25}},
            ) as (target, app),
            create_channel(target) as channel,
        ):
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def burst() -> bool:
                outcomes[:] = await asyncio.gather(
                    *(stub.ModelInfer(typed_request("oip-in-flight", rows)) for _ in range(8)),
                    return_exceptions=True,
                )
                return any(isinstance(o, grpc.aio.AioRpcError) for o in outcomes)

            await eventually(burst, "a ModelInfer refused at the in-flight limit", within_s=WAIT_S)
            in_flight_after = app.predictor.in_flight("oip-in-flight")
        errors = [decode_rpc_error(o) for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        answers = [o for o in outcomes if not isinstance(o, BaseException)]
        assert {(e.code, e.reason, e.retry_delay_s) for e in errors} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "ENDPOINT_OVERLOADED", 0.25)
        }
        assert answers
        expected = reference(sessions, V1, rows)[1]
        for answer in answers:
            got = {o.name: o for o in answer.outputs}["probabilities"]
            np.testing.assert_allclose(
                np.asarray(got.contents.fp32_contents).reshape(-1, 2), expected, rtol=0, atol=1e-5
            )
        assert in_flight_after == 0


class TestReadiness:
    async def test_ready_once_it_holds_a_deployment(self, dependencies: Dependencies) -> None:
        """A router that has received no deployment (its registry is away) is live but not
        ready; one that follows the registry becomes ready."""
        deps = dependencies
        await deploy(deps, "oip-ready", {V1: 100})
        async with (
            oip_router(deps, registry_target=f"127.0.0.1:{free_port()}") as (lonely, _),
            client(lonely) as triton,
        ):
            assert await triton.is_server_live()
            assert not await triton.is_server_ready()
        async with oip_router(deps) as (target, _), client(target) as triton:
            await eventually(triton.is_server_ready, "ServerReady once deployments arrive")


class TestStreaming:
    async def test_a_stream_is_routed_per_request(
        self, dependencies: Dependencies, sessions: dict[str, ort.InferenceSession]
    ) -> None:
        """tritonclient's stream_infer on the router, auth on: each request of the stream is
        routed on its own (a 50/50 split reaches both versions), answered as onnxruntime
        answers for the version it names, under its id; a request with rows of the wrong
        width gets its own error and the stream goes on; a stream without a key is refused."""
        deps = dependencies
        await deploy(deps, "oip-stream", {V1: 50, V2: 50})
        key, record = new_api_key("erin", {Role.PREDICT}, n=TEST_SCRYPT_N)
        bad = np.ascontiguousarray(ROWS[:, :7])

        async def requests() -> AsyncIterator[dict[str, Any]]:
            for i in range(40):
                yield {
                    "model_name": "oip-stream",
                    "inputs": inputs(bad if i == 7 else ROWS),
                    "request_id": f"s{i}",
                }

        answers: dict[str, Any] = {}
        errors: list[str] = []
        async with (
            oip_router(deps, auth={"enabled": True, "keys": [record.model_dump()]}) as (
                target,
                _,
            ),
            client(target) as triton,
            create_channel(target) as channel,
        ):
            stream = triton.stream_infer(requests(), stream_timeout=60, headers={"x-api-key": key})
            async for result, error in stream:
                if error is not None:
                    errors.append(error.message())
                else:
                    answers[result.get_response().id] = result
            # Refused at the call's start, before any request: none is sent, so the client
            # does not race the refusal with its own writes.
            keyless = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(()))
            refused = await refused_oip(keyless.read())

        assert sorted(answers) == sorted(f"s{i}" for i in range(40) if i != 7)
        versions = {a.get_response().model_version for a in answers.values()}
        assert versions == {"1", "2"}
        for answer in answers.values():
            version = V1 if answer.get_response().model_version == "1" else V2
            assert_answers_as(answer, sessions, version)
        (error,) = errors
        assert error.startswith("[request id: s7] INVALID_ARGUMENT: "), error
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_MISSING",
        )
