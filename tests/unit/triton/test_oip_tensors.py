"""Open Inference Protocol input tensors read and checked as the router and the inference
facade both take them, and tensors turned to raw bytes and back."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from modelserve_runtime.errors import InvalidArgumentError
from modelserve_triton.errors import TritonError
from modelserve_triton.oip import (
    InputTensor,
    decode_output,
    decode_raw,
    encode_raw,
    read_inputs,
    refuse_classification,
    signature_violations,
)

#: An input signature of (name, datatype, shape): two rows-first inputs.
SIGNATURE = (("dense", "FP32", (-1, 2), False), ("ids", "INT64", (-1, -1), False))


def _request(**arrays: tuple[str, npt.NDArray[Any]]) -> Any:
    """A request sending each (datatype, array) as raw contents, as tritonclient does."""
    request = service_pb2.ModelInferRequest(model_name="churn")
    for name, (datatype, array) in arrays.items():
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(encode_raw(array))
    return request


def _read_error(request: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgumentError) as info:
        read_inputs(request)
    return [(v.field, v.description) for v in info.value.violations]


def _violations(tensors: dict[str, InputTensor], **kwargs: Any) -> list[tuple[str, str]]:
    options: dict[str, Any] = {
        "version": "models/churn/versions/3",
        "missing": "required input is missing",
        "reject_non_finite": True,
        **kwargs,
    }
    return [(v.field, v.description) for v in signature_violations(tensors, SIGNATURE, **options)]


class TestRawCodec:
    def test_fixed_size_arrays_round_trip(self) -> None:
        """A fixed-size array becomes its C-order bytes (also when it is a strided view) and
        reads back as the same values and shape."""
        array = np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]

        raw = encode_raw(array)

        assert raw == np.ascontiguousarray(array).tobytes()
        np.testing.assert_array_equal(decode_raw("INT32", (3, 2), raw), array)

    def test_bytes_elements_are_length_prefixed(self) -> None:
        """A BYTES array (objects or numpy bytes) is length-prefixed as tritonclient sends it;
        an empty one is no bytes at all."""
        texts = np.array([[b"hi"], [b"there"]], dtype=np.object_)

        raw = encode_raw(texts)

        assert raw == serialize_byte_tensor(texts).item()
        assert encode_raw(texts.astype(np.bytes_)) == raw
        assert decode_raw("BYTES", (2, 1), raw).tolist() == [[b"hi"], [b"there"]]
        assert encode_raw(np.empty((0, 1), dtype=np.object_)) == b""

    def test_an_output_whose_bytes_do_not_fill_its_shape_is_a_triton_error(self) -> None:
        """An answer with too few bytes for its output (the python backend answers empty
        outputs under numpy 2) fails naming the model, the output, the bytes and the shape,
        rather than as a reshape error from numpy."""
        array = np.ones((1, 2), dtype=np.float32)

        np.testing.assert_array_equal(
            decode_output("m", "y", "FP32", (1, 2), array.tobytes()), array
        )
        with pytest.raises(TritonError) as caught:
            decode_output("fraud", "probabilities", "FP32", (1, 2), b"")
        assert str(caught.value) == (
            "model 'fraud' answered output 'probabilities' with 0 bytes, which do not make a"
            " FP32 tensor of shape [1, 2]"
        )
        with pytest.raises(TritonError, match="answered output 'label' with 8 bytes"):
            decode_output("fraud", "label", "BYTES", (1,), b"\xff\xff\x00\x00abcd")


class TestReadInputs:
    def test_raw_tensors_are_kept_as_they_came(self) -> None:
        """Raw contents are taken by name with their datatype and shape, bytes untouched."""
        dense = np.ones((2, 2), np.float32)
        request = _request(dense=("FP32", dense), ids=("INT64", np.zeros((2, 3), np.int64)))

        tensors = read_inputs(request)

        assert list(tensors) == ["dense", "ids"]
        assert tensors["dense"] == InputTensor("dense", "FP32", (2, 2), dense.tobytes())
        np.testing.assert_array_equal(tensors["dense"].array(), dense)

    def test_typed_contents_become_raw_bytes(self) -> None:
        """Values sent in InferTensorContents read as the raw bytes tritonclient would send."""
        request = service_pb2.ModelInferRequest(model_name="churn")
        typed = request.inputs.add(name="ids", datatype="INT64", shape=[2, 2])
        typed.contents.int64_contents.extend([1, 2, 3, 4])
        typed = request.inputs.add(name="text", datatype="BYTES", shape=[1])
        typed.contents.bytes_contents.append(b"hello")

        tensors = read_inputs(request)

        assert tensors["ids"].raw == np.array([[1, 2], [3, 4]], np.int64).tobytes()
        assert tensors["text"].array().tolist() == [b"hello"]

    def test_contents_that_do_not_fill_the_shape(self) -> None:
        """Raw bytes, BYTES elements or typed values too few for the shape are refused naming
        the input's contents."""
        short = _request(dense=("FP32", np.zeros((2, 2), np.float32)))
        short.inputs[0].shape[0] = 3
        texts = _request(text=("BYTES", np.array([b"a", b"b"], dtype=np.object_)))
        texts.inputs[0].shape[0] = 3
        typed = service_pb2.ModelInferRequest(model_name="churn")
        typed.inputs.add(name="ids", datatype="INT64", shape=[3]).contents.int64_contents.append(1)

        assert _read_error(short) == [
            ("inputs[dense].contents", "shape [3, 2] of FP32 needs 24 bytes, got 16")
        ]
        assert _read_error(texts) == [("inputs[text].contents", "shape [3] needs 3 values, got 2")]
        assert _read_error(typed) == [("inputs[ids].contents", "shape [3] needs 3 values, got 1")]

    def test_bytes_contents_that_are_not_length_prefixed(self) -> None:
        """Raw BYTES contents whose lengths run past their end (float bytes sent as BYTES, a
        cut-off element, a length cut in half) are refused naming the input's contents."""
        floats = np.ones((2, 2), np.float32)
        cases = {
            floats.tobytes(): "element 0 declares 1065353216 bytes, 12 are left",
            encode_raw(np.array([b"ab", b"cd"], dtype=np.object_))[:-1]: (
                "element 1 declares 2 bytes, 1 are left"
            ),
            encode_raw(np.array([b"ab"], dtype=np.object_)) + b"\x01\x00": (
                "element 1 has 2 bytes left for its 4-byte length"
            ),
        }
        for raw, why in cases.items():
            request = service_pb2.ModelInferRequest(model_name="churn")
            request.inputs.add(name="text", datatype="BYTES", shape=[2])
            request.raw_input_contents.append(raw)

            assert _read_error(request) == [
                ("inputs[text].contents", f"not length-prefixed BYTES elements: {why}")
            ]

    def test_malformed_requests_are_named(self) -> None:
        """No inputs, raw contents that do not pair with the inputs, an unsupported datatype
        and a negative dimension are each refused naming the field."""
        pair = _request(dense=("FP32", np.zeros(2, np.float32)))
        pair.raw_input_contents.append(b"")
        half = service_pb2.ModelInferRequest(model_name="churn")
        half.inputs.add(name="x", datatype="FP16", shape=[1])
        negative = service_pb2.ModelInferRequest(model_name="churn")
        negative.inputs.add(name="x", datatype="FP32", shape=[-1])

        assert _read_error(service_pb2.ModelInferRequest()) == [
            ("inputs", "at least one input tensor is required")
        ]
        assert _read_error(pair) == [
            ("raw_input_contents", "2 raw contents for 1 inputs; send one per input")
        ]
        assert _read_error(half) == [("inputs[x].datatype", "unsupported datatype 'FP16'")]
        assert _read_error(negative) == [("inputs[x].shape", "dimensions must be >= 0")]

    def test_names_sent_twice_are_named_together(self) -> None:
        """Every input name sent more than once is one violation of the same error."""
        one = ("FP32", np.zeros(1, np.float32))
        request = _request(a=one, b=one)
        for name in ("a", "b"):
            request.inputs.add(name=name, datatype="FP32", shape=[1])
            request.raw_input_contents.append(encode_raw(one[1]))

        assert _read_error(request) == [
            ("inputs[a]", "named more than once"),
            ("inputs[b]", "named more than once"),
        ]


class TestSignatureViolations:
    def test_fitting_tensors_have_none(self) -> None:
        """Tensors of the signature's names, ranks, fixed dimensions and datatypes fit."""
        request = _request(
            dense=("FP32", np.zeros((3, 2), np.float32)), ids=("INT64", np.zeros((3, 5), np.int64))
        )

        assert _violations(read_inputs(request)) == []

    def test_every_problem_is_named_in_order(self) -> None:
        """Unknown inputs come first, then each signature input in turn: missing (described
        as the caller says), a wrong shape or a wrong datatype."""
        wrong_shape = _request(
            dense=("FP32", np.zeros((1, 3), np.float32)), extra=("FP32", np.zeros(1, np.float32))
        )
        wrong_type = _request(
            dense=("FP64", np.zeros((1, 2), np.float64)), ids=("INT64", np.zeros((1, 1), np.int64))
        )

        assert _violations(read_inputs(wrong_shape), missing="required by v3") == [
            ("inputs[extra]", "not an input of models/churn/versions/3"),
            ("inputs[dense].shape", "expected [-1, 2], got [1, 3]"),
            ("inputs[ids]", "required by v3"),
        ]
        assert _violations(read_inputs(wrong_type)) == [
            ("inputs[dense].datatype", "expected FP32, got FP64")
        ]

    def test_a_signature_without_a_datatype_takes_any(self) -> None:
        """An input whose signature leaves the datatype unset is checked by name and shape
        only."""
        tensors = read_inputs(_request(ids=("INT32", np.zeros((1, 2), np.int32))))

        violations = signature_violations(
            tensors,
            [("ids", None, [-1, 2], False)],
            version="v",
            missing="",
            reject_non_finite=True,
        )

        assert violations == []

    def test_nan_and_infinity_are_refused_when_asked(self) -> None:
        """A NaN or infinity in a float input is named unless the caller allows them."""
        dense = np.array([[1.0, np.inf]], np.float32)
        tensors = read_inputs(
            _request(dense=("FP32", dense), ids=("INT64", np.zeros((1, 1), np.int64)))
        )

        assert _violations(tensors) == [("inputs[dense]", "contains NaN or infinity")]
        assert _violations(tensors, reject_non_finite=False) == []

    def test_an_input_that_allows_nan_and_infinity_takes_them(self) -> None:
        """The signature's `allow_non_finite` lets one input take NaN and infinity while the
        others still refuse them."""
        tensors = read_inputs(
            _request(
                dense=("FP32", np.array([[np.nan, np.inf]], np.float32)),
                other=("FP64", np.array([[np.nan]], np.float64)),
            )
        )
        signature = [("dense", "FP32", (-1, 2), True), ("other", "FP64", (-1, 1), False)]

        violations = signature_violations(
            tensors, signature, version="v", missing="", reject_non_finite=True
        )

        assert [(v.field, v.description) for v in violations] == [
            ("inputs[other]", "contains NaN or infinity")
        ]


class TestRefuseClassification:
    def test_classification_outputs_are_refused(self) -> None:
        """An output asking for Triton's top-k classification is refused naming its
        parameters; plain outputs pass."""
        request = service_pb2.ModelInferRequest(model_name="churn")
        request.outputs.add(name="score")
        refuse_classification(request)
        request.outputs.add(name="label").parameters["classification"].int64_param = 2

        with pytest.raises(InvalidArgumentError) as info:
            refuse_classification(request)

        assert [(v.field, v.description) for v in info.value.violations] == [
            ("outputs.parameters", "classification outputs are not supported")
        ]
