"""Open Inference Protocol (KServe v2 `inference.ModelInferRequest`) tensors, read and checked.

The router and the inference facade both take a caller's `ModelInferRequest`: both read its
input tensors here, with the same checks and the same errors (INVALID_ARGUMENT naming each bad
field), and check them against a version's signature here; what each does next is its own.
Raw tensors stay as they came (fixed-size elements back to back, BYTES length-prefixed, as
tritonclient sends them); typed contents (`InferTensorContents`) become the same raw bytes.
"""

from __future__ import annotations

import importlib.metadata
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import service_pb2
from tritonclient.utils import (
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from modelserve_runtime.errors import FieldViolation, InvalidArgumentError
from modelserve_triton.errors import TritonError


def server_metadata(name: str, extensions: Sequence[str]) -> Any:
    """A ServerMetadataResponse: `name`, the installed modelserve's version (as Triton gives
    its own), and the protocol extensions (Triton's names) that the server implements."""
    try:
        version = importlib.metadata.version("modelserve")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return service_pb2.ServerMetadataResponse(
        name=name, version=version, extensions=list(extensions)
    )


#: Where each datatype's values sit in InferTensorContents; the datatypes a request may use.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_NUMPY = {datatype: np.dtype(triton_to_np_dtype(datatype)) for datatype in CONTENTS_FIELD}
#: Bytes per element of the fixed-size datatypes (BYTES elements are length-prefixed).
_ITEMSIZE = {datatype: dtype.itemsize for datatype, dtype in _NUMPY.items() if datatype != "BYTES"}
#: The floating-point datatypes, which can hold NaN and infinity.
_FLOATS = {"FP32": _NUMPY["FP32"], "FP64": _NUMPY["FP64"]}


def encode_raw(array: npt.NDArray[Any]) -> bytes:
    """An array as a raw tensor's bytes: its elements in C order, or for a BYTES array (of
    objects or numpy bytes) each element length-prefixed, as Triton takes them."""
    if np_to_triton_dtype(array.dtype) == "BYTES":
        serialized = serialize_byte_tensor(array)
        return bytes(serialized.item()) if serialized.size else b""
    return np.ascontiguousarray(array).tobytes()


def bytes_elements(raw: bytes) -> int:
    """The number of elements in a BYTES tensor's raw content, each a 4-byte little-endian
    length and then that many bytes; ValueError naming the first element that runs past the
    end."""
    size, offset, count = len(raw), 0, 0
    while offset < size:
        if size - offset < 4:
            raise ValueError(
                f"element {count} has {size - offset} bytes left for its 4-byte length"
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        if length > size - offset - 4:
            raise ValueError(
                f"element {count} declares {length} bytes, {size - offset - 4} are left"
            )
        offset += 4 + length
        count += 1
    return count


def decode_raw(datatype: str, shape: Sequence[int], raw: bytes) -> npt.NDArray[Any]:
    """A raw tensor's bytes as an array of its datatype and shape (a read-only view of the
    bytes, except for BYTES, whose elements are copied out)."""
    array: npt.NDArray[Any] = (
        deserialize_bytes_tensor(raw)
        if datatype == "BYTES"
        else np.frombuffer(raw, dtype=np.dtype(triton_to_np_dtype(datatype)))
    )
    return array.reshape(shape)


def decode_output(
    model_name: str, name: str, datatype: str, shape: Sequence[int], raw: bytes
) -> npt.NDArray[Any]:
    """One output of Triton's answer as an array; TritonError when its bytes do not make a
    tensor of its datatype and shape (Triton's python backend answers empty outputs when the
    stub's numpy is one it was not built for)."""
    try:
        return decode_raw(datatype, shape, raw)
    except (ValueError, struct.error) as exc:
        raise TritonError(
            f"model {model_name!r} answered output {name!r} with {len(raw)} bytes, which do not"
            f" make a {datatype} tensor of shape {list(shape)}"
        ) from exc


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One input tensor of a request, as read by `read_inputs`: its bytes fill its shape."""

    name: str
    datatype: str
    """Triton's name of the element type ("FP32", "BYTES", ...)."""
    shape: tuple[int, ...]
    raw: bytes
    """The raw bytes, as the request sent them or made from its typed contents."""

    def array(self) -> npt.NDArray[Any]:
        """The tensor as an array of its datatype and shape."""
        return decode_raw(self.datatype, self.shape, self.raw)


def _raw_of_typed(tensor: Any, shape: tuple[int, ...], count: int) -> bytes:
    """Typed contents as the raw bytes Triton takes, checked against the shape."""
    values = getattr(tensor.contents, CONTENTS_FIELD[tensor.datatype])
    if len(values) != count:
        raise InvalidArgumentError.for_field(
            f"inputs[{tensor.name}].contents",
            f"shape {list(shape)} needs {count} values, got {len(values)}",
        )
    return encode_raw(np.asarray(list(values), dtype=_NUMPY[tensor.datatype]))


def read_inputs(request: Any) -> dict[str, InputTensor]:
    """The request's input tensors by name, checked on their own, in request order: one raw
    content per input or none, a supported datatype, non-negative dimensions, and bytes or
    typed values that fill each shape. InvalidArgumentError otherwise; names sent more than
    once are named together."""
    inputs = request.inputs
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(inputs):
        raise InvalidArgumentError.for_field(
            "raw_input_contents",
            f"{len(raw_contents)} raw contents for {len(inputs)} inputs; send one per input",
        )
    if not inputs:
        raise InvalidArgumentError.for_field("inputs", "at least one input tensor is required")
    tensors: dict[str, InputTensor] = {}
    duplicates: list[FieldViolation] = []
    for index, tensor in enumerate(inputs):
        name = tensor.name
        if name in tensors:
            duplicates.append(FieldViolation(f"inputs[{name}]", "named more than once"))
            continue
        datatype = tensor.datatype
        if datatype not in CONTENTS_FIELD:
            raise InvalidArgumentError.for_field(
                f"inputs[{name}].datatype", f"unsupported datatype {datatype!r}"
            )
        shape = tuple(tensor.shape)
        count = 1
        for dim in shape:
            if dim < 0:
                raise InvalidArgumentError.for_field(
                    f"inputs[{name}].shape", "dimensions must be >= 0"
                )
            count *= dim
        if not raw_contents:
            raw = _raw_of_typed(tensor, shape, count)
        else:
            raw = raw_contents[index]
            if datatype == "BYTES":
                try:
                    elements = bytes_elements(raw)
                except ValueError as exc:
                    raise InvalidArgumentError.for_field(
                        f"inputs[{name}].contents", f"not length-prefixed BYTES elements: {exc}"
                    ) from exc
                if elements != count:
                    raise InvalidArgumentError.for_field(
                        f"inputs[{name}].contents",
                        f"shape {list(shape)} needs {count} values, got {elements}",
                    )
            elif len(raw) != count * _ITEMSIZE[datatype]:
                raise InvalidArgumentError.for_field(
                    f"inputs[{name}].contents",
                    f"shape {list(shape)} of {datatype} needs {count * _ITEMSIZE[datatype]}"
                    f" bytes, got {len(raw)}",
                )
        tensors[name] = InputTensor(name, datatype, shape, raw)
    if duplicates:
        raise InvalidArgumentError.from_violations(duplicates)
    return tensors


def signature_violations(
    tensors: Mapping[str, InputTensor],
    signature: Iterable[tuple[str, str | None, Sequence[int], bool]],
    *,
    version: str,
    missing: str,
    reject_non_finite: bool,
) -> list[FieldViolation]:
    """What keeps the tensors (read by `read_inputs`) from fitting a version's input
    `signature`, given as (name, datatype, shape, allow_non_finite) with -1 for a free
    dimension and None for any datatype: inputs the version (`version` names it) lacks, inputs
    it needs that are missing (described as `missing`), then for each of its inputs in turn
    the rank and fixed dimensions, the exact datatype (no casting, as Triton) and, when
    `reject_non_finite` and the input does not allow them, no NaN or infinity. Empty when
    they fit."""
    specs = list(signature)
    expected = {name for name, _, _, _ in specs}
    violations = [
        FieldViolation(f"inputs[{name}]", f"not an input of {version}")
        for name in tensors
        if name not in expected
    ]
    for name, datatype, want, allow_non_finite in specs:
        where = f"inputs[{name}]"
        found = tensors.get(name)
        if found is None:
            violations.append(FieldViolation(where, missing))
            continue
        shape = found.shape
        if len(shape) != len(want) or any(
            w != -1 and w != g for w, g in zip(want, shape, strict=True)
        ):
            violations.append(
                FieldViolation(f"{where}.shape", f"expected {list(want)}, got {list(shape)}")
            )
            continue
        if datatype is not None and found.datatype != datatype:
            violations.append(
                FieldViolation(f"{where}.datatype", f"expected {datatype}, got {found.datatype}")
            )
            continue
        float_dtype = _FLOATS.get(found.datatype)
        if (
            reject_non_finite
            and not allow_non_finite
            and float_dtype is not None
            and not np.isfinite(np.frombuffer(found.raw, dtype=float_dtype)).all()
        ):
            violations.append(FieldViolation(where, "contains NaN or infinity"))
    return violations


def refuse_classification(request: Any) -> None:
    """InvalidArgumentError when an output asks for Triton's classification extension: its
    top-k labels would answer something else than the caller's tensors."""
    if any("classification" in o.parameters for o in request.outputs):
        raise InvalidArgumentError.for_field(
            "outputs.parameters", "classification outputs are not supported"
        )
