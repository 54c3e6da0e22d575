"""Coalescing in front of Triton: requests for one version that arrive while its calls are busy
wait, and go to Triton together as one batched call; each caller gets its own rows back.

Each call into Triton costs this process far more CPU than the rows it carries (the gRPC call,
its span, Triton's own per-request work), so under load one call for many requests is what
lets a Python front door keep up. A request that finds fewer than `limit` calls of its lane
in flight goes at once, alone: at low load nothing waits and nothing is joined.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from tritonclient.grpc import service_pb2

from modelserve_inference.oip_requests import CheckedRequest
from modelserve_runtime.tracing import record_carried
from modelserve_triton.runner import TritonError

#: Statuses of a failed batched call that say something about one of its requests (its input,
#: or the model on it), so each request is run alone to find whose; the others (Triton down,
#: out of time, queue full) would fail each request alone too.
_PER_REQUEST = frozenset(
    {"StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", "StatusCode.UNKNOWN"}
)


class TritonInfer(Protocol):
    """Sends one ModelInferRequest to Triton as it is (`TritonRunner.infer_request`)."""

    async def infer_request(
        self,
        request: Any,
        *,
        timeout_s: float,
        context: otel_context.Context | None = None,
        links: Sequence[trace.Link] = (),
    ) -> Any: ...


@dataclass(slots=True)
class _Waiting:
    """A request waiting for a call of its lane."""

    request: Any
    checked: CheckedRequest
    deadline: float
    """Loop time by which the caller needs the answer."""
    span: trace.SpanContext
    """The caller's span: the batched call's parent, or one of its links."""
    future: asyncio.Future[Any]
    queued_ns: int = 0
    """When it started waiting, where its caller's span records (else 0: nothing to trace)."""
    carried_by: trace.SpanContext | None = None
    """The first member's span, for the other members of a batched call."""
    batch_requests: int = 0


class _Lane:
    """The calls of one lane in flight and the requests waiting for one."""

    __slots__ = ("in_flight", "waiting")

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting: deque[_Waiting] = deque()


class Coalescer:
    """Sends requests to Triton, at most `limit` calls per lane at a time when asked to, the
    requests that wait meanwhile joined into batches of up to `max_rows` rows."""

    def __init__(self, triton: TritonInfer, *, tracer: trace.Tracer | None = None) -> None:
        """`tracer` makes the `inference.coalesced` spans (the service's own by default)."""
        self._triton = triton
        self._tracer = tracer
        self._lanes: dict[tuple[object, ...], _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def infer(
        self,
        request: Any,
        checked: CheckedRequest,
        *,
        timeout_s: float,
        limit: int,
        max_rows: int,
    ) -> Any:
        """Triton's answer to `request` (checked, ready for Triton), within `timeout_s`.

        With `limit` 0, or when the request cannot be joined with others, it goes at once.
        Raises TritonError as Triton's call would, and a DEADLINE_EXCEEDED one when the time
        runs out while the request waits. A coalesced call is given the longest time left
        among its requests (a gRPC caller's own deadline still ends its call on time).
        """
        if not limit or not checked.batchable:
            return await self._triton.infer_request(request, timeout_s=timeout_s)
        key = checked.lane
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if lane.in_flight < limit:
            # Nothing waits in a lane with a free call (see _drain): go now, alone.
            lane.in_flight += 1
            try:
                return await self._triton.infer_request(request, timeout_s=timeout_s)
            finally:
                self._finished(key, lane, limit, max_rows)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        current = trace.get_current_span()
        waiting = _Waiting(
            request, checked, loop.time() + timeout_s, current.get_span_context(), future
        )
        if current.is_recording():
            waiting.queued_ns = time.time_ns()
        lane.waiting.append(waiting)
        try:
            return await future
        finally:
            if waiting.carried_by is not None:
                record_carried(
                    "inference.coalesced",
                    waiting.queued_ns,
                    waiting.carried_by,
                    waiting.batch_requests,
                    with_tracer=self._tracer,
                )

    async def close(self) -> None:
        """Cancels the batched calls in flight; their callers are cancelled too."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _finished(self, key: tuple[object, ...], lane: _Lane, limit: int, max_rows: int) -> None:
        lane.in_flight -= 1
        if lane.waiting:
            self._drain(lane, limit, max_rows, key)
        elif not lane.in_flight and self._lanes.get(key) is lane:
            del self._lanes[key]

    def _drain(self, lane: _Lane, limit: int, max_rows: int, key: tuple[object, ...]) -> None:
        """Sends what waits, in order, in batches of up to `max_rows` rows, while the lane has
        free calls; a request whose deadline has passed is answered so without a call."""
        now = asyncio.get_running_loop().time()
        while lane.waiting and lane.in_flight < limit:
            batch: list[_Waiting] = []
            rows = 0
            while lane.waiting:
                waiting = lane.waiting[0]
                if batch and rows + waiting.checked.rows > max_rows:
                    break
                lane.waiting.popleft()
                if waiting.future.done():  # its caller is gone
                    continue
                if waiting.deadline <= now:
                    waiting.future.set_exception(_late())
                    continue
                batch.append(waiting)
                rows += waiting.checked.rows
            if batch:
                lane.in_flight += 1
                # A context of its own: not that of the caller whose call just ended.
                task = asyncio.get_running_loop().create_task(
                    self._send(batch, key, lane, limit, max_rows), context=contextvars.Context()
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(
        self,
        batch: list[_Waiting],
        key: tuple[object, ...],
        lane: _Lane,
        limit: int,
        max_rows: int,
    ) -> None:
        try:
            await self._answer(batch)
        except Exception as exc:  # whatever went wrong, each caller hears of it
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
        finally:
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.cancel()
            self._finished(key, lane, limit, max_rows)

    async def _answer(self, batch: list[_Waiting]) -> None:
        """One call for the whole batch; when Triton refuses it for something one of its
        requests may have caused, each request alone, so only that one gets the error."""
        loop = asyncio.get_running_loop()
        first = batch[0]
        parent = trace.set_span_in_context(trace.NonRecordingSpan(first.span))
        timeout_s = max(w.deadline for w in batch) - loop.time()
        try:
            if len(batch) == 1:
                answers = [
                    await self._triton.infer_request(
                        first.request, timeout_s=timeout_s, context=parent
                    )
                ]
            else:
                for waiting in batch[1:]:
                    if waiting.queued_ns and first.span.is_valid:
                        waiting.carried_by = first.span
                        waiting.batch_requests = len(batch)
                parts = [(w.request, w.checked) for w in batch]
                answer = await self._triton.infer_request(
                    join_requests(parts),
                    timeout_s=timeout_s,
                    context=parent,
                    links=[trace.Link(w.span) for w in batch[1:] if w.span.is_valid],
                )
                answers = split_response(answer, parts)
        except TritonError as exc:
            if len(batch) > 1 and exc.status in _PER_REQUEST:
                for waiting in batch:
                    waiting.carried_by = None  # each runs alone, in its own trace
                await asyncio.gather(*(self._answer([w]) for w in batch))
                return
            for waiting in batch:
                if not waiting.future.done():
                    # One exception per caller: each one raises and chains its own.
                    waiting.future.set_exception(TritonError(exc.message, exc.status))
            return
        for waiting, response in zip(batch, answers, strict=True):
            if not waiting.future.done():
                waiting.future.set_result(response)


def _late() -> TritonError:
    return TritonError(
        "the deadline passed before triton answered", status="StatusCode.DEADLINE_EXCEEDED"
    )


def join_requests(parts: Sequence[tuple[Any, CheckedRequest]]) -> Any:
    """One ModelInferRequest holding the rows of every part in turn (parts of one lane: the
    same version, outputs and inner dimensions), its inputs in the signature's order."""
    first, checked = parts[0]
    rows = sum(c.rows for _, c in parts)
    joined = service_pb2.ModelInferRequest(
        model_name=first.model_name, model_version=first.model_version
    )
    by_name = {t.name: t for t in first.inputs}
    for index, name in enumerate(checked.names):
        tensor = by_name[name]
        joined.inputs.add(name=name, datatype=tensor.datatype, shape=[rows, *tensor.shape[1:]])
        joined.raw_input_contents.append(b"".join(c.raws[index] for _, c in parts))
    for output in first.outputs:
        joined.outputs.add(name=output.name)
    return joined


def split_response(answer: Any, parts: Sequence[tuple[Any, CheckedRequest]]) -> list[Any]:
    """Triton's answer to `join_requests(parts)` cut back into one answer per part, each with
    its own rows of every output and its own request id."""
    total = sum(c.rows for _, c in parts)
    outputs = list(answer.outputs)
    raw_contents = list(answer.raw_output_contents)
    if len(raw_contents) != len(outputs):
        raise TritonError(
            f"triton answered {len(outputs)} outputs with {len(raw_contents)} raw contents"
        )
    row_bytes = []
    for output, raw in zip(outputs, raw_contents, strict=True):
        if not output.shape or output.shape[0] != total or len(raw) % total:
            raise TritonError(
                f"triton answered output {output.name!r} of a {total}-row batch with shape"
                f" {list(output.shape)} and {len(raw)} bytes"
            )
        row_bytes.append(len(raw) // total)
    answers = []
    start = 0
    for request, checked in parts:
        rows = checked.rows
        response = service_pb2.ModelInferResponse(
            model_name=answer.model_name, model_version=answer.model_version, id=request.id
        )
        for output, raw, size in zip(outputs, raw_contents, row_bytes, strict=True):
            response.outputs.add(
                name=output.name, datatype=output.datatype, shape=[rows, *output.shape[1:]]
            )
            response.raw_output_contents.append(raw[start * size : (start + rows) * size])
        answers.append(response)
        start += rows
    return answers
