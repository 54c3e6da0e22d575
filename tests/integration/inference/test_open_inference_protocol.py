"""The Open Inference Protocol facade, driven by tritonclient exactly as it drives Triton."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from importlib.metadata import version as installed_version
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as triton_grpc
from inference_testing import (
    MODEL_ID,
    ROWS,
    V1,
    V2,
    RunningInference,
    load,
    local_settings,
    reference,
)
from structlog.testing import capture_logs
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from modelserve_demo import fraud
from modelserve_inference.config import InferenceSettings
from modelserve_runtime.errors import decode_rpc_error

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module", params=["http", "grpc"])
def inference_settings(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, registry_target: str
) -> InferenceSettings:
    """A local-mode service sending requests to Triton over HTTP (the default) or gRPC:
    every test of the facade runs over both."""
    return local_settings(tmp_path_factory, registry_target, triton_protocol=request.param)


@pytest.fixture(scope="module")
async def loaded(inference_service: RunningInference) -> RunningInference:
    """The module's service with both versions loaded."""
    await load(inference_service.stub, V1)
    await load(inference_service.stub, V2)
    return inference_service


@pytest.fixture
async def client(loaded: RunningInference) -> AsyncIterator[InferenceServerClient]:
    """tritonclient's asyncio client pointed at the inference service instead of Triton."""
    triton = InferenceServerClient(loaded.target)
    yield triton
    await triton.close()


def _inputs(rows: npt.NDArray[Any], datatype: str = "FP32") -> list[triton_grpc.InferInput]:
    features = triton_grpc.InferInput("features", list(rows.shape), datatype)
    # set_data_from_numpy sends the tensor in raw_input_contents, as tritonclient always does.
    features.set_data_from_numpy(rows)
    return [features]


async def _infer(
    client: InferenceServerClient, version: str = "1", rows: npt.NDArray[Any] = ROWS, **kwargs: Any
) -> Any:
    return await client.infer(MODEL_ID, _inputs(rows), model_version=version, **kwargs)


async def _refused(client: InferenceServerClient, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        await client.infer(MODEL_ID, model_version=kwargs.pop("version", "1"), **kwargs)
    return info.value


def _assert_answers_as(result: Any, model: fraud.TrainedModel) -> None:
    labels, probabilities = reference(model)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("label"), labels)


class TestHealthAndMetadata:
    async def test_server_is_live_and_ready(self, client: InferenceServerClient) -> None:
        """is_server_live and is_server_ready answer True while Triton is up."""
        assert await client.is_server_live()
        assert await client.is_server_ready()
        server = await client.get_server_metadata()
        # The installed modelserve's version, and the extensions served (not model_repository:
        # loading and unloading stay UNIMPLEMENTED).
        assert (server.name, server.version) == (
            "modelserve-inference",
            installed_version("modelserve"),
        )
        assert list(server.extensions) == ["model_configuration", "statistics", "parameters"]

    async def test_model_ready_per_version(self, client: InferenceServerClient) -> None:
        """A loaded version is ready, an unknown version or model is not."""
        assert await client.is_model_ready(MODEL_ID, "1")
        assert await client.is_model_ready(MODEL_ID, "2")
        assert await client.is_model_ready(MODEL_ID)
        assert not await client.is_model_ready(MODEL_ID, "99")
        assert not await client.is_model_ready("churn", "1")

    async def test_model_metadata_is_the_signature(self, client: InferenceServerClient) -> None:
        """ModelMetadata gives the version's signature; without a version, every READY one."""
        metadata = await client.get_model_metadata(MODEL_ID, "1")
        newest = await client.get_model_metadata(MODEL_ID)

        assert metadata.name == MODEL_ID
        assert list(metadata.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("features", "FP32", [-1, len(fraud.FEATURE_REFS)])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("label", "INT64", [-1]),
            ("probabilities", "FP32", [-1, 2]),
        ]
        assert list(newest.versions) == ["1", "2"]

    async def test_metadata_of_an_unknown_model_is_not_found(
        self, client: InferenceServerClient
    ) -> None:
        """ModelMetadata of a model the service does not hold is NOT_FOUND."""
        with pytest.raises(InferenceServerException) as info:
            await client.get_model_metadata("churn", "1")

        assert info.value.status() == "StatusCode.NOT_FOUND"


class TestModelInfer:
    async def test_requests_reach_triton_over_the_configured_protocol(
        self, loaded: RunningInference, inference_settings: InferenceSettings
    ) -> None:
        """With HTTP the service holds an HTTP client on its Triton's HTTP endpoint; with
        gRPC none, and requests share the model-control client."""
        http = loaded.app.http_runner
        if inference_settings.triton_protocol == "http":
            assert http is not None
            assert loaded.app.triton is not None
            assert http.url == loaded.app.triton.http_endpoint
        else:
            assert http is None

    async def test_each_version_answers_as_onnxruntime(
        self, client: InferenceServerClient, fraud_models: dict[str, fraud.TrainedModel]
    ) -> None:
        """Unchanged tritonclient code gets each version's onnxruntime answer, raw contents in
        and out."""
        first = await _infer(client, "1")
        second = await _infer(client, "2")

        _assert_answers_as(first, fraud_models[V1])
        _assert_answers_as(second, fraud_models[V2])
        assert first.get_response().model_version == "1"
        assert second.get_response().model_version == "2"

    async def test_no_version_runs_the_newest_ready_one(
        self, client: InferenceServerClient, fraud_models: dict[str, fraud.TrainedModel]
    ) -> None:
        """A request without a version is answered by the newest READY version."""
        result = await client.infer(MODEL_ID, _inputs(ROWS))

        assert result.get_response().model_version == "2"
        _assert_answers_as(result, fraud_models[V2])

    async def test_requested_outputs_and_request_id(self, client: InferenceServerClient) -> None:
        """Only the requested outputs come back, with the request's id."""
        result = await _infer(
            client,
            outputs=[triton_grpc.InferRequestedOutput("probabilities")],
            request_id="req-7",
        )

        response = result.get_response()
        assert [o.name for o in response.outputs] == ["probabilities"]
        assert response.id == "req-7"

    async def test_typed_contents_are_accepted(
        self, loaded: RunningInference, fraud_models: dict[str, fraud.TrainedModel]
    ) -> None:
        """A request with values in InferTensorContents instead of raw bytes gets the same answer."""
        request = service_pb2.ModelInferRequest(model_name=MODEL_ID, model_version="1")
        tensor = request.inputs.add(name="features", datatype="FP32", shape=list(ROWS.shape))
        tensor.contents.fp32_contents.extend(ROWS.reshape(-1).tolist())

        stub = service_pb2_grpc.GRPCInferenceServiceStub(loaded.channel)
        response = await stub.ModelInfer(request)

        by_name = dict(
            zip([o.name for o in response.outputs], response.raw_output_contents, strict=True)
        )
        probabilities = np.frombuffer(by_name["probabilities"], dtype=np.float32).reshape(-1, 2)
        np.testing.assert_allclose(probabilities, reference(fraud_models[V1])[1], rtol=0, atol=1e-5)

    async def test_the_synchronous_client_works_too(
        self, loaded: RunningInference, fraud_models: dict[str, fraud.TrainedModel]
    ) -> None:
        """tritonclient.grpc's blocking client, as most Triton users write it, works unchanged."""

        def call() -> Any:
            client = triton_grpc.InferenceServerClient(loaded.target)
            try:
                assert client.is_server_ready()
                assert client.is_model_ready(MODEL_ID, "1")
                return client.infer(MODEL_ID, _inputs(ROWS), model_version="1")
            finally:
                client.close()

        _assert_answers_as(await asyncio.to_thread(call), fraud_models[V1])

    async def test_calls_go_through_the_standard_interceptors(
        self, client: InferenceServerClient
    ) -> None:
        """Each facade call writes the same one-line RPC summary as every other RPC."""
        with capture_logs() as logs:
            await _infer(client)

        summaries = [e for e in logs if e["event"] == "rpc"]
        assert [(e["method"], e["code"]) for e in summaries] == [
            ("/inference.GRPCInferenceService/ModelInfer", "OK")
        ]


class TestBadRequests:
    async def test_wrong_shape_names_expected_and_received(
        self, client: InferenceServerClient, loaded: RunningInference
    ) -> None:
        """Rows of 7 features are INVALID_ARGUMENT saying [-1, 8] was expected and [4, 7] sent."""
        error = await _refused(client, inputs=_inputs(np.ascontiguousarray(ROWS[:, :7])))

        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "inputs[features].shape: expected [-1, 8], got [4, 7]" in error.message()
        await self._assert_still_serving(client)

    async def test_wrong_datatype_names_expected_and_received(
        self, client: InferenceServerClient
    ) -> None:
        """FP64 rows for the FP32 input are INVALID_ARGUMENT, not silently cast."""
        error = await _refused(client, inputs=_inputs(ROWS.astype(np.float64), "FP64"))

        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "inputs[features].datatype: expected FP32, got FP64" in error.message()
        await self._assert_still_serving(client)

    async def test_nan_is_refused_naming_the_input(self, client: InferenceServerClient) -> None:
        """A NaN among the features is INVALID_ARGUMENT naming the input."""
        rows = ROWS.copy()
        rows[2, 3] = np.nan

        error = await _refused(client, inputs=_inputs(rows))

        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "inputs[features]: contains NaN or infinity" in error.message()
        await self._assert_still_serving(client)

    async def test_unknown_version_is_not_found(self, client: InferenceServerClient) -> None:
        """A version the service does not hold is NOT_FOUND."""
        error = await _refused(client, inputs=_inputs(ROWS), version="99")

        assert error.status() == "StatusCode.NOT_FOUND"
        assert "models/fraud/versions/99" in error.message()

    async def test_unknown_output_is_refused(self, client: InferenceServerClient) -> None:
        """Asking for an output the version lacks is INVALID_ARGUMENT naming it."""
        error = await _refused(
            client, inputs=_inputs(ROWS), outputs=[triton_grpc.InferRequestedOutput("score")]
        )

        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "score" in error.message()

    async def test_classification_output_is_refused(self, client: InferenceServerClient) -> None:
        """Triton's top-k classification extension is not offered: INVALID_ARGUMENT, not a
        silently different answer."""
        error = await _refused(
            client,
            inputs=_inputs(ROWS),
            outputs=[triton_grpc.InferRequestedOutput("probabilities", class_count=1)],
        )

        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "classification" in error.message()

    async def test_raw_contents_that_do_not_fill_the_shape(self, loaded: RunningInference) -> None:
        """Raw bytes for 3 rows declared as 4 are INVALID_ARGUMENT with an ErrorInfo and the
        field violation, as every modelserve error."""
        request = service_pb2.ModelInferRequest(model_name=MODEL_ID, model_version="1")
        request.inputs.add(name="features", datatype="FP32", shape=list(ROWS.shape))
        request.raw_input_contents.append(ROWS[:3].tobytes())
        stub = service_pb2_grpc.GRPCInferenceServiceStub(loaded.channel)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(request)

        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.domain == "inference.modelserve"
        assert [v.field for v in error.violations] == ["inputs[features].contents"]

    @staticmethod
    async def _assert_still_serving(client: InferenceServerClient) -> None:
        assert await client.is_model_ready(MODEL_ID, "1")
        assert (await _infer(client)).as_numpy("probabilities").shape == (len(ROWS), 2)


class TestTritonExtensions:
    async def test_a_stream_answers_each_request_by_id_and_survives_a_bad_one(
        self, client: InferenceServerClient, fraud_models: dict[str, fraud.TrainedModel]
    ) -> None:
        """tritonclient's stream_infer: requests to both versions come back under their ids,
        each as onnxruntime answers for its version; a request with rows of the wrong width
        gets its own error, naming its id and the expected shape, and the others still come."""
        bad = np.ascontiguousarray(ROWS[:, :7])

        async def requests() -> AsyncIterator[dict[str, Any]]:
            for i in range(12):
                version = "1" if i % 2 == 0 else "2"
                rows = bad if i == 5 else ROWS
                yield {
                    "model_name": MODEL_ID,
                    "model_version": version,
                    "inputs": _inputs(rows),
                    "request_id": f"r{i}",
                }

        answers: dict[str, Any] = {}
        errors: list[str] = []
        async for result, error in client.stream_infer(requests(), stream_timeout=60):
            if error is not None:
                errors.append(error.message())
            else:
                answers[result.get_response().id] = result

        assert sorted(answers) == sorted(f"r{i}" for i in range(12) if i != 5)
        for request_id, result in answers.items():
            version = V1 if int(request_id[1:]) % 2 == 0 else V2
            _assert_answers_as(result, fraud_models[version])
        (error,) = errors
        assert error.startswith("[request id: r5] INVALID_ARGUMENT: "), error
        assert "inputs[features].shape: expected [-1, 8], got [4, 7]" in error

    async def test_the_synchronous_clients_stream_calls_back(
        self, loaded: RunningInference, fraud_models: dict[str, fraud.TrainedModel]
    ) -> None:
        """start_stream and async_stream_infer, as Triton users stream with the blocking
        client: every request's answer reaches the callback."""

        def call() -> list[Any]:
            answered: list[Any] = []
            done = threading.Event()

            def callback(result: Any, error: Any) -> None:
                answered.append(error if error is not None else result)
                if len(answered) == 3:
                    done.set()

            client = triton_grpc.InferenceServerClient(loaded.target)
            try:
                client.start_stream(callback=callback)
                for i in range(3):
                    client.async_stream_infer(
                        MODEL_ID, _inputs(ROWS), model_version="1", request_id=str(i)
                    )
                assert done.wait(30), "the stream's answers did not all come"
                client.stop_stream()
            finally:
                client.close()
            return answered

        answered = await asyncio.to_thread(call)
        assert sorted(r.get_response().id for r in answered) == ["0", "1", "2"]
        for result in answered:
            _assert_answers_as(result, fraud_models[V1])

    async def test_model_config_is_tritons(
        self, client: InferenceServerClient, loaded: RunningInference
    ) -> None:
        """get_model_config answers what Triton itself answers for the model; a model the
        service does not hold is NOT_FOUND."""
        ours = await client.get_model_config(MODEL_ID, "1")
        triton = InferenceServerClient(loaded.app.runner.url)
        try:
            theirs = await triton.get_model_config(MODEL_ID)
        finally:
            await triton.close()

        assert ours == theirs
        assert ours.config.name == MODEL_ID
        assert ours.config.max_batch_size == 256
        with pytest.raises(InferenceServerException) as info:
            await client.get_model_config("churn")
        assert info.value.status() == "StatusCode.NOT_FOUND"

    async def test_statistics_are_tritons_for_held_versions(
        self, client: InferenceServerClient, loaded: RunningInference
    ) -> None:
        """get_inference_statistics answers Triton's counts for a version, and for every
        model when none is named; an unknown version is NOT_FOUND, a version without a model
        INVALID_ARGUMENT."""
        await _infer(client, version="2")
        ours = await client.get_inference_statistics(MODEL_ID, "2")
        triton = InferenceServerClient(loaded.app.runner.url)
        try:
            theirs = await triton.get_inference_statistics(MODEL_ID, "2")
        finally:
            await triton.close()

        (stats,) = ours.model_stats
        assert (stats.name, stats.version) == (MODEL_ID, "2")
        assert stats.inference_stats.success.count >= 1
        assert (
            stats.inference_stats.success.count
            == theirs.model_stats[0].inference_stats.success.count
        )
        every = await client.get_inference_statistics()
        assert {(s.name, s.version) for s in every.model_stats} >= {
            (MODEL_ID, "1"),
            (MODEL_ID, "2"),
        }
        for name, version, status in (
            (MODEL_ID, "99", "StatusCode.NOT_FOUND"),
            ("", "1", "StatusCode.INVALID_ARGUMENT"),
        ):
            with pytest.raises(InferenceServerException) as info:
                await client.get_inference_statistics(name, version)
            assert info.value.status() == status, (name, version)

    async def test_repository_index_lists_the_held_versions(
        self, client: InferenceServerClient
    ) -> None:
        """get_model_repository_index lists each version the service holds in Triton's terms."""
        index = await client.get_model_repository_index()

        assert {(m.name, m.version, m.state) for m in index.models} >= {
            (MODEL_ID, "1", "READY"),
            (MODEL_ID, "2", "READY"),
        }
