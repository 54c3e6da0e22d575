"""Keys and values in the feature store's Redis that something else wrote. A key of another
kind (a string where the store keeps an entity's hash) is DATA_LOSS naming the operation, not
UNAVAILABLE (Redis answered; retrying cannot help), and a batch that touches it writes
nothing, not even the entities before it. A value in an entity's hash that is not one of ours
reads as not stored, and the next write replaces it."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis
from feature_testing import customer_view, entity, rpc_error, settings, write
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import running

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import feature_value_pb2 as value_pb
from modelserve_feature.server import build_server
from modelserve_features.redis_store import EntityKey, redis_key

FOREIGN = redis_key(EntityKey("customer", "c-1"))


def _segment(value: str) -> dict[str, value_pb.FeatureValue]:
    return {"segment": value_pb.FeatureValue(string_value=value)}


async def _segments(
    stub: pb_grpc.FeatureServiceAsyncStub, *entity_ids: str
) -> list[tuple[str, int]]:
    response = await stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(
            entities=[entity(e) for e in entity_ids], features=["customer:segment"]
        )
    )
    return [
        (e.values["customer:segment"].string_value, e.statuses["customer:segment"])
        for e in response.results
    ]


class TestForeignKeys:
    async def test_a_key_of_another_kind_is_data_loss_and_its_batch_writes_nothing(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(writes=[write("c-2", _segment("old"))])
            )
            await redis_client.set(FOREIGN, "written by another tool")
            with pytest.raises(grpc.aio.AioRpcError) as read:
                await _segments(stub, "c-2", "c-1")
            with pytest.raises(grpc.aio.AioRpcError) as batch:
                await stub.WriteFeatures(
                    pb.WriteFeaturesRequest(
                        writes=[write("c-2", _segment("new")), write("c-1", _segment("new"))]
                    )
                )
            others = await _segments(stub, "c-2")
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest()
            )
        refused_read, refused_write = rpc_error(read), rpc_error(batch)
        for error, operation in ((refused_read, "read"), (refused_write, "write")):
            assert (error.code, error.reason) == (grpc.StatusCode.DATA_LOSS, "REDIS_WRONG_TYPE")
            assert error.metadata["operation"] == operation
        assert f"{FOREIGN} holds a string, not a hash" in refused_write.message
        # c-2 came first in the refused batch and kept its value.
        assert others == [("old", pb.FEATURE_STATUS_PRESENT)]
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert await redis_client.get(FOREIGN) == b"written by another tool"

    async def test_a_value_that_is_not_ours_reads_as_not_stored_and_is_replaced(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Too short to hold an event time: the write script once failed on it halfway."""
        key = redis_key(EntityKey("customer", "c-4"))
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await redis_client.hset(key, "segment", "x")
            before = await _segments(stub, "c-4")
            written = await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[write("c-5", _segment("new")), write("c-4", _segment("new"))]
                )
            )
            after = await _segments(stub, "c-4", "c-5")
        assert before == [("", pb.FEATURE_STATUS_MISSING)]
        assert (written.values_written, written.values_skipped_stale) == (2, 0)
        assert after == [("new", pb.FEATURE_STATUS_PRESENT)] * 2
