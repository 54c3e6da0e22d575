"""The prediction log: one PredictionRecord per request on a Redis Stream, written by the router."""

from __future__ import annotations

import asyncio
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
    """Appends records without making the caller wait; the stream is capped near `max_len`."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = DEFAULT_STREAM,
        max_len: int = 1_000_000,
        max_pending: int = 10_000,
    ) -> None:
        self._redis = client
        self._stream = stream
        self._max_len = max_len
        self._pending: set[asyncio.Task[None]] = set()
        self._max_pending = max_pending
        self.dropped = 0

    def append(self, record: prediction_record_pb2.PredictionRecord) -> None:
        """Schedules the append; counts and logs a drop when too many appends are in flight."""
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            log.warning(
                "prediction_log_dropped", request_id=record.request_id, dropped=self.dropped
            )
            return
        task = asyncio.ensure_future(self._append(record))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _append(self, record: prediction_record_pb2.PredictionRecord) -> None:
        try:
            await self._redis.xadd(
                self._stream, dict[Any, Any](encode_record(record)), maxlen=self._max_len, approximate=True
            )
        except redis.RedisError as exc:
            self.dropped += 1
            log.error("prediction_log_failed", request_id=record.request_id, error=str(exc))

    async def flush(self) -> None:
        """Waits for every scheduled append."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
