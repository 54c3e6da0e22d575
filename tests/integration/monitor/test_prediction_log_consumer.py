"""PredictionLogConsumer against a real Redis stream, driven by hand (no background task)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from support import eventually

from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.consumer import PredictionLogConsumer
from modelserve_monitor.monitor import Monitor
from modelserve_monitor.store import AggregateStore, StoreTtls, Window
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


def _store(client: aioredis.Redis) -> AggregateStore:
    return AggregateStore(client, ttls=StoreTtls(seen_s=600, prediction_s=600), baseline_records=10)


def _consumer(
    client: aioredis.Redis,
    name: str = "c1",
    batch_size: int = 4,
    claim_min_idle_ms: int = 60_000,
) -> PredictionLogConsumer:
    return PredictionLogConsumer(
        client,
        _store(client),
        stream=DEFAULT_STREAM,
        group=GROUP,
        consumer=name,
        block_ms=100,
        batch_size=batch_size,
        claim_min_idle_ms=claim_min_idle_ms,
    )


async def _pending_idle_for(client: aioredis.Redis, idle_ms: int) -> None:
    """Returns once every pending entry of the group has been idle `idle_ms`, asking Redis."""

    async def all_idle() -> bool:
        pending = await client.xpending_range(DEFAULT_STREAM, GROUP, "-", "+", 100)
        return all(entry["time_since_delivered"] >= idle_ms for entry in pending)

    await eventually(
        all_idle, f"pending entries idle {idle_ms} ms", within_s=DEADLINE_S, every_s=0.001
    )


async def _count(client: aioredis.Redis) -> int:
    summary = await Monitor(_store(client)).endpoint_stats("fraud", Window.TOTAL)
    return summary.request_count


class TestPredictionLogConsumer:
    async def test_process_available_reads_everything_in_batches(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Without a background task, process_available aggregates and acks every waiting entry."""
        consumer = _consumer(redis_client, batch_size=4)
        await consumer.ensure_group()
        for i in range(10):
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"r{i}")))
        async with asyncio.timeout(DEADLINE_S):
            assert await consumer.process_available() == 10
            assert await consumer.process_available() == 0
        assert await _count(redis_client) == 10
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 0

    async def test_ensure_group_twice_is_harmless(self, redis_client: aioredis.Redis) -> None:
        """Creating the group when it exists (BUSYGROUP) is not an error."""
        consumer = _consumer(redis_client)
        await consumer.ensure_group()
        await consumer.ensure_group()
        groups = await redis_client.xinfo_groups(DEFAULT_STREAM)
        assert [g["name"] for g in groups] == [GROUP.encode()]

    async def test_unacknowledged_entries_are_read_again_and_counted_once(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Entries a crashed consumer read but never acked are re-read by its successor, once."""
        await _consumer(redis_client).ensure_group()
        for i in range(3):
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"r{i}")))
        # A consumer named c1 reads the entries, then dies before it acknowledges them.
        await redis_client.xreadgroup(GROUP, "c1", {DEFAULT_STREAM: ">"}, count=10)
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 3
        successor = _consumer(redis_client, name="c1")
        async with asyncio.timeout(DEADLINE_S):
            assert await successor.process_available() == 3
        assert await _count(redis_client) == 3
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 0

    async def test_malformed_entry_is_acknowledged_and_counted(
        self, redis_client: aioredis.Redis
    ) -> None:
        """An entry that holds no record is counted as malformed and acked, not retried."""
        consumer = _consumer(redis_client)
        await consumer.ensure_group()
        await redis_client.xadd(DEFAULT_STREAM, {RECORD_FIELD: b"\x0a\xff\xff\xff"})
        await redis_client.xadd(DEFAULT_STREAM, encode_record(_record("ok")))
        async with asyncio.timeout(DEADLINE_S):
            assert await consumer.process_available() == 2
        assert consumer.malformed == 1
        assert await _count(redis_client) == 1
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 0

    async def test_drain_returns_once_everything_is_acknowledged(
        self, redis_client: aioredis.Redis
    ) -> None:
        """drain waits by asking until every entry appended before it is aggregated and acked."""
        consumer = _consumer(redis_client, batch_size=3)
        await consumer.ensure_group()
        await consumer.drain(DEADLINE_S)
        for i in range(8):
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"r{i}")))
        consumer.start()
        try:
            await consumer.drain(DEADLINE_S)
            assert await _count(redis_client) == 8
        finally:
            await consumer.close()
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 0

    async def test_entries_of_a_dead_consumer_are_claimed_and_counted_once(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Entries another consumer left pending past claim_min_idle_ms are claimed (XAUTOCLAIM)."""
        await _consumer(redis_client).ensure_group()
        for i in range(5):
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"r{i}")))
        # Consumer `dead` reads everything and dies without acknowledging.
        await redis_client.xreadgroup(GROUP, "dead", {DEFAULT_STREAM: ">"}, count=10)
        eager = _consumer(redis_client, name="live", claim_min_idle_ms=1)
        patient = _consumer(redis_client, name="other", claim_min_idle_ms=3_600_000)
        await _pending_idle_for(redis_client, 2)
        async with asyncio.timeout(DEADLINE_S):
            assert await patient.process_available() == 0
            assert await eager.process_available() == 5
        assert eager.claimed == 5
        assert await _count(redis_client) == 5
        assert (await redis_client.xpending(DEFAULT_STREAM, GROUP))["pending"] == 0

    async def test_record_delivered_to_two_consumers_is_counted_once(
        self, redis_client: aioredis.Redis
    ) -> None:
        """The same record appended twice and read by two consumers of the group counts once."""
        first, second = _consumer(redis_client, name="a"), _consumer(redis_client, name="b")
        await first.ensure_group()
        await redis_client.xadd(DEFAULT_STREAM, encode_record(_record("same")))
        async with asyncio.timeout(DEADLINE_S):
            assert await first.process_available() == 1
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record("same")))
            assert await second.process_available() == 1
        assert second.duplicates == 1
        assert await _count(redis_client) == 1

    async def test_baseline_takes_exactly_the_first_records_across_a_batch(
        self, redis_client: aioredis.Redis
    ) -> None:
        """A batch that crosses the baseline size fills the baseline with exactly its first N."""
        consumer = _consumer(redis_client, batch_size=25)
        await consumer.ensure_group()
        for i in range(7):
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"a{i}")))
        async with asyncio.timeout(DEADLINE_S):
            assert await consumer.process_available() == 7
            for i in range(18):
                await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"b{i}")))
            assert await consumer.process_available() == 18
        baseline = await _store(redis_client).baseline("fraud", "models/fraud/versions/1")
        assert baseline.requests == 10
        assert await _count(redis_client) == 25
