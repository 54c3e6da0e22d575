"""The Open Inference Protocol's HTTP/REST binding (KServe v2, with Triton's binary tensor
extension), served by the same servicer and the same server interceptors as its gRPC binding.

Each HTTP call runs the gRPC method it means (`POST /v2/models/m/infer` is
`/inference.GRPCInferenceService/ModelInfer`) through the service's own interceptor chain
(tracing with the caller's `traceparent`, request id, the `rpc` log line and metrics under the
gRPC method's name, error status, API keys and roles), with an `HttpCallContext` standing for
gRPC's: its metadata are the HTTP headers, lower-cased, and an abort ends the HTTP call with
the status's HTTP code and `{"error": "<details>"}`. A refused request is therefore refused the
same way over both bindings, with the same words.

Routes: `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2` (server metadata),
`GET /v2/models/<name>[/versions/<version>]` (model metadata), `GET .../ready` (model
ready) and `POST .../infer`; and Triton's `GET .../config`, `GET [/v2/models/<name>...]/stats`
and `POST /v2/repository/index`, answered as Triton answers them (protobuf's JSON mapping)
where the servicer implements them, 501 where it does not. Liveness and readiness answer 200, or 400 for false, as the
protocol says.
"""

from __future__ import annotations

import json
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from aiohttp import web
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from grpc.aio import AbortError
from opentelemetry import trace
from tritonclient.grpc import service_pb2

from modelserve_runtime.errors import InvalidArgumentError
from modelserve_triton.oip_json import (
    HEADER_LENGTH,
    encode_infer,
    model_metadata_json,
    parse_infer,
    server_metadata_json,
)

log = structlog.get_logger()

SERVICE = "inference.GRPCInferenceService"

#: The HTTP status of each gRPC status code (as Google's HTTP APIs map them).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
_STATUS_DETAILS = "grpc-status-details-bin"
#: The auth-context property gRPC fills with a verified client certificate's subject CN.
_CERTIFICATE_CN = "x509_common_name"


@dataclass(slots=True)
class _CallDetails:
    """What a server interceptor is told of a call (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...]


# grpc.aio.ServicerContext is generic in the stubs only.
class HttpCallContext(grpc.aio.ServicerContext):  # type: ignore[type-arg]
    """gRPC's servicer context for a call that came over HTTP: the headers as metadata, no
    deadline (the service's own budgets apply), an abort that records the status and raises
    AbortError as gRPC's does. Unary calls only: reads and writes are refused."""

    def __init__(
        self,
        metadata: tuple[tuple[str, str | bytes], ...],
        peer: str,
        certificate_cn: str | None,
    ) -> None:
        self._metadata = metadata
        self._peer = peer
        self._auth = {_CERTIFICATE_CN: [certificate_cn.encode()]} if certificate_cn else {}
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()

    async def read(self) -> Any:
        raise RuntimeError("an HTTP call has one request")

    async def write(self, message: Any) -> None:
        raise RuntimeError("an HTTP call has one answer")

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        return None

    async def abort(  # type: ignore[override]
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        self._code = code
        self._details = details
        self._trailing = tuple(trailing_metadata or ())
        raise AbortError(details)

    async def abort_with_status(self, status: Any) -> None:  # type: ignore[override]
        await self.abort(status.code, status.details, status.trailing_metadata)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailing = tuple(trailing_metadata or ())

    def invocation_metadata(self) -> Any:
        return self._metadata

    def set_code(self, code: Any) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_compression(self, compression: Any) -> None:
        return None

    def disable_next_message_compression(self) -> None:
        return None

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> Any:
        names = self._auth.get(_CERTIFICATE_CN)
        return list(names) if names else None

    def peer_identity_key(self) -> str | None:
        return _CERTIFICATE_CN if self._auth else None

    def auth_context(self) -> Any:
        return self._auth

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return None

    def trailing_metadata(self) -> Any:
        return self._trailing

    def code(self) -> Any:
        return self._code

    def details(self) -> Any:
        return self._details

    def add_done_callback(self, callback: Any) -> None:
        return None

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False


class _Pending:
    """The request a route hands down the interceptor chain: built (parsed) and its answer
    rendered only inside it, so a body that does not parse, or an answer that JSON cannot
    carry, is refused, traced, logged and counted like any bad call."""

    __slots__ = ("build", "render")

    def __init__(self, build: Callable[[], Any], render: Callable[[Any], Any]) -> None:
        self.build = build
        self.render = render


@dataclass(frozen=True, slots=True)
class _Answer:
    response: Any
    """The servicer's answer, None when the call was refused."""
    code: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True, slots=True)
class JsonRoute:
    """A unary gRPC method of the service served on the HTTP binding as JSON (protobuf's JSON
    mapping, as grpc-gateway and grpcurl write it): `POST <path>` with the request message
    as the body, the answer message as JSON. Path parameters (`{endpoint}`) set the request
    field of the same name; the body may repeat one only with the same value."""

    path: str
    """aiohttp's path pattern, e.g. `/v1/endpoints/{endpoint}:predict`."""
    method: str
    """The full gRPC method, e.g. `/modelserve.router.v1.RouterService/Predict`."""
    request_type: Any
    """The request message class."""


def server_ssl_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    """TLS for the HTTP port from the gRPC port's files: the same certificate, and with a
    client CA the same demand for a client certificate signed by it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A listening socket on `host:port` (0: any free port); OSError when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, reuse_port=reuse_port, backlog=1024)


class OipHttpServer:
    """Serves the protocol's HTTP/REST binding on `sock` from the gRPC handlers of
    `inference.GRPCInferenceService` (`handlers`: the generic handlers a servicer registered)
    through `interceptors`, outermost first, as the gRPC server runs them."""

    def __init__(
        self,
        handlers: Sequence[grpc.GenericRpcHandler],
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        sock: socket.socket,
        *,
        max_body_bytes: int,
        grace_s: float,
        ssl_context: ssl.SSLContext | None = None,
        json_routes: Sequence[JsonRoute] = (),
    ) -> None:
        self._interceptors = tuple(interceptors)
        self._inner: dict[str, Any] = {}
        for name in (
            "ServerLive",
            "ServerReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelReady",
            "ModelInfer",
            "ModelConfig",
            "ModelStatistics",
            "RepositoryIndex",
        ):
            self._inner[f"/{SERVICE}/{name}"] = self._innermost(handlers, f"/{SERVICE}/{name}")
        self._json_routes = tuple(json_routes)
        for route in self._json_routes:
            self._inner[route.method] = self._innermost(handlers, route.method)
        self._sock = sock
        self._ssl = ssl_context
        self._max_body_bytes = max_body_bytes
        # aiohttp reads a timeout of 0 as none at all; gRPC's stop(0) cancels at once.
        self._grace_s = max(grace_s, 0.001)
        self.port: int = sock.getsockname()[1]
        self._runner: web.AppRunner | None = None

    @staticmethod
    def _innermost(handlers: Sequence[grpc.GenericRpcHandler], method: str) -> Any:
        for generic in handlers:
            handler = generic.service(_CallDetails(method, ()))
            if handler is not None:
                break
        else:
            raise LookupError(f"no handler for {method}")
        servicer_call: Any = handler.unary_unary

        async def call(pending: _Pending, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            trace.get_current_span().set_attribute("modelserve.protocol", "http")
            return pending.render(await servicer_call(pending.build(), context))

        return grpc.unary_unary_rpc_method_handler(call)

    async def start(self) -> None:
        app = web.Application(
            client_max_size=self._max_body_bytes, middlewares=[_json_errors], handler_args=None
        )
        models = "/v2/models/{name}"
        versions = "/v2/models/{name}/versions/{version}"
        app.add_routes(
            [
                web.get("/v2/health/live", self._server_live),
                web.get("/v2/health/ready", self._server_ready),
                web.get("/v2", self._server_metadata),
                # Before `models`, which would take "stats" for a model's name.
                web.get("/v2/models/stats", self._model_statistics),
                web.get(f"{models}/stats", self._model_statistics),
                web.get(f"{versions}/stats", self._model_statistics),
                web.get(f"{models}/config", self._model_config),
                web.get(f"{versions}/config", self._model_config),
                web.post("/v2/repository/index", self._repository_index),
                web.get(models, self._model_metadata),
                web.get(versions, self._model_metadata),
                web.get(f"{models}/ready", self._model_ready),
                web.get(f"{versions}/ready", self._model_ready),
                web.post(f"{models}/infer", self._model_infer),
                web.post(f"{versions}/infer", self._model_infer),
                *(web.post(r.path, self._json_route_handler(r)) for r in self._json_routes),
            ]
        )
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=self._grace_s
        )
        await runner.setup()
        await web.SockSite(runner, self._sock, ssl_context=self._ssl).start()
        self._runner = runner

    async def stop(self) -> None:
        """Stops listening, lets calls in flight finish for up to the grace period, then
        ends them."""
        runner, self._runner = self._runner, None
        if runner is None:
            self._sock.close()
            return
        await runner.cleanup()

    async def _call(
        self,
        request: web.Request,
        name: str,
        build: Callable[[], Any],
        render: Callable[[Any], Any] = lambda response: response,
    ) -> _Answer:
        metadata: tuple[tuple[str, str | bytes], ...] = tuple(
            (k.lower(), v) for k, v in request.headers.items()
        )
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = f"ipv4:{peername[0]}:{peername[1]}" if peername else "unknown"
        context = HttpCallContext(metadata, peer, _certificate_cn(request))
        details = _CallDetails(name if name.startswith("/") else f"/{SERVICE}/{name}", metadata)
        handler = await self._intercepted(iter(self._interceptors), details)
        try:
            response = await handler.unary_unary(_Pending(build, render), context)
        except AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            return _Answer(None, code, context.details() or "", context.trailing_metadata())
        return _Answer(response, grpc.StatusCode.OK, "", ())

    async def _intercepted(
        self, interceptors: Iterator[grpc.aio.ServerInterceptor], details: _CallDetails
    ) -> Any:
        interceptor = next(interceptors, None)
        if interceptor is None:
            return self._inner[details.method]

        async def continuation(call_details: Any) -> Any:
            return await self._intercepted(interceptors, call_details)

        return await interceptor.intercept_service(continuation, details)

    async def _server_live(self, request: web.Request) -> web.Response:
        answer = await self._call(request, "ServerLive", service_pb2.ServerLiveRequest)
        return _flag(answer, "live")

    async def _server_ready(self, request: web.Request) -> web.Response:
        answer = await self._call(request, "ServerReady", service_pb2.ServerReadyRequest)
        return _flag(answer, "ready")

    async def _server_metadata(self, request: web.Request) -> web.Response:
        answer = await self._call(request, "ServerMetadata", service_pb2.ServerMetadataRequest)
        return _json(answer, server_metadata_json)

    async def _model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self._call(
            request,
            "ModelMetadata",
            lambda: service_pb2.ModelMetadataRequest(name=name, version=version),
        )
        return _json(answer, model_metadata_json)

    async def _model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self._call(
            request, "ModelReady", lambda: service_pb2.ModelReadyRequest(name=name, version=version)
        )
        return _flag(answer, "ready", extra={"name": name})

    def _json_route_handler(
        self, route: JsonRoute
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            path_fields = dict(request.match_info)

            def build() -> Any:
                message = route.request_type()
                if body.strip():
                    try:
                        json_format.Parse(body, message)
                    except (json_format.ParseError, UnicodeDecodeError) as exc:
                        raise InvalidArgumentError.for_field(
                            "body", f"expected {message.DESCRIPTOR.full_name} as JSON: {exc}"
                        ) from None
                for field, value in path_fields.items():
                    sent = getattr(message, field)
                    if sent and sent != value:
                        raise InvalidArgumentError.for_field(
                            field, f"the path says {value!r}, the body {sent!r}"
                        )
                    setattr(message, field, value)
                return message

            answer = await self._call(
                request,
                route.method,
                build,
                lambda response: json_format.MessageToJson(response, indent=None).encode(),
            )
            if answer.response is None:
                return _error(answer)
            return web.Response(body=answer.response, content_type="application/json")

        return handle

    async def _model_config(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        answer = await self._call(
            request,
            "ModelConfig",
            lambda: service_pb2.ModelConfigRequest(name=name, version=version),
        )
        # As Triton answers: the configuration itself, in protobuf's JSON mapping.
        return _json(answer, lambda response: _proto_json(response.config))

    async def _model_statistics(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")
        version = request.match_info.get("version", "")
        answer = await self._call(
            request,
            "ModelStatistics",
            lambda: service_pb2.ModelStatisticsRequest(name=name, version=version),
        )
        return _json(answer, _proto_json)

    async def _repository_index(self, request: web.Request) -> web.Response:
        body = await request.read()

        def build() -> Any:
            ready = False
            if body.strip():
                try:
                    document = json.loads(body)
                except ValueError as exc:
                    raise InvalidArgumentError.for_field(
                        "body", f"expected a JSON object: {exc}"
                    ) from None
                if not isinstance(document, dict) or not isinstance(
                    document.get("ready", False), bool
                ):
                    raise InvalidArgumentError.for_field(
                        "body", 'expected {"ready": true or false}'
                    )
                ready = document.get("ready", False)
            return service_pb2.RepositoryIndexRequest(ready=ready)

        answer = await self._call(request, "RepositoryIndex", build)
        if answer.response is None:
            return _error(answer)
        # As Triton answers: the list of models itself.
        return web.json_response(_proto_json(answer.response).get("models", []))

    async def _model_infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        body = await request.read()
        header_length = request.headers.get(HEADER_LENGTH)
        parsed: list[Any] = []

        def build() -> Any:
            parsed.append(parse_infer(body, header_length, model_name=name, model_version=version))
            return parsed[0].request

        answer = await self._call(
            request, "ModelInfer", build, lambda response: encode_infer(response, parsed[0])
        )
        if answer.response is None:
            return _error(answer)
        content, json_length = answer.response
        if json_length is None:
            return web.Response(body=content, content_type="application/json")
        return web.Response(
            body=content,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(json_length)},
        )


def _proto_json(message: Any) -> dict[str, Any]:
    """A message in protobuf's JSON mapping, with the .proto's field names (as Triton's
    HTTP endpoint writes them)."""
    document: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return document


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


def _certificate_cn(request: web.Request) -> str | None:
    transport = request.transport
    certificate = transport.get_extra_info("peercert") if transport is not None else None
    if not certificate:
        return None
    for entry in certificate.get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return str(value)
    return None


def _flag(answer: _Answer, field: str, extra: dict[str, object] | None = None) -> web.Response:
    if answer.response is None:
        return _error(answer)
    value = bool(getattr(answer.response, field))
    return web.json_response({**(extra or {}), field: value}, status=200 if value else 400)


def _json(answer: _Answer, render: Callable[[Any], dict[str, object]]) -> web.Response:
    if answer.response is None:
        return _error(answer)
    return web.json_response(render(answer.response))


def _error(answer: _Answer) -> web.Response:
    """A refused call as the protocol's error object, with the status's HTTP code; a
    RetryInfo among the status's details becomes `Retry-After` (whole seconds, rounded up)."""
    headers = {"Grpc-Status": answer.code.name}
    retry = _retry_after_s(answer.trailing)
    if retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    return web.json_response(
        {"error": answer.details or answer.code.name},
        status=HTTP_STATUS.get(answer.code, 500),
        headers=headers,
    )


def _retry_after_s(trailing: Sequence[tuple[str, str | bytes]]) -> float | None:
    for key, value in trailing:
        if key != _STATUS_DETAILS or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """HTTP-level refusals (no such route, wrong method, a body over the size limit) as the
    protocol's error object rather than aiohttp's text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = (
                f"no route {request.method} {request.path}: this server speaks the Open"
                " Inference Protocol (/v2/health/live, /v2/health/ready, /v2,"
                " /v2/models/<name>[/versions/<version>][/ready|/infer])"
            )
        elif exc.status == 413:
            message = (
                f"the body is larger than this server's limit of {request.client_max_size}"
                " bytes (server.max_message_bytes)"
            )
        else:
            message = f"{request.method} {request.path}: {exc.reason}"
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return web.json_response({"error": message}, status=exc.status, headers=headers)
    except Exception:
        # The interceptors answer every error of a call; this is the binding's own.
        log.exception("http_internal_error", method=request.method, path=request.path)
        return web.json_response({"error": "internal error"}, status=500)
