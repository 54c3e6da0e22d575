"""Open Inference Protocol requests checked on their raw tensors, readied for Triton, joined
into one batch and cut back into one answer per caller."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from tritonclient.grpc import service_pb2

from modelserve_inference.coalesce import join_requests, split_response
from modelserve_inference.models import HeldVersion, VersionState
from modelserve_inference.oip_requests import (
    arrays_from_response,
    check_request,
    conform_response,
    request_from_arrays,
)
from modelserve_runtime.errors import InvalidArgumentError
from modelserve_triton.model_config import TensorSpec
from modelserve_triton.oip import read_inputs

#: A version with two inputs (the second has a free inner dimension) and two outputs, one of
#: them a per-row scalar.
HELD = HeldVersion(
    "models/churn/versions/3",
    "churn",
    3,
    VersionState.READY,
    inputs=(TensorSpec("dense", "FP32", (-1, 2)), TensorSpec("ids", "INT64", (-1, -1))),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("score", "FP32", (-1, 2))),
)


def _request(
    dense: npt.NDArray[Any],
    ids: npt.NDArray[Any],
    *,
    version: str = "3",
    outputs: tuple[str, ...] = (),
) -> Any:
    request = service_pb2.ModelInferRequest(model_name="churn", model_version=version)
    for name, array, datatype in (("dense", dense, "FP32"), ("ids", ids, "INT64")):
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _check(request: Any, *, reject_non_finite: bool = True) -> Any:
    return check_request(
        HELD,
        request,
        read_inputs(request),
        max_batch_size=8,
        reject_non_finite=reject_non_finite,
    )


def _rows(n: int, start: float = 0.0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    dense = (np.arange(2 * n, dtype=np.float32) + start).reshape(n, 2)
    ids = (np.arange(3 * n, dtype=np.int64) + int(start)).reshape(n, 3)
    return dense, ids


def _violations(request: Any, **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgumentError) as info:
        _check(request, **kwargs)
    return [(v.field, v.description) for v in info.value.violations]


class TestCheckRequest:
    def test_raw_tensors_pass_as_they_are(self) -> None:
        """A well-formed request keeps its raw bytes; the checks give its rows and each
        input's bytes in the signature's order."""
        dense, ids = _rows(3)
        request = _request(dense, ids)

        checked = _check(request)

        assert checked.rows == 3
        assert checked.names == ("dense", "ids")
        assert checked.raws == (dense.tobytes(), ids.tobytes())
        assert list(request.raw_input_contents) == [dense.tobytes(), ids.tobytes()]
        assert checked.batchable

    def test_every_signature_problem_is_named_at_once(self) -> None:
        """An unknown input, a wrong inner dimension and a wrong datatype come back together,
        each naming its field and what was expected."""
        request = service_pb2.ModelInferRequest(model_name="churn", model_version="3")
        request.inputs.add(name="dense", datatype="FP32", shape=[1, 3])
        request.raw_input_contents.append(np.zeros((1, 3), np.float32).tobytes())
        request.inputs.add(name="ids", datatype="INT32", shape=[1, 2])
        request.raw_input_contents.append(np.zeros((1, 2), np.int32).tobytes())
        request.inputs.add(name="extra", datatype="FP32", shape=[1])
        request.raw_input_contents.append(np.zeros(1, np.float32).tobytes())

        assert _violations(request) == [
            ("inputs[extra]", "not an input of models/churn/versions/3"),
            ("inputs[dense].shape", "expected [-1, 2], got [1, 3]"),
            ("inputs[ids].datatype", "expected INT64, got INT32"),
        ]

    def test_nan_in_raw_bytes_is_refused_unless_allowed(self) -> None:
        """A NaN inside the raw bytes of a float input is refused naming the input; with the
        check off it passes."""
        dense, ids = _rows(2)
        dense[1, 0] = np.nan

        assert _violations(_request(dense, ids)) == [("inputs[dense]", "contains NaN or infinity")]
        assert _check(_request(dense, ids), reject_non_finite=False).rows == 2

    def test_batch_sizes_must_agree_and_fit(self) -> None:
        """Inputs with different batch sizes, or more rows than the model takes, are refused."""
        dense, _ = _rows(2)
        _, ids = _rows(3)
        big_dense, big_ids = _rows(9)

        assert _violations(_request(dense, ids)) == [
            ("inputs", "every input needs the same batch size, from 1 to 8; got [2, 3]")
        ]
        assert _violations(_request(big_dense, big_ids))[0][0] == "inputs"

    def test_unknown_output(self) -> None:
        """Asking for an output the version lacks is refused naming output_names."""
        dense, ids = _rows(1)

        assert _violations(_request(dense, ids, outputs=("label", "margin"))) == [
            ("output_names", "unknown outputs ['margin']; the version has ['label', 'score']")
        ]

    def test_typed_contents_become_raw_bytes(self) -> None:
        """Values sent in InferTensorContents go to Triton as raw bytes, as tritonclient sends."""
        dense, ids = _rows(2)
        request = service_pb2.ModelInferRequest(model_name="churn", model_version="3")
        typed = request.inputs.add(name="dense", datatype="FP32", shape=[2, 2])
        typed.contents.fp32_contents.extend(dense.reshape(-1).tolist())
        typed = request.inputs.add(name="ids", datatype="INT64", shape=[2, 3])
        typed.contents.int64_contents.extend(ids.reshape(-1).tolist())

        checked = _check(request)

        assert list(request.raw_input_contents) == [dense.tobytes(), ids.tobytes()]
        assert not any(t.HasField("contents") for t in request.inputs)
        assert checked.raws == (dense.tobytes(), ids.tobytes())

    def test_triton_gets_the_version_number_and_no_parameters(self) -> None:
        """The version goes to Triton as its number, and parameters the facade does not offer
        (shared memory, priorities) are dropped rather than passed on."""
        dense, ids = _rows(1)
        request = _request(dense, ids, version="03", outputs=("score",))
        request.parameters["priority"].int64_param = 1
        request.inputs[0].parameters["shared_memory_region"].string_param = "region"
        request.outputs[0].parameters["shared_memory_region"].string_param = "out"

        _check(request)

        assert request.model_version == "3"
        assert not request.parameters
        assert not request.inputs[0].parameters
        assert not request.outputs[0].parameters

    def test_lanes_part_by_outputs_and_inner_dimensions(self) -> None:
        """Requests share a lane (can be joined) only with the same outputs and the same inner
        dimensions; a signature with a BYTES tensor is never joined."""
        dense, ids = _rows(2)
        same = _check(_request(*_rows(5)))
        other_outputs = _check(_request(dense, ids, outputs=("score",)))
        other_inner = _check(_request(dense, np.zeros((2, 4), np.int64)))
        texts = HeldVersion(
            "models/notes/versions/1",
            "notes",
            1,
            VersionState.READY,
            inputs=(TensorSpec("text", "BYTES", (-1, 1)),),
            outputs=(TensorSpec("score", "FP32", (-1, 1)),),
        )
        text = np.array([[b"hello"]], dtype=np.object_)

        base = _check(_request(dense, ids))

        assert base.lane == same.lane
        assert base.lane != other_outputs.lane
        assert base.lane != other_inner.lane
        assert not request_from_arrays(texts, {"text": text}, ["score"])[1].batchable


class TestJoinAndSplit:
    def test_rows_are_joined_in_turn_and_cut_back_per_caller(self) -> None:
        """Three callers' rows become one request in caller order; the answer's rows go back to
        each caller with its own request id."""
        parts = []
        for index, (n, start) in enumerate(((1, 0.0), (3, 10.0), (2, 20.0))):
            request = _request(*_rows(n, start))
            request.id = f"req-{index}"
            parts.append((request, _check(request)))

        joined = join_requests(parts)

        assert [(t.name, list(t.shape)) for t in joined.inputs] == [
            ("dense", [6, 2]),
            ("ids", [6, 3]),
        ]
        dense = np.frombuffer(joined.raw_input_contents[0], np.float32).reshape(6, 2)
        np.testing.assert_array_equal(
            dense, np.concatenate([_rows(1, 0.0)[0], _rows(3, 10.0)[0], _rows(2, 20.0)[0]])
        )

        answer = service_pb2.ModelInferResponse(model_name="churn", model_version="3")
        answer.outputs.add(name="label", datatype="INT64", shape=[6])
        answer.raw_output_contents.append(np.arange(6, dtype=np.int64).tobytes())
        answer.outputs.add(name="score", datatype="FP32", shape=[6, 2])
        answer.raw_output_contents.append(np.arange(12, dtype=np.float32).tobytes())

        answers = split_response(answer, parts)

        assert [a.id for a in answers] == ["req-0", "req-1", "req-2"]
        labels = [arrays_from_response(a)["label"].tolist() for a in answers]
        assert labels == [[0], [1, 2, 3], [4, 5]]
        assert arrays_from_response(answers[2])["score"].tolist() == [[8, 9], [10, 11]]
        assert {a.model_version for a in answers} == {"3"}

    def test_inputs_are_joined_in_the_signature_order(self) -> None:
        """A first caller that lists its inputs out of order still gives a batch whose bytes
        line up: each input is joined by name."""
        first_dense, first_ids = _rows(1)
        first = service_pb2.ModelInferRequest(model_name="churn", model_version="3")
        first.inputs.add(name="ids", datatype="INT64", shape=[1, 3])
        first.raw_input_contents.append(first_ids.tobytes())
        first.inputs.add(name="dense", datatype="FP32", shape=[1, 2])
        first.raw_input_contents.append(first_dense.tobytes())
        second = _request(*_rows(1, 5.0))

        joined = join_requests([(first, _check(first)), (second, _check(second))])

        assert [t.name for t in joined.inputs] == ["dense", "ids"]
        assert joined.raw_input_contents[0] == first_dense.tobytes() + _rows(1, 5.0)[0].tobytes()

    def test_an_answer_that_does_not_match_the_batch_is_refused(self) -> None:
        """An answer whose rows are not the batch's is an error, never a wrong cut."""
        parts = [(r, _check(r)) for r in (_request(*_rows(1)), _request(*_rows(2)))]
        answer = service_pb2.ModelInferResponse(model_name="churn", model_version="3")
        answer.outputs.add(name="label", datatype="INT64", shape=[2])
        answer.raw_output_contents.append(np.arange(2, dtype=np.int64).tobytes())

        with pytest.raises(Exception, match="3-row batch"):
            split_response(answer, parts)


class TestConversions:
    def test_per_row_scalars_get_their_signature_rank(self) -> None:
        """Triton's [N, 1] for a [-1] output goes back as [N]; other outputs keep their shape."""
        answer = service_pb2.ModelInferResponse(model_name="churn", model_version="3")
        answer.outputs.add(name="label", datatype="INT64", shape=[2, 1])
        answer.outputs.add(name="score", datatype="FP32", shape=[2, 2])

        conform_response(HELD, answer)

        assert [list(o.shape) for o in answer.outputs] == [[2], [2, 2]]

    def test_arrays_round_trip_through_a_request(self) -> None:
        """Arrays become a request whose raw bytes read back as the same arrays."""
        dense, ids = _rows(2)

        request, checked = request_from_arrays(HELD, {"dense": dense, "ids": ids}, ["score"])

        assert checked.rows == 2
        assert [o.name for o in request.outputs] == ["score"]
        echoed = service_pb2.ModelInferResponse(
            outputs=[
                service_pb2.ModelInferResponse.InferOutputTensor(
                    name=t.name, datatype=t.datatype, shape=t.shape
                )
                for t in request.inputs
            ],
            raw_output_contents=request.raw_input_contents,
        )
        arrays = arrays_from_response(echoed)
        np.testing.assert_array_equal(arrays["dense"], dense)
        np.testing.assert_array_equal(arrays["ids"], ids)
