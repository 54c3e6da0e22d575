"""Validates an ONNX artifact: it parses, passes onnx.checker, and matches its signature."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from google.protobuf.message import DecodeError

from modelserve_registry.resources import DataType, Signature, TensorSpec
from modelserve_runtime.errors import FieldViolation, InvalidArgumentError

_SIGNATURE_FIELD = "upload.model_version.signature"

_ELEM_TYPES: dict[int, DataType] = {
    onnx.TensorProto.BOOL: DataType.BOOL,
    onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.INT64: DataType.INT64,
    onnx.TensorProto.FLOAT: DataType.FP32,
    onnx.TensorProto.DOUBLE: DataType.FP64,
    onnx.TensorProto.STRING: DataType.BYTES,
}


def check_onnx_artifact(data: bytes, signature: Signature) -> None:
    """Raises InvalidArgumentError unless `data` is a valid ONNX model whose graph inputs and
    outputs are exactly the signature's, with the same data types and compatible shapes.
    """
    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError) as exc:
        description = f"the artifact is not a valid ONNX model: {exc}"
        raise InvalidArgumentError(
            description,
            reason="INVALID_ONNX",
            violations=[FieldViolation("chunk", description)],
        ) from None
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    # Before IR version 4, initializers were listed among the graph inputs too.
    graph_inputs = [v for v in graph.input if v.name not in initializers]
    violations = [
        *_compare("inputs", signature.inputs, graph_inputs),
        *_compare("outputs", signature.outputs, list(graph.output)),
    ]
    if violations:
        raise InvalidArgumentError(
            "the signature does not match the ONNX graph: "
            + "; ".join(f"{v.field}: {v.description}" for v in violations),
            reason="SIGNATURE_MISMATCH",
            violations=violations,
        )


def _compare(
    kind: str, declared: Sequence[TensorSpec], graph: Sequence[onnx.ValueInfoProto]
) -> list[FieldViolation]:
    field = f"{_SIGNATURE_FIELD}.{kind}"
    in_graph = {v.name: v for v in graph}
    missing = [t.name for t in declared if t.name not in in_graph]
    extra = [name for name in in_graph if name not in {t.name for t in declared}]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"declared but not in the graph: {', '.join(missing)}")
        if extra:
            parts.append(f"in the graph but not declared: {', '.join(extra)}")
        return [FieldViolation(field, "; ".join(parts))]
    violations: list[FieldViolation] = []
    for i, spec in enumerate(declared):
        tensor = in_graph[spec.name].type.tensor_type
        graph_type = _ELEM_TYPES.get(tensor.elem_type)
        if graph_type is not spec.datatype:
            graph_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
            violations.append(
                FieldViolation(
                    f"{field}[{i}].datatype",
                    f"{spec.name}: the graph's type is {graph_name}, the signature says "
                    f"{spec.datatype.value if spec.datatype else 'nothing'}",
                )
            )
        if tensor.HasField("shape"):
            # A graph dimension without a value is symbolic, so any declared size fits it.
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            if len(dims) != len(spec.shape) or any(
                g != -1 and s != -1 and g != s for g, s in zip(dims, spec.shape, strict=False)
            ):
                violations.append(
                    FieldViolation(
                        f"{field}[{i}].shape",
                        f"{spec.name}: the graph's shape is {dims}, the signature says "
                        f"{list(spec.shape)}",
                    )
                )
    return violations
