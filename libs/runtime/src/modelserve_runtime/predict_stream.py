"""A client of the router's `PredictStream`: many concurrent `Predict` calls over one stream.

    async with create_channel("router:50051", api_key=key) as channel:
        async with PredictStreamClient(channel) as router:
            answers = await asyncio.gather(*(router.predict(r) for r in requests))

Each `predict` sends its request down the one stream and waits for the answer that carries
its `request_id` (one is made when the request has none), so callers in one process share a
call the way they would share a channel. A request the router refuses raises
`PredictFailed` with the status a unary Predict would have ended with; the stream goes on.
When the stream itself ends (the router restarts, its deadline passes), every `predict`
still waiting raises the stream's error (whether the router ran it is unknown), and the next
`predict` opens a new stream.
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

#: The deadline of one stream; the next `predict` after it passes opens another.
STREAM_TIMEOUT_S = 3600.0


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
        timeout_s: float = STREAM_TIMEOUT_S,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        """`timeout_s`: the deadline of each stream (a channel's own default deadline, made for
        unary calls, would end it early); `metadata`: sent with each stream (an API key on a
        channel without one, say)."""
        self._stub = pb_grpc.RouterServiceStub(channel)
        self._timeout_s = timeout_s
        self._metadata = tuple(metadata)
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[pb.PredictResponse]] = {}
        self._write = asyncio.Lock()
        self._ended: BaseException | None = None
        self._closed = False
        self.streams_opened = 0
        """How many streams this client has opened: 1, plus one after each that ended."""

    @property
    def stream_ended(self) -> bool:
        """Whether the current stream has ended (the next `predict` opens another)."""
        return self._ended is not None

    async def __aenter__(self) -> PredictStreamClient:
        self._open()
        return self

    def _open(self) -> None:
        self._call = self._stub.PredictStream(
            timeout=self._timeout_s, metadata=self._metadata or None
        )
        self._ended = None
        self._waiting = {}
        self._reader = asyncio.create_task(self._read(), name="predict-stream-reader")
        self.streams_opened += 1

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
        if self._call is None or self._closed:
            raise RuntimeError("PredictStreamClient is not open: use it with `async with`")
        if self._ended is not None:
            self._open()
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        if request.request_id in self._waiting:
            raise ValueError(f"request_id {request.request_id!r} is already waiting")
        answered: asyncio.Future[pb.PredictResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = answered
        try:
            async with self._write:  # grpc.aio takes one write at a time per call
                await self._call.write(pb.PredictStreamRequest(request=request))
        except BaseException as exc:
            self._waiting.pop(request.request_id, None)
            if isinstance(exc, asyncio.InvalidStateError) and self._reader is not None:
                # The stream finished before the write (the router refused a new stream, or
                # it ended as we wrote) and its reader has not said why yet: it will, with
                # the stream's own error, as soon as it runs.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._reader)
            if self._ended is not None:
                raise self._ended from None
            raise
        return await answered

    async def close(self) -> None:
        """Ends the stream once every answer has come (requests still waiting get theirs)."""
        self._closed = True
        if self._call is None or self._reader is None:
            return
        if self._ended is None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._reader

    async def _read(self) -> None:
        # This stream's own: a stream opened after this one ends has its own.
        call, pending = self._call, self._waiting
        ended: BaseException = grpc.aio.AioRpcError(
            grpc.StatusCode.CANCELLED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="the stream has ended",
        )
        try:
            async for answer in call:
                waiting = pending.pop(answer.request_id, None)
                if waiting is None or waiting.done():
                    continue  # a caller that gave up (cancelled) while its request ran
                if answer.HasField("error"):
                    waiting.set_exception(
                        PredictFailed(answer.request_id, decode_predict_error(answer.error))
                    )
                else:
                    waiting.set_result(answer.response)
        except grpc.aio.AioRpcError as exc:
            ended = exc  # handed to every caller waiting, and to the next `predict`
        finally:
            if call is self._call:
                self._ended = ended
            for waiting in pending.values():
                if not waiting.done():
                    waiting.set_exception(ended)
            pending.clear()
