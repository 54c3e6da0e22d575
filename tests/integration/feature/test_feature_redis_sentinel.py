"""The feature service finding its Redis master through a real Sentinel, and again after the
master died and the Sentinel promoted the replica."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from feature_testing import customer_view, double, entity, rpc_error, write
from redis_topologies import MASTER_NAME, SentinelSetup, feature_service, sentinel_setup
from support import eventually

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve_feature.config import FeatureSettings
from modelserve_features.redis_store import EntityKey, redis_key
from modelserve_runtime.errors import UnavailableError
from modelserve_runtime.redis_connect import RedisConnection

AVG = "customer:avg_amount_30d"


@pytest.fixture
async def sentinel(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SentinelSetup]:
    """A master, a replica and a Sentinel of this test alone (the test kills the master)."""
    async with sentinel_setup(tmp_path_factory.mktemp("sentinel")) as setup:
        yield setup


def _settings(setup: SentinelSetup, master_name: str = MASTER_NAME) -> FeatureSettings:
    return FeatureSettings(
        redis=RedisConnection(
            mode="sentinel",
            nodes=[f"127.0.0.1:{setup.sentinel.port}"],
            master_name=master_name,
            timeout_s=0.5,
        )
    )


async def _stored(port: int, entity_id: str) -> bool:
    client = aioredis.Redis(port=port)
    try:
        return bool(await client.exists(redis_key(EntityKey("customer", entity_id))))
    finally:
        await client.aclose()


class TestSentinelMode:
    async def test_reads_and_writes_follow_the_master_through_a_failover(
        self, sentinel: SentinelSetup
    ) -> None:
        """The service writes to the master the Sentinel names; once that master is killed
        and the Sentinel has promoted the replica, writes and reads work again without a
        restart, on the new master, and what was written before is still there."""
        read = pb.GetOnlineFeaturesRequest(entities=[entity("c-1"), entity("c-2")], features=[AVG])
        async with feature_service(_settings(sentinel)) as service:
            stub = service.stub
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(writes=[write("c-1", {"avg_amount_30d": double(1.0)})])
            )
            assert await _stored(sentinel.master.port, "c-1")
            await eventually(
                lambda: _stored(sentinel.replica.port, "c-1"), "c-1 replicated", within_s=10
            )

            sentinel.master.stop()

            async def writes() -> bool:
                try:
                    await stub.WriteFeatures(
                        pb.WriteFeaturesRequest(
                            writes=[write("c-2", {"avg_amount_30d": double(2.0)})]
                        ),
                        timeout=1.0,
                    )
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
                    return False
                return True

            await eventually(writes, "a write after the failover", within_s=30, every_s=0.1)
            response = await stub.GetOnlineFeatures(read)
        assert await sentinel.master_port() == sentinel.replica.port
        assert await _stored(sentinel.replica.port, "c-2")
        assert [r.values[AVG].double_value for r in response.results] == [1.0, 2.0]

    async def test_an_unknown_master_name_is_unavailable_naming_it(
        self, sentinel: SentinelSetup
    ) -> None:
        """A master name the Sentinels do not monitor fails the readiness check, and each
        call, with UNAVAILABLE naming that master."""
        async with feature_service(_settings(sentinel, master_name="nope"), ready=False) as service:
            with pytest.raises(UnavailableError) as ready:
                await service.app.check_ready()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await service.stub.GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest(entities=[entity("c-1")], features=[AVG])
                )
        assert "No master found for 'nope'" in ready.value.message
        assert rpc_error(info).code is grpc.StatusCode.UNAVAILABLE
        assert rpc_error(info).reason == "REDIS_UNAVAILABLE"
        assert "'nope'" in rpc_error(info).message
