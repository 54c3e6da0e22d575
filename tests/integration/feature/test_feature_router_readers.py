"""The router's two feature readers (straight to Redis, through the feature service) agree."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from feature_testing import ago, customer_view, double, settings, write
from support import running

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import feature_value_pb2 as value_pb
from modelserve_feature.server import build_server
from modelserve_features.online import FeatureResult, FeatureStatus, OnlineStore
from modelserve_features.views import FeatureRef
from modelserve_router.sources import FeatureReader, RedisFeatureReader, ServiceFeatureReader
from modelserve_runtime.clients import FeatureClient
from modelserve_runtime.errors import NotFoundError

REFS = [
    FeatureRef("risk", "avg_amount_30d"),
    FeatureRef("risk", "chargebacks_90d"),
    FeatureRef("risk", "segment"),
    FeatureRef("risk", "embedding"),
]


class TestRouterReaders:
    async def test_both_readers_resolve_the_view_and_answer_alike(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """For a view named unlike its entity type, both readers map it to its entity type and
        return the same values, statuses (EXPIRED, DEFAULTED, MISSING, PRESENT) and event
        times; an unknown view is NOT_FOUND through either."""
        view = customer_view(max_age_s=60)
        view.name = "featureViews/risk"
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write("c-1", {"avg_amount_30d": double(3.5)}, view=view.name),
                        write(
                            "c-1",
                            {
                                "chargebacks_90d": value_pb.FeatureValue(int64_value=4),
                                "embedding": value_pb.FeatureValue(
                                    float_vector_value=value_pb.FloatVector(values=[1.5])
                                ),
                            },
                            view=view.name,
                            event_time=ago(600),
                        ),
                    ]
                )
            )
            readers: dict[str, FeatureReader] = {
                "redis": RedisFeatureReader(OnlineStore(redis_client)),
                "service": ServiceFeatureReader(FeatureClient(channel)),
            }
            types = {k: await r.entity_types(["risk"]) for k, r in readers.items()}
            read = {k: await r.read({"customer": "c-1"}, REFS) for k, r in readers.items()}
            for reader in readers.values():
                with pytest.raises(NotFoundError):
                    await reader.entity_types(["nope"])
        assert types == {"redis": {"risk": "customer"}, "service": {"risk": "customer"}}
        assert read["redis"] == read["service"]
        values = read["redis"]
        assert values[REFS[0]].value == 3.5
        assert values[REFS[0]].status is FeatureStatus.PRESENT
        assert values[REFS[1]] == FeatureResult(
            0, FeatureStatus.EXPIRED, values[REFS[1]].event_time_us
        )
        assert values[REFS[2]] == FeatureResult(None, FeatureStatus.MISSING)
        assert values[REFS[3]].status is FeatureStatus.EXPIRED
        assert values[REFS[3]].value is None

    async def test_the_service_reader_reads_again_as_maps_when_a_view_changed_its_entity_type(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """The service reader maps the lists answer back with the entity types it has kept;
        when a view has since been made over for another entity type, the lists no longer
        line up, and it reads again as maps: the values are right all the same, and the
        entity types are asked afresh."""
        risk = customer_view()
        risk.name = "featureViews/risk"
        shop = customer_view()
        shop.name, shop.entity_type = "featureViews/shop", "merchant"
        refs = [FeatureRef("shop", "avg_amount_30d"), FeatureRef("risk", "avg_amount_30d")]
        entities = {"customer": "c-1", "merchant": "m-1"}
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            for view in (risk, shop):
                await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view))
            reader = ServiceFeatureReader(FeatureClient(channel), refresh_s=3600)
            assert await reader.entity_types(["risk", "shop"]) == {
                "risk": "customer",
                "shop": "merchant",
            }
            risk.entity_type = "merchant"
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=risk, force=True))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write("m-1", {"avg_amount_30d": double(v)}, view=n, entity_type="merchant")
                        for n, v in ((risk.name, 1.0), (shop.name, 2.0))
                    ]
                )
            )
            read = await reader.read(entities, refs)
            types = await reader.entity_types(["risk", "shop"])
        assert {ref: (r.value, r.status) for ref, r in read.items()} == {
            refs[0]: (2.0, FeatureStatus.PRESENT),
            refs[1]: (1.0, FeatureStatus.PRESENT),
        }
        assert types == {"risk": "merchant", "shop": "merchant"}
