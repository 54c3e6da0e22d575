"""InferenceService with a real registry and a real local Triton, through real gRPC servers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from inference_testing import (
    MODEL_ID,
    ROWS,
    V1,
    V2,
    RunningInference,
    assert_answers_as,
    held,
    infer,
    infer_request,
    load,
    local_settings,
    reference,
    refused,
    triton_ready,
)

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import tensor_pb2
from modelserve_demo import fraud
from modelserve_inference.config import InferenceSettings
from modelserve_runtime.convert import numpy_to_tensor
from modelserve_runtime.errors import DeadlineExceededError

pytestmark = pytest.mark.triton

#: Asserts that a refused call left the service as it was.
UnchangedCheck = Callable[[], Awaitable[None]]


@pytest.fixture(scope="module")
def inference_settings(
    tmp_path_factory: pytest.TempPathFactory, registry_target: str
) -> InferenceSettings:
    """The conftest's local-mode service, with a tritonserver flag of the operator's own."""
    return local_settings(
        tmp_path_factory, registry_target, triton_extra_args=("--exit-timeout-secs=7",)
    )


class TestTritonFlags:
    async def test_extra_flags_reach_the_triton_it_starts(
        self, inference_service: RunningInference
    ) -> None:
        """TRITON_EXTRA_ARGS go to tritonserver: its options table shows the exit timeout."""
        triton = inference_service.app.triton
        assert triton is not None
        options = triton.log_path.read_text(errors="replace")

        (row,) = [line for line in options.splitlines() if line.startswith("| exit_timeout ")]
        assert row.split("|")[2].strip() == "7"


class TestLoadModelVersion:
    async def test_load_reports_ready_endpoint_and_signature(
        self, inference: pb_grpc.InferenceServiceAsyncStub
    ) -> None:
        """A loaded version is READY on a Triton endpoint that serves it, with its signature
        and the device its instances run on."""
        loaded = await load(inference, V1)

        assert loaded.name == V1
        assert loaded.reason == ""
        assert (loaded.device, list(loaded.gpus)) == (pb.INSTANCE_DEVICE_CPU, [])
        assert (loaded.triton_model_name, loaded.triton_model_version) == (MODEL_ID, 1)
        assert [(s.name, s.datatype, list(s.shape)) for s in loaded.inputs] == [
            ("features", tensor_pb2.DATA_TYPE_FP32, [-1, len(fraud.FEATURE_REFS)])
        ]
        assert [(s.name, s.datatype, list(s.shape)) for s in loaded.outputs] == [
            ("label", tensor_pb2.DATA_TYPE_INT64, [-1]),
            ("probabilities", tensor_pb2.DATA_TYPE_FP32, [-1, 2]),
        ]
        assert await triton_ready(loaded.triton_endpoint, 1)


class TestInfer:
    async def test_batch_matches_onnxruntime(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A batch of four rows gets onnxruntime's labels and probabilities for the same bytes."""
        await load(inference, V1)

        outputs = await infer(inference, infer_request(V1))

        assert outputs["probabilities"].shape == (4, 2)
        assert outputs["label"].shape[0] == 4
        assert_answers_as(outputs, fraud_models[V1])

    async def test_output_names_select_outputs(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """Naming one output returns only that output."""
        await load(inference, V1)

        outputs = await infer(inference, infer_request(V1, output_names=("probabilities",)))

        assert list(outputs) == ["probabilities"]
        np.testing.assert_allclose(
            outputs["probabilities"], reference(fraud_models[V1])[1], rtol=0, atol=1e-5
        )


class TestModelVersions:
    async def test_list_shows_both_versions_ready_in_order(
        self, inference: pb_grpc.InferenceServiceAsyncStub
    ) -> None:
        """Loading a second version of the model lists both READY, ordered by version."""
        await load(inference, V1)
        await load(inference, V2)

        listed = await held(inference)

        assert [(v.name, v.state) for v in listed] == [
            (V1, pb.MODEL_VERSION_STATE_READY),
            (V2, pb.MODEL_VERSION_STATE_READY),
        ]
        assert [v.triton_model_version for v in listed] == [1, 2]

    async def test_each_version_answers_with_its_own_model(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """Two loaded versions of one model each answer with their own artifact."""
        await load(inference, V1)
        await load(inference, V2)

        first = await infer(inference, infer_request(V1))
        second = await infer(inference, infer_request(V2))

        assert_answers_as(first, fraud_models[V1])
        assert_answers_as(second, fraud_models[V2])
        assert np.abs(first["probabilities"] - second["probabilities"]).max() > 1e-3

    async def test_unloaded_version_is_not_found_while_the_other_answers(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """Unloading version 1 leaves version 2 serving and makes version 1 NOT_FOUND."""
        await load(inference, V1)
        endpoint = (await load(inference, V2)).triton_endpoint

        await inference.UnloadModelVersion(pb.UnloadModelVersionRequest(name=V1))

        assert_answers_as(await infer(inference, infer_request(V2)), fraud_models[V2])
        error = await refused(inference.Infer(infer_request(V1)))
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == "VERSION_NOT_LOADED"
        assert error.metadata == {"name": V1}
        assert [v.name for v in await held(inference)] == [V2]
        assert not await triton_ready(endpoint, 1)
        assert await triton_ready(endpoint, 2)


class TestBadRequests:
    @pytest.fixture
    async def assert_unchanged(
        self,
        inference: pb_grpc.InferenceServiceAsyncStub,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> UnchangedCheck:
        """Version 1 loaded; a check that the service still holds what it held before the bad
        call and that version 1 still answers as its model."""
        await load(inference, V1)
        before = await held(inference)

        async def check() -> None:
            assert await held(inference) == before
            assert_answers_as(await infer(inference, infer_request(V1)), fraud_models[V1])

        return check

    async def test_wrong_inner_dimension(
        self, inference: pb_grpc.InferenceServiceAsyncStub, assert_unchanged: UnchangedCheck
    ) -> None:
        """A row of 7 features where the signature says 8 is refused at `inputs[features].shape`."""
        short = numpy_to_tensor("features", ROWS[:1, :7])

        error = await refused(inference.Infer(infer_request(V1, short)))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.reason == "INVALID_ARGUMENT"
        assert [v.field for v in error.violations] == ["inputs[features].shape"]
        assert "[-1, 8]" in error.violations[0].description
        await assert_unchanged()

    async def test_unknown_input_name(
        self, inference: pb_grpc.InferenceServiceAsyncStub, assert_unchanged: UnchangedCheck
    ) -> None:
        """An input the signature lacks is refused with a violation naming it."""
        extra = numpy_to_tensor("amount", np.ones((4, 1), dtype=np.float32))

        error = await refused(
            inference.Infer(infer_request(V1, numpy_to_tensor("features", ROWS), extra))
        )

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["inputs[amount]"]
        await assert_unchanged()

    async def test_missing_input(
        self, inference: pb_grpc.InferenceServiceAsyncStub, assert_unchanged: UnchangedCheck
    ) -> None:
        """A request without the signature's input is refused at that input, beside the stray one."""
        stray = numpy_to_tensor("amount", np.ones((4, 1), dtype=np.float32))

        error = await refused(inference.Infer(infer_request(V1, stray)))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["inputs[amount]", "inputs[features]"]
        await assert_unchanged()

    async def test_batch_larger_than_max_batch_size(
        self, inference: pb_grpc.InferenceServiceAsyncStub, assert_unchanged: UnchangedCheck
    ) -> None:
        """A batch over max_batch_size is the caller's error (INVALID_ARGUMENT on `inputs`), not
        UNAVAILABLE, which would invite a retry."""
        big = numpy_to_tensor("features", np.repeat(ROWS[:1], 257, axis=0))

        error = await refused(inference.Infer(infer_request(V1, big)))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["inputs"]
        await assert_unchanged()

    async def test_text_for_a_numeric_input(
        self, inference: pb_grpc.InferenceServiceAsyncStub, assert_unchanged: UnchangedCheck
    ) -> None:
        """A BYTES tensor for the FP32 input is refused at `inputs[features].datatype`."""
        text = numpy_to_tensor("features", np.full((1, 8), b"1.5", dtype=np.object_))

        error = await refused(inference.Infer(infer_request(V1, text)))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["inputs[features].datatype"]
        await assert_unchanged()

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    async def test_non_finite_values_are_refused(
        self,
        bad: float,
        inference: pb_grpc.InferenceServiceAsyncStub,
        assert_unchanged: UnchangedCheck,
    ) -> None:
        """NaN or infinity in a float input is refused at `inputs[features]` before Triton runs."""
        rows = ROWS.copy()
        rows[1, 5] = bad

        error = await refused(inference.Infer(infer_request(V1, numpy_to_tensor("features", rows))))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [(v.field, v.description) for v in error.violations] == [
            ("inputs[features]", "contains NaN or infinity")
        ]
        await assert_unchanged()

    async def test_contents_that_do_not_fill_the_shape(
        self, inference: pb_grpc.InferenceServiceAsyncStub, assert_unchanged: UnchangedCheck
    ) -> None:
        """A tensor whose values do not fill its shape is refused at `inputs[0].contents`."""
        tensor = numpy_to_tensor("features", ROWS[:1])
        tensor.shape[:] = [2, len(fraud.FEATURE_REFS)]

        error = await refused(inference.Infer(infer_request(V1, tensor)))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["inputs[0].contents"]
        await assert_unchanged()

    async def test_unknown_output_name(
        self, inference: pb_grpc.InferenceServiceAsyncStub, assert_unchanged: UnchangedCheck
    ) -> None:
        """Asking for an output the version lacks is refused at `output_names`."""
        error = await refused(inference.Infer(infer_request(V1, output_names=("score",))))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["output_names"]
        assert "score" in error.violations[0].description
        await assert_unchanged()

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
        assert_unchanged: UnchangedCheck,
    ) -> None:
        """A name not of the form `models/{model}/versions/{n}` is refused at `name` by every RPC."""
        requests: dict[str, Any] = {
            "Infer": infer_request(name),
            "LoadModelVersion": pb.LoadModelVersionRequest(name=name),
            "UnloadModelVersion": pb.UnloadModelVersionRequest(name=name),
        }

        error = await refused(getattr(inference, rpc)(requests[rpc]))

        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["name"]
        await assert_unchanged()

    async def test_unload_of_a_version_notheld(
        self, inference: pb_grpc.InferenceServiceAsyncStub, assert_unchanged: UnchangedCheck
    ) -> None:
        """Unloading a well-formed name that is not held is NOT_FOUND and unloads nothing else."""
        absent = f"models/{MODEL_ID}/versions/99"

        error = await refused(
            inference.UnloadModelVersion(pb.UnloadModelVersionRequest(name=absent))
        )

        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == "VERSION_NOT_LOADED"
        assert error.metadata == {"name": absent}
        await assert_unchanged()

    async def test_version_missing_from_registry(
        self, inference: pb_grpc.InferenceServiceAsyncStub, assert_unchanged: UnchangedCheck
    ) -> None:
        """Loading a version the registry lacks is NOT_FOUND and leaves nothing held for it."""
        missing = f"models/{MODEL_ID}/versions/99"

        error = await refused(inference.LoadModelVersion(pb.LoadModelVersionRequest(name=missing)))

        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.metadata == {"resource": missing}
        assert missing not in [v.name for v in await held(inference)]
        await assert_unchanged()


class TestDeadlines:
    async def test_a_passed_deadline_never_reaches_triton(
        self, inference_service: RunningInference
    ) -> None:
        """A caller with no time left gets DeadlineExceededError before Triton is called."""
        await load(inference_service.stub, V1)

        with pytest.raises(DeadlineExceededError) as info:
            await inference_service.app.versions.infer(V1, {"features": ROWS}, [], deadline_s=0.0)

        assert info.value.reason == "DEADLINE_EXCEEDED"

    async def test_triton_gets_only_the_time_the_caller_has_left(
        self, inference_service: RunningInference
    ) -> None:
        """Calls with a microsecond left, queued in Triton behind full batches, time out and say
        so (TRITON_DEADLINE, not UNAVAILABLE) while the calls without a deadline answer."""
        versions = inference_service.app.versions
        await load(inference_service.stub, V1)
        full = np.repeat(ROWS, 64, axis=0)

        results = await asyncio.gather(
            *(versions.infer(V1, {"features": full}, []) for _ in range(16)),
            *(versions.infer(V1, {"features": ROWS}, [], deadline_s=1e-6) for _ in range(8)),
            return_exceptions=True,
        )

        assert all(isinstance(r, dict) for r in results[:16]), [
            repr(r) for r in results[:16] if not isinstance(r, dict)
        ]
        late = [r for r in results[16:] if isinstance(r, BaseException)]
        assert late, "8 calls with 1 us left all beat 16 full batches"
        assert {(type(r), getattr(r, "reason", "")) for r in late} == {
            (DeadlineExceededError, "TRITON_DEADLINE")
        }

    async def test_a_call_within_its_deadline_answers(
        self,
        inference_service: RunningInference,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """A gRPC deadline of a few seconds leaves ample time: the answer is onnxruntime's."""
        await load(inference_service.stub, V1)

        outputs = await infer(inference_service.stub, infer_request(V1), timeout=5)

        assert_answers_as(outputs, fraud_models[V1])
