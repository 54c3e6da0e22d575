"""PredictionLogConsumer against a real Redis stream, driven by hand (no background task)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.consumer import PredictionLogConsumer
from modelserve_monitor.stats import EndpointStats
from modelserve_runtime.prediction_log import DEFAULT_STREAM, RECORD_FIELD, encode_record

GROUP = "monitor"
#: A consumer that never finishes fails the test instead of hanging it.
DEADLINE_S = 10.0


def _record(request_id: str) -> rec_pb.PredictionRecord:
    return rec_pb.PredictionRecord(
        request_id=request_id,
        endpoint="fraud",
        model_version="models/fraud/versions/1",
        latency_us=1000,
        status=rec_pb.PREDICTION_STATUS_OK,
    )


def _consumer(
    client: aioredis.Redis, stats: EndpointStats, name: str = "c1", batch_size: int = 4
) -> PredictionLogConsumer:
    return PredictionLogConsumer(
        client,
        stats,
        stream=DEFAULT_STREAM,
        group=GROUP,
        consumer=name,
        block_ms=100,
        batch_size=batch_size,
    )


def _stats() -> EndpointStats:
    return EndpointStats(max_latency_samples=100, max_remembered_records=1000)


class TestPredictionLogConsumer:
    async def test_process_available_reads_everything_in_batches(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Without a background task, process_available aggregates and acks every waiting entry."""
        stats = _stats()
        consumer = _consumer(redis_client, stats, batch_size=4)
        await consumer.ensure_group()
        for i in range(10):
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"r{i}")))
        async with asyncio.timeout(DEADLINE_S):
            assert await consumer.process_available() == 10
            assert await consumer.process_available() == 0
        assert stats.summary("fraud").request_count == 10
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 0

    async def test_ensure_group_twice_is_harmless(self, redis_client: aioredis.Redis) -> None:
        """Creating the group when it exists (BUSYGROUP) is not an error."""
        consumer = _consumer(redis_client, _stats())
        await consumer.ensure_group()
        await consumer.ensure_group()
        groups = await redis_client.xinfo_groups(DEFAULT_STREAM)
        assert [g["name"] for g in groups] == [GROUP.encode()]

    async def test_unacknowledged_entries_are_read_again_and_counted_once(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Entries a crashed consumer read but never acked are re-read by its successor, once."""
        await _consumer(redis_client, _stats()).ensure_group()
        for i in range(3):
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"r{i}")))
        # A consumer named c1 reads the entries, then dies before it acknowledges them.
        await redis_client.xreadgroup(GROUP, "c1", {DEFAULT_STREAM: ">"}, count=10)
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 3
        stats = _stats()
        successor = _consumer(redis_client, stats, name="c1")
        async with asyncio.timeout(DEADLINE_S):
            assert await successor.process_available() == 3
        assert stats.summary("fraud").request_count == 3
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 0

    async def test_malformed_entry_is_acknowledged_and_counted(
        self, redis_client: aioredis.Redis
    ) -> None:
        """An entry that holds no record is counted as malformed and acked, not retried."""
        stats = _stats()
        consumer = _consumer(redis_client, stats)
        await consumer.ensure_group()
        await redis_client.xadd(DEFAULT_STREAM, {RECORD_FIELD: b"\x0a\xff\xff\xff"})
        await redis_client.xadd(DEFAULT_STREAM, encode_record(_record("ok")))
        async with asyncio.timeout(DEADLINE_S):
            assert await consumer.process_available() == 2
        assert consumer.malformed == 1
        assert stats.summary("fraud").request_count == 1
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 0

    async def test_drain_returns_once_everything_is_acknowledged(
        self, redis_client: aioredis.Redis
    ) -> None:
        """drain waits by asking until every entry appended before it is aggregated and acked."""
        stats = _stats()
        consumer = _consumer(redis_client, stats, batch_size=3)
        await consumer.ensure_group()
        await consumer.drain(DEADLINE_S)
        for i in range(8):
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"r{i}")))
        consumer.start()
        try:
            await consumer.drain(DEADLINE_S)
            assert stats.summary("fraud").request_count == 8
        finally:
            await consumer.close()
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 0
