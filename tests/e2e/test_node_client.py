"""A client in another language, generated from protos/: `make client-node` (protoc-gen-es
and Connect's gRPC transport for Node.js) and `clients/node/predict.mjs` against the running
stack: the same answers as the Python stub's, a stream's requests each answered, and refusals
with their code, reason and bad fields decoded from the gRPC status details."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from node_client import predict

from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_cli.demo import DemoDeployment, demo_request
from modelserve_cli.stack import Stack
from modelserve_runtime.channels import create_channel


def _json(request: router_pb.PredictRequest) -> dict[str, Any]:
    return json_format.MessageToDict(request)


class TestNodeClient:
    async def test_predict_answers_as_the_python_stub(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        """The Node client's answer (printed as protobuf's canonical JSON, read back here) is the
        Python stub's for the same request, request and trace ids aside."""
        request = demo_request("c-1007", 12.5)
        code, lines = await predict(stack.targets["router"], _json(request))
        async with create_channel(stack.targets["router"]) as channel:
            expected = await router_grpc.RouterServiceStub(channel).Predict(request)
        assert code == 0
        [line] = lines
        answer = json_format.ParseDict(line, router_pb.PredictResponse())
        assert answer.model_version == demo.model_version
        assert len(answer.request_id) == 32 and len(answer.trace_id) == 32
        for message in (answer, expected):
            message.ClearField("request_id")
            message.ClearField("trace_id")
        assert answer == expected

    async def test_a_stream_answers_each_request(self, stack: Stack, demo: DemoDeployment) -> None:
        """Three requests down one PredictStream (bidirectional streaming from Node.js) come
        back each under its own request id, each with the model's answer."""
        code, lines = await predict(stack.targets["router"], _json(demo_request()), "--stream", "3")
        assert code == 0
        assert sorted(line["requestId"] for line in lines) == ["node-0", "node-1", "node-2"]
        for line in lines:
            assert line["response"]["requestId"] == line["requestId"]
            assert line["response"]["modelVersion"] == demo.model_version

    async def test_a_bad_field_is_named_in_the_details(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        """A string where the model needs a number: INVALID_ARGUMENT, and the BadRequest detail
        that a Node caller decodes names `features.amount`; down a stream, a PredictError."""
        request = _json(demo_request())
        request["features"]["amount"] = {"stringValue": "a lot"}
        code, [line] = await predict(stack.targets["router"], request)
        assert code == 1
        error = line["error"]
        assert (error["code"], error["domain"]) == ("InvalidArgument", "router.modelserve")
        assert [v["field"] for v in error["fieldViolations"]] == ["features.amount"]
        # Down a stream each such request is answered with its PredictError, and the stream
        # goes on to the end.
        code, lines = await predict(stack.targets["router"], request, "--stream", "2")
        assert code == 0
        assert sorted((x["requestId"], x["error"]["code"]) for x in lines) == [
            ("node-0", "InvalidArgument"),
            ("node-1", "InvalidArgument"),
        ]

    async def test_an_unknown_endpoint_is_not_found_with_its_resource(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        """NOT_FOUND, with the ErrorInfo's reason and the resource in its metadata."""
        request = _json(demo_request())
        request["endpoint"] = "no-such-endpoint"
        code, [line] = await predict(stack.targets["router"], request)
        assert code == 1
        assert line["error"]["code"] == "NotFound"
        assert line["error"]["reason"] == "NOT_FOUND"
        assert line["error"]["metadata"] == {"resource": "deployments/no-such-endpoint"}


class TestNodeClientOverConnect:
    """The same generated client over Connect's own protocol (connect-node's Connect
    transport, HTTP/1.1) to the router's HTTP port."""

    @staticmethod
    def _target(stack: Stack) -> str:
        assert stack.router_http_port is not None
        return f"127.0.0.1:{stack.router_http_port}"

    async def test_predict_answers_as_over_grpc(self, stack: Stack, demo: DemoDeployment) -> None:
        """Protobuf and JSON bodies both give the Python stub's answer."""
        request = demo_request("c-1007", 12.5)
        async with create_channel(stack.targets["router"]) as channel:
            expected = await router_grpc.RouterServiceStub(channel).Predict(request)
        expected.ClearField("request_id")
        expected.ClearField("trace_id")
        for extra in ((), ("--json",)):
            code, [line] = await predict(
                self._target(stack), _json(request), "--protocol", "connect", *extra
            )
            assert code == 0, line
            answer = json_format.ParseDict(line, router_pb.PredictResponse())
            assert len(answer.request_id) == 32 and len(answer.trace_id) == 32
            answer.ClearField("request_id")
            answer.ClearField("trace_id")
            assert answer == expected

    async def test_a_bad_field_is_named_in_the_details(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        """Connect's error object carries the same details as the gRPC status: the Node
        client decodes the BadRequest naming `features.amount` and the ErrorInfo."""
        request = _json(demo_request())
        request["features"]["amount"] = {"stringValue": "a lot"}
        code, [line] = await predict(self._target(stack), request, "--protocol", "connect")
        assert code == 1
        error = line["error"]
        assert (error["code"], error["domain"]) == ("InvalidArgument", "router.modelserve")
        assert [v["field"] for v in error["fieldViolations"]] == ["features.amount"]

    async def test_a_stream_sent_whole_answers_each_request(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        """PredictStream over Connect on HTTP/1.1: the requests go first, then each answer
        comes back under its own request id."""
        code, lines = await predict(
            self._target(stack), _json(demo_request()), "--protocol", "connect", "--stream", "3"
        )
        assert code == 0, lines
        assert sorted(line["requestId"] for line in lines) == ["node-0", "node-1", "node-2"]
        for line in lines:
            assert line["response"]["modelVersion"] == demo.model_version
