"""OpenTelemetry set-up: a tracer provider per process, OTLP/gRPC export when configured."""

from __future__ import annotations

import functools

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

TRACER_NAME = "modelserve"


def configure_tracing(service: str, otlp_endpoint: str | None) -> TracerProvider:
    """Installs `build_tracer_provider`'s provider as the global one."""
    provider = build_tracer_provider(service, otlp_endpoint)
    trace.set_tracer_provider(provider)
    return provider


def build_tracer_provider(service: str, otlp_endpoint: str | None) -> TracerProvider:
    """A tracer provider for `service`; spans are exported only when an endpoint is set.

    Without an endpoint nothing would ever read a span, so new traces are not recorded
    (`ParentBased(ALWAYS_OFF)`): each request still gets a valid trace id for its answer,
    its logs and its prediction record, and the W3C traceparent still goes to every hop, but
    no span objects, attributes or processors are paid for (about 60-100 us per hop on the
    router's profile). A caller's sampled trace is still recorded, as the flag asks.
    """
    sampler = None if otlp_endpoint else ParentBased(root=ALWAYS_OFF)
    provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=sampler)
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = not otlp_endpoint.startswith("https://")
        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure),
                schedule_delay_millis=200,
            )
        )
    return provider


@functools.cache
def tracer() -> trace.Tracer:
    """The tracer that modelserve code creates its spans with.

    Cached: `get_tracer` builds a new Tracer on every call, which showed in the router's
    profile. Before `configure_tracing` runs this is a proxy that follows the provider set
    later, so caching it early is safe.
    """
    return trace.get_tracer(TRACER_NAME)


def current_trace_id() -> str:
    """The hex trace id of the current span, or an empty string outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def record_carried(
    name: str,
    started_ns: int,
    carried_by: trace.SpanContext,
    requests: int,
    *,
    with_tracer: trace.Tracer | None = None,
) -> None:
    """Ends, in the current trace, a span from `started_ns` to now for a request whose work
    was done by a coalesced call of `requests` requests that runs in another request's trace
    (`carried_by`, that request's span), linked to it: no request's trace has a hole where
    its call was."""
    span = (with_tracer or tracer()).start_span(
        name,
        start_time=started_ns,
        links=[trace.Link(carried_by, {"modelserve.link": "carried_by"})],
        attributes={"modelserve.batch.requests": requests},
    )
    span.end()
