"""How held versions appear in the API, and the inputs warmup synthesizes from a signature."""

from __future__ import annotations

import numpy as np
import pytest

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve_inference.models import HeldVersion, VersionState, synthesize
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

        shown = held_to_proto(held, "127.0.0.1:8001")

        assert (shown.state, shown.reason, shown.triton_endpoint) == (expected, "why", "")

    def test_a_ready_version_carries_the_endpoint(self) -> None:
        """A READY version names the Triton endpoint that serves it."""
        held = HeldVersion("models/fraud/versions/1", "fraud", 1, VersionState.READY)

        assert held_to_proto(held, "127.0.0.1:8001").triton_endpoint == "127.0.0.1:8001"


class TestSynthesize:
    def test_zeros_of_the_signature_dtype_and_shape(self) -> None:
        """Warmup rows are zeros of the input's dtype; a free inner dimension becomes 1."""
        features = synthesize(TensorSpec("features", "FP32", (-1, 8)), 8)
        tokens = synthesize(TensorSpec("tokens", "INT64", (-1, -1)), 1)

        assert (features.shape, features.dtype, features.any()) == ((8, 8), np.float32, False)
        assert (tokens.shape, tokens.dtype) == ((1, 1), np.int64)
