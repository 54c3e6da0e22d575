"""An in-test OTLP receiver: gRPC for our services, HTTP (JSON or protobuf) for Triton."""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    """The parts of a span the tests look at; ids are lowercase hex."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: tuple[tuple[str, str], ...] = ()
    """String attributes (of spans received over gRPC), as (key, value) pairs."""
    links: tuple[tuple[str, str], ...] = ()
    """The spans it links to (of spans received over gRPC), as (trace id, span id) pairs."""


def _hex(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        return raw.hex()
    if len(raw) in (16, 32) and all(c in "0123456789abcdefABCDEF" for c in raw):
        return raw.lower()
    return base64.b64decode(raw).hex() if raw else ""


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: Any) -> Any:
        self._receiver.add_proto(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Collects spans sent over OTLP/gRPC (`grpc_endpoint`) and OTLP/HTTP (`http_endpoint`)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        # By trace id, so a test polling for one trace does not scan the session's spans.
        self._by_trace: dict[str, list[ReceivedSpan]] = {}
        self.errors: list[str] = []
        self.http_posts = 0
        self._lock = threading.Lock()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.http_posts += 1
                try:
                    if "json" in (self.headers.get("Content-Type") or ""):
                        receiver.add_json(json.loads(body))
                    else:
                        request = trace_service_pb2.ExportTraceServiceRequest()
                        request.ParseFromString(body)
                        receiver.add_proto(request)
                except Exception as exc:
                    receiver.errors.append(f"{exc!r}: {body[:2000]!r}")
                    raise
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                return None

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_port = self._http.server_address[1]
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def grpc_endpoint(self) -> str:
        """Where to point OTEL_EXPORTER_OTLP_ENDPOINT."""
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """`host:port` for Triton's OTLP/HTTP exporter."""
        return f"127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self._grpc.start()
        self._http_thread.start()

    def stop(self) -> None:
        self._grpc.stop(0)
        self._http.shutdown()

    def _extend(self, spans: Iterable[ReceivedSpan]) -> None:
        with self._lock:
            for span in spans:
                self.spans.append(span)
                self._by_trace.setdefault(span.trace_id, []).append(span)

    def add_proto(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found.append(
                        ReceivedSpan(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.kind,
                            tuple(
                                (a.key, a.value.string_value)
                                for a in span.attributes
                                if a.value.HasField("string_value")
                            ),
                            tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        )
                    )
        self._extend(found)

    def add_json(self, body: dict[str, Any]) -> None:
        found = []
        for resource_spans in body.get("resourceSpans", body.get("resource_spans", [])):
            attributes = resource_spans.get("resource", {}).get("attributes", [])
            service = next(
                (
                    a["value"].get("stringValue", a["value"].get("string_value", ""))
                    for a in attributes
                    if a.get("key") == "service.name"
                ),
                "",
            )
            for scope in resource_spans.get("scopeSpans", resource_spans.get("scope_spans", [])):
                for span in scope.get("spans", []):
                    found.append(
                        ReceivedSpan(
                            service,
                            span.get("name", ""),
                            _hex(span.get("traceId", span.get("trace_id", ""))),
                            _hex(span.get("spanId", span.get("span_id", ""))),
                            _hex(span.get("parentSpanId", span.get("parent_span_id", ""))),
                            int(span.get("kind", 0)),
                        )
                    )
        self._extend(found)

    def describe(self, trace_id: str, log_path: Path | None = None) -> str:
        """What the receiver holds, for a failure message: posts, errors, spans per service,
        the spans of `trace_id`, Triton's spans of other traces, and trace lines of a log."""
        with self._lock:
            spans = list(self.spans)
        by_service = Counter(s.service for s in spans)
        lines = [
            f"receiver: {self.http_posts} HTTP posts, {len(spans)} spans {dict(by_service)}",
            *(f"export error: {error[:500]}" for error in self.errors[-3:]),
            f"trace {trace_id}:",
            *(f"  {s}" for s in spans if s.trace_id == trace_id),
            "the last Triton spans:",
            *(f"  {s}" for s in [s for s in spans if s.service == "triton"][-6:]),
        ]
        if log_path is not None and log_path.exists():
            text = log_path.read_text(errors="replace").splitlines()
            wanted = ("trace", "otlp", "opentelemetry", "export", "curl", "http")
            lines.append(f"lines of {log_path} about tracing:")
            lines += [f"  {line[:300]}" for line in text if any(w in line.lower() for w in wanted)][
                -15:
            ]
        return "\n".join(lines)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans received so far for one trace."""
        with self._lock:
            return list(self._by_trace.get(trace_id, ()))
