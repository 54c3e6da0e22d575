"""Coalescing with a real Triton: concurrent requests for one version go to Triton together and
each caller gets exactly its own rows back, through the facade's raw path and through Infer;
a coalesced call carries the callers' traces into Triton; a batch Triton refuses is retried
request by request, so only the bad one fails."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from inference_testing import V1, RunningInference, load, reference
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from otlp_receiver import OtlpReceiver
from support import eventually
from tritonclient.grpc import service_pb2

from modelserve_demo import fraud
from modelserve_inference.coalesce import Coalescer
from modelserve_inference.config import InferenceSettings
from modelserve_inference.models import HeldVersion, ModelVersions
from modelserve_inference.oip_requests import (
    CheckedRequest,
    arrays_from_response,
    request_from_arrays,
)
from modelserve_runtime.errors import DeadlineExceededError
from modelserve_triton.runner import TritonError, TritonRunner

pytestmark = pytest.mark.triton

#: Concurrent callers in each test.
CALLERS = 24
#: Payments of 1 to 3 rows per caller that neither version was trained on.
PAYMENTS = fraud.make_dataset(3 * CALLERS, seed=21)[0]


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    """Receives Triton's own spans."""
    receiver = OtlpReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def inference_settings(
    tmp_path_factory: pytest.TempPathFactory, registry_target: str, otlp: OtlpReceiver
) -> InferenceSettings:
    """One Triton call per version in flight, the others wait and are coalesced; Triton
    sends its spans to `otlp`."""
    return InferenceSettings(
        triton_work_dir=tmp_path_factory.mktemp("triton"),
        registry_target=registry_target,
        reconcile=False,
        coalesce_in_flight=1,
        warmup_batch_sizes=(1,),
        triton_trace_endpoint=otlp.http_endpoint,
        triton_trace_export_delay_ms=100,
    )


@pytest.fixture(scope="module")
async def held(inference_service: RunningInference) -> HeldVersion:
    """Version 1 loaded, READY, and its warmup request counted by Triton. Triton counts a
    request in its statistics a moment after answering it: a test that reads the counters
    before and after its own calls must not see the warmup land in between (on a busy
    machine it did, as a third call)."""
    await load(inference_service.stub, V1)
    runner = TritonRunner(inference_service.app.versions.triton_endpoint)

    async def warmup_counted() -> bool:
        return (await _triton_counts(runner))[0] >= 1

    try:
        await eventually(warmup_counted, "the warmup request counted by Triton")
    finally:
        await runner.close()
    return inference_service.app.versions.get(V1)


@pytest.fixture
async def triton(inference_service: RunningInference) -> AsyncIterator[TritonRunner]:
    """A client of the service's Triton, for its statistics."""
    runner = TritonRunner(inference_service.app.versions.triton_endpoint)
    yield runner
    await runner.close()


def _rows_of(caller: int) -> npt.NDArray[np.float32]:
    """Caller i sends 1, 2 or 3 rows of its own."""
    return np.ascontiguousarray(PAYMENTS[3 * caller : 3 * caller + 1 + caller % 3])


def _oip_request(caller: int) -> Any:
    rows = _rows_of(caller)
    request = service_pb2.ModelInferRequest(model_name="fraud", model_version="1", id=f"c{caller}")
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.tobytes())
    return request


async def _triton_counts(triton: TritonRunner) -> tuple[int, int]:
    """Requests Triton has answered for fraud version 1, and the rows in them."""
    statistics = await triton.statistics(timeout_s=5)
    (version,) = [
        m for m in statistics["model_stats"] if m["name"] == "fraud" and m["version"] == "1"
    ]
    # Triton's JSON leaves out counters that are still 0.
    success = version.get("inference_stats", {}).get("success", {})
    return int(success.get("count", 0)), int(version.get("inference_count", 0))


async def _calls_and_rows(triton: TritonRunner, before: tuple[int, int], rows: int) -> int:
    """The Triton requests made since `before`, once Triton has counted all `rows`."""

    async def counted() -> bool:
        return (await _triton_counts(triton))[1] - before[1] >= rows

    await eventually(counted, f"{rows} rows counted by Triton")
    return (await _triton_counts(triton))[0] - before[0]


class TestCoalescing:
    async def test_facade_requests_share_triton_calls_and_each_gets_its_own_rows(
        self,
        inference_service: RunningInference,
        held: HeldVersion,
        triton: TritonRunner,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """24 concurrent ModelInfer requests of 1 to 3 rows reach Triton as two calls (the
        first alone, the others joined while it ran) and each caller gets onnxruntime's answer
        for exactly its rows, under its own request id."""
        versions = inference_service.app.versions
        before = await _triton_counts(triton)

        responses = await asyncio.gather(
            *(versions.infer_request(held, _oip_request(i)) for i in range(CALLERS))
        )

        rows = sum(len(_rows_of(i)) for i in range(CALLERS))
        assert await _calls_and_rows(triton, before, rows) == 2
        for caller, response in enumerate(responses):
            labels, probabilities = reference(fraud_models[V1], _rows_of(caller))
            outputs = arrays_from_response(response)
            assert response.id == f"c{caller}"
            assert response.model_version == "1"
            np.testing.assert_allclose(outputs["probabilities"], probabilities, atol=1e-5)
            np.testing.assert_array_equal(outputs["label"], labels)

    async def test_infer_calls_share_triton_calls_and_each_gets_its_own_rows(
        self,
        inference_service: RunningInference,
        held: HeldVersion,
        triton: TritonRunner,
        fraud_models: dict[str, fraud.TrainedModel],
    ) -> None:
        """The same through Infer's arrays: two Triton calls for 24 callers, each answered with
        its own rows, the per-row label in the signature's shape."""
        versions: ModelVersions = inference_service.app.versions
        before = await _triton_counts(triton)

        answers = await asyncio.gather(
            *(versions.infer(V1, {"features": _rows_of(i)}, []) for i in range(CALLERS))
        )

        rows = sum(len(_rows_of(i)) for i in range(CALLERS))
        assert await _calls_and_rows(triton, before, rows) == 2
        for caller, outputs in enumerate(answers):
            labels, probabilities = reference(fraud_models[V1], _rows_of(caller))
            np.testing.assert_allclose(outputs["probabilities"], probabilities, atol=1e-5)
            assert outputs["label"].shape == labels.shape
            np.testing.assert_array_equal(outputs["label"], labels)

    async def test_callers_asking_for_different_outputs_are_not_mixed(
        self, inference_service: RunningInference, held: HeldVersion
    ) -> None:
        """Callers that ask for different outputs are coalesced apart: each gets exactly the
        outputs it asked for."""
        versions = inference_service.app.versions
        wanted = [["probabilities"] if i % 2 else ["label"] for i in range(CALLERS)]

        answers = await asyncio.gather(
            *(versions.infer(V1, {"features": _rows_of(i)}, wanted[i]) for i in range(CALLERS))
        )

        assert [sorted(a) for a in answers] == wanted

    async def test_a_request_whose_deadline_passes_while_waiting_never_reaches_triton(
        self, inference_service: RunningInference, held: HeldVersion, triton: TritonRunner
    ) -> None:
        """Requests whose deadline passes while they wait for a call are answered
        DEADLINE_EXCEEDED (TRITON_DEADLINE) without going to Triton: Triton counts only the
        rows of the two callers that had time."""
        versions = inference_service.app.versions
        before = await _triton_counts(triton)

        results = await asyncio.gather(
            versions.infer(V1, {"features": _rows_of(0)}, []),
            *(versions.infer(V1, {"features": _rows_of(1)}, [], deadline_s=1e-6) for _ in range(7)),
            versions.infer(V1, {"features": _rows_of(2)}, []),
            return_exceptions=True,
        )

        late = results[1:-1]
        assert {(type(r), getattr(r, "reason", "")) for r in late} == {
            (DeadlineExceededError, "TRITON_DEADLINE")
        }
        assert isinstance(results[0], dict)
        assert isinstance(results[-1], dict)
        rows = len(_rows_of(0)) + len(_rows_of(2))
        assert await _calls_and_rows(triton, before, rows) == 2
        assert (await _triton_counts(triton))[1] - before[1] == rows


class TestCoalescedCalls:
    @pytest.fixture
    def spans(self) -> InMemorySpanExporter:
        """Spans of the test's own Triton client."""
        return InMemorySpanExporter()

    @pytest.fixture
    async def coalescer(
        self, inference_service: RunningInference, spans: InMemorySpanExporter
    ) -> AsyncIterator[tuple[Coalescer, TritonRunner, TracerProvider]]:
        """A coalescer on the service's Triton whose client records its spans."""
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        runner = TritonRunner(
            inference_service.app.versions.triton_endpoint, tracer=provider.get_tracer("tests")
        )
        coalescer = Coalescer(runner, tracer=provider.get_tracer("coalescer"))
        yield coalescer, runner, provider
        await coalescer.close()
        await runner.close()

    async def test_a_coalesced_call_carries_the_first_trace_and_links_the_others(
        self,
        held: HeldVersion,
        coalescer: tuple[Coalescer, TritonRunner, TracerProvider],
        spans: InMemorySpanExporter,
    ) -> None:
        """Four callers, each in its own span: the first call is the first caller's child; the
        coalesced one is the second caller's child (its traceparent goes to Triton), linked to
        the third and fourth callers' spans."""
        calls, _, provider = coalescer
        tracer = provider.get_tracer("callers")

        async def caller(index: int) -> Any:
            request, checked = request_from_arrays(held, {"features": _rows_of(index)}, [])
            with tracer.start_as_current_span(f"caller-{index}"):
                return await calls.infer(request, checked, timeout_s=10, limit=1, max_rows=256)

        await asyncio.gather(*(caller(i) for i in range(4)))

        finished = spans.get_finished_spans()
        by_name = {s.name: s for s in finished if s.name.startswith("caller-")}
        triton_calls = [s for s in finished if s.name == "triton.infer"]
        assert len(triton_calls) == 2
        alone, joined = sorted(triton_calls, key=lambda s: len(s.links))
        assert alone.kind is SpanKind.CLIENT
        assert alone.parent is not None
        assert alone.parent.span_id == by_name["caller-0"].context.span_id
        assert joined.parent is not None
        assert joined.parent.span_id == by_name["caller-1"].context.span_id
        assert joined.context.trace_id == by_name["caller-1"].context.trace_id
        assert [link.context.span_id for link in joined.links] == [
            by_name["caller-2"].context.span_id,
            by_name["caller-3"].context.span_id,
        ]
        assert joined.attributes is not None
        assert joined.attributes["model.name"] == "fraud"
        assert joined.attributes["model.version"] == 1
        # The callers whose rows rode along each have a span for it in their own trace,
        # linked to the caller whose trace holds the call; the others need none.
        carried = sorted(
            (s for s in finished if s.name == "inference.coalesced"),
            key=lambda s: s.parent.span_id if s.parent else 0,
        )
        expected = sorted(
            (by_name["caller-2"], by_name["caller-3"]), key=lambda s: s.context.span_id
        )
        assert [s.parent.span_id if s.parent else None for s in carried] == [
            c.context.span_id for c in expected
        ]
        assert [s.context.trace_id for s in carried] == [c.context.trace_id for c in expected]
        for span in carried:
            assert [link.context.span_id for link in span.links] == [
                by_name["caller-1"].context.span_id
            ]
            assert span.attributes is not None
            assert span.attributes["modelserve.batch.requests"] == 3

    async def test_triton_continues_the_trace_of_the_caller_each_call_is_made_for(
        self,
        inference_service: RunningInference,
        held: HeldVersion,
        coalescer: tuple[Coalescer, TritonRunner, TracerProvider],
        otlp: OtlpReceiver,
    ) -> None:
        """Through the facade's path, Triton's spans join the first caller's trace for the call
        it got alone and the second caller's for the coalesced call; the callers whose rows
        rode along are only linked, so no Triton span is in their traces."""
        versions = inference_service.app.versions
        tracer = coalescer[2].get_tracer("callers")
        traces: dict[int, str] = {}

        async def caller(index: int) -> Any:
            with tracer.start_as_current_span(f"caller-{index}") as span:
                traces[index] = format(span.get_span_context().trace_id, "032x")
                return await versions.infer_request(held, _oip_request(index))

        async def another_call() -> None:
            await versions.infer_request(held, _oip_request(0))

        await asyncio.gather(*(caller(i) for i in range(4)))

        await eventually(
            lambda: bool(otlp.trace(traces[0])) and bool(otlp.trace(traces[1])),
            "Triton spans in the first two callers' traces",
            nudge=another_call,
        )
        assert {s.service for s in otlp.trace(traces[1])} == {"triton"}
        assert otlp.trace(traces[2]) == otlp.trace(traces[3]) == []

    async def test_a_refused_batch_is_retried_request_by_request(
        self, held: HeldVersion, coalescer: tuple[Coalescer, TritonRunner, TracerProvider]
    ) -> None:
        """When Triton refuses a coalesced call because of one request in it (here one whose
        bytes do not fill its shape, let past the checks on purpose), each request is sent
        alone: the others answer, only that one gets Triton's INVALID_ARGUMENT."""
        calls, _, _ = coalescer

        def good(index: int) -> tuple[Any, CheckedRequest]:
            return request_from_arrays(held, {"features": _rows_of(index)}, [])

        bad, bad_checked = good(2)
        short = bad_checked.raws[0][:-4]
        bad.raw_input_contents[0] = short
        parts = [good(0), good(1), (bad, dataclasses.replace(bad_checked, raws=(short,))), good(3)]

        results = await asyncio.gather(
            *(calls.infer(r, c, timeout_s=10, limit=1, max_rows=256) for r, c in parts),
            return_exceptions=True,
        )

        refused = [r for r in results if isinstance(r, BaseException)]
        assert [type(r) for r in refused] == [TritonError]
        assert isinstance(refused[0], TritonError)
        assert refused[0].status == "StatusCode.INVALID_ARGUMENT"
        assert isinstance(results[2], TritonError)
        for index in (0, 1, 3):
            assert arrays_from_response(results[index])["probabilities"].shape == (
                len(_rows_of(index)),
                2,
            )
