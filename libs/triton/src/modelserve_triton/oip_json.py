"""The Open Inference Protocol's HTTP/REST bodies (KServe v2 JSON, with Triton's binary tensor
extension) as the protocol's gRPC messages, and back.

An inference request is a JSON object naming its input tensors, each with its values in
`data` (nested or flat, row-major) or, with `"parameters": {"binary_data_size": n}`, as n raw
bytes that follow the JSON in the body; `Inference-Header-Content-Length` then says where the
JSON ends. It becomes a `ModelInferRequest` with raw contents, so the gRPC servicers answer it
with the same checks as any gRPC caller. An answer's outputs go back as JSON values, or as raw
bytes after the JSON for outputs asked for with `"binary_data": true` (or all of them with the
request parameter `"binary_data_output": true`), as Triton's own HTTP endpoint does.

Every refusal is an InvalidArgumentError naming the JSON field (`inputs[0].data`) and what was
expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor, triton_to_np_dtype

from modelserve_runtime.errors import InvalidArgumentError
from modelserve_triton.oip import CONTENTS_FIELD, decode_raw, encode_raw

#: The header that says how many bytes of the body are JSON (the rest is raw tensor bytes).
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Parameters of the binary extension: they shape the HTTP body, not the inference.
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data"
BINARY_OUTPUTS = "binary_data_output"
#: The datatypes a request may send as JSON values, and what JSON values each takes.
_NUMBERS = {
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "FP16",
    "FP32",
    "FP64",
}
DATATYPES = frozenset({*_NUMBERS, "BOOL", "BYTES"})


@dataclass(frozen=True, slots=True)
class ParsedInfer:
    """An HTTP inference request as the gRPC request it means, and how to answer it."""

    request: Any
    """A `ModelInferRequest`: raw contents, one per input, in the order of `inputs`."""
    binary_outputs: frozenset[str]
    """Outputs to answer as raw bytes after the JSON."""
    all_binary: bool
    """Every output goes back as raw bytes (`binary_data_output`)."""


def _refuse(field: str, description: str) -> InvalidArgumentError:
    return InvalidArgumentError.for_field(field, description)


def _object(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _refuse(field, f"expected a JSON object, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _string(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise _refuse(field, f"expected a non-empty string, got {_kind(value)}")
    return value


def _parameters(value: object, field: str, target: Any) -> None:
    """JSON parameters (booleans, integers, numbers, strings) into a protobuf parameter map."""
    for key, item in _object(value, field).items():
        parameter = target[key]
        if isinstance(item, bool):
            parameter.bool_param = item
        elif isinstance(item, int):
            if not -(2**63) <= item < 2**63:
                raise _refuse(f"{field}.{key}", "integer out of the int64 range")
            parameter.int64_param = item
        elif isinstance(item, float):
            parameter.double_param = item
        elif isinstance(item, str):
            parameter.string_param = item
        else:
            raise _refuse(
                f"{field}.{key}", f"expected a boolean, number or string, got {_kind(item)}"
            )


def _shape(value: object, field: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise _refuse(field, f"expected an array of integers >= 0, got {json.dumps(value)[:80]}")
    return value


def _flatten(value: object, field: str) -> list[Any]:
    """A tensor's `data`, nested or flat, as one row-major list of its elements."""
    if not isinstance(value, list):
        raise _refuse(field, f"expected an array of the tensor's values, got {_kind(value)}")
    flat: list[Any] = []
    pending: list[Any] = [iter(value)]
    while pending:
        for item in pending[-1]:
            if isinstance(item, list):
                pending.append(iter(item))
                break
            flat.append(item)
        else:
            pending.pop()
    return flat


def _raw_of_values(values: list[Any], datatype: str, field: str) -> bytes:
    """JSON values as a raw tensor's bytes (BYTES elements length-prefixed), each checked to
    be of the JSON kind its datatype takes and to fit it."""
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise _refuse(field, "BYTES takes strings")
        array = np.array([v.encode() for v in values], dtype=np.object_)
        return bytes(serialize_byte_tensor(array).item()) if values else b""
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise _refuse(field, "BOOL takes true or false")
        return np.array(values, dtype=np.bool_).tobytes()
    dtype = np.dtype(triton_to_np_dtype(datatype))
    if dtype.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise _refuse(field, f"{datatype} takes integers")
        info = np.iinfo(dtype)
        if values and not (info.min <= min(values) and max(values) <= info.max):
            raise _refuse(field, f"{datatype} takes integers from {info.min} to {info.max}")
    elif not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise _refuse(field, f"{datatype} takes numbers")
    try:
        return np.array(values, dtype=dtype).tobytes()
    except OverflowError as exc:
        raise _refuse(field, f"a value does not fit {datatype}: {exc}") from exc


def parse_infer(
    body: bytes,
    header_length: str | None,
    *,
    model_name: str,
    model_version: str,
) -> ParsedInfer:
    """The body of `POST /v2/models/<model_name>[/versions/<model_version>]/infer` as a
    ModelInferRequest for that model; InvalidArgumentError naming the field otherwise."""
    if header_length is None:
        head, tail = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise _refuse(
                HEADER_LENGTH,
                f"expected the byte length of the JSON header, from 0 to the body's"
                f" {len(body)} bytes, got {header_length!r}",
            )
        head, tail = body[:length], body[length:]
    try:
        document = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse("body", f"expected a JSON inference request: {exc}") from None
    document = _object(document, "body")
    request = service_pb2.ModelInferRequest(model_name=model_name, model_version=model_version)
    if "id" in document:
        if not isinstance(document["id"], str):
            raise _refuse("id", f"expected a string, got {_kind(document['id'])}")
        request.id = document["id"]
    all_binary = False
    if "parameters" in document:
        _parameters(document["parameters"], "parameters", request.parameters)
        if BINARY_OUTPUTS in request.parameters:
            flag = request.parameters[BINARY_OUTPUTS]
            if flag.WhichOneof("parameter_choice") != "bool_param":
                raise _refuse(f"parameters.{BINARY_OUTPUTS}", "expected true or false")
            all_binary = flag.bool_param
            del request.parameters[BINARY_OUTPUTS]
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _refuse("inputs", "expected a non-empty array of input tensors")
    offset = 0
    for index, item in enumerate(inputs):
        where = f"inputs[{index}]"
        tensor = _object(item, where)
        name = _string(tensor.get("name"), f"{where}.name")
        datatype = tensor.get("datatype")
        if datatype not in DATATYPES:
            raise _refuse(
                f"{where}.datatype", f"expected one of {sorted(DATATYPES)}, got {datatype!r}"
            )
        shape = _shape(tensor.get("shape"), f"{where}.shape")
        added = request.inputs.add(name=name, datatype=datatype, shape=shape)
        size = None
        if "parameters" in tensor:
            _parameters(tensor["parameters"], f"{where}.parameters", added.parameters)
            if BINARY_SIZE in added.parameters:
                if added.parameters[BINARY_SIZE].WhichOneof("parameter_choice") != "int64_param":
                    raise _refuse(f"{where}.parameters.{BINARY_SIZE}", "expected an integer")
                size = added.parameters[BINARY_SIZE].int64_param
                del added.parameters[BINARY_SIZE]
        if size is not None:
            if "data" in tensor:
                raise _refuse(where, f"send `data` or `{BINARY_SIZE}`, not both")
            if not 0 <= size <= len(tail) - offset:
                raise _refuse(
                    f"{where}.parameters.{BINARY_SIZE}",
                    f"{size} bytes declared, {len(tail) - offset} left after the JSON header",
                )
            request.raw_input_contents.append(tail[offset : offset + size])
            offset += size
            continue
        if "data" not in tensor:
            raise _refuse(where, f"expected `data`, or `parameters.{BINARY_SIZE}` and raw bytes")
        values = _flatten(tensor["data"], f"{where}.data")
        count = math.prod(shape)
        if len(values) != count:
            raise _refuse(f"{where}.data", f"shape {shape} needs {count} values, got {len(values)}")
        request.raw_input_contents.append(_raw_of_values(values, datatype, f"{where}.data"))
    if offset != len(tail):
        raise _refuse(
            "body",
            f"{len(tail) - offset} bytes after the JSON header belong to no input"
            f" (`{BINARY_SIZE}` sums to {offset})",
        )
    binary: set[str] = set()
    if "outputs" in document:
        outputs = document["outputs"]
        if not isinstance(outputs, list):
            raise _refuse(
                "outputs", f"expected an array of requested outputs, got {_kind(outputs)}"
            )
        for index, item in enumerate(outputs):
            where = f"outputs[{index}]"
            output = _object(item, where)
            name = _string(output.get("name"), f"{where}.name")
            added_output = request.outputs.add(name=name)
            if "parameters" in output:
                _parameters(output["parameters"], f"{where}.parameters", added_output.parameters)
                if BINARY_OUTPUT in added_output.parameters:
                    flag = added_output.parameters[BINARY_OUTPUT]
                    if flag.WhichOneof("parameter_choice") != "bool_param":
                        raise _refuse(
                            f"{where}.parameters.{BINARY_OUTPUT}", "expected true or false"
                        )
                    if flag.bool_param:
                        binary.add(name)
                    del added_output.parameters[BINARY_OUTPUT]
    return ParsedInfer(request, frozenset(binary), all_binary)


def _parameter_value(parameter: Any) -> object:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice is not None else None


def parameters_json(parameters: Mapping[str, Any]) -> dict[str, object]:
    """A protobuf parameter map as a JSON object."""
    return {key: _parameter_value(value) for key, value in parameters.items()}


def _values(datatype: str, shape: Sequence[int], raw: bytes, field: str) -> list[Any]:
    array = decode_raw(datatype, shape, raw)
    if datatype != "BYTES":
        values: list[Any] = array.reshape(-1).tolist()
        return values
    try:
        return [bytes(v).decode() for v in array.reshape(-1)]
    except UnicodeDecodeError:
        raise _refuse(
            field, f"holds bytes that are not UTF-8 text: ask for it with `{BINARY_OUTPUT}`"
        ) from None


def _typed_raw(output: Any) -> bytes:
    """An output's typed contents (which no Triton answer uses, but a servicer may) as raw."""
    field = CONTENTS_FIELD.get(output.datatype)
    if field is None:
        return b""
    values = list(getattr(output.contents, field))
    if output.datatype == "BYTES":
        return encode_raw(np.array(values, dtype=np.object_))
    return encode_raw(np.array(values, dtype=np.dtype(triton_to_np_dtype(output.datatype))))


def encode_infer(response: Any, parsed: ParsedInfer) -> tuple[bytes, int | None]:
    """A ModelInferResponse as the HTTP answer's body, and the length of its JSON header when
    raw output bytes follow it (None: the body is JSON only)."""
    raws = response.raw_output_contents
    outputs = []
    binary: list[bytes] = []
    for index, output in enumerate(response.outputs):
        raw = raws[index] if index < len(raws) else _typed_raw(output)
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        parameters = parameters_json(output.parameters)
        if parsed.all_binary or output.name in parsed.binary_outputs:
            parameters[BINARY_SIZE] = len(raw)
            binary.append(raw)
        else:
            entry["data"] = _values(output.datatype, output.shape, raw, f"outputs[{output.name}]")
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = parameters_json(response.parameters)
    head = json.dumps(document, separators=(",", ":"), allow_nan=True).encode()
    if not binary:
        return head, None
    return b"".join((head, *binary)), len(head)


def tensor_metadata_json(tensors: Sequence[Any]) -> list[dict[str, object]]:
    """ModelMetadataResponse.TensorMetadata entries as JSON objects."""
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def model_metadata_json(response: Any) -> dict[str, object]:
    """A ModelMetadataResponse as the JSON the protocol's model metadata endpoint answers."""
    document: dict[str, object] = {
        "name": response.name,
        "versions": list(response.versions),
        "inputs": tensor_metadata_json(response.inputs),
        "outputs": tensor_metadata_json(response.outputs),
    }
    if response.platform:
        document["platform"] = response.platform
    return document


def server_metadata_json(response: Any) -> dict[str, object]:
    """A ServerMetadataResponse as the JSON of `GET /v2`."""
    return {
        "name": response.name,
        "version": response.version,
        "extensions": list(response.extensions),
    }
