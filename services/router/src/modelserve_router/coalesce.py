"""Micro-batching on the router's hot path: concurrent model calls for one version become one
batched call, and each caller gets its own rows back.

In Python the per-request client work (building the request, one gRPC call, decoding the
answer) is what limits the router's throughput, not Triton. A `CoalescingRunner` wraps any
`ModelRunner`. Calls for the same version, outputs and input layout queue in a lane; a lane
sends what is waiting as soon as it has a free slot (`max_batches` calls in flight per lane),
so a lone request goes out at once and concurrent ones ride together, as Triton's own
batcher does with no queue delay. `budget_s` > 0 makes the first request of a batch wait up
to that long for company when the lane is idle.

A batch that fails because of an input (INVALID_ARGUMENT, from the runner or from Triton)
is retried request by request, so a bad request fails alone; any other failure (Triton down,
a deadline) is every member's failure. Each caller's deadline still applies: a caller that
gives up leaves the batch, and its rows' answer is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from prometheus_client import Histogram

from modelserve_router.routing import ServedVersion
from modelserve_router.sources import Arrays, ModelRunner
from modelserve_runtime.errors import InvalidArgumentError, ModelServeError

log = structlog.get_logger()

BATCH_REQUESTS = Histogram(
    "modelserve_router_batch_requests",
    "Requests sent to the model together in one coalesced call",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

_LaneKey = tuple[str, str, int, tuple[str, ...], tuple[tuple[str, str, tuple[int, ...]], ...]]


@dataclass(slots=True)
class _Call:
    inputs: Mapping[str, npt.NDArray[Any]]
    rows: int
    future: asyncio.Future[Arrays]


@dataclass(slots=True)
class _Lane:
    version: ServedVersion
    output_names: tuple[str, ...]
    waiting: deque[_Call] = field(default_factory=deque)
    in_flight: int = 0


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
    ) -> None:
        self._inner = inner
        self._max_rows = max_batch_rows
        self._max_batches = max_batches
        self._budget_s = budget_s
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
        key: _LaneKey = (
            version.model_version,
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
            lane = self._lanes[key] = _Lane(version, tuple(output_names))
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        lane.waiting.append(_Call(inputs, rows, future))
        if lane.in_flight < self._max_batches:
            self._dispatch(key, lane)
        return await future

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
            if self._budget_s > 0 and lane.in_flight == 1:
                await asyncio.sleep(self._budget_s)
            while lane.waiting:
                batch = self._take(lane)
                if batch:
                    await self._send(lane, batch)
        finally:
            lane.in_flight -= 1
            if not lane.waiting and lane.in_flight == 0 and self._lanes.get(key) is lane:
                del self._lanes[key]

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
        try:
            outputs = await self._inner.run(lane.version, stacked, lane.output_names)
        except Exception as exc:  # each member gets the failure, or a retry alone
            if _bad_input(exc):
                await asyncio.gather(*(self._one(lane, call) for call in batch))
                return
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        start = 0
        for call in batch:
            end = start + call.rows
            if not call.future.done():
                call.future.set_result({name: array[start:end] for name, array in outputs.items()})
            start = end

    async def _one(self, lane: _Lane, call: _Call) -> None:
        if call.future.done():
            return
        try:
            result = await self._inner.run(lane.version, call.inputs, lane.output_names)
        except Exception as exc:  # the caller's own failure
            if not call.future.done():
                call.future.set_exception(exc)
            return
        if not call.future.done():
            call.future.set_result(result)

    async def close(self) -> None:
        """Waits out the batches in flight."""
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task


def _rows(inputs: Mapping[str, npt.NDArray[Any]]) -> int | None:
    """The number of rows every input shares along its first dimension, or None."""
    counts = {array.shape[0] if array.ndim else -1 for array in inputs.values()}
    if len(counts) != 1:
        return None
    rows = counts.pop()
    return rows if rows >= 1 else None
