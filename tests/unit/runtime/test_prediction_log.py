"""The prediction log contract: stream entry encoding, and the writer against a real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_runtime.prediction_log import (
    DEFAULT_STREAM,
    RECORD_FIELD,
    PredictionLogWriter,
    decode_record,
    encode_record,
)


def _record(request_id: str) -> rec_pb.PredictionRecord:
    return rec_pb.PredictionRecord(
        request_id=request_id,
        endpoint="fraud",
        model_version="models/fraud/versions/1",
        latency_us=1234,
        status=rec_pb.PREDICTION_STATUS_OK,
    )


class TestRecordEncoding:
    def test_round_trip(self) -> None:
        """A record encoded as a stream entry decodes to an equal record."""
        record = _record("r-1")
        assert decode_record(encode_record(record)) == record

    def test_entry_without_record_is_a_value_error(self) -> None:
        """An entry without the `record` field raises ValueError, which readers treat as malformed."""
        with pytest.raises(ValueError, match="record"):
            decode_record({b"other": b"x"})
        assert RECORD_FIELD == b"record"


class TestPredictionLogWriter:
    async def test_appends_reach_the_stream(self, redis_client: aioredis.Redis) -> None:
        """Every appended record is on the stream once flush returns."""
        writer = PredictionLogWriter(redis_client)
        for i in range(20):
            writer.append(_record(f"r-{i}"))
        await writer.flush()
        entries = await redis_client.xrange(DEFAULT_STREAM)
        assert sorted(decode_record(fields).request_id for _, fields in entries) == sorted(
            f"r-{i}" for i in range(20)
        )
        assert writer.dropped == 0

    async def test_full_writer_drops_and_counts(self, redis_client: aioredis.Redis) -> None:
        """Beyond max_pending appends in flight, a record is dropped and counted, never queued."""
        writer = PredictionLogWriter(redis_client, max_pending=2)
        for i in range(3):
            writer.append(_record(f"r-{i}"))
        assert writer.dropped == 1
        await writer.flush()
        assert await redis_client.xlen(DEFAULT_STREAM) == 2

    async def test_burst_larger_than_the_connection_pool_is_written(
        self, redis_client: aioredis.Redis
    ) -> None:
        """A burst of appends bigger than the client's connection pool is written whole."""
        writer = PredictionLogWriter(redis_client)
        for i in range(300):
            writer.append(_record(f"r-{i}"))
        await writer.flush()
        assert writer.dropped == 0
        assert await redis_client.xlen(DEFAULT_STREAM) == 300
