"""Feature views through a real FeatureService and a real Redis: apply, version, refuse, list."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis
from feature_testing import customer_view, double, entity, rpc_error, settings, write
from support import running

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve.feature.v1 import feature_view_pb2 as view_pb
from modelserve.type.v1 import feature_value_pb2 as value_pb
from modelserve_feature.server import build_server
from modelserve_features import catalog
from modelserve_features.redis_store import view_history_key


class TestApply:
    async def test_apply_creates_then_versions_changes(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A new view is version 1; the same definition again changes nothing; an added
        feature makes version 2, and version 1 stays readable."""
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            created = await stub.ApplyFeatureView(
                pb.ApplyFeatureViewRequest(feature_view=customer_view())
            )
            again = await stub.ApplyFeatureView(
                pb.ApplyFeatureViewRequest(feature_view=customer_view())
            )
            grown = await stub.ApplyFeatureView(
                pb.ApplyFeatureViewRequest(
                    feature_view=customer_view(country=view_pb.FEATURE_DTYPE_STRING)
                )
            )
            current = await stub.GetFeatureView(
                pb.GetFeatureViewRequest(name="featureViews/customer")
            )
            first = await stub.GetFeatureView(
                pb.GetFeatureViewRequest(name="featureViews/customer", version=1)
            )
        assert (created.changed, created.feature_view.version) == (True, 1)
        assert (again.changed, again.feature_view.version) == (False, 1)
        assert (grown.changed, grown.feature_view.version) == (True, 2)
        assert current.feature_view.version == 2
        assert current.feature_view.owner == "risk-team"
        assert [f.name for f in current.feature_view.features][-1] == "country"
        assert "country" not in [f.name for f in first.feature_view.features]
        assert current.feature_view.create_time == first.feature_view.create_time
        assert current.feature_view.features[1].default_value.int64_value == 0

    @pytest.mark.parametrize(
        ("change", "needle"),
        [
            ("retype", "changes dtype from double to string"),
            ("remove", "'vip' is removed"),
            ("entity", "entity type changes"),
        ],
    )
    async def test_breaking_change_needs_force(
        self, redis_url: str, redis_client: aioredis.Redis, change: str, needle: str
    ) -> None:
        """A retyped or removed feature or another entity type is refused FAILED_PRECONDITION
        and leaves the view as it was; with force it is applied as a new version."""
        broken = customer_view()
        if change == "retype":
            broken.features[0].dtype = view_pb.FEATURE_DTYPE_STRING
        elif change == "remove":
            del broken.features[3]
        else:
            broken.entity_type = "merchant"
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=broken))
            unchanged = await stub.GetFeatureView(
                pb.GetFeatureViewRequest(name="featureViews/customer")
            )
            forced = await stub.ApplyFeatureView(
                pb.ApplyFeatureViewRequest(feature_view=broken, force=True)
            )
        error = rpc_error(info)
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "BREAKING_CHANGE"
        assert needle in error.message
        assert unchanged.feature_view.version == 1
        assert unchanged.feature_view.features == customer_view().features
        assert (forced.changed, forced.feature_view.version) == (True, 2)

    async def test_bad_definition_is_refused_and_stores_nothing(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A view with a duplicate feature, an unset dtype or a default of the wrong dtype is
        INVALID_ARGUMENT naming each field, and nothing is stored."""
        bad = customer_view()
        bad.features[1].default_value.CopyFrom(value_pb.FeatureValue(string_value="zero"))
        bad.features.add(name="segment", dtype=view_pb.FEATURE_DTYPE_STRING)
        unset = customer_view()
        unset.features[2].dtype = view_pb.FEATURE_DTYPE_UNSPECIFIED
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=bad))
            with pytest.raises(grpc.aio.AioRpcError) as unset_info:
                await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=unset))
            bad.name = "views/customer"
            with pytest.raises(grpc.aio.AioRpcError) as name_info:
                await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=bad))
        error = rpc_error(info)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == [
            "feature_view.features[1].default_value",
            "feature_view.features[5].name",
        ]
        assert "expected int64, got string" in error.violations[0].description
        assert [v.field for v in rpc_error(unset_info).violations] == [
            "feature_view.features[2].dtype"
        ]
        assert [v.field for v in rpc_error(name_info).violations] == ["feature_view.name"]
        assert await redis_client.keys("*") == []


def _apply(view: view_pb.FeatureView, expected_version: int) -> pb.ApplyFeatureViewRequest:
    return pb.ApplyFeatureViewRequest(feature_view=view, expected_version=expected_version)


class TestExpectedVersion:
    async def test_a_change_made_against_an_old_version_is_aborted(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Two teams read version 1; the first one's change lands as version 2, the second
        one's is ABORTED naming the current version and stores nothing. 0 creates only a view
        that does not exist; a negative version is INVALID_ARGUMENT."""
        with_country = customer_view(country=view_pb.FEATURE_DTYPE_STRING)
        with_region = customer_view(
            country=view_pb.FEATURE_DTYPE_STRING, region=view_pb.FEATURE_DTYPE_STRING
        )
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            created = await stub.ApplyFeatureView(_apply(customer_view(), 0))
            with pytest.raises(grpc.aio.AioRpcError) as exists:
                await stub.ApplyFeatureView(_apply(customer_view(), 0))
            first = await stub.ApplyFeatureView(_apply(with_country, 1))
            with pytest.raises(grpc.aio.AioRpcError) as second:
                await stub.ApplyFeatureView(_apply(with_region, 1))
            with pytest.raises(grpc.aio.AioRpcError) as negative:
                await stub.ApplyFeatureView(_apply(with_region, -1))
            current = await stub.GetFeatureView(
                pb.GetFeatureViewRequest(name="featureViews/customer")
            )
            third = await stub.ApplyFeatureView(_apply(with_region, 2))
        assert (created.feature_view.version, first.feature_view.version) == (1, 2)
        for refused, version in ((exists, "1"), (second, "2")):
            error = rpc_error(refused)
            assert (error.code, error.reason) == (grpc.StatusCode.ABORTED, "CONCURRENT_CHANGE")
            assert error.metadata["version"] == version
        assert "read it again and retry" in rpc_error(second).message
        assert [v.field for v in rpc_error(negative).violations] == ["expected_version"]
        assert current.feature_view.version == 2
        assert [f.name for f in current.feature_view.features][-1] == "country"
        assert (third.changed, third.feature_view.version) == (True, 3)
        # The refused change stored no version.
        assert sorted(await redis_client.hkeys(view_history_key("customer"))) == [b"1", b"2", b"3"]

    async def test_a_view_that_keeps_changing_under_an_apply_is_aborted(
        self, redis_url: str, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every transaction of an apply lost its WATCH to another writer (here: no attempt
        left): ABORTED, as a stale `expected_version` is, and nothing is stored."""
        monkeypatch.setattr(catalog, "_APPLY_ATTEMPTS", 0)
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ApplyFeatureView(
                    pb.ApplyFeatureViewRequest(feature_view=customer_view())
                )
        error = rpc_error(refused)
        assert (error.code, error.reason) == (grpc.StatusCode.ABORTED, "CONCURRENT_CHANGE")
        assert await redis_client.keys("fs:*") == []


class TestListAndDelete:
    async def test_list_pages_by_name(self, redis_url: str, redis_client: aioredis.Redis) -> None:
        """ListFeatureViews returns views by name, page by page, until the token is empty."""
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            for name in ("merchant", "customer", "device"):
                view = customer_view()
                view.name = f"featureViews/{name}"
                await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view))
            first = await stub.ListFeatureViews(pb.ListFeatureViewsRequest(page_size=2))
            second = await stub.ListFeatureViews(
                pb.ListFeatureViewsRequest(page_size=2, page_token=first.next_page_token)
            )
        assert [v.name for v in first.feature_views] == [
            "featureViews/customer",
            "featureViews/device",
        ]
        assert [v.name for v in second.feature_views] == ["featureViews/merchant"]
        assert second.next_page_token == ""

    async def test_deleted_view_is_not_found(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """After DeleteFeatureView, getting the view, reading and writing its features are
        NOT_FOUND naming it; deleting it again is NOT_FOUND too."""
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await stub.DeleteFeatureView(pb.DeleteFeatureViewRequest(name="featureViews/customer"))
            calls = {
                "get": stub.GetFeatureView(pb.GetFeatureViewRequest(name="featureViews/customer")),
                "read": stub.GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest(
                        entities=[entity("c-1")], features=["customer:avg_amount_30d"]
                    )
                ),
                "write": stub.WriteFeatures(
                    pb.WriteFeaturesRequest(writes=[write("c-1", {"avg_amount_30d": double(1.0)})])
                ),
                "delete": stub.DeleteFeatureView(
                    pb.DeleteFeatureViewRequest(name="featureViews/customer")
                ),
            }
            errors = {}
            for what, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                errors[what] = rpc_error(info)
        for what, error in errors.items():
            assert error.code is grpc.StatusCode.NOT_FOUND, what
            assert "'customer'" in error.message, what
