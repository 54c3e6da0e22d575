"""The Connect protocol (connectrpc.com/docs/protocol) on a service's HTTP port: every method of
every service the port's server hosts, at `POST /<package.Service>/<Method>`, with protobuf
or JSON bodies, so Connect clients generated from the same protos (Go, TypeScript, Swift,
Kotlin, Dart, Python), and curl, call the services over HTTP/1.1 without gRPC.

- Unary methods: `Content-Type: application/json` (protobuf's JSON mapping) or
  `application/proto`, the bare message as the body, the answer as the body of a 200. A refused
  call answers the status's HTTP code with Connect's error object: `code` (`invalid_argument`,
  ...), `message`, and `details`, each a `type` (e.g. `google.rpc.BadRequest`), its
  unpadded base64 `value` and, for reading, the same as JSON under `debug`.
- Streaming methods (and unary ones, when asked so): `application/connect+proto` or
  `application/connect+json`, each message in a 5-byte envelope; the answers follow in
  envelopes, and the last envelope ends the stream with `{}` or `{"error": ...}` and the
  trailing metadata.
- `Connect-Timeout-Ms` is the call's deadline: the servicer's `time_remaining()` and, once
  past, a cancelled call answering `deadline_exceeded`. `Content-Encoding: gzip` (streams:
  `Connect-Content-Encoding`) bodies are read; an answer of 1 KiB or more is gzipped when the
  caller's `Accept-Encoding` (`Connect-Accept-Encoding`) lists gzip. Headers are the call's
  metadata (`-bin` ones base64), the servicer's initial metadata come back as headers and its
  trailing metadata as `Trailer-` headers (streams: the end message's `metadata`).

Bidirectional streams work with callers that send their whole request stream first, as
HTTP/1.1 callers do; the protocol wants HTTP/2 for more, which this port does not speak.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from modelserve_runtime.errors import (
    InvalidArgumentError,
    ModelServeError,
    ResourceExhaustedError,
)
from modelserve_runtime.http_binding import (
    HTTP_STATUS,
    STATUS_DETAILS,
    HttpServer,
    Metadata,
    retry_after,
)

#: Connect's name of each status code.
CODES: dict[grpc.StatusCode, str] = {
    code: code.name.lower() for code in grpc.StatusCode if code is not grpc.StatusCode.OK
}
CODES[grpc.StatusCode.CANCELLED] = "canceled"
#: Body encodings read and written, most preferred first.
ENCODINGS = ("gzip", "identity")
#: Answers smaller than this are sent as they are.
COMPRESS_MIN_BYTES = 1024
_UNARY_TYPES = {"application/json": "json", "application/proto": "proto"}
_STREAM_TYPES = {"application/connect+json": "json", "application/connect+proto": "proto"}
_TIMEOUT = re.compile(r"[0-9]{1,10}")
_FLAG_COMPRESSED = 0b01
_FLAG_END = 0b10
_ENVELOPE = struct.Struct(">BI")


@dataclass(frozen=True, slots=True)
class ConnectMethod:
    """One method as Connect serves it."""

    path: str
    """`/<package.Service>/<Method>`, also the gRPC method's name."""
    request_type: Any
    client_streaming: bool
    server_streaming: bool


def service_methods(services: Sequence[str]) -> list[ConnectMethod]:
    """The methods of `services` (full names of services whose protos are loaded)."""
    pool = descriptor_pool.Default()
    methods = []
    for name in services:
        service = pool.FindServiceByName(name)
        for method in service.methods:
            methods.append(
                ConnectMethod(
                    path=f"/{service.full_name}/{method.name}",
                    request_type=message_factory.GetMessageClass(method.input_type),
                    client_streaming=method.client_streaming,
                    server_streaming=method.server_streaming,
                )
            )
    return methods


class _Refusal(Exception):
    """A refusal made by the protocol before any servicer ran (a bad header, a body that is
    not a message)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Codec:
    def __init__(self, name: str) -> None:
        self.name = name

    def decode(self, data: bytes, message_type: Any) -> Any:
        message = message_type()
        expected = message.DESCRIPTOR.full_name
        if self.name == "proto":
            try:
                message.ParseFromString(data)
            except DecodeError as exc:
                raise InvalidArgumentError.for_field(
                    "body", f"expected {expected} as protobuf: {exc}"
                ) from None
            return message
        if not data.strip():
            return message
        try:
            # Unknown fields are skipped, as protobuf's binary form skips them: a caller built
            # from newer protos still gets through.
            json_format.Parse(data, message, ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError.for_field(
                "body", f"expected {expected} as JSON: {exc}"
            ) from None
        return message

    def encode(self, message: Any) -> bytes:
        if self.name == "proto":
            return bytes(message.SerializeToString())
        return json_format.MessageToJson(message, indent=None).encode()


class ConnectRoutes:
    """Connect's routes on `server` for `methods` (those a servicer implements)."""

    def __init__(self, server: HttpServer, methods: Sequence[ConnectMethod]) -> None:
        self._server = server
        self._methods = [m for m in methods if server.serve(m.path, protocol="connect")]

    def routes(self) -> list[web.RouteDef]:
        return [web.post(method.path, self._handler(method)) for method in self._methods]

    def speaks(self) -> str:
        return (
            "Connect (POST /<package.Service>/<Method>, e.g. "
            + (self._methods[0].path if self._methods else "/grpc.health.v1.Health/Check")
            + ")"
        )

    def _handler(self, method: ConnectMethod) -> Callable[[web.Request], Any]:
        streaming = method.client_streaming or method.server_streaming

        async def handle(request: web.Request) -> web.StreamResponse:
            content_type = request.content_type
            if content_type in _STREAM_TYPES:
                return await self._stream(request, method, _Codec(_STREAM_TYPES[content_type]))
            if content_type in _UNARY_TYPES and not streaming:
                return await self._unary(request, method, _Codec(_UNARY_TYPES[content_type]))
            accepted = sorted(_STREAM_TYPES if streaming else {**_UNARY_TYPES, **_STREAM_TYPES})
            raise web.HTTPUnsupportedMediaType(headers={"Accept-Post": ", ".join(accepted)})

        return handle

    async def _unary(
        self, request: web.Request, method: ConnectMethod, codec: _Codec
    ) -> web.StreamResponse:
        accept = request.headers.get("Accept-Encoding", request.headers.get("Content-Encoding"))
        try:
            _check_version(request.headers.get("Connect-Protocol-Version"))
            timeout_s = _timeout_s(request)
            encoding = _encoding(request.headers.get("Content-Encoding"), "Content-Encoding")
            # aiohttp inflates a gzipped body as it reads it (within the same size limit).
            body = await _read_body(request, self._server.max_body_bytes, encoding)
        except _Refusal as exc:
            return _unary_error(exc.code, exc.message, (), (), accept)
        context = self._server.context(request, timeout_s=timeout_s)
        answer = await self._server.call(
            request,
            method.path,
            lambda: codec.decode(body, method.request_type),
            codec.encode,
            protocol="connect",
            context=context,
        )
        if answer.response is None:
            return _unary_error(
                answer.code, answer.details, answer.trailing, answer.initial, accept
            )
        headers = _headers(answer.initial)
        headers.update(_headers(answer.trailing, prefix="trailer-"))
        content, encoding = _compress(answer.response, accept)
        if encoding != "identity":
            headers["Content-Encoding"] = encoding
        headers["Content-Type"] = f"application/{codec.name}"
        return web.Response(body=content, headers=headers)

    async def _stream(
        self, request: web.Request, method: ConnectMethod, codec: _Codec
    ) -> web.StreamResponse:
        accept = request.headers.get(
            "Connect-Accept-Encoding", request.headers.get("Connect-Content-Encoding")
        )
        response = web.StreamResponse(headers={"Content-Type": f"application/connect+{codec.name}"})
        answer_encoding = _negotiate(accept)
        if answer_encoding != "identity":
            response.headers["Connect-Content-Encoding"] = answer_encoding
        limit = self._server.max_body_bytes

        async def send(data: bytes, flags: int, initial: Metadata = ()) -> None:
            """Sends one envelope; the first sends the headers, with `initial` (the servicer's
            initial metadata) among them."""
            if not response.prepared:
                response.headers.update(_headers(initial))
                await response.prepare(request)
            if answer_encoding == "gzip" and flags == 0 and len(data) >= COMPRESS_MIN_BYTES:
                data, flags = gzip.compress(data, compresslevel=6), flags | _FLAG_COMPRESSED
            await response.write(_ENVELOPE.pack(flags, len(data)) + data)

        async def write(message: Any) -> None:
            await send(codec.encode(message), 0, context.initial)

        try:
            _check_version(request.headers.get("Connect-Protocol-Version"))
            timeout_s = _timeout_s(request)
            encoding = _encoding(
                request.headers.get("Connect-Content-Encoding"), "Connect-Content-Encoding"
            )
        except _Refusal as exc:
            await send(_end_stream(exc.code, exc.message, ()), _FLAG_END)
            await response.write_eof()
            return response
        context = self._server.context(request, timeout_s=timeout_s, writer=write)
        requests = _messages(request, codec, method.request_type, encoding, limit)

        if method.client_streaming:
            answer = await self._server.call(
                request,
                method.path,
                lambda: requests,
                lambda r: r,
                protocol="connect",
                context=context,
            )
        else:
            # The one request is read before the call, and refused inside it if it is bad.
            only: Any
            try:
                only = await _single(requests)
            except ModelServeError as exc:
                only = exc

            def build_one() -> Any:
                if isinstance(only, ModelServeError):
                    raise only
                return only

            answer = await self._server.call(
                request, method.path, build_one, lambda r: r, protocol="connect", context=context
            )
        if answer.response is not None and not method.server_streaming:
            await write(answer.response)
        if answer.code is grpc.StatusCode.OK:
            end = _end_ok(answer.trailing)
        else:
            end = _end_stream(answer.code, answer.details, answer.trailing)
        await send(end, _FLAG_END, answer.initial)
        await response.write_eof()
        return response


async def _single(requests: AsyncIterator[Any]) -> Any:
    """The one request of a call that takes one."""
    first = None
    count = 0
    async for message in requests:
        count += 1
        if count > 1:
            raise InvalidArgumentError.for_field("body", "expected one message, got more")
        first = message
    if first is None:
        raise InvalidArgumentError.for_field("body", "expected one message, got none")
    return first


async def _messages(
    request: web.Request, codec: _Codec, message_type: Any, encoding: str, limit: int
) -> AsyncIterator[Any]:
    """The enveloped messages of a streamed request, decoded as they arrive."""
    content = request.content
    while True:
        try:
            prefix = await content.readexactly(_ENVELOPE.size)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise InvalidArgumentError.for_field(
                    "body", "the stream ends inside an envelope's prefix"
                ) from None
            return
        flags, length = _ENVELOPE.unpack(prefix)
        if length > limit:
            raise _too_large(length, limit)
        try:
            data = await content.readexactly(length)
        except asyncio.IncompleteReadError:
            raise InvalidArgumentError.for_field(
                "body", f"the stream ends inside a message of {length} bytes"
            ) from None
        if flags & _FLAG_END:
            raise InvalidArgumentError.for_field("body", "a request stream has no end message")
        if flags & _FLAG_COMPRESSED:
            if encoding == "identity":
                raise InvalidArgumentError.for_field(
                    "body", "a compressed message, but Connect-Content-Encoding is identity"
                )
            data = _gunzip(data, limit)
        yield codec.decode(data, message_type)


def _too_large(size: int, limit: int) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"a message of {size} bytes is over this server's limit of {limit}"
        " (server.max_message_bytes)",
        reason="MESSAGE_TOO_LARGE",
    )


def _check_version(version: str | None) -> None:
    if version is not None and version.strip() != "1":
        raise _Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Connect-Protocol-Version: expected 1, got {version!r}",
        )


def _timeout_s(request: web.Request) -> float | None:
    value = request.headers.get("Connect-Timeout-Ms")
    if value is None:
        return None
    if not _TIMEOUT.fullmatch(value.strip()):
        raise _Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Connect-Timeout-Ms: expected a whole number of milliseconds (at most 10 digits),"
            f" got {value!r}",
        )
    return int(value) / 1000


def _encoding(value: str | None, header: str) -> str:
    encoding = (value or "identity").strip().lower()
    if encoding not in ENCODINGS:
        raise _Refusal(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{header}: {encoding!r} is not supported; supported: {', '.join(ENCODINGS)}",
        )
    return encoding


def _negotiate(accept: str | None) -> str:
    """The caller's most preferred encoding this server writes (identity at worst)."""
    for item in (accept or "").split(","):
        name = item.split(";")[0].strip().lower()
        if name in ENCODINGS:
            return name
    return "identity"


async def _read_body(request: web.Request, limit: int, encoding: str) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the body is larger than this server's limit of {limit} bytes"
            " (server.max_message_bytes)",
        ) from None
    except (ContentEncodingError, RequestPayloadError):
        raise _Refusal(
            grpc.StatusCode.INVALID_ARGUMENT, f"Content-Encoding: the body is not {encoding}"
        ) from None


def _gunzip(data: bytes, limit: int) -> bytes:
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(data, limit + 1)
    except zlib.error as exc:
        raise InvalidArgumentError.for_field("body", f"not gzip: {exc}") from None
    if len(out) > limit:
        raise _too_large(len(out), limit)
    return out


def _compress(content: bytes, accept: str | None) -> tuple[bytes, str]:
    encoding = _negotiate(accept)
    if encoding == "gzip" and len(content) >= COMPRESS_MIN_BYTES:
        return gzip.compress(content, compresslevel=6), "gzip"
    return content, "identity"


def _headers(metadata: Metadata, prefix: str = "") -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in metadata:
        if key == STATUS_DETAILS or key.startswith(("grpc-", "connect-")):
            continue
        text = _b64(value) if isinstance(value, bytes) else value
        name = prefix + key
        headers[name] = f"{headers[name]}, {text}" if name in headers else text
    return headers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def error_json(code: grpc.StatusCode, message: str, trailing: Metadata) -> dict[str, Any]:
    """Connect's error object for a status: its code, message and the details of the
    google.rpc.Status the servicer attached (ErrorInfo, BadRequest, RetryInfo, ...)."""
    error: dict[str, Any] = {"code": CODES.get(code, "unknown")}
    if message:
        error["message"] = message
    details = []
    for key, value in trailing:
        if key != STATUS_DETAILS or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            item: dict[str, Any] = {"type": detail.TypeName(), "value": _b64(detail.value)}
            try:
                known = message_factory.GetMessageClass(
                    descriptor_pool.Default().FindMessageTypeByName(detail.TypeName())
                )
                item["debug"] = json_format.MessageToDict(known.FromString(detail.value))
            except (KeyError, DecodeError):
                pass
            details.append(item)
    if details:
        error["details"] = details
    return error


def _unary_error(
    code: grpc.StatusCode,
    message: str,
    trailing: Metadata,
    initial: Metadata,
    accept: str | None,
) -> web.Response:
    headers = _headers(initial)
    headers.update(_headers(trailing, prefix="trailer-"))
    headers.update(retry_after(trailing))
    content, encoding = _compress(json.dumps(error_json(code, message, trailing)).encode(), accept)
    if encoding != "identity":
        headers["Content-Encoding"] = encoding
    headers["Content-Type"] = "application/json"
    return web.Response(body=content, status=HTTP_STATUS.get(code, 500), headers=headers)


def _end_stream(code: grpc.StatusCode, message: str, trailing: Metadata) -> bytes:
    end: dict[str, Any] = {"error": error_json(code, message, trailing)}
    metadata = _metadata_json(trailing)
    if metadata:
        end["metadata"] = metadata
    return json.dumps(end).encode()


def _end_ok(trailing: Metadata) -> bytes:
    metadata = _metadata_json(trailing)
    return json.dumps({"metadata": metadata} if metadata else {}).encode()


def _metadata_json(metadata: Metadata) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in metadata:
        if key == STATUS_DETAILS or key.startswith(("grpc-", "connect-")):
            continue
        out.setdefault(key, []).append(_b64(value) if isinstance(value, bytes) else value)
    return out
