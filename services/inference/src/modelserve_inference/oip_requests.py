"""Open Inference Protocol requests checked against a version's signature without decoding them.

The facade forwards the caller's `ModelInferRequest` to Triton as it came, so its raw tensors
are checked where they lie: names, datatypes and shapes from the tensor metadata, sizes from
the byte counts, NaN and infinity through a zero-copy view of the bytes. Only typed contents
(`InferTensorContents`, which tritonclient never sends) are converted, to raw bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from modelserve_inference.models import HeldVersion

#: Where each datatype's values sit in InferTensorContents, when sent without raw contents.
_CONTENTS_FIELD = {
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
_NUMPY = {datatype: np.dtype(triton_to_np_dtype(datatype)) for datatype in _CONTENTS_FIELD}
#: Bytes per element of the fixed-size datatypes (BYTES elements are length-prefixed).
_ITEMSIZE = {datatype: dtype.itemsize for datatype, dtype in _NUMPY.items() if datatype != "BYTES"}
#: The floating-point datatypes, which can hold NaN and infinity.
_FLOATS = {"FP32": _NUMPY["FP32"], "FP64": _NUMPY["FP64"]}

#: An input tensor of a request as read: the tensor, its shape and its raw bytes.
ReadTensor = tuple[Any, tuple[int, ...], bytes]


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    """What the checks learnt about a request, as coalescing needs it."""

    rows: int
    """The batch size: the first dimension, the same in every input."""
    names: tuple[str, ...]
    """The signature's input names, in its order."""
    raws: tuple[bytes, ...]
    """Each input's raw bytes, in the same order."""
    lane: tuple[object, ...]
    """Requests with equal lanes can go to Triton as one batch: the same version, the same
    requested outputs and the same inner dimensions of every input."""
    batchable: bool
    """Whether rows of this request can be joined with others' and split back (no BYTES
    tensor in the signature, whose elements have no fixed size)."""


def _raw_of_typed(tensor: Any, shape: tuple[int, ...], count: int) -> bytes:
    """Typed contents as the raw bytes Triton takes, checked against the shape."""
    values = getattr(tensor.contents, _CONTENTS_FIELD[tensor.datatype])
    if len(values) != count:
        raise InvalidArgumentError.for_field(
            f"inputs[{tensor.name}].contents",
            f"shape {list(shape)} needs {count} values, got {len(values)}",
        )
    array = np.asarray(list(values), dtype=_NUMPY[tensor.datatype])
    if tensor.datatype == "BYTES":
        return bytes(serialize_byte_tensor(array).item())
    return array.tobytes()


def read_request(request: Any) -> dict[str, ReadTensor]:
    """The request's input tensors by name, checked on their own, in request order: one raw
    content per input or none, a supported datatype, non-negative dimensions, and bytes or
    typed values that fill each shape. InvalidArgumentError otherwise."""
    inputs = request.inputs
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(inputs):
        raise InvalidArgumentError.for_field(
            "raw_input_contents",
            f"{len(raw_contents)} raw contents for {len(inputs)} inputs; send one per input",
        )
    if not inputs:
        raise InvalidArgumentError.for_field("inputs", "at least one input tensor is required")
    tensors: dict[str, ReadTensor] = {}
    duplicates: list[FieldViolation] = []
    for index, tensor in enumerate(inputs):
        name = tensor.name
        if name in tensors:
            duplicates.append(FieldViolation(f"inputs[{name}]", "named more than once"))
            continue
        datatype = tensor.datatype
        if datatype not in _CONTENTS_FIELD:
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
            tensors[name] = (tensor, shape, _raw_of_typed(tensor, shape, count))
            continue
        raw = raw_contents[index]
        if datatype == "BYTES":
            elements = deserialize_bytes_tensor(raw).size
            if elements != count:
                raise InvalidArgumentError.for_field(
                    f"inputs[{name}].contents",
                    f"shape {list(shape)} needs {count} values, got {elements}",
                )
        elif len(raw) != count * _ITEMSIZE[datatype]:
            raise InvalidArgumentError.for_field(
                f"inputs[{name}].contents",
                f"shape {list(shape)} of {datatype} needs {count * _ITEMSIZE[datatype]} bytes,"
                f" got {len(raw)}",
            )
        tensors[name] = (tensor, shape, raw)
    if duplicates:
        raise InvalidArgumentError.from_violations(duplicates)
    return tensors


def check_request(
    held: HeldVersion,
    request: Any,
    tensors: Mapping[str, ReadTensor],
    *,
    max_batch_size: int,
    reject_non_finite: bool,
) -> CheckedRequest:
    """Checks the request (read by `read_request`) against the version's signature, as
    `ModelVersions.infer` checks arrays with exact dtypes: every input present and known, its
    rank and fixed dimensions, its exact datatype, no NaN or infinity when `reject_non_finite`,
    one batch size from 1 to `max_batch_size`, known requested outputs. InvalidArgumentError
    naming every bad field otherwise.

    Then readies the request for Triton, in place: typed contents become raw bytes, the
    version is spelled as Triton spells it, and parameters (shared memory, classification,
    priorities: none of which the facade offers) are dropped.
    """
    specs = held.inputs
    expected = {spec.name for spec in specs}
    violations = [
        FieldViolation(f"inputs[{name}]", f"not an input of {held.name}")
        for name in tensors
        if name not in expected
    ]
    raws: list[bytes] = []
    inner: list[tuple[int, ...]] = []
    sizes: set[int] = set()
    batchable = True
    for spec in specs:
        found = tensors.get(spec.name)
        if found is None:
            violations.append(FieldViolation(f"inputs[{spec.name}]", "required input is missing"))
            continue
        tensor, shape, raw = found
        want = spec.shape
        if len(shape) != len(want) or any(
            w != -1 and w != g for w, g in zip(want, shape, strict=True)
        ):
            violations.append(
                FieldViolation(
                    f"inputs[{spec.name}].shape", f"expected {list(want)}, got {list(shape)}"
                )
            )
            continue
        datatype = tensor.datatype
        if datatype != spec.datatype:
            violations.append(
                FieldViolation(
                    f"inputs[{spec.name}].datatype", f"expected {spec.datatype}, got {datatype}"
                )
            )
            continue
        float_dtype = _FLOATS.get(datatype)
        if (
            reject_non_finite
            and float_dtype is not None
            and not np.isfinite(np.frombuffer(raw, dtype=float_dtype)).all()
        ):
            violations.append(FieldViolation(f"inputs[{spec.name}]", "contains NaN or infinity"))
            continue
        if datatype == "BYTES":
            batchable = False
        raws.append(raw)
        inner.append(shape[1:])
        sizes.add(shape[0] if shape else 0)
    if violations:
        raise InvalidArgumentError.from_violations(violations)
    if len(sizes) != 1 or not 1 <= next(iter(sizes)) <= max_batch_size:
        raise InvalidArgumentError.for_field(
            "inputs",
            f"every input needs the same batch size, from 1 to {max_batch_size};"
            f" got {sorted(sizes)}",
        )
    outputs = tuple(o.name for o in request.outputs)
    if outputs:
        known = [o.name for o in held.outputs]
        unknown = [name for name in outputs if name not in known]
        if unknown:
            raise InvalidArgumentError.for_field(
                "output_names", f"unknown outputs {unknown}; the version has {sorted(known)}"
            )
    _ready_for_triton(held, request, tensors)
    if batchable:
        batchable = all(o.datatype != "BYTES" for o in held.outputs)
    return CheckedRequest(
        rows=next(iter(sizes)),
        names=tuple(spec.name for spec in specs),
        raws=tuple(raws),
        lane=(held.name, outputs, *inner),
        batchable=batchable,
    )


def _ready_for_triton(held: HeldVersion, request: Any, tensors: Mapping[str, ReadTensor]) -> None:
    version = str(held.version)
    if request.model_version != version:
        request.model_version = version
    if request.parameters:
        request.ClearField("parameters")
    for tensor in request.inputs:
        if tensor.parameters:
            tensor.ClearField("parameters")
    for output in request.outputs:
        if output.parameters:
            output.ClearField("parameters")
    if not request.raw_input_contents:
        for tensor in request.inputs:
            tensor.ClearField("contents")
        request.raw_input_contents.extend(tensors[t.name][2] for t in request.inputs)


def conform_response(held: HeldVersion, response: Any) -> Any:
    """Gives each output of Triton's answer the rank its signature declares, in place: a
    per-row scalar (signature [-1]) that Triton answers as [N, 1] goes back as [N]. Only the
    shape changes: the raw bytes are the same either way."""
    scalars = {o.name for o in held.outputs if len(o.shape) == 1}
    if not scalars:
        return response
    for output in response.outputs:
        if output.name in scalars and len(output.shape) == 2 and output.shape[1] == 1:
            del output.shape[1]
    return response


def request_from_arrays(
    held: HeldVersion, arrays: Mapping[str, npt.NDArray[Any]], output_names: Sequence[str]
) -> tuple[Any, CheckedRequest]:
    """A ModelInferRequest for arrays that passed `ModelVersions.infer`'s checks, and what
    coalescing needs to know of it."""
    request = service_pb2.ModelInferRequest(model_name=held.model, model_version=str(held.version))
    raws: list[bytes] = []
    inner: list[tuple[int, ...]] = []
    batchable = True
    rows = 0
    for spec in held.inputs:
        array = arrays[spec.name]
        datatype = np_to_triton_dtype(array.dtype)
        request.inputs.add(name=spec.name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            batchable = False
            raws.append(bytes(serialize_byte_tensor(array).item()))
        else:
            raws.append(array.tobytes())
        inner.append(array.shape[1:])
        rows = array.shape[0]
    request.raw_input_contents.extend(raws)
    for name in output_names:
        request.outputs.add(name=name)
    if batchable:
        batchable = all(o.datatype != "BYTES" for o in held.outputs)
    checked = CheckedRequest(
        rows=rows,
        names=tuple(spec.name for spec in held.inputs),
        raws=tuple(raws),
        lane=(held.name, tuple(output_names), *inner),
        batchable=batchable,
    )
    return request, checked


def arrays_from_response(response: Any) -> dict[str, npt.NDArray[Any]]:
    """Triton's outputs as arrays of their datatypes and shapes (views of the raw bytes)."""
    arrays: dict[str, npt.NDArray[Any]] = {}
    raw_contents = response.raw_output_contents
    for index, output in enumerate(response.outputs):
        shape = tuple(output.shape)
        raw = raw_contents[index]
        if output.datatype == "BYTES":
            arrays[output.name] = deserialize_bytes_tensor(raw).reshape(shape)
        else:
            dtype = np.dtype(triton_to_np_dtype(output.datatype))
            arrays[output.name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return arrays
