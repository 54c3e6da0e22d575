"""A prediction through the running stack: same answer as onnxruntime, traced end to end, logged."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan
from support import eventually, expected_probabilities

from modelserve.monitor.v1 import monitor_service_pb2 as monitor_pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as monitor_grpc
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve.type.v1 import feature_value_pb2
from modelserve_cli.demo import DemoDeployment, demo_request
from modelserve_cli.stack import Stack
from modelserve_demo import fraud
from modelserve_runtime.channels import create_channel
from modelserve_runtime.errors import decode_rpc_error


async def _predict(stack: Stack, request: router_pb.PredictRequest) -> router_pb.PredictResponse:
    async with create_channel(stack.targets["router"]) as channel:
        return await router_grpc.RouterServiceStub(channel).Predict(request)


class TestPredict:
    @pytest.mark.parametrize(
        ("customer", "amount"), [("c-1001", 420.0), ("c-1007", 12.5), ("c-1019", 3000.0)]
    )
    async def test_matches_onnxruntime(
        self, stack: Stack, demo: DemoDeployment, customer: str, amount: float
    ) -> None:
        """The router's answer equals onnxruntime in-process on the same feature vector, to 1e-5."""
        request = demo_request(customer, amount)
        response = await _predict(stack, request)
        probabilities = next(o for o in response.outputs if o.name == "probabilities")
        assert list(probabilities.shape) == [1, 2]
        np.testing.assert_allclose(
            np.asarray(probabilities.contents.fp32_contents),
            expected_probabilities(demo, request),
            atol=1e-5,
        )
        assert response.model_version == demo.model_version
        assert response.route_reason == "single_target"
        assert len(response.request_id) == 32
        assert not response.degraded

    async def test_one_trace_across_every_hop(
        self, stack: Stack, demo: DemoDeployment, otlp: OtlpReceiver
    ) -> None:
        """One Predict yields spans from router, feature, inference and Triton under one trace id,
        each with its parent present in the trace."""
        response = await _predict(stack, demo_request("c-1002", 99.0))
        assert len(response.trace_id) == 32
        wanted = {"router", "feature", "inference", "triton"}
        # Triton was seen (here and in CI) never exporting the spans of an odd request while
        # it exported those of the requests after it; so the trace is looked for among this
        # Predict and the ones sent while waiting, and the first complete one is checked.
        traces = [response.trace_id]

        async def another() -> None:
            traces.append((await _predict(stack, demo_request("c-1005", 1.0))).trace_id)

        def complete() -> str | None:
            # Its root too: the router's Predict span ends after the answer is sent, so it
            # can be exported after every other span of the trace.
            return next(
                (
                    t
                    for t in traces
                    if wanted <= {s.service for s in otlp.trace(t)}
                    and any(not s.parent_span_id for s in otlp.trace(t))
                ),
                None,
            )

        await eventually(
            lambda: complete() is not None,
            f"one Predict's spans of {sorted(wanted)}",
            nudge=another,
            explain=lambda: otlp.describe(traces[0], stack.triton_log_path),
        )
        trace_id = complete()
        assert trace_id is not None
        spans = otlp.trace(trace_id)
        assert not otlp.errors
        assert wanted <= {s.service for s in spans}, (otlp.http_posts, len(otlp.spans), spans)
        by_id = {s.span_id: s for s in spans}
        roots = [s for s in spans if not s.parent_span_id]
        assert [r.name for r in roots] == ["modelserve.router.v1.RouterService/Predict"]
        for span in spans:
            if span.parent_span_id:
                assert span.parent_span_id in by_id, f"{span} has no parent in the trace"

        def parent_service(service: str, name_part: str) -> str:
            span = next(s for s in spans if s.service == service and name_part in s.name)
            return by_id[span.parent_span_id].service

        assert parent_service("feature", "GetOnlineFeatures") == "router"
        assert parent_service("inference", "InferenceService/Infer") == "router"
        triton_root = next(
            s
            for s in spans
            if s.service == "triton"
            and s.parent_span_id in by_id
            and by_id[s.parent_span_id].service != "triton"
        )
        assert by_id[triton_root.parent_span_id].name == "triton.infer"
        assert by_id[triton_root.parent_span_id].service == "inference"

    async def test_each_request_of_a_stream_has_a_trace_of_its_own(
        self, stack: Stack, demo: DemoDeployment, otlp: OtlpReceiver
    ) -> None:
        """Three requests down one PredictStream: three trace ids, none the stream's. Each
        trace's root is the request's span, linked to the stream's span, with its feature
        read under it; the stream's own trace holds no request's work. (The three requests
        may share one coalesced model call, which is in the trace of the one that sent it.)"""
        async with create_channel(stack.targets["router"]) as channel:
            call = router_grpc.RouterServiceStub(channel).PredictStream(
                iter(
                    router_pb.PredictStreamRequest(request=demo_request(f"c-10{i:02d}", 10.0 + i))
                    for i in range(1, 4)
                ),
                timeout=30,
            )
            answers = [item.response async for item in call]
        traces = {a.trace_id for a in answers}
        assert len(traces) == 3 and all(len(t) == 32 for t in traces)
        name = "modelserve.router.v1.RouterService/PredictStream request"

        def roots() -> list[ReceivedSpan]:
            found = [s for t in traces for s in otlp.trace(t) if not s.parent_span_id]
            return found if len(found) == 3 else []

        def hops_seen() -> bool:
            services = [{s.service for s in otlp.trace(t)} for t in traces]
            return all({"router", "feature"} <= found for found in services) and any(
                "inference" in found for found in services
            )

        await eventually(
            lambda: bool(roots()) and hops_seen(),
            "each stream request's trace, with its hops",
            explain=lambda: str([otlp.trace(t) for t in traces]),
        )
        requests = roots()
        assert {(r.service, r.name) for r in requests} == {("router", name)}
        streams = {link for r in requests for link in r.links}
        [(stream_trace, stream_span)] = streams  # all three link to the one stream span
        assert stream_trace not in traces
        await eventually(
            lambda: any(s.span_id == stream_span for s in otlp.trace(stream_trace)),
            "the stream's own span",
        )
        assert {s.name for s in otlp.trace(stream_trace)} == {
            "modelserve.router.v1.RouterService/PredictStream"
        }

    async def test_monitor_counts_the_predictions(self, stack: Stack, demo: DemoDeployment) -> None:
        """Each answered Predict lands in the prediction log and the monitor's count for its version."""
        async with create_channel(stack.targets["monitor"]) as channel:
            monitor = monitor_grpc.MonitorServiceStub(channel)

            async def count() -> int:
                try:
                    stats = await monitor.GetEndpointStats(
                        monitor_pb.GetEndpointStatsRequest(endpoint="fraud")
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.NOT_FOUND:
                        return 0
                    raise
                return sum(
                    v.request_count for v in stats.versions if v.model_version == demo.model_version
                )

            before = await count()
            for amount in (1.0, 2.0, 3.0, 4.0, 5.0):
                await _predict(stack, demo_request("c-1003", amount))

            async def counted() -> bool:
                return await count() >= before + 5

            await eventually(counted, "the five predictions in the monitor's count")
            assert await count() == before + 5


class TestBadInput:
    async def test_unknown_endpoint_is_not_found(self, stack: Stack, demo: DemoDeployment) -> None:
        """An endpoint without a deployment answers NOT_FOUND."""
        request = demo_request()
        request.endpoint = "no-such-endpoint"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _predict(stack, request)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND

    async def test_missing_entity_id_names_the_field(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        """A request without the customer id the model needs is INVALID_ARGUMENT naming entities.customer."""
        request = demo_request()
        del request.entities[fraud.ENTITY_TYPE]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _predict(stack, request)
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.domain == "router.modelserve"
        assert [v.field for v in error.violations] == ["entities.customer"]

    async def test_missing_caller_feature_names_the_field(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        """A request without the amount the model needs is INVALID_ARGUMENT naming features.amount."""
        request = demo_request()
        del request.features["amount"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _predict(stack, request)
        assert [v.field for v in decode_rpc_error(info.value).violations] == ["features.amount"]

    async def test_non_finite_caller_feature_names_the_field(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        """An amount of NaN is INVALID_ARGUMENT naming features.amount, on the default path too."""
        request = demo_request()
        request.features["amount"].double_value = float("nan")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _predict(stack, request)
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["features.amount"]

    async def test_oversized_message_is_refused_and_service_keeps_serving(
        self, stack: Stack, demo: DemoDeployment
    ) -> None:
        """A request over the size limit gets RESOURCE_EXHAUSTED, and the next request is answered."""
        request = demo_request()
        request.features["blob"].CopyFrom(
            feature_value_pb2.FeatureValue(string_value="x" * (5 * 1024 * 1024))
        )
        async with grpc.aio.insecure_channel(
            stack.targets["router"], options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router_grpc.RouterServiceStub(channel).Predict(request, timeout=10)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        response = await _predict(stack, demo_request())
        assert response.model_version == demo.model_version


class TestPredictCommand:
    async def test_prints_the_answer(self, stack: Stack, demo: DemoDeployment) -> None:
        """`modelserve predict` prints the version, both outputs and the trace id, exit code 0."""
        result = await asyncio.to_thread(
            subprocess.run,
            [
                str(Path(sys.executable).parent / "modelserve"),
                "predict",
                "--router",
                stack.targets["router"],
                "--customer",
                "c-1004",
                "--amount",
                "950",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert demo.model_version in result.stdout
        assert "output probabilities [1, 2]" in result.stdout
        assert "trace id" in result.stdout

    async def test_reports_a_refusal(self, stack: Stack, demo: DemoDeployment) -> None:
        """A refused call prints the status code and the message, exit code 1."""
        result = await asyncio.to_thread(
            subprocess.run,
            [
                str(Path(sys.executable).parent / "modelserve"),
                "predict",
                "--router",
                stack.targets["router"],
                "--customer",
                "",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert result.returncode == 1
        assert "INVALID_ARGUMENT" in result.stdout
        assert "entities.customer" in result.stdout
