"""The Open Inference Protocol's HTTP/REST binding (KServe v2, with Triton's binary tensor
extension) on a service's HTTP port (`modelserve_runtime.http_binding`), served by the same
servicer and the same server interceptors as its gRPC binding.

Each HTTP call runs the gRPC method it means (`POST /v2/models/m/infer` is
`/inference.GRPCInferenceService/ModelInfer`) through the service's own interceptor chain;
an abort ends the HTTP call with the status's HTTP code and `{"error": "<details>"}`.

Routes: `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2` (server metadata),
`GET /v2/models/<name>[/versions/<version>]` (model metadata), `GET .../ready` (model
ready) and `POST .../infer`; and Triton's `GET .../config`, `GET [/v2/models/<name>...]/stats`
and `POST /v2/repository/index`, answered as Triton answers them (protobuf's JSON mapping)
where the servicer implements them, 501 where it does not. Liveness and readiness answer 200, or 400 for false, as the
protocol says.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from modelserve_runtime.errors import InvalidArgumentError
from modelserve_runtime.http_binding import HTTP_STATUS, Answer, HttpServer, retry_after
from modelserve_triton.oip_json import (
    HEADER_LENGTH,
    encode_infer,
    model_metadata_json,
    parse_infer,
    server_metadata_json,
)

SERVICE = "inference.GRPCInferenceService"


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


class OipRoutes:
    """The protocol's routes on `server` (the servicers of `inference.GRPCInferenceService`),
    and `json_routes`: further unary methods as JSON."""

    def __init__(self, server: HttpServer, json_routes: Sequence[JsonRoute] = ()) -> None:
        self._server = server
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
            if not server.serve(f"/{SERVICE}/{name}", protocol="http"):
                raise LookupError(f"no handler for /{SERVICE}/{name}")
        self._json_routes = tuple(json_routes)
        for route in self._json_routes:
            if not server.serve(route.method, protocol="http"):
                raise LookupError(f"no handler for {route.method}")

    def routes(self) -> list[web.RouteDef]:
        models = "/v2/models/{name}"
        versions = "/v2/models/{name}/versions/{version}"
        return [
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

    def speaks(self) -> str:
        paths = ", ".join(r.path for r in self._json_routes)
        return (
            "the Open Inference Protocol (/v2/health/live, /v2/health/ready, /v2,"
            " /v2/models/<name>[/versions/<version>][/ready|/infer])"
            + (f" and {paths}" if paths else "")
        )

    async def _call(
        self,
        request: web.Request,
        name: str,
        build: Callable[[], Any],
        render: Callable[[Any], Any] = lambda response: response,
    ) -> Answer:
        method = name if name.startswith("/") else f"/{SERVICE}/{name}"
        return await self._server.call(request, method, build, render, protocol="http")

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


def _flag(answer: Answer, field: str, extra: dict[str, object] | None = None) -> web.Response:
    if answer.response is None:
        return _error(answer)
    value = bool(getattr(answer.response, field))
    return web.json_response({**(extra or {}), field: value}, status=200 if value else 400)


def _json(answer: Answer, render: Callable[[Any], dict[str, object]]) -> web.Response:
    if answer.response is None:
        return _error(answer)
    return web.json_response(render(answer.response))


def _error(answer: Answer) -> web.Response:
    """A refused call as the protocol's error object, with the status's HTTP code; a
    RetryInfo among the status's details becomes `Retry-After` (whole seconds, rounded up)."""
    headers = {"Grpc-Status": answer.code.name, **retry_after(answer.trailing)}
    return web.json_response(
        {"error": answer.details or answer.code.name},
        status=HTTP_STATUS.get(answer.code, 500),
        headers=headers,
    )
