"""The prediction log: one PredictionRecord per request on a Redis Stream, written by the router."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

import redis.asyncio as redis
import structlog
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisClusterException

from modelserve.type.v1 import prediction_record_pb2

log = structlog.get_logger()

#: The stream the router appends to and the monitor reads.
DEFAULT_STREAM = "modelserve:predictions"
#: The stream entry field that holds the serialized record.
RECORD_FIELD = b"record"


def encode_record(record: prediction_record_pb2.PredictionRecord) -> dict[bytes, bytes]:
    """The stream entry for a record."""
    return {RECORD_FIELD: record.SerializeToString()}


def decode_record(fields: Mapping[bytes, bytes]) -> prediction_record_pb2.PredictionRecord:
    """The record in a stream entry; ValueError when the entry holds none."""
    raw = fields.get(RECORD_FIELD)
    if raw is None:
        raise ValueError("stream entry has no 'record' field")
    record = prediction_record_pb2.PredictionRecord()
    record.ParseFromString(raw)
    return record


#: Records by what became of them: `written` to the stream, or dropped because the buffer
#: was full (`buffer_full`), Redis refused the XADD (`refused`: a wrong type at the stream's
#: key, out of memory), or the process stopped with records still unwritten (`shutdown`).
RECORDS = Counter(
    "modelserve_prediction_log_records_total",
    "Prediction records written to the stream or dropped, by outcome",
    ["outcome"],
)
#: Records held in memory, waiting for Redis.
BUFFERED = Gauge(
    "modelserve_prediction_log_buffered",
    "Prediction records held in memory, not yet on the stream",
    # With several router processes: one series per live process (its `pid` label).
    multiprocess_mode="liveall",
)


class Record(Protocol):
    """What the writer takes: a PredictionRecord, or an object that makes one when written
    (the router completes an answered request's record off the answer's path)."""

    @property
    def request_id(self) -> str:
        """The request's id, for the log line of a drop."""
        ...

    def SerializeToString(self) -> bytes:
        """The serialized PredictionRecord."""
        ...


class PredictionLogWriter:
    """Appends records without making the caller wait, and holds them while Redis is away.

    Records queue in memory; one background task drains the queue in batches of up to
    `max_batch` XADDs per pipeline, so a burst costs a few Redis round trips, not one per
    record; with `linger_s` the first record after a quiet spell waits that long for others
    to share its pipeline. When Redis cannot be reached (a connection refused or broken, a
    timeout, a failover), the batch stays at the head of the queue and the writer tries
    again after a backoff that doubles from `retry_initial_s` up to `retry_max_s`: an
    outage costs no record as long as fewer than `max_pending` are buffered, and the buffer
    is written in order once Redis answers. Past `max_pending` buffered records new ones
    are dropped. Every drop is counted (`dropped`, and
    `modelserve_prediction_log_records_total` by reason) and logged: the first of a run of
    drops at once, then at most once per `log_every_s` with the count.

    Delivery is at least once: a batch whose reply was lost with a broken connection may
    have reached Redis and is sent again. An XADD that Redis answers with an error (a key
    of the wrong type, out of memory) drops that record rather than retrying it forever.
    The stream is capped near `max_len`.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = DEFAULT_STREAM,
        max_len: int = 1_000_000,
        max_pending: int = 10_000,
        max_batch: int = 256,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
        log_every_s: float = 1.0,
        linger_s: float = 0.0,
    ) -> None:
        self._redis = client
        self._stream = stream
        self._max_len = max_len
        self._max_pending = max_pending
        self._max_batch = max_batch
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._log_every_s = log_every_s
        self._linger_s = linger_s
        self._queue: deque[Record] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._unlogged_drops = 0
        self._last_drop_log = -math.inf
        self.dropped = 0
        """Records dropped so far, for any reason."""
        self.written = 0
        """Records on the stream so far."""
        self.batches = 0
        """Pipelines that reached Redis so far."""

    @property
    def buffered(self) -> int:
        """Records in memory, not yet on the stream."""
        return len(self._queue)

    def append(self, record: Record) -> None:
        """Queues the record; counts and logs a drop when the buffer is full."""
        if len(self._queue) >= self._max_pending:
            self._drop(1, "buffer_full", request_id=record.request_id)
            return
        self._queue.append(record)
        BUFFERED.inc()
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(
                self._drain(), name="prediction-log-drain"
            )

    def _drop(self, count: int, reason: str, **details: Any) -> None:
        self.dropped += count
        RECORDS.labels(reason).inc(count)
        self._unlogged_drops += count
        now = time.monotonic()
        if now - self._last_drop_log >= self._log_every_s:
            log.warning(
                "prediction_log_dropped",
                reason=reason,
                records=self._unlogged_drops,
                dropped=self.dropped,
                buffered=len(self._queue),
                **details,
            )
            self._last_drop_log = now
            self._unlogged_drops = 0

    async def _drain(self) -> None:
        if self._linger_s > 0 and len(self._queue) < self._max_batch:
            # The first record after a quiet spell waits for company: one pipeline per
            # record costs the router more CPU than its request's XADD is worth.
            await asyncio.sleep(self._linger_s)
        delay_s = self._retry_initial_s
        failing_since: float | None = None
        while self._queue:
            count = min(self._max_batch, len(self._queue))
            batch = [self._queue[i] for i in range(count)]
            try:
                replies = await self._send(batch)
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                # Kept at the head of the queue: the next attempt sends the same records. An
                # XADD Redis refuses comes back as its reply instead (see `_send`), so what
                # lands here is Redis away, or a failover: worth waiting out.
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "prediction_log_unavailable",
                        error=str(exc) or type(exc).__name__,
                        buffered=len(self._queue),
                        retry_in_s=delay_s,
                    )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, self._retry_max_s)
                continue
            self.batches += 1
            for _ in range(count):
                self._queue.popleft()
            BUFFERED.dec(count)
            refused = [
                (r, reply)
                for r, reply in zip(batch, replies, strict=True)
                if isinstance(reply, Exception)
            ]
            self.written += count - len(refused)
            RECORDS.labels("written").inc(count - len(refused))
            if refused:
                self._drop(
                    len(refused),
                    "refused",
                    request_id=refused[0][0].request_id,
                    error=str(refused[0][1]),
                )
            if failing_since is not None:
                log.info(
                    "prediction_log_recovered",
                    outage_s=round(time.monotonic() - failing_since, 3),
                    buffered=len(self._queue),
                )
                failing_since = None
                delay_s = self._retry_initial_s

    async def _send(self, batch: list[Record]) -> list[object]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for record in batch:
                # XADD by hand: `pipe.xadd` spends more of the router's CPU checking its
                # keyword arguments than the command costs to pack.
                pipe.execute_command(
                    "XADD",
                    self._stream,
                    "MAXLEN",
                    "~",
                    self._max_len,
                    "*",
                    RECORD_FIELD,
                    record.SerializeToString(),
                )
            replies: list[object] = await pipe.execute(raise_on_error=False)
        return replies

    async def flush(self) -> None:
        """Waits until every queued record has been written (or counted as dropped); while
        Redis is away that is until it is back (see `close`)."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)

    async def close(self, timeout_s: float) -> None:
        """Flushes for up to `timeout_s`, then stops the writer: records still buffered then
        (Redis away) are counted and logged as dropped."""
        drainer = self._drainer
        if drainer is not None and not drainer.done():
            await asyncio.wait([drainer], timeout=timeout_s)
            if not drainer.done():
                drainer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drainer
        if self._queue:
            left = len(self._queue)
            self._queue.clear()
            BUFFERED.dec(left)
            self._last_drop_log = -math.inf
            self._drop(left, "shutdown", waited_s=timeout_s)
