"""Concurrent reads of the online store share their Redis round trips, for better and worse."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from modelserve_cli.stack import RedisProcess, free_port
from modelserve_features.online import FeatureStatus, FeatureWrite, OnlineStore
from modelserve_features.redis_store import EntityKey
from modelserve_features.views import FeatureDtype, FeatureRef, FeatureSpec, FeatureView
from modelserve_runtime.errors import UnavailableError

VIEW = FeatureView(
    name="customer",
    entity_type="customer",
    features=(FeatureSpec("score", FeatureDtype.DOUBLE),),
)
SCORE = FeatureRef("customer", "score")


def _customer(i: int) -> EntityKey:
    return EntityKey("customer", f"c-{i}")


async def _seed(store: OnlineStore, count: int) -> None:
    await store.apply_view(VIEW)
    await store.write(
        [FeatureWrite(_customer(i), "customer", {"score": i + 0.5}) for i in range(count)]
    )


async def _round_trips(client: aioredis.Redis) -> int:
    """Read round trips so far: each GETs the views epoch once (in the read script or in a
    pipeline alike), and Redis counts the commands scripts run."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, to be stopped under the reads."""
    server = RedisProcess(tmp_path / "redis", port=free_port())
    server.start()
    yield server
    server.stop()


class TestConcurrentReads:
    async def test_reads_that_come_together_share_one_round_trip(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Twenty reads started at once take two round trips (the first goes alone, the
        other nineteen together once it is back), and each caller gets its own entity."""
        store = OnlineStore(redis_client)
        await _seed(store, 20)
        await store.read([_customer(0)], [SCORE])
        before = await _round_trips(redis_client)
        rows = await asyncio.gather(*(store.read([_customer(i)], [SCORE]) for i in range(20)))
        after = await _round_trips(redis_client)
        assert after - before == 2
        assert [row[SCORE].value for (row,) in rows] == [i + 0.5 for i in range(20)]
        assert {row[SCORE].status for (row,) in rows} == {FeatureStatus.PRESENT}

    async def test_a_failed_shared_round_trip_fails_every_read_in_it(
        self, own_redis: RedisProcess
    ) -> None:
        """With Redis gone, every one of several concurrent reads fails UNAVAILABLE with
        Redis's own error, the ones that waited for a shared call as much as the first."""
        client = aioredis.Redis.from_url(own_redis.url)
        store = OnlineStore(client, timeout_s=5.0)
        try:
            await _seed(store, 5)
            await store.read([_customer(0)], [SCORE])
            own_redis.stop()
            outcomes = await asyncio.gather(
                *(store.read([_customer(i)], [SCORE]) for i in range(5)),
                return_exceptions=True,
            )
        finally:
            await client.aclose()
        assert all(isinstance(o, UnavailableError) for o in outcomes), outcomes
        messages = [o.message for o in outcomes if isinstance(o, UnavailableError)]
        assert not [m for m in messages if "TimeoutError" in m], messages

    async def test_reads_planned_before_a_view_change_are_answered_by_the_new_view(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Two reads that resolved their features before another process retyped one, and
        share a round trip: both answer by the new definition (the stored double no longer
        matches and reads MISSING), the second too, although the first already reloaded
        the definitions by the time the second saw the change."""
        store = OnlineStore(redis_client)
        await _seed(store, 2)
        await store.read([_customer(0)], [SCORE])
        retyped = FeatureView(
            name="customer",
            entity_type="customer",
            features=(FeatureSpec("score", FeatureDtype.STRING),),
        )
        await OnlineStore(redis_client).apply_view(retyped, force=True)
        rows = await asyncio.gather(*(store.read([_customer(i)], [SCORE]) for i in range(2)))
        assert [row[SCORE].status for (row,) in rows] == [FeatureStatus.MISSING] * 2
