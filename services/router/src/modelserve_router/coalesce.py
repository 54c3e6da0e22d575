"""Micro-batching on the router's hot path: concurrent model calls for one version become one
batched call, and each caller gets its own rows back.

In Python the per-request client work (building the request, one call, decoding the
answer) is what limits the router's throughput, not Triton. A `CoalescingRunner` wraps any
`ModelRunner`. Calls for the same version, outputs and input layout queue in a lane; a lane
sends what is waiting as soon as it has a free slot (`max_batches` calls in flight per lane),
so a lone request goes out at once and concurrent ones ride together, as Triton's own
batcher does with no queue delay.

`budget_s` > 0 (or an endpoint's own budget) lets the first request of a batch, when its lane
is idle, wait for company, but only as much as the router lately had: `Upstream` counts the
requests each version has in the router, and the held request goes as soon as as many wait
in the lane as the version's recent peak, or the batch is full, or the budget has passed.
A request alone in the router never waits; under load the requests in flight meet in one
call. An endpoint's own budget (set by the predictor in `ENDPOINT_BUDGET` around its model
call) holds for its requests only: requests of endpoints with different budgets ride in lanes
of their own, even for one version, and each lane counts its own company. On this project's 2-core machine, with Triton's python backend, a 5 ms budget took the
router from about 2,000 to 3,000-3,500 requests/s at concurrency 64 (loadtests/RESULTS.md).

A batch that fails because of an input (INVALID_ARGUMENT, from the runner or from Triton)
is retried request by request, so a bad request fails alone; any other failure (Triton down,
a deadline) is every member's failure. Each caller's deadline still applies: a caller that
gives up leaves the batch, and its rows' answer is dropped. So does `timeout_s`, counted from
when a request joins its lane: a request queued behind a call that hangs fails after it
(UNAVAILABLE, UPSTREAM_TIMEOUT, as the call itself would) instead of waiting for that call's
timeout and then its own, so the router's fallbacks still have time to answer. Shadow copies
(`WAIT_BOUNDED` off) wait within their own deadline instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Histogram

from modelserve_router.routing import ServedVersion
from modelserve_router.sources import BATCH_LINKS, Arrays, ModelRunner
from modelserve_runtime.errors import InvalidArgumentError, ModelServeError, UnavailableError
from modelserve_runtime.tracing import record_carried

log = structlog.get_logger()

BATCH_REQUESTS = Histogram(
    "modelserve_router_batch_requests",
    "Requests sent to the model together in one coalesced call",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

ENDPOINT_BUDGET: ContextVar[float | None] = ContextVar("modelserve_coalesce_budget_s", default=None)
"""The micro-batching budget (seconds) of the endpoint whose request is calling the model, when
it has one of its own; None: the runner's `budget_s`."""

WAIT_BOUNDED: ContextVar[bool] = ContextVar("modelserve_coalesce_wait_bounded", default=True)
"""Whether the runner's `timeout_s` bounds the calling request's wait from when it queues; a
shadow copy, which has a deadline of its own for the whole copy, sets it False."""

_LaneKey = tuple[
    str, float | None, str, int, tuple[str, ...], tuple[tuple[str, str, tuple[int, ...]], ...]
]
_Group = tuple[str, float | None]
"""Requests that may ride together: (model version, their endpoint's own budget or None)."""


class Upstream:
    """How many requests each model version has in the router: what tells a lane with a budget
    how much company to wait for.

    The predictor `enter`s a request when it starts building the version's input, `leave`s it
    when it calls the model (or gives up before; a held lane looks again then), and marks it
    `done` when the call is over; each with its endpoint's own budget (None when it has none),
    so that requests of endpoints with different budgets are counted apart.
    `expected` is the most requests the version had in the router at once lately (this
    window of `WINDOW_S` and the one before): 1 for a lone caller, about the callers'
    concurrency under load.
    """

    WINDOW_S = 0.25

    def __init__(self) -> None:
        self._active: dict[_Group, int] = {}
        # Per group: (window start, peak in it, peak in the window before).
        self._peaks: dict[_Group, tuple[float, int, int]] = {}
        self._waiters: dict[_Group, list[asyncio.Future[None]]] = {}

    def expected(self, model_version: str, budget_s: float | None = None) -> int:
        """The most requests the version had in the router at once lately (at least 1), among
        those whose endpoint has the budget `budget_s` of its own (None: none)."""
        group = (model_version, budget_s)
        peaks = self._peaks.get(group)
        if peaks is None:
            return 1
        start, peak, before = peaks
        now = time.monotonic()
        if now - start >= 2 * self.WINDOW_S:
            return max(1, self._active.get(group, 0))
        if now - start >= self.WINDOW_S:
            return max(1, peak)
        return max(1, peak, before)

    def enter(self, model_version: str, budget_s: float | None = None) -> None:
        """A request for the version starts building its input; `budget_s`: its endpoint's
        own micro-batching budget, if any."""
        group = (model_version, budget_s)
        active = self._active[group] = self._active.get(group, 0) + 1
        now = time.monotonic()
        start, peak, before = self._peaks.get(group, (now, 0, 0))
        if now - start >= self.WINDOW_S:
            before = peak if now - start < 2 * self.WINDOW_S else 0
            start, peak = now, 0
        self._peaks[group] = (start, max(peak, active), before)

    def leave(self, model_version: str, budget_s: float | None = None) -> None:
        self.wake(model_version, budget_s)

    def wake(self, model_version: str, budget_s: float | None = None) -> None:
        """Wakes whatever waits in `changed` for the version and budget (a request left, or
        joined a lane)."""
        for waiter in self._waiters.pop((model_version, budget_s), ()):
            if not waiter.done():
                waiter.set_result(None)

    def done(self, model_version: str, budget_s: float | None = None) -> None:
        group = (model_version, budget_s)
        left = self._active.get(group, 0) - 1
        if left > 0:
            self._active[group] = left
        else:
            self._active.pop(group, None)

    async def changed(
        self, model_version: str, timeout_s: float, budget_s: float | None = None
    ) -> None:
        """Returns when a request of the version and budget leaves (reaches its model call or
        gives up) or joins a lane, or after `timeout_s`."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault((model_version, budget_s), []).append(waiter)
        timer = loop.call_later(timeout_s, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass(slots=True)
class _Call:
    inputs: Mapping[str, npt.NDArray[Any]]
    rows: int
    future: asyncio.Future[Arrays]
    span: trace.SpanContext
    """The calling request's span: a batch's call runs under its first member's."""
    queued_ns: int = 0
    """When it joined its lane, where its own span records (else 0: nothing to trace)."""
    carried_by: trace.SpanContext | None = None
    """The first member's span, for the other members of a coalesced call."""
    batch_requests: int = 0


@dataclass(slots=True)
class _Lane:
    version: ServedVersion
    budget_s: float | None
    """Its requests' endpoint budget (None: the runner's)."""
    output_names: tuple[str, ...]
    waiting: deque[_Call] = field(default_factory=deque)
    in_flight: int = 0
    gathering: bool = False
    """Whether its first call is held for company (see `CoalescingRunner._gather`)."""


def _bad_input(exc: BaseException) -> bool:
    """Whether a failure is about an input: the batch is retried request by request."""
    if isinstance(exc, InvalidArgumentError):
        return True
    return (
        isinstance(exc, ModelServeError) and exc.metadata.get("upstream_code") == "INVALID_ARGUMENT"
    )


class CoalescingRunner:
    """A ModelRunner that merges concurrent calls for one version into batched calls."""

    def __init__(
        self,
        inner: ModelRunner,
        *,
        max_batch_rows: int = 256,
        max_batches: int = 1,
        budget_s: float = 0.0,
        upstream: Upstream | None = None,
        timeout_s: float | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        """`timeout_s`: the longest a request waits for its answer, queued and sent (None:
        only the inner runner's own timeout, from the send, bounds it). `tracer` makes the
        `router.coalesced` spans (the service's own by default)."""
        self._inner = inner
        self._tracer = tracer
        self._timeout_s = timeout_s
        self._max_rows = max_batch_rows
        self._max_batches = max_batches
        self._budget_s = budget_s
        self.upstream = upstream or Upstream()
        """What an idle lane with a budget waits for; the predictor keeps it."""
        self._lanes: dict[_LaneKey, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(
        self,
        version: ServedVersion,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
    ) -> Arrays:
        rows = _rows(inputs)
        if rows is None or rows > self._max_rows:
            # Inputs without one shared row count cannot be stacked; a call larger than a
            # batch goes alone.
            return await self._inner.run(version, inputs, output_names)
        budget_s = ENDPOINT_BUDGET.get()
        key: _LaneKey = (
            version.model_version,
            budget_s,
            version.triton_endpoint,
            version.triton_model_version,
            tuple(output_names),
            tuple(
                (name, array.dtype.str, tuple(array.shape[1:]))
                for name, array in sorted(inputs.items())
            ),
        )
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(version, budget_s, tuple(output_names))
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        current = trace.get_current_span()
        call = _Call(inputs, rows, future, current.get_span_context())
        if current.is_recording():
            call.queued_ns = time.time_ns()
        lane.waiting.append(call)
        if lane.gathering:
            # Company for the held call: it rides along, and the holder counts again.
            self.upstream.wake(version.model_version, budget_s)
        elif lane.in_flight < self._max_batches:
            self._dispatch(key, lane)
        timer = (
            None
            if self._timeout_s is None or not WAIT_BOUNDED.get()
            else asyncio.get_running_loop().call_later(
                self._timeout_s, _expire, future, version.model_version, self._timeout_s
            )
        )
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            if call.carried_by is not None:
                record_carried(
                    "router.coalesced",
                    call.queued_ns,
                    call.carried_by,
                    call.batch_requests,
                    with_tracer=self._tracer,
                )

    def waiting(self, model_version: str) -> int:
        """Requests for the version queued behind its calls in flight."""
        return sum(
            len(lane.waiting)
            for lane in self._lanes.values()
            if lane.version.model_version == model_version
        )

    def _dispatch(self, key: _LaneKey, lane: _Lane) -> None:
        lane.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._drain(key, lane))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, key: _LaneKey, lane: _Lane) -> None:
        try:
            budget_s = self._budget_s if lane.budget_s is None else lane.budget_s
            if budget_s > 0 and lane.in_flight == 1:
                lane.gathering = True
                try:
                    await self._gather(lane, budget_s)
                finally:
                    lane.gathering = False
            while lane.waiting:
                batch = self._take(lane)
                if batch:
                    await self._send(lane, batch)
        finally:
            lane.in_flight -= 1
            if not lane.waiting and lane.in_flight == 0 and self._lanes.get(key) is lane:
                del self._lanes[key]

    async def _gather(self, lane: _Lane, budget_s: float) -> None:
        """Holds an idle lane's first call until as many requests wait as the version lately
        had in the router at once, or the batch is full, or the budget is spent."""
        loop = asyncio.get_running_loop()
        until = loop.time() + budget_s
        model_version = lane.version.model_version
        target = min(self.upstream.expected(model_version, lane.budget_s), self._max_rows)
        while len(lane.waiting) < target and sum(c.rows for c in lane.waiting) < self._max_rows:
            left = until - loop.time()
            if left <= 0:
                return
            await self.upstream.changed(model_version, left, lane.budget_s)

    def _take(self, lane: _Lane) -> list[_Call]:
        batch: list[_Call] = []
        rows = 0
        while lane.waiting:
            call = lane.waiting[0]
            if call.future.done():  # the caller gave up
                lane.waiting.popleft()
                continue
            if batch and rows + call.rows > self._max_rows:
                break
            batch.append(lane.waiting.popleft())
            rows += call.rows
        return batch

    async def _send(self, lane: _Lane, batch: list[_Call]) -> None:
        BATCH_REQUESTS.observe(len(batch))
        if len(batch) == 1:
            await self._one(lane, batch[0])
            return
        names = list(batch[0].inputs)
        stacked = {name: np.concatenate([c.inputs[name] for c in batch]) for name in names}
        # The call belongs to its first member's trace (not to whichever request's task
        # drains the lane) and links to the others', as inference's own coalescer does.
        parent = otel_context.attach(
            trace.set_span_in_context(trace.NonRecordingSpan(batch[0].span))
        )
        links = BATCH_LINKS.set(tuple(trace.Link(c.span) for c in batch[1:] if c.span.is_valid))
        for call in batch[1:]:
            if call.queued_ns and batch[0].span.is_valid:
                call.carried_by = batch[0].span
                call.batch_requests = len(batch)
        try:
            outputs = await self._inner.run(lane.version, stacked, lane.output_names)
        except Exception as exc:  # each member gets the failure, or a retry alone
            if _bad_input(exc):
                for call in batch:
                    call.carried_by = None  # each runs alone, in its own trace
                await asyncio.gather(*(self._one(lane, call) for call in batch))
                return
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        finally:
            BATCH_LINKS.reset(links)
            otel_context.detach(parent)
        start = 0
        for call in batch:
            end = start + call.rows
            if not call.future.done():
                call.future.set_result({name: array[start:end] for name, array in outputs.items()})
            start = end

    async def _one(self, lane: _Lane, call: _Call) -> None:
        if call.future.done():
            return
        parent = otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(call.span)))
        try:
            result = await self._inner.run(lane.version, call.inputs, lane.output_names)
        except Exception as exc:  # the caller's own failure
            if not call.future.done():
                call.future.set_exception(exc)
            return
        finally:
            otel_context.detach(parent)
        if not call.future.done():
            call.future.set_result(result)

    async def close(self) -> None:
        """Waits out the batches in flight."""
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task


def _expire(future: asyncio.Future[Arrays], model_version: str, timeout_s: float) -> None:
    """Fails a request still waiting for its answer after `timeout_s`; its lane skips it, or
    drops its rows of the batch in flight."""
    if not future.done():
        future.set_exception(
            UnavailableError(
                f"{model_version} did not answer within {timeout_s:.3f}s",
                reason="UPSTREAM_TIMEOUT",
                metadata={
                    "model_version": model_version,
                    "upstream_code": "DEADLINE_EXCEEDED",
                    "timeout_s": f"{timeout_s:.3f}",
                },
            )
        )


def _rows(inputs: Mapping[str, npt.NDArray[Any]]) -> int | None:
    """The number of rows every input shares along its first dimension, or None."""
    counts = {array.shape[0] if array.ndim else -1 for array in inputs.values()}
    if len(counts) != 1:
        return None
    rows = counts.pop()
    return rows if rows >= 1 else None
