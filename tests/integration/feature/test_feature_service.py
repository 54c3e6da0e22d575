"""FeatureService against a real Redis, through a real gRPC server and channel."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis
from support import running

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import feature_value_pb2
from modelserve_feature.config import FeatureSettings
from modelserve_feature.server import build_server
from modelserve_runtime.errors import decode_rpc_error


def _settings(redis_url: str) -> FeatureSettings:
    return FeatureSettings(redis_url=redis_url)


class TestFeatureService:
    async def test_write_then_read_many_entities(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Written values come back typed, per entity, with missing ones marked MISSING."""
        async with running(build_server, _settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            write = pb.WriteFeaturesRequest(
                writes=[
                    pb.EntityFeatureWrite(
                        entity=pb.EntityKey(entity_type="customer", entity_id="c-1"),
                        values={
                            "avg_amount_30d": feature_value_pb2.FeatureValue(double_value=42.5),
                            "chargebacks_90d": feature_value_pb2.FeatureValue(int64_value=2),
                        },
                    ),
                    pb.EntityFeatureWrite(
                        entity=pb.EntityKey(entity_type="customer", entity_id="c-2"),
                        values={"avg_amount_30d": feature_value_pb2.FeatureValue(double_value=7.0)},
                    ),
                ]
            )
            written = await stub.WriteFeatures(write)
            assert written.values_written == 3
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    entities=[
                        pb.EntityKey(entity_type="customer", entity_id="c-1"),
                        pb.EntityKey(entity_type="customer", entity_id="c-2"),
                    ],
                    features=["customer:avg_amount_30d", "customer:chargebacks_90d"],
                )
            )
        first, second = response.results
        assert first.entity.entity_id == "c-1"
        assert first.values["customer:avg_amount_30d"].double_value == 42.5
        assert first.values["customer:chargebacks_90d"].int64_value == 2
        assert second.values["customer:avg_amount_30d"].double_value == 7.0
        assert second.statuses["customer:chargebacks_90d"] == pb.FEATURE_STATUS_MISSING
        assert not second.values["customer:chargebacks_90d"].HasField("double_value")

    async def test_bad_feature_reference_is_invalid_argument(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A feature reference without an entity type is refused, naming the field."""
        async with running(build_server, _settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest(
                        entities=[pb.EntityKey(entity_type="customer", entity_id="c-1")],
                        features=["avg_amount_30d"],
                    )
                )
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.domain == "feature.modelserve"
        assert [v.field for v in error.violations] == ["features[0]"]

    async def test_bad_write_writes_nothing(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A batch with one unset value is refused whole: the good entry is not written either."""
        async with running(build_server, _settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.WriteFeatures(
                    pb.WriteFeaturesRequest(
                        writes=[
                            pb.EntityFeatureWrite(
                                entity=pb.EntityKey(entity_type="customer", entity_id="c-1"),
                                values={"a": feature_value_pb2.FeatureValue(double_value=1.0)},
                            ),
                            pb.EntityFeatureWrite(
                                entity=pb.EntityKey(entity_type="customer", entity_id="c-2"),
                                values={"b": feature_value_pb2.FeatureValue()},
                            ),
                        ]
                    )
                )
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert decode_rpc_error(info.value).violations[0].field == "writes[1].values['b']"
        assert await redis_client.keys("*") == []
