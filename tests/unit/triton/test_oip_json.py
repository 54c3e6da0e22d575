"""The Open Inference Protocol's HTTP/REST bodies as its gRPC messages, and back."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from modelserve_runtime.errors import InvalidArgumentError
from modelserve_triton.oip_json import (
    encode_infer,
    model_metadata_json,
    parse_infer,
    server_metadata_json,
)


def _parse(document: Any, tail: bytes = b"", header_length: str | None = None) -> Any:
    head = json.dumps(document).encode()
    if tail and header_length is None:
        header_length = str(len(head))
    return parse_infer(head + tail, header_length, model_name="fraud", model_version="2")


def _refusal(document: Any, tail: bytes = b"", header_length: str | None = None) -> str:
    with pytest.raises(InvalidArgumentError) as info:
        _parse(document, tail, header_length)
    return str(info.value)


def _tensor(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [2, 2], **fields}


class TestRequests:
    def test_nested_and_flat_data_make_the_same_raw_tensor(self) -> None:
        nested = _parse({"inputs": [_tensor(data=[[1, 2.5], [3, 4]])]}).request
        flat = _parse({"inputs": [_tensor(data=[1, 2.5, 3, 4])]}).request
        expected = np.array([1, 2.5, 3, 4], dtype=np.float32).tobytes()
        assert list(nested.raw_input_contents) == list(flat.raw_input_contents) == [expected]
        assert (nested.model_name, nested.model_version) == ("fraud", "2")
        assert (nested.inputs[0].name, nested.inputs[0].datatype) == ("x", "FP32")
        assert list(nested.inputs[0].shape) == [2, 2]

    def test_every_json_datatype(self) -> None:
        parsed = _parse(
            {
                "inputs": [
                    {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
                    {"name": "i", "datatype": "INT64", "shape": [2], "data": [-(2**40), 7]},
                    {"name": "u", "datatype": "UINT8", "shape": [1], "data": [255]},
                    {"name": "h", "datatype": "FP16", "shape": [1], "data": [0.5]},
                    {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["héllo", ""]},
                ]
            }
        ).request
        raws = list(parsed.raw_input_contents)
        assert raws[0] == np.array([True, False]).tobytes()
        assert raws[1] == np.array([-(2**40), 7], dtype=np.int64).tobytes()
        assert raws[2] == b"\xff"
        assert raws[3] == np.array([0.5], dtype=np.float16).tobytes()
        assert list(deserialize_bytes_tensor(raws[4])) == ["héllo".encode(), b""]

    def test_binary_inputs_follow_the_json_header_in_order(self) -> None:
        first = np.arange(4, dtype=np.float32).tobytes()
        second = np.array([9], dtype=np.int32).tobytes()
        parsed = _parse(
            {
                "inputs": [
                    _tensor(parameters={"binary_data_size": len(first)}),
                    {"name": "y", "datatype": "INT32", "shape": [1], "data": [5]},
                    {
                        "name": "z",
                        "datatype": "INT32",
                        "shape": [1],
                        "parameters": {"binary_data_size": len(second)},
                    },
                ]
            },
            first + second,
        )
        raws = list(parsed.request.raw_input_contents)
        assert raws == [first, np.array([5], dtype=np.int32).tobytes(), second]
        # The extension's parameter shapes the body; it does not reach the servicer.
        assert all("binary_data_size" not in t.parameters for t in parsed.request.inputs)

    def test_parameters_outputs_and_binary_choices(self) -> None:
        parsed = _parse(
            {
                "id": "r-1",
                "parameters": {"routing_key": "c-7", "priority": 2, "w": 0.5, "flag": True},
                "inputs": [_tensor(data=[1, 2, 3, 4])],
                "outputs": [
                    {"name": "label", "parameters": {"binary_data": True}},
                    {"name": "probabilities", "parameters": {"binary_data": False}},
                ],
            }
        )
        request = parsed.request
        assert request.id == "r-1"
        assert request.parameters["routing_key"].string_param == "c-7"
        assert request.parameters["priority"].int64_param == 2
        assert request.parameters["w"].double_param == 0.5
        assert request.parameters["flag"].bool_param is True
        assert [o.name for o in request.outputs] == ["label", "probabilities"]
        assert all(not o.parameters for o in request.outputs)
        assert parsed.binary_outputs == {"label"}
        assert not parsed.all_binary
        everything = _parse(
            {"parameters": {"binary_data_output": True}, "inputs": [_tensor(data=[1, 2, 3, 4])]}
        )
        assert everything.all_binary
        assert "binary_data_output" not in everything.request.parameters


class TestRefusals:
    @pytest.mark.parametrize(
        ("document", "expected"),
        [
            ([1], "body: expected a JSON object, got an array"),
            ({}, "inputs: expected a non-empty array of input tensors"),
            ({"inputs": []}, "inputs: expected a non-empty array"),
            ({"inputs": [_tensor(name="", data=[1, 2, 3, 4])]}, "inputs[0].name: expected a"),
            ({"inputs": [_tensor(datatype="FP8", data=[1])]}, "inputs[0].datatype: expected one"),
            ({"inputs": [_tensor(shape=[2, -1], data=[1])]}, "inputs[0].shape: expected an array"),
            ({"inputs": [_tensor()]}, "inputs[0]: expected `data`"),
            ({"inputs": [_tensor(data=[1, 2, 3])]}, "inputs[0].data: shape [2, 2] needs 4 values"),
            ({"inputs": [_tensor(data=[1, 2, 3, "4"])]}, "inputs[0].data: FP32 takes numbers"),
            ({"inputs": [_tensor(data=[1, 2, 3, True])]}, "inputs[0].data: FP32 takes numbers"),
            (
                {"inputs": [_tensor(datatype="INT8", data=[1, 2, 3, 300])]},
                "inputs[0].data: INT8 takes integers from -128 to 127",
            ),
            (
                {"inputs": [_tensor(datatype="INT32", data=[1, 2, 3, 4.5])]},
                "inputs[0].data: INT32 takes integers",
            ),
            (
                {"inputs": [_tensor(datatype="BOOL", data=[1, 0, 1, 0])]},
                "inputs[0].data: BOOL takes true or false",
            ),
            (
                {"inputs": [_tensor(datatype="BYTES", data=[1, 2, 3, 4])]},
                "inputs[0].data: BYTES takes strings",
            ),
            ({"inputs": [_tensor(data=5)]}, "inputs[0].data: expected an array"),
            (
                {"inputs": [_tensor(data=[1, 2, 3, 4], parameters={"a": [1]})]},
                "inputs[0].parameters.a: expected a boolean, number or string, got an array",
            ),
            (
                {"id": 7, "inputs": [_tensor(data=[1, 2, 3, 4])]},
                "id: expected a string, got a number",
            ),
            (
                {"inputs": [_tensor(data=[1, 2, 3, 4])], "outputs": {"name": "label"}},
                "outputs: expected an array of requested outputs, got an object",
            ),
            (
                {
                    "inputs": [_tensor(data=[1, 2, 3, 4])],
                    "outputs": [{"name": "label", "parameters": {"binary_data": 1}}],
                },
                "outputs[0].parameters.binary_data: expected true or false",
            ),
        ],
    )
    def test_each_bad_field_is_named(self, document: Any, expected: str) -> None:
        assert _refusal(document).startswith(expected)

    def test_not_json(self) -> None:
        with pytest.raises(InvalidArgumentError, match="body: expected a JSON inference request"):
            parse_infer(b"{inputs:", None, model_name="m", model_version="")

    def test_binary_sizes_must_match_the_bytes_sent(self) -> None:
        four = np.zeros(4, dtype=np.float32).tobytes()
        more = {"inputs": [_tensor(parameters={"binary_data_size": 32})]}
        assert "inputs[0].parameters.binary_data_size: 32 bytes declared, 16 left" in _refusal(
            more, four
        )
        fewer = {"inputs": [_tensor(parameters={"binary_data_size": 8})]}
        assert "8 bytes after the JSON header belong to no input" in _refusal(fewer, four)
        both = {"inputs": [_tensor(data=[1, 2, 3, 4], parameters={"binary_data_size": 16})]}
        assert "inputs[0]: send `data` or `binary_data_size`, not both" in _refusal(both, four)
        assert "Inference-Header-Content-Length: expected the byte length" in _refusal(
            more, four, header_length="99999"
        )
        assert "Inference-Header-Content-Length" in _refusal(more, four, header_length="abc")


def _response(**fields: Any) -> Any:
    response = service_pb2.ModelInferResponse(model_name="fraud", model_version="1", **fields)
    return response


class TestAnswers:
    def test_outputs_as_json_values(self) -> None:
        response = _response(id="r-9")
        response.outputs.add(name="label", datatype="INT64", shape=[2])
        response.outputs.add(name="p", datatype="FP32", shape=[2, 2])
        response.raw_output_contents.append(np.array([1, 0], dtype=np.int64).tobytes())
        response.raw_output_contents.append(np.array([0.25, 0.75, 1, 0], np.float32).tobytes())
        response.parameters["route_reason"].string_param = "canary"
        parsed = _parse({"inputs": [_tensor(data=[1, 2, 3, 4])]})
        body, header_length = encode_infer(response, parsed)
        assert header_length is None
        assert json.loads(body) == {
            "model_name": "fraud",
            "model_version": "1",
            "id": "r-9",
            "parameters": {"route_reason": "canary"},
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]},
                {"name": "p", "datatype": "FP32", "shape": [2, 2], "data": [0.25, 0.75, 1, 0]},
            ],
        }

    def test_binary_outputs_follow_the_json(self) -> None:
        response = _response()
        response.outputs.add(name="label", datatype="INT64", shape=[2])
        response.outputs.add(name="text", datatype="BYTES", shape=[1])
        label = np.array([1, 0], dtype=np.int64).tobytes()
        text = bytes(serialize_byte_tensor(np.array([b"\xff\x00"], dtype=np.object_)).item())
        response.raw_output_contents.extend([label, text])
        parsed = _parse(
            {
                "inputs": [_tensor(data=[1, 2, 3, 4])],
                "outputs": [
                    {"name": "label", "parameters": {"binary_data": True}},
                    {"name": "text", "parameters": {"binary_data": True}},
                ],
            }
        )
        body, header_length = encode_infer(response, parsed)
        assert header_length is not None
        head = json.loads(body[:header_length])
        assert [o["parameters"] for o in head["outputs"]] == [
            {"binary_data_size": len(label)},
            {"binary_data_size": len(text)},
        ]
        assert all("data" not in o for o in head["outputs"])
        assert body[header_length:] == label + text

    def test_bytes_that_are_not_text_need_binary(self) -> None:
        response = _response()
        response.outputs.add(name="text", datatype="BYTES", shape=[1])
        response.raw_output_contents.append(
            bytes(serialize_byte_tensor(np.array([b"\xff"], dtype=np.object_)).item())
        )
        parsed = _parse({"inputs": [_tensor(data=[1, 2, 3, 4])]})
        with pytest.raises(InvalidArgumentError, match=r"outputs\[text\]: holds bytes that are"):
            encode_infer(response, parsed)

    def test_typed_contents_become_values(self) -> None:
        response = _response()
        output = response.outputs.add(name="p", datatype="FP64", shape=[2])
        output.contents.fp64_contents.extend([0.5, 1.5])
        parsed = _parse({"inputs": [_tensor(data=[1, 2, 3, 4])]})
        body, _ = encode_infer(response, parsed)
        assert json.loads(body)["outputs"][0]["data"] == [0.5, 1.5]

    def test_metadata(self) -> None:
        metadata = service_pb2.ModelMetadataResponse(
            name="fraud", versions=["1", "2"], platform="onnxruntime_onnx"
        )
        metadata.inputs.add(name="features", datatype="FP32", shape=[-1, 8])
        metadata.outputs.add(name="label", datatype="INT64", shape=[-1])
        assert model_metadata_json(metadata) == {
            "name": "fraud",
            "versions": ["1", "2"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}],
            "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
        }
        server = service_pb2.ServerMetadataResponse(name="s", version="1", extensions=["a"])
        assert server_metadata_json(server) == {"name": "s", "version": "1", "extensions": ["a"]}
