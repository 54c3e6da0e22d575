"""How held versions appear in the API, and the inputs warmup synthesizes from a signature."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from structlog.testing import capture_logs

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve_inference.models import (
    HeldVersion,
    VersionState,
    synthesize,
    usable_samples,
    warmup_inputs,
)
from modelserve_inference.servicer import held_to_proto
from modelserve_triton.model_config import TensorSpec


class TestHeldToProto:
    @pytest.mark.parametrize(
        ("state", "expected"),
        [
            (VersionState.LOADING, pb.MODEL_VERSION_STATE_LOADING),
            (VersionState.WARMING, pb.MODEL_VERSION_STATE_WARMING),
            (VersionState.FAILED, pb.MODEL_VERSION_STATE_FAILED),
        ],
    )
    def test_only_ready_versions_carry_the_endpoint(
        self, state: VersionState, expected: int
    ) -> None:
        """A version that is not READY is listed with its state and reason but no endpoint."""
        held = HeldVersion("models/fraud/versions/1", "fraud", 1, state, reason="why")

        shown = held_to_proto(held, "127.0.0.1:8001", "127.0.0.1:8000")

        assert (shown.state, shown.reason, shown.triton_endpoint, shown.triton_http_endpoint) == (
            expected,
            "why",
            "",
            "",
        )

    def test_a_ready_version_carries_the_endpoints(self) -> None:
        """A READY version names the Triton endpoints, gRPC and HTTP, that serve it."""
        held = HeldVersion("models/fraud/versions/1", "fraud", 1, VersionState.READY)

        shown = held_to_proto(held, "127.0.0.1:8001", "127.0.0.1:8000")

        assert (shown.triton_endpoint, shown.triton_http_endpoint) == (
            "127.0.0.1:8001",
            "127.0.0.1:8000",
        )


class TestSynthesize:
    def test_zeros_of_the_signature_dtype_and_shape(self) -> None:
        """Warmup rows are zeros of the input's dtype; a free inner dimension becomes 1."""
        features = synthesize(TensorSpec("features", "FP32", (-1, 8)), 8)
        tokens = synthesize(TensorSpec("tokens", "INT64", (-1, -1)), 1)

        assert (features.shape, features.dtype, features.any()) == ((8, 8), np.float32, False)
        assert (tokens.shape, tokens.dtype) == ((1, 1), np.int64)


class TestWarmupInputs:
    def test_sample_rows_repeat_to_the_batch_size(self) -> None:
        """A warmup batch takes the sample rows in turn: 0, 1, 2, 0, 1, ..."""
        rows = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)

        batch = warmup_inputs([TensorSpec("x", "FP32", (-1, 1))], {"x": rows}, 5)

        np.testing.assert_array_equal(batch["x"][:, 0], [1.0, 2.0, 3.0, 1.0, 2.0])

    def test_without_samples_the_inputs_are_synthesized(self) -> None:
        """No samples: zeros of the signature."""
        batch = warmup_inputs([TensorSpec("x", "FP32", (-1, 2))], {}, 4)

        assert batch["x"].shape == (4, 2)
        assert not batch["x"].any()

    def test_usable_samples_are_cast_to_the_signature(self) -> None:
        """Samples that fit the signature are kept, cast to its dtypes."""
        specs = [TensorSpec("x", "FP32", (-1, 2)), TensorSpec("n", "INT64", (-1,))]
        samples: dict[str, npt.NDArray[Any]] = {
            "x": np.ones((3, 2), dtype=np.float64),
            "n": np.arange(3, dtype=np.int32),
        }

        usable = usable_samples("models/m/versions/1", specs, samples)

        assert usable["x"].dtype == np.dtype(np.float32)
        assert usable["n"].dtype == np.dtype(np.int64)

    @pytest.mark.parametrize(
        ("samples", "problem"),
        [
            ({"x": np.ones((3, 3), np.float32)}, "has shape [3, 3], not [-1, 2]"),
            ({}, ""),
            ({"x": np.ones((3, 2), np.float32), "y": np.ones(3)}, "not inputs of the signature"),
            ({"x": np.ones((0, 2), np.float32)}, "at least one"),
        ],
    )
    def test_samples_that_do_not_fit_are_dropped_with_a_warning(
        self, samples: dict[str, npt.NDArray[Any]], problem: str
    ) -> None:
        """Samples of the wrong shape, for unknown inputs or without rows are not used: warmup
        synthesizes its inputs instead (no samples at all is not worth a warning)."""
        with capture_logs() as logs:
            usable = usable_samples(
                "models/m/versions/1", [TensorSpec("x", "FP32", (-1, 2))], samples
            )

        assert usable == {}
        if problem:
            (event,) = logs
            assert event["event"] == "sample_inputs_unusable"
            assert problem in " ".join(event["problems"])
        else:
            assert logs == []
