"""Open Inference Protocol requests checked against a version's signature without decoding them.

The facade forwards the caller's `ModelInferRequest` to Triton as it came, so its raw tensors
are checked where they lie (`modelserve_triton.oip` reads them): names, datatypes and shapes
from the tensor metadata, sizes from the byte counts, NaN and infinity through a zero-copy view
of the bytes. Only typed contents (`InferTensorContents`, which tritonclient never sends) are
converted, to raw bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from modelserve_runtime.errors import InvalidArgumentError
from modelserve_triton.oip import InputTensor, decode_output, signature_violations
from modelserve_triton.runner import encode_request

if TYPE_CHECKING:
    from modelserve_inference.models import HeldVersion


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


def check_request(
    held: HeldVersion,
    request: Any,
    tensors: Mapping[str, InputTensor],
    *,
    max_batch_size: int,
    reject_non_finite: bool,
) -> CheckedRequest:
    """Checks the request (read by `read_inputs`) against the version's signature, as
    `ModelVersions.infer` checks arrays with exact dtypes: every input present and known, its
    rank and fixed dimensions, its exact datatype, no NaN or infinity when `reject_non_finite`,
    one batch size from 1 to `max_batch_size`, known requested outputs. InvalidArgumentError
    naming every bad field otherwise.

    Then readies the request for Triton, in place: typed contents become raw bytes, the
    version is spelled as Triton spells it, and parameters (shared memory, classification,
    priorities: none of which the facade offers) are dropped.
    """
    specs = held.inputs
    violations = signature_violations(
        tensors,
        ((spec.name, spec.datatype, spec.shape, spec.allow_non_finite) for spec in specs),
        version=held.name,
        missing="required input is missing",
        reject_non_finite=reject_non_finite,
    )
    if violations:
        raise InvalidArgumentError.from_violations(violations)
    inputs = [tensors[spec.name] for spec in specs]
    sizes = {tensor.shape[0] if tensor.shape else 0 for tensor in inputs}
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
    # A BYTES tensor's elements have no fixed size: its rows cannot be joined and split back.
    datatypes = {t.datatype for t in inputs} | {o.datatype for o in held.outputs}
    return CheckedRequest(
        rows=next(iter(sizes)),
        names=tuple(spec.name for spec in specs),
        raws=tuple(tensor.raw for tensor in inputs),
        lane=(held.name, outputs, *(tensor.shape[1:] for tensor in inputs)),
        batchable="BYTES" not in datatypes,
    )


def _ready_for_triton(held: HeldVersion, request: Any, tensors: Mapping[str, InputTensor]) -> None:
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
        request.raw_input_contents.extend(tensors[t.name].raw for t in request.inputs)


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
    names = tuple(spec.name for spec in held.inputs)
    inputs = [arrays[name] for name in names]
    request = encode_request(
        held.model, held.version, dict(zip(names, inputs, strict=True)), output_names
    )
    # A BYTES tensor's elements have no fixed size: its rows cannot be joined and split back.
    datatypes = {t.datatype for t in request.inputs} | {o.datatype for o in held.outputs}
    checked = CheckedRequest(
        rows=inputs[-1].shape[0] if inputs else 0,
        names=names,
        raws=tuple(request.raw_input_contents),
        lane=(held.name, tuple(output_names), *(array.shape[1:] for array in inputs)),
        batchable="BYTES" not in datatypes,
    )
    return request, checked


def arrays_from_response(response: Any) -> dict[str, npt.NDArray[Any]]:
    """Triton's outputs as arrays of their datatypes and shapes (views of the raw bytes);
    TritonError when an output's bytes do not make its tensor."""
    raw_contents = response.raw_output_contents
    return {
        output.name: decode_output(
            response.model_name,
            output.name,
            output.datatype,
            tuple(output.shape),
            raw_contents[index] if index < len(raw_contents) else b"",
        )
        for index, output in enumerate(response.outputs)
    }
