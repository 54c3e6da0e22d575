"""InferenceService with a real registry and a real local Triton, through real gRPC servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from support import running

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_demo import fraud
from modelserve_inference import server as inference_server
from modelserve_inference.config import InferenceSettings
from modelserve_registry import server as registry_server
from modelserve_registry.config import RegistrySettings
from modelserve_runtime.clients import RegistryAdminClient
from modelserve_runtime.convert import TRITON_NAMES, numpy_to_tensor, tensor_to_numpy
from modelserve_runtime.errors import DecodedError, decode_rpc_error
from modelserve_triton.model_config import TensorSpec
from modelserve_triton.runner import TritonRunner

pytestmark = pytest.mark.triton

MODEL_ID = "fraud"
V1 = f"models/{MODEL_ID}/versions/1"
V2 = f"models/{MODEL_ID}/versions/2"
DOMAIN = "inference.modelserve"
#: Four payments that neither version was trained on.
ROWS = fraud.make_dataset(4, seed=7)[0]
_DATATYPES = {name: code for code, name in TRITON_NAMES.items()}


def _spec(spec: TensorSpec) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(
        name=spec.name, datatype=_DATATYPES[spec.datatype], shape=list(spec.shape)
    )


@pytest.fixture(scope="module")
def fraud_models() -> dict[str, fraud.TrainedModel]:
    """The demo fraud model by version name: version 1 trained with seed 0, version 2 with 1."""
    return {V1: fraud.train(seed=0), V2: fraud.train(seed=1)}


@pytest.fixture(scope="module")
async def registry_target(
    tmp_path_factory: pytest.TempPathFactory, fraud_models: dict[str, fraud.TrainedModel]
) -> AsyncIterator[str]:
    """`host:port` of a real registry over a data directory in tmp, holding both versions."""
    settings = RegistrySettings(data_dir=tmp_path_factory.mktemp("registry"))
    async with running(registry_server.build_server, settings) as (grpc_server, channel, _):
        admin = RegistryAdminClient(channel)
        await admin.create_model(MODEL_ID, "demo fraud model")
        for seed, (name, trained) in enumerate(fraud_models.items()):
            signature = registry_pb.Signature(
                inputs=[_spec(s) for s in trained.inputs],
                outputs=[_spec(s) for s in trained.outputs],
                feature_refs=list(trained.feature_refs),
            )
            version = await admin.upload_model_version(
                f"models/{MODEL_ID}",
                registry_pb.ModelVersion(
                    description=f"demo fraud model, seed {seed}",
                    format=registry_pb.ARTIFACT_FORMAT_ONNX,
                    signature=signature,
                ),
                trained.onnx_bytes,
            )
            assert version.name == name
        yield f"127.0.0.1:{grpc_server.port}"


@pytest.fixture(scope="module")
async def inference(
    tmp_path_factory: pytest.TempPathFactory, registry_target: str
) -> AsyncIterator[pb_grpc.InferenceServiceAsyncStub]:
    """A stub on a real inference service that started its own tritonserver, for the module."""
    settings = InferenceSettings(
        triton_mode="local",
        triton_work_dir=tmp_path_factory.mktemp("triton"),
        registry_target=registry_target,
    )
    async with running(inference_server.build_server, settings) as (_, channel, _app):
        yield pb_grpc.InferenceServiceStub(channel)


def _reference(model: fraud.TrainedModel) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Labels and probabilities of onnxruntime in this process, on the bytes that were uploaded."""
    session = ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"features": ROWS})
    return np.asarray(labels), np.asarray(probabilities)


def _request(
    name: str, *inputs: tensor_pb2.Tensor, output_names: tuple[str, ...] = ()
) -> pb.InferRequest:
    return pb.InferRequest(
        name=name,
        inputs=list(inputs) or [numpy_to_tensor("features", ROWS)],
        output_names=list(output_names),
    )


async def _infer(
    stub: pb_grpc.InferenceServiceAsyncStub, request: pb.InferRequest
) -> dict[str, npt.NDArray[Any]]:
    response = await stub.Infer(request)
    assert response.name == request.name
    return {t.name: tensor_to_numpy(t) for t in response.outputs}


def _assert_answers_as(outputs: dict[str, npt.NDArray[Any]], model: fraud.TrainedModel) -> None:
    labels, probabilities = _reference(model)
    assert set(outputs) == {"label", "probabilities"}
    np.testing.assert_allclose(outputs["probabilities"], probabilities, rtol=0, atol=1e-5)
    # The signature says label is [-1]; Triton's [N, 1] answer is given back that shape.
    assert outputs["label"].shape == (len(ROWS),)
    np.testing.assert_array_equal(outputs["label"], labels)


async def _load(stub: pb_grpc.InferenceServiceAsyncStub, name: str) -> pb.LoadedModelVersion:
    response = await stub.LoadModelVersion(pb.LoadModelVersionRequest(name=name))
    assert response.model_version.state == pb.MODEL_VERSION_STATE_READY, response
    return response.model_version


async def _held(stub: pb_grpc.InferenceServiceAsyncStub) -> list[pb.LoadedModelVersion]:
    return list((await stub.ListModelVersions(pb.ListModelVersionsRequest())).model_versions)


async def _triton_ready(endpoint: str, version: int) -> bool:
    """What the Triton at `endpoint` itself says about that version of the model."""
    triton = TritonRunner(endpoint)
    try:
        return await triton.is_model_ready(MODEL_ID, version, timeout_s=5)
    finally:
        await triton.close()


async def _refused(call: Awaitable[object]) -> DecodedError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    error = decode_rpc_error(info.value)
    assert error.domain == DOMAIN
    return error


class TestLoadModelVersion:
    async def test_load_reports_ready_endpoint_and_signature(
        self, inference: pb_grpc.InferenceServiceAsyncStub
    ) -> None:
        """A loaded version is READY on a Triton endpoint that serves it, with its signature."""
        loaded = await _load(inference, V1)

        assert loaded.name == V1
        assert loaded.reason == ""
        assert (loaded.triton_model_name, loaded.triton_model_version) == (MODEL_ID, 1)
        assert [(s.name, s.datatype, list(s.shape)) for s in loaded.inputs] == [
            ("features", tensor_pb2.DATA_TYPE_FP32, [-1, len(fraud.FEATURE_REFS)])
        ]
        assert [(s.name, s.datatype, list(s.shape)) for s in loaded.outputs] == [
            ("label", tensor_pb2.DATA_TYPE_INT64, [-1]),
            ("probabilities", tensor_pb2.DATA_TYPE_FP32, [-1, 2]),
        ]
        assert await _triton_ready(loaded.triton_endpoint, 1)


class TestInfer:
    async def test_batch_matches_onnxruntime(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A batch of four rows gets onnxruntime's labels and probabilities for the same bytes."""
        await _load(inference, V1)

        outputs = await _infer(inference, _request(V1))

        assert outputs["probabilities"].shape == (4, 2)
        assert outputs["label"].shape[0] == 4
        _assert_answers_as(outputs, fraud_models[V1])

    async def test_output_names_select_outputs(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """Naming one output returns only that output."""
        await _load(inference, V1)

        outputs = await _infer(inference, _request(V1, output_names=("probabilities",)))

        assert list(outputs) == ["probabilities"]
        np.testing.assert_allclose(
            outputs["probabilities"], _reference(fraud_models[V1])[1], rtol=0, atol=1e-5
        )


class TestModelVersions:
    async def test_list_shows_both_versions_ready_in_order(
        self, inference: pb_grpc.InferenceServiceAsyncStub
    ) -> None:
        """Loading a second version of the model lists both READY, ordered by version."""
        await _load(inference, V1)
        await _load(inference, V2)

        held = await _held(inference)

        assert [(v.name, v.state) for v in held] == [
            (V1, pb.MODEL_VERSION_STATE_READY),
            (V2, pb.MODEL_VERSION_STATE_READY),
        ]
        assert [v.triton_model_version for v in held] == [1, 2]

    async def test_each_version_answers_with_its_own_model(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """Two loaded versions of one model each answer with their own artifact."""
        await _load(inference, V1)
        await _load(inference, V2)

        first = await _infer(inference, _request(V1))
        second = await _infer(inference, _request(V2))

        _assert_answers_as(first, fraud_models[V1])
        _assert_answers_as(second, fraud_models[V2])
        assert np.abs(first["probabilities"] - second["probabilities"]).max() > 1e-3

    async def test_unloaded_version_is_not_found_while_the_other_answers(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """Unloading version 1 leaves version 2 serving and makes version 1 NOT_FOUND."""
        await _load(inference, V1)
        endpoint = (await _load(inference, V2)).triton_endpoint

        await inference.UnloadModelVersion(pb.UnloadModelVersionRequest(name=V1))

        _assert_answers_as(await _infer(inference, _request(V2)), fraud_models[V2])
        error = await _refused(inference.Infer(_request(V1)))
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == "VERSION_NOT_LOADED"
        assert error.metadata == {"name": V1}
        assert [v.name for v in await _held(inference)] == [V2]
        assert not await _triton_ready(endpoint, 1)
        assert await _triton_ready(endpoint, 2)


class TestBadRequests:
    @pytest.fixture
    async def before(
        self, inference: pb_grpc.InferenceServiceAsyncStub
    ) -> list[pb.LoadedModelVersion]:
        """Version 1 loaded; what the service holds before the bad call."""
        await _load(inference, V1)
        return await _held(inference)

    @staticmethod
    async def _assert_nothing_changed(
        stub: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        model: fraud.TrainedModel,
    ) -> None:
        assert await _held(stub) == before
        _assert_answers_as(await _infer(stub, _request(V1)), model)

    async def test_wrong_inner_dimension(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A row of 7 features where the signature says 8 is refused at `inputs[features].shape`."""
        short = numpy_to_tensor("features", ROWS[:1, :7])

        error = await _refused(inference.Infer(_request(V1, short)))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.reason == "INVALID_ARGUMENT"
        assert [v.field for v in error.violations] == ["inputs[features].shape"]
        assert "[-1, 8]" in error.violations[0].description
        await self._assert_nothing_changed(inference, before, fraud_models[V1])

    async def test_unknown_input_name(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """An input the signature lacks is refused with a violation naming it."""
        extra = numpy_to_tensor("amount", np.ones((4, 1), dtype=np.float32))

        error = await _refused(
            inference.Infer(_request(V1, numpy_to_tensor("features", ROWS), extra))
        )

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["inputs[amount]"]
        await self._assert_nothing_changed(inference, before, fraud_models[V1])

    async def test_missing_input(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A request without the signature's input is refused at that input, beside the stray one."""
        stray = numpy_to_tensor("amount", np.ones((4, 1), dtype=np.float32))

        error = await _refused(inference.Infer(_request(V1, stray)))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["inputs[amount]", "inputs[features]"]
        await self._assert_nothing_changed(inference, before, fraud_models[V1])

    async def test_batch_larger_than_max_batch_size(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A batch over max_batch_size is the caller's error (INVALID_ARGUMENT on `inputs`), not
        UNAVAILABLE, which would invite a retry."""
        big = numpy_to_tensor("features", np.repeat(ROWS[:1], 257, axis=0))

        error = await _refused(inference.Infer(_request(V1, big)))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["inputs"]
        await self._assert_nothing_changed(inference, before, fraud_models[V1])

    async def test_text_for_a_numeric_input(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A BYTES tensor for the FP32 input is refused at `inputs[features].datatype`."""
        text = numpy_to_tensor("features", np.full((1, 8), b"1.5", dtype=np.object_))

        error = await _refused(inference.Infer(_request(V1, text)))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["inputs[features].datatype"]
        await self._assert_nothing_changed(inference, before, fraud_models[V1])

    async def test_contents_that_do_not_fill_the_shape(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A tensor whose values do not fill its shape is refused at `inputs[0].contents`."""
        tensor = numpy_to_tensor("features", ROWS[:1])
        tensor.shape[:] = [2, len(fraud.FEATURE_REFS)]

        error = await _refused(inference.Infer(_request(V1, tensor)))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["inputs[0].contents"]
        await self._assert_nothing_changed(inference, before, fraud_models[V1])

    async def test_unknown_output_name(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """Asking for an output the version lacks is refused at `output_names`."""
        error = await _refused(inference.Infer(_request(V1, output_names=("score",))))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["output_names"]
        assert "score" in error.violations[0].description
        await self._assert_nothing_changed(inference, before, fraud_models[V1])

    @pytest.mark.parametrize(
        "name",
        [
            "models/Fraud/versions/x",
            "models/Fraud/versions/1",
            "models/fraud/versions/0",
            "models/fraud",
        ],
    )
    @pytest.mark.parametrize("rpc", ["Infer", "LoadModelVersion", "UnloadModelVersion"])
    async def test_malformed_version_name(
        self,
        rpc: str,
        name: str,
        inference: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A name not of the form `models/{model}/versions/{n}` is refused at `name` by every RPC."""
        requests: dict[str, Any] = {
            "Infer": _request(name),
            "LoadModelVersion": pb.LoadModelVersionRequest(name=name),
            "UnloadModelVersion": pb.UnloadModelVersionRequest(name=name),
        }

        error = await _refused(getattr(inference, rpc)(requests[rpc]))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["name"]
        await self._assert_nothing_changed(inference, before, fraud_models[V1])

    async def test_unload_of_a_version_not_held(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """Unloading a well-formed name that is not held is NOT_FOUND and unloads nothing else."""
        absent = f"models/{MODEL_ID}/versions/99"

        error = await _refused(
            inference.UnloadModelVersion(pb.UnloadModelVersionRequest(name=absent))
        )

        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == "VERSION_NOT_LOADED"
        assert error.metadata == {"name": absent}
        await self._assert_nothing_changed(inference, before, fraud_models[V1])

    async def test_version_missing_from_registry(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        before: list[pb.LoadedModelVersion],
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """Loading a version the registry lacks is NOT_FOUND and leaves nothing held for it."""
        missing = f"models/{MODEL_ID}/versions/99"

        error = await _refused(inference.LoadModelVersion(pb.LoadModelVersionRequest(name=missing)))

        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.metadata == {"resource": missing}
        assert missing not in [v.name for v in await _held(inference)]
        await self._assert_nothing_changed(inference, before, fraud_models[V1])
