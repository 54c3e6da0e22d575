"""Conversions between the shared protobuf value types and Python/numpy values."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from modelserve.type.v1 import feature_value_pb2, tensor_pb2
from modelserve_runtime.errors import InvalidArgumentError

#: A feature value in Python; a float vector is a tuple of floats.
PyValue = int | float | str | bool | tuple[float, ...]

DTYPES: dict[tensor_pb2.DataType.ValueType, np.dtype[np.generic]] = {
    tensor_pb2.DATA_TYPE_BOOL: np.dtype(np.bool_),
    tensor_pb2.DATA_TYPE_INT32: np.dtype(np.int32),
    tensor_pb2.DATA_TYPE_INT64: np.dtype(np.int64),
    tensor_pb2.DATA_TYPE_FP32: np.dtype(np.float32),
    tensor_pb2.DATA_TYPE_FP64: np.dtype(np.float64),
    tensor_pb2.DATA_TYPE_BYTES: np.dtype(np.object_),
}
#: Triton's name of each data type.
TRITON_NAMES: dict[tensor_pb2.DataType.ValueType, str] = {
    tensor_pb2.DATA_TYPE_BOOL: "BOOL",
    tensor_pb2.DATA_TYPE_INT32: "INT32",
    tensor_pb2.DATA_TYPE_INT64: "INT64",
    tensor_pb2.DATA_TYPE_FP32: "FP32",
    tensor_pb2.DATA_TYPE_FP64: "FP64",
    tensor_pb2.DATA_TYPE_BYTES: "BYTES",
}
_BY_NUMPY = {
    np.dtype(np.bool_): tensor_pb2.DATA_TYPE_BOOL,
    np.dtype(np.int32): tensor_pb2.DATA_TYPE_INT32,
    np.dtype(np.int64): tensor_pb2.DATA_TYPE_INT64,
    np.dtype(np.float32): tensor_pb2.DATA_TYPE_FP32,
    np.dtype(np.float64): tensor_pb2.DATA_TYPE_FP64,
    np.dtype(np.object_): tensor_pb2.DATA_TYPE_BYTES,
}


def value_to_proto(value: PyValue | None) -> feature_value_pb2.FeatureValue:
    """A Python value as a FeatureValue; None gives an empty (missing) one."""
    if value is None:
        return feature_value_pb2.FeatureValue()
    if isinstance(value, bool):
        return feature_value_pb2.FeatureValue(bool_value=value)
    if isinstance(value, int):
        return feature_value_pb2.FeatureValue(int64_value=value)
    if isinstance(value, float):
        return feature_value_pb2.FeatureValue(double_value=value)
    if isinstance(value, tuple):
        return feature_value_pb2.FeatureValue(
            float_vector_value=feature_value_pb2.FloatVector(values=value)
        )
    return feature_value_pb2.FeatureValue(string_value=value)


def value_from_proto(value: feature_value_pb2.FeatureValue) -> PyValue | None:
    """The Python value of a FeatureValue (a vector as a tuple of floats); None when unset."""
    kind = value.WhichOneof("kind")
    if kind == "float_vector_value":
        return tuple(float(v) for v in value.float_vector_value.values)
    return None if kind is None else getattr(value, kind)


def tensor_to_numpy(
    tensor: tensor_pb2.Tensor, field_path: str = "tensor"
) -> npt.NDArray[np.generic]:
    """The tensor as an array; InvalidArgumentError when type, shape and values disagree."""
    dtype = DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidArgumentError.for_field(
            f"{field_path}.datatype", "must be set to a known data type"
        )
    contents = tensor.contents
    values: list[object]
    if tensor.datatype == tensor_pb2.DATA_TYPE_BOOL:
        values = list(contents.bool_contents)
    elif tensor.datatype in (tensor_pb2.DATA_TYPE_INT32, tensor_pb2.DATA_TYPE_INT64):
        values = list(contents.int_contents)
    elif tensor.datatype == tensor_pb2.DATA_TYPE_FP32:
        values = list(contents.fp32_contents)
    elif tensor.datatype == tensor_pb2.DATA_TYPE_FP64:
        values = list(contents.fp64_contents)
    else:
        values = list(contents.bytes_contents)
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgumentError.for_field(f"{field_path}.shape", "dimensions must be >= 0")
    expected = int(np.prod(shape)) if shape else 1
    if expected != len(values):
        raise InvalidArgumentError.for_field(
            f"{field_path}.contents",
            f"shape {list(shape)} needs {expected} values, got {len(values)}",
        )
    return np.asarray(values, dtype=dtype).reshape(shape)


def numpy_to_tensor(name: str, array: npt.NDArray[np.generic]) -> tensor_pb2.Tensor:
    """An array as a Tensor named `name`."""
    datatype = _BY_NUMPY.get(array.dtype)
    if datatype is None:
        if array.dtype.kind == "S":
            datatype = tensor_pb2.DATA_TYPE_BYTES
        else:
            raise TypeError(f"unsupported dtype {array.dtype} for tensor {name}")
    tensor = tensor_pb2.Tensor(name=name, datatype=datatype, shape=list(array.shape))
    flat = array.reshape(-1)
    contents = tensor.contents
    if datatype == tensor_pb2.DATA_TYPE_BOOL:
        contents.bool_contents.extend(flat.tolist())
    elif datatype in (tensor_pb2.DATA_TYPE_INT32, tensor_pb2.DATA_TYPE_INT64):
        contents.int_contents.extend(flat.tolist())
    elif datatype == tensor_pb2.DATA_TYPE_FP32:
        contents.fp32_contents.extend(flat.tolist())
    elif datatype == tensor_pb2.DATA_TYPE_FP64:
        contents.fp64_contents.extend(flat.tolist())
    else:
        contents.bytes_contents.extend(v if isinstance(v, bytes) else str(v).encode() for v in flat)
    return tensor
