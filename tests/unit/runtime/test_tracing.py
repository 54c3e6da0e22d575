"""The tracer provider: spans recorded only where something exports them, trace ids always."""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from modelserve_runtime.tracing import build_tracer_provider


def test_without_an_exporter_a_new_trace_is_not_recorded_but_has_ids() -> None:
    tracer = build_tracer_provider("svc", None).get_tracer("t")
    with tracer.start_as_current_span("root") as span:
        context = span.get_span_context()
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    assert not span.is_recording()
    assert context.is_valid and context.trace_id != 0
    # The next hop still learns the trace id, with the sampled flag (bit 0) off.
    _, trace_id, span_id, flags = carrier["traceparent"].split("-")
    assert (trace_id, span_id) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert int(flags, 16) & 1 == 0


def test_without_an_exporter_a_callers_sampled_trace_is_still_recorded() -> None:
    tracer = build_tracer_provider("svc", None).get_tracer("t")
    parent = SpanContext(
        trace_id=0xABC, span_id=0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    context = trace.set_span_in_context(NonRecordingSpan(parent))
    with tracer.start_as_current_span("child", context=context) as span:
        assert span.is_recording()
        assert span.get_span_context().trace_id == 0xABC


def test_with_an_exporter_every_trace_is_recorded() -> None:
    provider = build_tracer_provider("svc", "http://127.0.0.1:1")
    # Started, never ended: nothing is queued for an export to that address.
    span = provider.get_tracer("t").start_span("root")
    assert span.is_recording()
