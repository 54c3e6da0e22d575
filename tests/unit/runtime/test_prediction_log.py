"""The prediction log contract: stream entry encoding, and the writer against a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs
from support import eventually

from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_cli.stack import RedisProcess
from modelserve_runtime.prediction_log import (
    DEFAULT_STREAM,
    RECORD_FIELD,
    RECORDS,
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

    async def test_linger_lets_a_quiet_spells_records_share_a_pipeline(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Records appended a Redis round trip apart go in one pipeline when the first one
        lingers, and in several when it does not."""
        lingering = PredictionLogWriter(redis_client, stream="lingering", linger_s=0.5)
        eager = PredictionLogWriter(redis_client, stream="eager")
        for i in range(5):
            lingering.append(_record(f"r-{i}"))
            eager.append(_record(f"r-{i}"))
            await redis_client.ping()  # meanwhile the eager writer's XADD goes out
        await lingering.flush()
        await eager.flush()
        assert await redis_client.xlen("lingering") == await redis_client.xlen("eager") == 5
        assert lingering.batches == 1
        assert eager.batches > 1

    async def test_a_record_redis_refuses_is_dropped_and_the_rest_written(
        self, redis_client: aioredis.Redis
    ) -> None:
        """An XADD Redis answers with an error (here the stream's key holds a string) drops
        that batch's records, counted and logged; the writer goes on once the key is fixed."""
        await redis_client.set(DEFAULT_STREAM, "not a stream")
        writer = PredictionLogWriter(redis_client)
        refused_before = RECORDS.labels("refused")._value.get()
        with capture_logs() as logs:
            for i in range(3):
                writer.append(_record(f"r-{i}"))
            await writer.flush()
        assert writer.dropped == 3
        assert RECORDS.labels("refused")._value.get() - refused_before == 3
        drops = [e for e in logs if e["event"] == "prediction_log_dropped"]
        assert drops and drops[0]["reason"] == "refused" and "WRONGTYPE" in drops[0]["error"]
        await redis_client.delete(DEFAULT_STREAM)
        writer.append(_record("r-after"))
        await writer.flush()
        entries = await redis_client.xrange(DEFAULT_STREAM)
        assert [decode_record(fields).request_id for _, fields in entries] == ["r-after"]
        assert writer.written == 1


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    """A redis-server of this test's own, which it may stop and start again on its port."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


class TestRedisOutage:
    async def test_buffered_through_an_outage_up_to_the_buffer_size(
        self, own_redis: RedisProcess
    ) -> None:
        """Records appended while Redis is down wait in memory and reach the stream, in order,
        once it is back; those past the buffer's size are dropped, counted and logged."""
        client = aioredis.Redis.from_url(own_redis.url, socket_connect_timeout=0.5)
        writer = PredictionLogWriter(client, max_pending=50, retry_initial_s=0.01, retry_max_s=0.05)
        try:
            with capture_logs() as logs:
                writer.append(_record("before"))
                await writer.flush()
                assert writer.written == 1
                own_redis.stop()
                for i in range(60):
                    writer.append(_record(f"r-{i:02d}"))
                await eventually(
                    lambda: any(e["event"] == "prediction_log_unavailable" for e in logs),
                    "the writer tried Redis while it was down",
                )
                # Still held after failed attempts: nothing was given up.
                assert writer.buffered == 50
                assert writer.dropped == 10
                own_redis.start()
                await writer.flush()
            # Persistence is off: the restarted server holds only what came after.
            entries = await client.xrange(DEFAULT_STREAM)
            assert [decode_record(fields).request_id for _, fields in entries] == [
                f"r-{i:02d}" for i in range(50)
            ]
            assert writer.buffered == 0 and writer.written == 51
            drops = [e for e in logs if e["event"] == "prediction_log_dropped"]
            assert drops[0]["reason"] == "buffer_full"
            assert drops[0]["request_id"] == "r-50"
            assert any(e["event"] == "prediction_log_recovered" for e in logs)
        finally:
            await client.aclose()

    async def test_a_full_redis_refuses_records_counted_and_taking_them_again_once_freed(
        self, own_redis: RedisProcess
    ) -> None:
        """Redis at its `maxmemory` with `noeviction` answers XADD with OOM: those records are
        dropped, counted and logged (not held: a full Redis does not drain by waiting), the
        router goes on, and records are written again once memory is freed."""
        client = aioredis.Redis.from_url(own_redis.url)
        writer = PredictionLogWriter(client, retry_initial_s=0.01, retry_max_s=0.05)
        try:
            await client.set("ballast", b"x" * 4_000_000)
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", str(used))
            with capture_logs() as logs:
                for i in range(5):
                    writer.append(_record(f"r-{i}"))
                await writer.flush()
                assert writer.dropped == 5 and writer.written == 0 and writer.buffered == 0
                await client.delete("ballast")
                writer.append(_record("r-after"))
                await writer.flush()
            drops = [e for e in logs if e["event"] == "prediction_log_dropped"]
            assert drops and drops[0]["reason"] == "refused" and "maxmemory" in drops[0]["error"]
            entries = await client.xrange(DEFAULT_STREAM)
            assert [decode_record(fields).request_id for _, fields in entries] == ["r-after"]
        finally:
            await client.aclose()

    async def test_close_gives_up_after_its_timeout_and_counts_the_rest(
        self, own_redis: RedisProcess
    ) -> None:
        """A writer closed while Redis is away waits up to its timeout, then counts and logs
        what it still holds as dropped: a stop is bounded and loses nothing silently."""
        client = aioredis.Redis.from_url(own_redis.url, socket_connect_timeout=0.5)
        writer = PredictionLogWriter(client, retry_initial_s=0.01, retry_max_s=0.05)
        shutdown_before = RECORDS.labels("shutdown")._value.get()
        try:
            own_redis.stop()
            with capture_logs() as logs:
                for i in range(5):
                    writer.append(_record(f"r-{i}"))
                await writer.close(timeout_s=0.2)
            assert writer.buffered == 0 and writer.dropped == 5
            assert RECORDS.labels("shutdown")._value.get() - shutdown_before == 5
            drops = [e for e in logs if e["event"] == "prediction_log_dropped"]
            assert [(e["reason"], e["records"]) for e in drops] == [("shutdown", 5)]
        finally:
            await client.aclose()
