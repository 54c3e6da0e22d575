"""The prediction log: one PredictionRecord per request on a Redis Stream, written by the router."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Any

import redis.asyncio as redis
import structlog

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


class PredictionLogWriter:
    """Appends records without making the caller wait.

    Records queue in memory; one background task drains the queue in batches of up to
    `max_batch` XADDs per pipeline, so a burst costs a few Redis round trips, not one
    connection per record. Past `max_pending` queued records new ones are dropped and
    counted. The stream is capped near `max_len`.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = DEFAULT_STREAM,
        max_len: int = 1_000_000,
        max_pending: int = 10_000,
        max_batch: int = 256,
    ) -> None:
        self._redis = client
        self._stream = stream
        self._max_len = max_len
        self._max_pending = max_pending
        self._max_batch = max_batch
        self._queue: deque[prediction_record_pb2.PredictionRecord] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self.dropped = 0

    def append(self, record: prediction_record_pb2.PredictionRecord) -> None:
        """Queues the record; counts and logs a drop when the queue is full."""
        if len(self._queue) >= self._max_pending:
            self.dropped += 1
            log.warning(
                "prediction_log_dropped", request_id=record.request_id, dropped=self.dropped
            )
            return
        self._queue.append(record)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for record in batch:
                        pipe.xadd(
                            self._stream,
                            dict[Any, Any](encode_record(record)),
                            maxlen=self._max_len,
                            approximate=True,
                        )
                    await pipe.execute()
            except redis.RedisError as exc:
                self.dropped += len(batch)
                log.error("prediction_log_failed", records=len(batch), error=str(exc))

    async def flush(self) -> None:
        """Waits until every queued record has been written (or counted as dropped)."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)
