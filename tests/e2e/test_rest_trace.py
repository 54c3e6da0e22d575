"""The router's Open Inference Protocol over HTTP/REST in the running stack: curl's JSON gets
onnxruntime's answer, and the caller's `traceparent` is continued through router, inference
and Triton."""

from __future__ import annotations

import secrets
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
from otlp_receiver import OtlpReceiver
from support import eventually

from modelserve_cli.demo import DemoDeployment
from modelserve_cli.stack import Stack
from modelserve_demo import fraud

ROWS = fraud.make_dataset(3, seed=21)[0]
CALLER_SPAN = "00f067aa0ba902b7"


async def _infer(stack: Stack, trace_id: str) -> dict[str, Any]:
    assert stack.router_http_port is not None
    body = {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": list(ROWS.shape),
                "data": ROWS.tolist(),
            }
        ]
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{stack.router_http_port}/v2/models/fraud/infer",
            json=body,
            headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"},
        ) as response,
    ):
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def test_a_rest_call_is_answered_and_traced_through_every_hop(
    stack: Stack, demo: DemoDeployment, otlp: OtlpReceiver
) -> None:
    """The answer is onnxruntime's for the rows; the router's ModelInfer span (marked
    `modelserve.protocol=http`) is the caller's span's child, inference's span is the
    router's child, and Triton's spans hang under inference's."""
    trace_id = secrets.token_hex(16)
    answer = await _infer(stack, trace_id)
    probabilities = next(o for o in answer["outputs"] if o["name"] == "probabilities")
    session = ort.InferenceSession(demo.trained.onnx_bytes, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        np.asarray(probabilities["data"]).reshape(probabilities["shape"]),
        session.run(["probabilities"], {"features": ROWS})[0],
        rtol=0,
        atol=1e-5,
    )
    assert answer["parameters"]["trace_id"] == trace_id
    wanted = {"router", "inference", "triton"}
    traces = [trace_id]

    async def another() -> None:
        # Triton has been seen not exporting an odd request's spans: more requests, more
        # traces, the first complete one is checked.
        traces.append(secrets.token_hex(16))
        await _infer(stack, traces[-1])

    def complete() -> str | None:
        return next(
            (t for t in traces if wanted <= {s.service for s in otlp.trace(t)}
             and any(s.parent_span_id == CALLER_SPAN for s in otlp.trace(t))),
            None,
        )  # fmt: skip

    await eventually(
        lambda: complete() is not None,
        "one REST call's spans of router, inference and Triton",
        nudge=another,
        explain=lambda: otlp.describe(traces[0], stack.triton_log_path),
    )
    found = complete()
    assert found is not None
    spans = otlp.trace(found)
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if s.parent_span_id == CALLER_SPAN]
    assert (root.service, root.name) == ("router", "inference.GRPCInferenceService/ModelInfer")
    assert ("modelserve.protocol", "http") in root.attributes
    for span in spans:
        if span is not root:
            assert span.parent_span_id in by_id, f"{span} has no parent in the trace"
    inference = next(s for s in spans if s.service == "inference" and "Infer" in s.name)
    assert by_id[inference.parent_span_id].service == "router"
    triton_root = next(
        s for s in spans if s.service == "triton" and by_id[s.parent_span_id].service != "triton"
    )
    assert by_id[triton_root.parent_span_id].service == "inference"


async def test_a_connect_call_is_traced_as_connect(
    stack: Stack, demo: DemoDeployment, otlp: OtlpReceiver
) -> None:
    """ModelInfer over Connect on the same port (the method the REST route runs too): the
    caller's trace continues, and the router's span says `modelserve.protocol=connect`."""
    assert stack.router_http_port is not None
    trace_id = secrets.token_hex(16)
    body = {
        "modelName": "fraud",
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [str(n) for n in ROWS.shape],
                "contents": {"fp32Contents": ROWS.reshape(-1).tolist()},
            }
        ],
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{stack.router_http_port}/inference.GRPCInferenceService/ModelInfer",
            json=body,
            headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"},
        ) as response,
    ):
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["parameters"]["trace_id"]["stringParam"] == trace_id

    def root() -> Any:
        spans = [s for s in otlp.trace(trace_id) if s.parent_span_id == CALLER_SPAN]
        return spans[0] if spans else None

    await eventually(lambda: root() is not None, "the router's span of the Connect call")
    span = root()
    assert (span.service, span.name) == ("router", "inference.GRPCInferenceService/ModelInfer")
    assert ("modelserve.protocol", "connect") in span.attributes
