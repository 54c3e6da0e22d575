"""A client of the router's `PredictStream`: many concurrent `Predict` calls over one stream.

    async with create_channel("router:50051", api_key=key) as channel:
        async with PredictStreamClient(channel) as router:
            answers = await asyncio.gather(*(router.predict(r) for r in requests))

Each `predict` sends its request down the one stream and waits for the answer that carries
its `request_id` (one is made when the request has none), so callers in one process share a
call the way they would share a channel. A request the router refuses raises
`PredictFailed` with the status a unary Predict would have ended with; the stream goes on.
When the stream itself ends (the router stops, the deadline passes), every waiting and every
later `predict` raises the stream's error; open a new client to go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc

from modelserve.router.v1 import router_service_pb2 as pb
from modelserve.router.v1 import router_service_pb2_grpc as pb_grpc
from modelserve_runtime.errors import DecodedError, FieldViolation


class PredictFailed(Exception):
    """The router answered one request of the stream with an error; `error` is what a
    failed unary Predict's status would have said (code, reason, violations, retry delay)."""

    def __init__(self, request_id: str, error: DecodedError) -> None:
        super().__init__(f"{error.code.name}: {error.message} (request {request_id})")
        self.request_id = request_id
        self.error = error


def decode_predict_error(error: pb.PredictError) -> DecodedError:
    """A stream's PredictError in the terms `decode_rpc_error` gives a unary call's."""
    code = next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)
    return DecodedError(
        code=code,
        message=error.message,
        reason=error.reason,
        domain=error.domain,
        metadata=dict(error.metadata),
        violations=[FieldViolation(v.field, v.description) for v in error.field_violations],
        retry_delay_s=(
            error.retry_delay.ToNanoseconds() / 1e9 if error.HasField("retry_delay") else None
        ),
    )


class PredictStreamClient:
    """Predict calls multiplexed over one `RouterService.PredictStream` call (see the
    module's docstring). Open it inside the event loop that uses it."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        """`timeout_s`: the deadline of the whole stream (None: the channel's default);
        `metadata`: sent once, with the call (an API key on a channel without one, say)."""
        self._stub = pb_grpc.RouterServiceStub(channel)
        self._timeout_s = timeout_s
        self._metadata = tuple(metadata)
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[pb.PredictResponse]] = {}
        self._write = asyncio.Lock()
        self._ended: BaseException | None = None

    async def __aenter__(self) -> PredictStreamClient:
        self._call = self._stub.PredictStream(
            timeout=self._timeout_s, metadata=self._metadata or None
        )
        self._reader = asyncio.create_task(self._read(), name="predict-stream-reader")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        """Sends `request` down the stream and returns its answer. Raises PredictFailed
        when the router refuses it, and the stream's AioRpcError when the stream has ended."""
        if self._call is None:
            raise RuntimeError("PredictStreamClient is not open: use it with `async with`")
        if self._ended is not None:
            raise self._ended
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        if request.request_id in self._waiting:
            raise ValueError(f"request_id {request.request_id!r} is already waiting")
        answered: asyncio.Future[pb.PredictResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = answered
        try:
            async with self._write:  # grpc.aio takes one write at a time per call
                await self._call.write(pb.PredictStreamRequest(request=request))
        except BaseException:
            self._waiting.pop(request.request_id, None)
            if self._ended is not None:
                raise self._ended from None
            raise
        return await answered

    async def close(self) -> None:
        """Ends the stream once every answer has come (requests still waiting get theirs)."""
        if self._call is None or self._reader is None:
            return
        if self._ended is None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._reader

    async def _read(self) -> None:
        try:
            async for answer in self._call:
                waiting = self._waiting.pop(answer.request_id, None)
                if waiting is None or waiting.done():
                    continue  # a caller that gave up (cancelled) while its request ran
                if answer.HasField("error"):
                    waiting.set_exception(
                        PredictFailed(answer.request_id, decode_predict_error(answer.error))
                    )
                else:
                    waiting.set_result(answer.response)
        except grpc.aio.AioRpcError as exc:
            self._ended = exc
            raise
        finally:
            ended = self._ended or grpc.aio.AioRpcError(
                grpc.StatusCode.CANCELLED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="the stream has ended",
            )
            self._ended = ended
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(ended)
            self._waiting.clear()
