"""check_onnx_artifact on real ONNX models built here: parsing, names, types and shapes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelserve_registry.onnx_artifact import check_onnx_artifact
from modelserve_registry.resources import DataType, Signature, TensorSpec
from modelserve_runtime.errors import InvalidArgumentError


def identity_model(
    input_shape: list[int | str], *, ir_version: int = 8, with_initializer_input: bool = False
) -> bytes:
    """`y = x + b`: input x FP32, output y FP32; optionally b listed among the inputs (IR 3 style)."""
    bias = numpy_helper.from_array(np.zeros((3,), dtype=np.float32), name="b")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)]
    if with_initializer_input:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "add",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, input_shape)],
        initializer=[bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model.SerializeToString()


def signature(x: TensorSpec, y: TensorSpec | None = None) -> Signature:
    return Signature(inputs=(x,), outputs=(y or TensorSpec("y", DataType.FP32, (-1, 3)),))


X = TensorSpec("x", DataType.FP32, (-1, 3))


class TestCheckOnnxArtifact:
    def test_matching_signature_passes(self) -> None:
        """A symbolic batch dimension accepts -1 or a fixed size in the signature."""
        check_onnx_artifact(identity_model(["N", 3]), signature(X))
        check_onnx_artifact(
            identity_model(["N", 3]), signature(TensorSpec("x", DataType.FP32, (8, 3)))
        )

    def test_initializers_listed_as_inputs_are_not_inputs(self) -> None:
        """An old-style model that lists its weights among its inputs still matches its real inputs."""
        model = identity_model(["N", 3], ir_version=3, with_initializer_input=True)
        check_onnx_artifact(model, signature(X))

    @pytest.mark.parametrize(
        ("x", "field"),
        [
            (
                TensorSpec("x", DataType.FP32, (-1, 4)),
                "upload.model_version.signature.inputs[0].shape",
            ),
            (
                TensorSpec("x", DataType.FP32, (-1, 3, 1)),
                "upload.model_version.signature.inputs[0].shape",
            ),
            (
                TensorSpec("x", DataType.INT64, (-1, 3)),
                "upload.model_version.signature.inputs[0].datatype",
            ),
            (TensorSpec("z", DataType.FP32, (-1, 3)), "upload.model_version.signature.inputs"),
        ],
    )
    def test_mismatch_names_the_field(self, x: TensorSpec, field: str) -> None:
        """A signature that disagrees with the graph is refused with the disagreeing field named."""
        with pytest.raises(InvalidArgumentError) as info:
            check_onnx_artifact(identity_model(["N", 3]), signature(x))
        assert info.value.reason == "SIGNATURE_MISMATCH"
        assert [v.field for v in info.value.violations] == [field]

    def test_extra_graph_output_is_named(self) -> None:
        """An output the graph has but the signature lacks is named in the violation."""
        sig = Signature(inputs=(X,), outputs=())
        with pytest.raises(InvalidArgumentError) as info:
            check_onnx_artifact(identity_model(["N", 3]), sig)
        [violation] = info.value.violations
        assert violation.field == "upload.model_version.signature.outputs"
        assert "in the graph but not declared: y" in violation.description

    @pytest.mark.parametrize("data", [b"", b"\x08\x07", b"certainly not protobuf \xff\xff\xff"])
    def test_not_onnx_is_invalid(self, data: bytes) -> None:
        """Bytes that do not parse or do not pass onnx.checker are INVALID_ONNX."""
        with pytest.raises(InvalidArgumentError) as info:
            check_onnx_artifact(data, signature(X))
        assert info.value.reason == "INVALID_ONNX"
