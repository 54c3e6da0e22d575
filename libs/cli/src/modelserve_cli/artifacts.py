"""Client-side model files: an ONNX file's signature, and scikit-learn models converted to ONNX."""

from __future__ import annotations

from pathlib import Path

import onnx

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import tensor_pb2

_DATATYPES: dict[int, tensor_pb2.DataType.ValueType] = {
    onnx.TensorProto.FLOAT: tensor_pb2.DATA_TYPE_FP32,
    onnx.TensorProto.DOUBLE: tensor_pb2.DATA_TYPE_FP64,
    onnx.TensorProto.INT32: tensor_pb2.DATA_TYPE_INT32,
    onnx.TensorProto.INT64: tensor_pb2.DATA_TYPE_INT64,
    onnx.TensorProto.BOOL: tensor_pb2.DATA_TYPE_BOOL,
    onnx.TensorProto.STRING: tensor_pb2.DATA_TYPE_BYTES,
}


class ArtifactError(Exception):
    """A model file cannot be registered; the message says why."""


def _spec(value: onnx.ValueInfoProto) -> tensor_pb2.TensorSpec:
    tensor = value.type.tensor_type
    datatype = _DATATYPES.get(tensor.elem_type)
    if datatype is None:
        raise ArtifactError(f"tensor {value.name!r} has an element type modelserve does not serve")
    if not tensor.HasField("shape"):
        raise ArtifactError(f"tensor {value.name!r} has no declared shape")
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return tensor_pb2.TensorSpec(name=value.name, datatype=datatype, shape=shape)


def onnx_signature(data: bytes, feature_refs: list[str]) -> registry_pb.Signature:
    """The signature of an ONNX model, read from its graph (initializers are not inputs)."""
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # onnx raises DecodeError and others for a bad file
        raise ArtifactError(f"not an ONNX model: {exc}") from None
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_spec(v) for v in model.graph.output]
    return registry_pb.Signature(inputs=inputs, outputs=outputs, feature_refs=feature_refs)


def sklearn_to_onnx(path: Path, input_name: str) -> bytes:
    """Loads a scikit-learn model from a local joblib file and converts it to ONNX.

    The pickle is only ever opened here, on the caller's own machine, from a file the
    caller chose; only the converted ONNX bytes go to the registry.
    """
    import joblib  # type: ignore[import-untyped]  # joblib ships no type hints
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier
    from sklearn.pipeline import Pipeline

    model = joblib.load(path)
    width = getattr(model, "n_features_in_", None)
    if not isinstance(width, int):
        raise ArtifactError(f"{path}: not a fitted scikit-learn model (no n_features_in_)")
    final = model.steps[-1][1] if isinstance(model, Pipeline) else model
    # Classifiers answer plain tensors, not a list of {class: probability} maps.
    options = {id(final): {"zipmap": False}} if is_classifier(final) else {}
    try:
        converted = convert_sklearn(
            model,
            initial_types=[(input_name, FloatTensorType([None, width]))],
            name=path.stem,
            options=options,
        )
    except Exception as exc:  # skl2onnx raises many types for unsupported models
        raise ArtifactError(f"{path}: skl2onnx cannot convert it: {exc}") from None
    data: bytes = converted.SerializeToString()
    return data
