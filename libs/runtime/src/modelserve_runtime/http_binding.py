"""A service's HTTP port (`server.http_port`): its gRPC methods served over HTTP/1.1 by the same
servicers through the same server interceptors as its gRPC port.

Each HTTP call runs the gRPC method it means through the service's own interceptor chain
(tracing with the caller's `traceparent`, request id, the `rpc` log line and metrics under the
gRPC method's name, error status, API keys and roles), with an `HttpCallContext` standing for
gRPC's: its metadata are the HTTP headers, lower-cased, its deadline the one the caller sent,
and an abort records the status as gRPC's does. A refused request is therefore refused the
same way over both ports, with the same words.

What is spoken on the port comes from route groups: Connect (every service, `connect.py`) and
the Open Inference Protocol's REST binding (router and inference, `modelserve_triton.oip_http`).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from aiohttp import web
from google.rpc import error_details_pb2, status_pb2
from grpc.aio import AbortError
from opentelemetry import trace

log = structlog.get_logger()

#: The HTTP status of each gRPC status code (as Google's HTTP APIs and Connect map them).
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
#: The trailing metadata key of a status's details (google.rpc.Status, binary).
STATUS_DETAILS = "grpc-status-details-bin"
#: What a call whose deadline passed is told, as gRPC words it.
DEADLINE_EXCEEDED = "Deadline Exceeded"
#: The auth-context property gRPC fills with a verified client certificate's subject CN.
_CERTIFICATE_CN = "x509_common_name"

Metadata = tuple[tuple[str, str | bytes], ...]
#: Response headers a browser shows a page without being told (CORS-safelisted), and those
#: CORS itself sets.
_SAFELISTED = frozenset(
    {
        "cache-control",
        "content-language",
        "content-length",
        "content-type",
        "expires",
        "last-modified",
        "pragma",
        "vary",
        "access-control-allow-origin",
        "access-control-expose-headers",
        "date",
        "server",
        "transfer-encoding",
    }
)


@dataclass(slots=True)
class CallDetails:
    """What a server interceptor is told of a call (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: Metadata


# grpc.aio.ServicerContext is generic in the stubs only.
class HttpCallContext(grpc.aio.ServicerContext):  # type: ignore[type-arg]
    """gRPC's servicer context for a call that came over HTTP: the headers as metadata, the
    caller's deadline (none: the service's own budgets apply), an abort that records the
    status and raises AbortError as gRPC's does, and `write` for a streamed answer (given a
    writer; a unary call refuses it)."""

    def __init__(
        self,
        metadata: Metadata,
        peer: str,
        certificate_cn: str | None,
        *,
        deadline: float | None = None,
        writer: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        self._metadata = metadata
        self._peer = peer
        self._auth = {_CERTIFICATE_CN: [certificate_cn.encode()]} if certificate_cn else {}
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: Metadata = ()
        self.initial: Metadata = ()
        """Metadata the servicer sent ahead of its answer (`send_initial_metadata`)."""
        self.deadline = deadline
        """The loop's time at which the caller stops waiting, None for no deadline."""
        self.expired = False
        self._writer = writer

    def expire(self) -> None:
        """Marks the call as past its deadline (its status becomes DEADLINE_EXCEEDED)."""
        self.expired = True
        self._code = grpc.StatusCode.DEADLINE_EXCEEDED
        self._details = DEADLINE_EXCEEDED

    async def read(self) -> Any:
        raise RuntimeError("the requests of an HTTP call come as the handler's iterator")

    async def write(self, message: Any) -> None:
        if self._writer is None:
            raise RuntimeError("this HTTP call has one answer")
        await self._writer(message)

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        self.initial = tuple(initial_metadata or ())

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
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

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


class Pending:
    """The request a route hands down the interceptor chain: built (parsed) and its answer
    rendered only inside it, so a body that does not parse, or an answer that cannot be
    encoded, is refused, traced, logged and counted like any bad call. For a client stream
    `build` gives the iterator of requests; for a server stream `render` is unused (each
    answer goes to the call's writer)."""

    __slots__ = ("build", "render")

    def __init__(self, build: Callable[[], Any], render: Callable[[Any], Any]) -> None:
        self.build = build
        self.render = render


@dataclass(frozen=True, slots=True)
class Answer:
    response: Any
    """The servicer's answer (rendered), None when the call was refused."""
    code: grpc.StatusCode
    details: str
    trailing: Metadata
    initial: Metadata = ()


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


def header_metadata(request: web.Request) -> Metadata:
    """The request's headers as gRPC metadata: keys lower-cased, `-bin` values decoded from
    base64 (padded or not) as gRPC gives them; a `-bin` value that is not base64 is left out."""
    metadata: list[tuple[str, str | bytes]] = []
    for key, value in request.headers.items():
        key = key.lower()
        if key.endswith("-bin"):
            try:
                metadata.append((key, base64.b64decode(value + "=" * (-len(value) % 4))))
            except ValueError:
                continue
        else:
            metadata.append((key, value))
    return tuple(metadata)


def retry_after(trailing: Metadata) -> dict[str, str]:
    """`Retry-After` (whole seconds, rounded up) from a RetryInfo among a refusal's status
    details, for HTTP clients and proxies that read no details; none without one."""
    for key, value in trailing:
        if key != STATUS_DETAILS or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                seconds = info.retry_delay.ToTimedelta().total_seconds()
                return {"Retry-After": str(max(1, math.ceil(seconds)))}
    return {}


def certificate_cn(request: web.Request) -> str | None:
    """The subject CN of the client certificate the TLS handshake verified, if any."""
    transport = request.transport
    certificate = transport.get_extra_info("peercert") if transport is not None else None
    if not certificate:
        return None
    for entry in certificate.get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return str(value)
    return None


def _peer(request: web.Request) -> str:
    peername = request.transport.get_extra_info("peername") if request.transport else None
    return f"ipv4:{peername[0]}:{peername[1]}" if peername else "unknown"


#: The handler attribute of each kind of method: (client streams, server streams).
_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def find_handler(handlers: Sequence[grpc.GenericRpcHandler], method: str) -> Any:
    """The servicer's handler of `method` among the generic handlers, or None."""
    for generic in handlers:
        handler = generic.service(CallDetails(method, ()))
        if handler is not None:
            return handler
    return None


def _innermost(handler: Any, protocol: str) -> Any:
    """The servicer's handler taking a Pending: the request is built, and a unary answer
    rendered, inside the interceptor chain."""
    attribute, factory = _KINDS[(handler.request_streaming, handler.response_streaming)]
    servicer_call: Any = getattr(handler, attribute)
    call: Callable[..., Any]
    if not handler.response_streaming:

        async def call(pending: Pending, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            trace.get_current_span().set_attribute("modelserve.protocol", protocol)
            return pending.render(await servicer_call(pending.build(), context))

    elif inspect.isasyncgenfunction(servicer_call):

        async def call(pending: Pending, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            trace.get_current_span().set_attribute("modelserve.protocol", protocol)
            async for response in servicer_call(pending.build(), context):
                yield response

    else:
        # A servicer that writes its answers through `context.write` (health's Watch).
        async def call(pending: Pending, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            trace.get_current_span().set_attribute("modelserve.protocol", protocol)
            return await servicer_call(pending.build(), context)

    return factory(call)


RouteGroup = Callable[["HttpServer"], Sequence[web.RouteDef]]


class HttpServer:
    """Serves the routes of `groups` on `sock`, each call through the gRPC handlers a servicer
    registered (`handlers`) and `interceptors`, outermost first, as the gRPC server runs them.
    `speaks` names what the port serves, for the answer to a path it does not know."""

    def __init__(
        self,
        handlers: Sequence[grpc.GenericRpcHandler],
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        sock: socket.socket,
        *,
        max_body_bytes: int,
        grace_s: float,
        ssl_context: ssl.SSLContext | None = None,
        cors_origins: Sequence[str] = (),
        max_in_flight: int | None = None,
    ) -> None:
        self._cors = frozenset(cors_origins)
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self.handlers = tuple(handlers)
        self._interceptors = tuple(interceptors)
        self._inner: dict[tuple[str, str], Any] = {}
        self._routes: list[web.RouteDef] = []
        self.speaks: list[str] = []
        self._sock = sock
        self._ssl = ssl_context
        self.max_body_bytes = max_body_bytes
        # aiohttp reads a timeout of 0 as none at all; gRPC's stop(0) cancels at once.
        self._grace_s = max(grace_s, 0.001)
        self.port: int = sock.getsockname()[1]
        self._runner: web.AppRunner | None = None

    def serve(self, method: str, *, protocol: str) -> bool:
        """Makes `method` callable through `call` with `protocol` (named on its spans); False
        when no servicer implements it."""
        if (method, protocol) in self._inner:
            return True
        handler = find_handler(self.handlers, method)
        if handler is None:
            return False
        self._inner[(method, protocol)] = _innermost(handler, protocol)
        return True

    def add_routes(self, routes: Sequence[web.RouteDef], speaks: str) -> None:
        self._routes.extend(routes)
        self.speaks.append(speaks)

    async def start(self) -> None:
        middlewares = [self._errors]
        if self._cors:
            middlewares.insert(0, self._preflight)
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=middlewares)
        if self._cors:
            app.on_response_prepare.append(self._allow_origin)
        app.add_routes(self._routes)
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

    def context(
        self,
        request: web.Request,
        *,
        timeout_s: float | None = None,
        writer: Callable[[Any], Awaitable[None]] | None = None,
    ) -> HttpCallContext:
        """The servicer context of one HTTP call (`timeout_s`: the caller's deadline)."""
        deadline = None
        if timeout_s is not None:
            deadline = asyncio.get_running_loop().time() + timeout_s
        return HttpCallContext(
            header_metadata(request),
            _peer(request),
            certificate_cn(request),
            deadline=deadline,
            writer=writer,
        )

    async def call(
        self,
        request: web.Request,
        method: str,
        build: Callable[[], Any],
        render: Callable[[Any], Any] = lambda response: response,
        *,
        protocol: str,
        context: HttpCallContext | None = None,
    ) -> Answer:
        """Runs `method` (served by `serve`) on the request `build` makes, through the
        interceptors; the answer `render` makes, or the status it was refused with. Past the
        context's deadline the call is cancelled and answers DEADLINE_EXCEEDED."""
        if context is None:
            context = self.context(request)
        if self._max_in_flight is not None and self._in_flight >= self._max_in_flight:
            # As gRPC refuses a call over `maximum_concurrent_rpcs`: before any handler runs.
            return Answer(
                None,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._max_in_flight} calls are in flight on this port, its limit"
                " (server.max_concurrent_rpcs)",
                (),
            )
        self._in_flight += 1
        try:
            return await self._call(request, method, build, render, protocol, context)
        finally:
            self._in_flight -= 1

    async def _call(
        self,
        request: web.Request,
        method: str,
        build: Callable[[], Any],
        render: Callable[[Any], Any],
        protocol: str,
        context: HttpCallContext,
    ) -> Answer:
        details = CallDetails(method, context.invocation_metadata())
        handler = await self._intercepted(iter(self._interceptors), details, protocol)
        attribute = _KINDS[(handler.request_streaming, handler.response_streaming)][0]
        timer = None
        task = asyncio.current_task()
        if context.deadline is not None and task is not None:

            def expire() -> None:
                context.expire()
                task.cancel()

            timer = asyncio.get_running_loop().call_at(context.deadline, expire)
        try:
            result = getattr(handler, attribute)(Pending(build, render), context)
            if inspect.isasyncgen(result):
                # No interceptor turned the servicer's stream into writes: write it here.
                async for message in result:
                    await context.write(message)
                response = None
            else:
                response = await result
        except AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            return Answer(
                None, code, context.details() or "", context.trailing_metadata(), context.initial
            )
        except asyncio.CancelledError:
            if not context.expired or task is None:
                raise
            task.uncancel()
            return Answer(None, grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_EXCEEDED, ())
        finally:
            if timer is not None:
                timer.cancel()
        return Answer(
            response, grpc.StatusCode.OK, "", context.trailing_metadata(), context.initial
        )

    async def _intercepted(
        self,
        interceptors: Iterator[grpc.aio.ServerInterceptor],
        details: CallDetails,
        protocol: str,
    ) -> Any:
        interceptor = next(interceptors, None)
        if interceptor is None:
            return self._inner[(details.method, protocol)]

        async def continuation(call_details: Any) -> Any:
            return await self._intercepted(interceptors, call_details, protocol)

        return await interceptor.intercept_service(continuation, details)

    def _allowed(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self._cors or origin in self._cors)

    @web.middleware
    async def _preflight(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """A browser's CORS preflight (OPTIONS with Access-Control-Request-Method): allowed
        origins may POST and GET with whatever headers they ask for; others are refused."""
        wanted = request.headers.get("Access-Control-Request-Method")
        if request.method != "OPTIONS" or wanted is None:
            return await handler(request)
        origin = request.headers.get("Origin")
        if not self._allowed(origin):
            return web.json_response(
                {"error": f"origin {origin!r} may not call this port (server.http_cors_origins)"},
                status=403,
            )
        headers = {
            "Access-Control-Allow-Origin": str(origin),
            "Access-Control-Allow-Methods": "POST, GET",
            "Access-Control-Max-Age": "7200",
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        }
        asked = request.headers.get("Access-Control-Request-Headers")
        if asked:
            headers["Access-Control-Allow-Headers"] = asked
        return web.Response(status=204, headers=headers)

    async def _allow_origin(self, request: web.Request, response: web.StreamResponse) -> None:
        """An answer to an allowed origin names it, and lets its page read every header the
        answer has (status, Retry-After, Connect's trailers)."""
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" or not self._allowed(origin):
            return
        response.headers["Access-Control-Allow-Origin"] = str(origin)
        response.headers.add("Vary", "Origin")
        exposed = sorted({name for name in response.headers if name.lower() not in _SAFELISTED})
        if exposed:
            response.headers["Access-Control-Expose-Headers"] = ", ".join(exposed)

    @web.middleware
    async def _errors(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """HTTP-level refusals (no such route, wrong method, a body over the size limit) as
        `{"error": ...}` rather than aiohttp's text."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404:
                message = f"no route {request.method} {request.path}: this port speaks " + (
                    "; ".join(self.speaks)
                )
            elif exc.status == 413:
                message = (
                    f"the body is larger than this server's limit of {request.client_max_size}"
                    " bytes (server.max_message_bytes)"
                )
            else:
                message = f"{request.method} {request.path}: {exc.reason}"
            headers = {
                k: v for k, v in exc.headers.items() if k.lower() in ("allow", "accept-post")
            }
            return web.json_response({"error": message}, status=exc.status, headers=headers)
        except Exception:
            # The interceptors answer every error of a call; this is the binding's own.
            log.exception("http_internal_error", method=request.method, path=request.path)
            return web.json_response({"error": "internal error"}, status=500)
