"""Online reads and writes through a real FeatureService and a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import redis.asyncio as aioredis
from feature_testing import ago, at, customer_view, double, entity, rpc_error, settings, write
from prometheus_client import REGISTRY
from support import running

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve.feature.v1 import feature_view_pb2 as view_pb
from modelserve.type.v1 import feature_value_pb2 as value_pb
from modelserve_feature.server import build_server
from modelserve_runtime.errors import DecodedError

ALL = [
    "customer:avg_amount_30d",
    "customer:chargebacks_90d",
    "customer:segment",
    "customer:vip",
    "customer:embedding",
]


#: A value of every dtype of the customer view, as written.
EVERY_DTYPE = {
    "avg_amount_30d": double(42.5),
    "chargebacks_90d": value_pb.FeatureValue(int64_value=-(2**62)),
    "segment": value_pb.FeatureValue(string_value="gold ✓"),
    "vip": value_pb.FeatureValue(bool_value=False),
    "embedding": value_pb.FeatureValue(
        float_vector_value=value_pb.FloatVector(values=[0.5, -1.25])
    ),
}


def _risk_and_merchant_views() -> tuple[view_pb.FeatureView, view_pb.FeatureView]:
    """`risk`, a second view of customers (the customer view's features), and `merchant`,
    a view of merchants with one double."""
    risk = customer_view()
    risk.name = "featureViews/risk"
    merchant = view_pb.FeatureView(
        name="featureViews/merchant",
        entity_type="merchant",
        features=[view_pb.FeatureSpec(name="avg_amount_30d", dtype=view_pb.FEATURE_DTYPE_DOUBLE)],
    )
    return risk, merchant


async def _apply(stub: pb_grpc.FeatureServiceStub, max_age_s: int = 0) -> None:
    await stub.ApplyFeatureView(
        pb.ApplyFeatureViewRequest(feature_view=customer_view(max_age_s=max_age_s))
    )


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class TestRead:
    async def test_many_entities_many_features_typed_with_statuses(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Every dtype comes back as written with its event time and PRESENT; an unwritten
        feature with a default is DEFAULTED, one without is MISSING; entities keep request
        order; the whole read is one Redis round trip."""
        written_at = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub)
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write(
                            "c-1",
                            EVERY_DTYPE,
                            event_time=at(written_at),
                        ),
                        write("c-2", {"avg_amount_30d": double(7.0)}),
                    ]
                )
            )
            reads_before = _sample("modelserve_feature_redis_seconds_count", op="read")
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    entities=[entity("c-2"), entity("c-1"), entity("c-3")], features=ALL
                )
            )
            reads_after = _sample("modelserve_feature_redis_seconds_count", op="read")
        second, first, unknown = response.results
        assert [r.entity.entity_id for r in response.results] == ["c-2", "c-1", "c-3"]
        assert first.values["customer:avg_amount_30d"].double_value == 42.5
        assert first.values["customer:chargebacks_90d"].int64_value == -(2**62)
        assert first.values["customer:segment"].string_value == "gold ✓"
        assert first.values["customer:vip"].HasField("bool_value")
        assert not first.values["customer:vip"].bool_value
        assert list(first.values["customer:embedding"].float_vector_value.values) == [0.5, -1.25]
        assert set(first.statuses.values()) == {pb.FEATURE_STATUS_PRESENT}
        assert first.event_times["customer:segment"].ToDatetime(UTC) == written_at
        assert second.statuses["customer:avg_amount_30d"] == pb.FEATURE_STATUS_PRESENT
        assert second.statuses["customer:chargebacks_90d"] == pb.FEATURE_STATUS_DEFAULTED
        assert second.values["customer:chargebacks_90d"].int64_value == 0
        assert "customer:chargebacks_90d" not in second.event_times
        assert second.statuses["customer:segment"] == pb.FEATURE_STATUS_MISSING
        assert second.values["customer:segment"].WhichOneof("kind") is None
        assert unknown.statuses["customer:avg_amount_30d"] == pb.FEATURE_STATUS_MISSING
        assert reads_after - reads_before == 1

    async def test_values_older_than_max_age_are_expired(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """With a max age of one minute, a value from two minutes ago reads EXPIRED (with the
        feature's default where it has one, and the stale value's event time); a fresh one
        reads PRESENT."""
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub, max_age_s=60)
            old = ago(120)
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write(
                            "c-1",
                            {
                                "avg_amount_30d": double(1.0),
                                "chargebacks_90d": value_pb.FeatureValue(int64_value=3),
                            },
                            event_time=old,
                        ),
                        write("c-2", {"avg_amount_30d": double(2.0)}, event_time=ago(1)),
                    ]
                )
            )
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    entities=[entity("c-1"), entity("c-2")],
                    features=["customer:avg_amount_30d", "customer:chargebacks_90d"],
                )
            )
        stale, fresh = response.results
        assert stale.statuses["customer:avg_amount_30d"] == pb.FEATURE_STATUS_EXPIRED
        assert stale.values["customer:avg_amount_30d"].WhichOneof("kind") is None
        assert stale.event_times["customer:avg_amount_30d"] == old
        assert stale.statuses["customer:chargebacks_90d"] == pb.FEATURE_STATUS_EXPIRED
        assert stale.values["customer:chargebacks_90d"].int64_value == 0
        assert fresh.statuses["customer:avg_amount_30d"] == pb.FEATURE_STATUS_PRESENT
        assert fresh.values["customer:avg_amount_30d"].double_value == 2.0

    async def test_one_read_spans_views_and_entity_types(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Features of three views over two entity types, read together: each entity answers
        the features of the views of its type and no others, each value from its own view's
        hash; each view counts one read and the entities of its type."""
        risk, merchant = _risk_and_merchant_views()
        views = ("customer", "risk", "merchant")

        def samples() -> dict[str, float]:
            return {
                f"{name} {metric}": _sample(f"modelserve_feature_{metric}_total", view=name)
                for name in views
                for metric in ("reads", "entities_read")
            }

        before = samples()
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            for view in (customer_view(), risk, merchant):
                await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write("c-1", {"avg_amount_30d": double(1.0)}),
                        write("c-1", {"avg_amount_30d": double(2.0)}, view=risk.name),
                        write("c-2", {"avg_amount_30d": double(3.0)}),
                        write(
                            "m-1",
                            {"avg_amount_30d": double(4.0)},
                            view=merchant.name,
                            entity_type="merchant",
                        ),
                    ]
                )
            )
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    entities=[entity("c-1"), entity("m-1", "merchant"), entity("c-2")],
                    features=[
                        "risk:segment",
                        "merchant:avg_amount_30d",
                        "customer:avg_amount_30d",
                        "risk:avg_amount_30d",
                    ],
                )
            )
        after = samples()
        answered = [
            {key: (status, r.values[key].double_value) for key, status in r.statuses.items()}
            for r in response.results
        ]
        present, missing = pb.FEATURE_STATUS_PRESENT, pb.FEATURE_STATUS_MISSING
        assert answered == [
            {
                "customer:avg_amount_30d": (present, 1.0),
                "risk:avg_amount_30d": (present, 2.0),
                "risk:segment": (missing, 0.0),
            },
            {"merchant:avg_amount_30d": (present, 4.0)},
            {
                "customer:avg_amount_30d": (present, 3.0),
                "risk:avg_amount_30d": (missing, 0.0),
                "risk:segment": (missing, 0.0),
            },
        ]
        assert {k: after[k] - before[k] for k in before} == {
            "customer reads": 1,
            "customer entities_read": 2,
            "risk reads": 1,
            "risk entities_read": 2,
            "merchant reads": 1,
            "merchant entities_read": 1,
        }

    @pytest.mark.parametrize(
        ("features", "reason", "named"),
        [
            (["merchant:avg_amount_30d"], "FEATURE_VIEW_NOT_FOUND", "'merchant'"),
            (["customer:avg_amount_30d", "customer:nope"], "FEATURE_NOT_FOUND", "'customer:nope'"),
        ],
    )
    async def test_unknown_view_or_feature_is_not_found(
        self,
        redis_url: str,
        redis_client: aioredis.Redis,
        features: list[str],
        reason: str,
        named: str,
    ) -> None:
        """A read naming a view or a feature that does not exist is NOT_FOUND naming it."""
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest(entities=[entity("c-1")], features=features)
                )
        error = rpc_error(info)
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == reason
        assert named in error.message

    async def test_bad_requests_are_invalid_argument(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A reference without a view, or a feature whose view's entity type has no entity in
        the request, is INVALID_ARGUMENT naming the field."""
        shapes: list[DecodedError] = []
        no_entities: list[DecodedError] = []
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub)
            for _ in range(2):  # the second time too: a refused list is not remembered as read
                with pytest.raises(grpc.aio.AioRpcError) as shape:
                    await stub.GetOnlineFeatures(
                        pb.GetOnlineFeaturesRequest(
                            entities=[entity("c-1")],
                            features=["customer:vip", "avg_amount_30d"],
                        )
                    )
                with pytest.raises(grpc.aio.AioRpcError) as no_entity:
                    await stub.GetOnlineFeatures(
                        pb.GetOnlineFeaturesRequest(
                            entities=[entity("m-1", "merchant")], features=["customer:vip"]
                        )
                    )
                shapes.append(rpc_error(shape))
                no_entities.append(rpc_error(no_entity))
        for error in shapes:
            assert error.code is grpc.StatusCode.INVALID_ARGUMENT
            assert error.domain == "feature.modelserve"
            assert [v.field for v in error.violations] == ["features[1]"]
        for error in no_entities:
            assert error.code is grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in error.violations] == ["features[0]"]

    async def test_a_view_changed_by_another_process_is_seen_by_the_next_read(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """After another service instance retypes a feature (forced), the next read of the
        same features through this one answers by the new definition: the stored double no
        longer matches and reads MISSING, and the view's new default applies."""
        request = pb.GetOnlineFeaturesRequest(
            entities=[entity("c-1")], features=["customer:avg_amount_30d", "customer:vip"]
        )
        retyped = customer_view()
        retyped.features[0].dtype = view_pb.FEATURE_DTYPE_STRING
        retyped.features[3].default_value.bool_value = True
        async with (
            running(build_server, settings(redis_url)) as (_, channel, _app),
            running(build_server, settings(redis_url)) as (_, other_channel, _other),
        ):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub)
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(writes=[write("c-1", {"avg_amount_30d": double(1.5)})])
            )
            before = (await stub.GetOnlineFeatures(request)).results[0]
            await pb_grpc.FeatureServiceStub(other_channel).ApplyFeatureView(
                pb.ApplyFeatureViewRequest(feature_view=retyped, force=True)
            )
            after = (await stub.GetOnlineFeatures(request)).results[0]
        assert before.statuses["customer:avg_amount_30d"] == pb.FEATURE_STATUS_PRESENT
        assert before.statuses["customer:vip"] == pb.FEATURE_STATUS_MISSING
        assert after.statuses["customer:avg_amount_30d"] == pb.FEATURE_STATUS_MISSING
        assert after.values["customer:avg_amount_30d"].WhichOneof("kind") is None
        assert after.statuses["customer:vip"] == pb.FEATURE_STATUS_DEFAULTED
        assert after.values["customer:vip"].bool_value is True

    async def test_malformed_stored_values_read_as_not_stored(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A stored value that does not decode (a short or long number, a vector of partial
        floats, text that is not UTF-8, an unknown tag, nothing at all, less than a header) or
        that decodes as another dtype (an int64 where a double is wanted, the same size) reads
        as not stored: DEFAULTED or MISSING, never an error."""
        stamp = (1_700_000_000_000_000).to_bytes(8, "big")
        extra = {
            "ratio": view_pb.FEATURE_DTYPE_DOUBLE,
            "rank": view_pb.FEATURE_DTYPE_INT64,
            "nickname": view_pb.FEATURE_DTYPE_STRING,
            "trusted": view_pb.FEATURE_DTYPE_BOOL,
        }
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureView(
                pb.ApplyFeatureViewRequest(feature_view=customer_view(**extra))
            )
            await redis_client.hset(
                "fs:{customer:c-1}:customer",
                mapping={
                    "avg_amount_30d": b"d" + stamp + b"\x00\x01\x02",
                    "chargebacks_90d": b"i" + stamp + b"\x00\x00\x00\x07",
                    "segment": b"s" + stamp + b"\xff\xfe",
                    "vip": b"z" + stamp + b"\x01",
                    "embedding": b"v" + stamp + b"\x00\x00\x80\x3f\x00",
                    "ratio": b"i" + stamp + bytes(8),
                    "rank": b"i" + stamp + bytes(9),
                    "nickname": b"",
                    "trusted": b"b" + stamp[:4],
                },
            )
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    entities=[entity("c-1")], features=[*ALL, *(f"customer:{n}" for n in extra)]
                )
            )
        (result,) = response.results
        assert dict(result.statuses) == {
            "customer:avg_amount_30d": pb.FEATURE_STATUS_MISSING,
            "customer:chargebacks_90d": pb.FEATURE_STATUS_DEFAULTED,
            "customer:segment": pb.FEATURE_STATUS_MISSING,
            "customer:vip": pb.FEATURE_STATUS_MISSING,
            "customer:embedding": pb.FEATURE_STATUS_MISSING,
            "customer:ratio": pb.FEATURE_STATUS_MISSING,
            "customer:rank": pb.FEATURE_STATUS_MISSING,
            "customer:nickname": pb.FEATURE_STATUS_MISSING,
            "customer:trusted": pb.FEATURE_STATUS_MISSING,
        }
        assert result.values["customer:chargebacks_90d"].int64_value == 0
        assert not result.event_times

    async def test_reads_go_on_after_redis_forgets_its_scripts(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A read after SCRIPT FLUSH (what a restarted or failed-over server looks like to a
        client) loads the read script again and answers as before."""
        request = pb.GetOnlineFeaturesRequest(
            entities=[entity("c-1")], features=["customer:avg_amount_30d"]
        )
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub)
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(writes=[write("c-1", {"avg_amount_30d": double(4.5)})])
            )
            first = await stub.GetOnlineFeatures(request)
            await redis_client.script_flush()
            again = await stub.GetOnlineFeatures(request)
        assert again == first
        assert again.results[0].values["customer:avg_amount_30d"].double_value == 4.5

    async def test_a_wide_view_reads_every_feature(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A view of 450 features, all written, reads back whole in one call, each value its
        own."""
        names = [f"f{i:03d}" for i in range(450)]
        wide = view_pb.FeatureView(
            name="featureViews/wide",
            entity_type="customer",
            features=[
                view_pb.FeatureSpec(name=n, dtype=view_pb.FEATURE_DTYPE_INT64) for n in names
            ],
        )
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=wide))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write(
                            "c-1",
                            {n: value_pb.FeatureValue(int64_value=i) for i, n in enumerate(names)},
                            view="featureViews/wide",
                        )
                    ]
                )
            )
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    entities=[entity("c-1")], features=[f"wide:{n}" for n in names]
                )
            )
        (result,) = response.results
        assert {k: v.int64_value for k, v in result.values.items()} == {
            f"wide:{n}": i for i, n in enumerate(names)
        }
        assert set(result.statuses.values()) == {pb.FEATURE_STATUS_PRESENT}

    async def test_cache_is_off_by_default_and_serves_hot_entities_when_on(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Without a cache a read sees a change made behind the service's back at once; with
        CACHE_TTL_S set, a read within the TTL answers from the process (and a write through
        the service drops the cached entry)."""
        request = pb.GetOnlineFeaturesRequest(
            entities=[entity("c-1")], features=["customer:avg_amount_30d"]
        )

        async def read(stub: pb_grpc.FeatureServiceStub) -> float:
            response = await stub.GetOnlineFeatures(request)
            return response.results[0].values["customer:avg_amount_30d"].double_value

        first = write("c-1", {"avg_amount_30d": double(1.0)})
        second = write("c-1", {"avg_amount_30d": double(2.0)})
        for cache_ttl_s, expected in ((0.0, [1.0, 0.0, 2.0]), (300.0, [1.0, 1.0, 2.0])):
            await redis_client.flushall()
            async with running(build_server, settings(redis_url, cache_ttl_s=cache_ttl_s)) as (
                _,
                channel,
                _app,
            ):
                stub = pb_grpc.FeatureServiceStub(channel)
                await _apply(stub)
                await stub.WriteFeatures(pb.WriteFeaturesRequest(writes=[first]))
                seen = [await read(stub)]
                await redis_client.delete("fs:{customer:c-1}:customer")
                seen.append(await read(stub))
                await stub.WriteFeatures(pb.WriteFeaturesRequest(writes=[second]))
                seen.append(await read(stub))
            assert seen == expected, cache_ttl_s

    async def test_metrics_count_reads_entities_and_statuses_per_view(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A read adds to the per-view read, entity and value-status counters (each value
        counted once, by its status) and to the Redis latency histogram."""
        view = "customer"
        statuses = ("present", "missing", "expired", "defaulted")

        def samples() -> dict[str, float]:
            return {
                "reads": _sample("modelserve_feature_reads_total", view=view),
                "entities": _sample("modelserve_feature_entities_read_total", view=view),
                **{
                    s: _sample("modelserve_feature_values_read_total", view=view, status=s)
                    for s in statuses
                },
                "written": _sample(
                    "modelserve_feature_values_written_total", view=view, outcome="written"
                ),
                "redis reads": _sample("modelserve_feature_redis_seconds_count", op="read"),
            }

        before = samples()
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub, max_age_s=60)
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write("c-1", {"avg_amount_30d": double(1.0)}),
                        write("c-2", {"avg_amount_30d": double(2.0)}, event_time=ago(120)),
                    ]
                )
            )
            await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    entities=[entity("c-1"), entity("c-2"), entity("c-3")],
                    features=[
                        "customer:avg_amount_30d",
                        "customer:segment",
                        "customer:chargebacks_90d",
                    ],
                )
            )
        after = samples()
        assert {k: after[k] - before[k] for k in before} == {
            "reads": 1,
            "entities": 3,
            "present": 1,
            "missing": 4,
            "expired": 1,
            "defaulted": 3,
            "written": 2,
            "redis reads": 1,
        }


def _as_lists(result: pb.EntityFeatures, refs: list[str]) -> list[tuple[str, int, object, int]]:
    """A FEATURE_LAYOUT_LISTS entity read back against the refs it answers, in order."""
    assert len(result.ordered_values) == len(result.ordered_statuses) == len(refs)
    assert len(result.ordered_event_times_us) == len(refs)
    return [
        (ref, status, _kind(value), event_time)
        for ref, value, status, event_time in zip(
            refs,
            result.ordered_values,
            result.ordered_statuses,
            result.ordered_event_times_us,
            strict=True,
        )
    ]


def _as_maps(result: pb.EntityFeatures, refs: list[str]) -> list[tuple[str, int, object, int]]:
    """A FEATURE_LAYOUT_MAPS entity, put in the order of `refs` the way lists come."""
    return [
        (
            ref,
            result.statuses[ref],
            _kind(result.values[ref]),
            (result.event_times[ref].ToMicroseconds() if ref in result.event_times else 0),
        )
        for ref in refs
    ]


def _kind(value: value_pb.FeatureValue) -> object:
    kind = value.WhichOneof("kind")
    if kind == "float_vector_value":
        return tuple(value.float_vector_value.values)
    return None if kind is None else (kind, getattr(value, kind))


class TestListLayout:
    async def test_lists_answer_what_maps_answer_in_request_order(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """FEATURE_LAYOUT_LISTS answers, for each entity, the same values, statuses and event
        times as the maps (PRESENT of every dtype, DEFAULTED, MISSING, EXPIRED), as three
        lists in the order of `features`, with the maps left empty; unset and MAPS answer
        maps and no lists."""
        fresh, stale = ago(5), ago(7200)
        refs = [
            "customer:segment",
            "customer:embedding",
            "customer:avg_amount_30d",
            "customer:vip",
            "customer:chargebacks_90d",
        ]
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub, max_age_s=3600)
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write(
                            "c-1",
                            EVERY_DTYPE,
                            event_time=fresh,
                        ),
                        write("c-2", {"avg_amount_30d": double(7.0)}, event_time=stale),
                    ]
                )
            )
            entities = [entity("c-2"), entity("c-1"), entity("c-3")]
            answers = {
                layout: await stub.GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest(entities=entities, features=refs, layout=layout)
                )
                for layout in (
                    pb.FEATURE_LAYOUT_UNSPECIFIED,
                    pb.FEATURE_LAYOUT_MAPS,
                    pb.FEATURE_LAYOUT_LISTS,
                )
            }
        lists = answers[pb.FEATURE_LAYOUT_LISTS]
        for layout in (pb.FEATURE_LAYOUT_UNSPECIFIED, pb.FEATURE_LAYOUT_MAPS):
            maps = answers[layout]
            assert [_as_maps(r, refs) for r in maps.results] == [
                _as_lists(r, refs) for r in lists.results
            ]
            assert all(not r.ordered_values and not r.ordered_statuses for r in maps.results)
        assert [r.entity.entity_id for r in lists.results] == ["c-2", "c-1", "c-3"]
        assert all(not r.values and not r.statuses and not r.event_times for r in lists.results)
        expired, first, unknown = (_as_lists(r, refs) for r in lists.results)
        present = pb.FEATURE_STATUS_PRESENT
        first_at = fresh.ToMicroseconds()
        assert first == [
            ("customer:segment", present, ("string_value", "gold ✓"), first_at),
            ("customer:embedding", present, (0.5, -1.25), first_at),
            ("customer:avg_amount_30d", present, ("double_value", 42.5), first_at),
            ("customer:vip", present, ("bool_value", False), first_at),
            ("customer:chargebacks_90d", present, ("int64_value", -(2**62)), first_at),
        ]
        assert expired[2] == (
            "customer:avg_amount_30d",
            pb.FEATURE_STATUS_EXPIRED,
            None,
            stale.ToMicroseconds(),
        )
        assert expired[4] == (
            "customer:chargebacks_90d",
            pb.FEATURE_STATUS_DEFAULTED,
            ("int64_value", 0),
            0,
        )
        assert unknown[0] == ("customer:segment", pb.FEATURE_STATUS_MISSING, None, 0)

    async def test_lists_follow_the_request_across_views_and_entity_types(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Features asked out of view order, over two entity types, one of them twice: each
        entity's lists hold the features of its type in the order asked (the repeated one
        twice), though the service reads them view by view."""
        risk, merchant = _risk_and_merchant_views()
        features = [
            "risk:segment",
            "merchant:avg_amount_30d",
            "customer:avg_amount_30d",
            "risk:avg_amount_30d",
            "customer:segment",
            "customer:avg_amount_30d",
        ]
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            for view in (customer_view(), risk, merchant):
                await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write(
                            "c-1",
                            {
                                "avg_amount_30d": double(1.0),
                                "segment": value_pb.FeatureValue(string_value="c"),
                            },
                        ),
                        write(
                            "c-1",
                            {
                                "avg_amount_30d": double(2.0),
                                "segment": value_pb.FeatureValue(string_value="r"),
                            },
                            view=risk.name,
                        ),
                        write(
                            "m-1",
                            {"avg_amount_30d": double(4.0)},
                            view=merchant.name,
                            entity_type="merchant",
                        ),
                    ]
                )
            )
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    entities=[entity("m-1", "merchant"), entity("c-1")],
                    features=features,
                    layout=pb.FEATURE_LAYOUT_LISTS,
                )
            )
        shop, customer = response.results
        assert [_kind(v) for v in shop.ordered_values] == [("double_value", 4.0)]
        assert [_kind(v) for v in customer.ordered_values] == [
            ("string_value", "r"),
            ("double_value", 1.0),
            ("double_value", 2.0),
            ("string_value", "c"),
            ("double_value", 1.0),
        ]

    async def test_an_unknown_layout_is_invalid_argument_and_reads_nothing(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A layout that is not a FeatureLayout value (a newer client's, say) is
        INVALID_ARGUMENT naming `layout`, and Redis is not read."""
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub)
            reads_before = _sample("modelserve_feature_redis_seconds_count", op="read")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest(
                        entities=[entity("c-1")],
                        features=["customer:vip"],
                        layout=7,  # type: ignore[arg-type]
                    )
                )
            reads_after = _sample("modelserve_feature_redis_seconds_count", op="read")
        error = rpc_error(info)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["layout"]
        assert "MAPS or LISTS" in error.message
        assert reads_after == reads_before


async def _refused_writing_nothing(
    stub: pb_grpc.FeatureServiceStub,
    redis_client: aioredis.Redis,
    writes: list[pb.EntityFeatureWrite],
) -> DecodedError:
    """The refusal of a WriteFeatures batch that must be refused whole; Redis unchanged."""
    keys_before = sorted(await redis_client.keys("*"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.WriteFeatures(pb.WriteFeaturesRequest(writes=writes))
    assert sorted(await redis_client.keys("*")) == keys_before
    return rpc_error(info)


class TestWrite:
    async def test_bad_value_refuses_the_whole_batch(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A batch with a value of the wrong dtype, an unknown feature, an unset value or an
        entity of another type is INVALID_ARGUMENT naming entity, feature and expected dtype,
        and none of the batch's good values is written."""
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub)
            error = await _refused_writing_nothing(
                stub,
                redis_client,
                [
                    write("c-1", {"avg_amount_30d": double(1.0)}),
                    write(
                        "c-2",
                        {
                            "avg_amount_30d": value_pb.FeatureValue(string_value="high"),
                            "nope": double(1.0),
                            "vip": value_pb.FeatureValue(),
                        },
                    ),
                    write(
                        "m-1",
                        {"vip": value_pb.FeatureValue(bool_value=True)},
                        entity_type="merchant",
                    ),
                ],
            )
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        violations = {v.field: v.description for v in error.violations}
        assert violations["writes[1].values['avg_amount_30d']"] == (
            "entity customer/c-2, feature 'avg_amount_30d': expected double, got string"
        )
        assert "has no feature 'nope'" in violations["writes[1].values['nope']"]
        assert "expected bool, got no value" in violations["writes[1].values['vip']"]
        assert "keyed by 'customer'" in violations["writes[2].entity.entity_type"]

    async def test_older_event_time_never_overwrites_newer(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A value with an earlier event time than the stored one is skipped and counted stale,
        while a newer value in the same batch is written."""
        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub)
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write(
                            "c-1",
                            {
                                "avg_amount_30d": double(2.0),
                                "segment": value_pb.FeatureValue(string_value="new"),
                            },
                            event_time=ago(10),
                        )
                    ]
                )
            )
            late = await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write(
                            "c-1",
                            {
                                "avg_amount_30d": double(1.0),
                                "segment": value_pb.FeatureValue(string_value="old"),
                            },
                            event_time=ago(20),
                        ),
                        write(
                            "c-1",
                            {"vip": value_pb.FeatureValue(bool_value=True)},
                            event_time=ago(20),
                        ),
                    ]
                )
            )
            newer = await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[write("c-1", {"avg_amount_30d": double(3.0)}, event_time=ago(5))]
                )
            )
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(entities=[entity("c-1")], features=ALL[:4])
            )
        values = response.results[0].values
        assert (late.values_written, late.values_skipped_stale) == (1, 2)
        assert (newer.values_written, newer.values_skipped_stale) == (1, 0)
        assert values["customer:avg_amount_30d"].double_value == 3.0
        assert values["customer:segment"].string_value == "new"
        assert values["customer:vip"].bool_value

    async def test_an_event_time_from_the_future_is_refused(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """An event time more than MAX_EVENT_TIME_AHEAD_S after the service's clock (a day,
        or epoch milliseconds read as seconds) is INVALID_ARGUMENT naming
        `writes[i].event_time`, and nothing of its batch is written: stored, it would outrank
        every true write until that time. A minute ahead (a drifting clock) is taken."""
        far = at(datetime.now(UTC) + timedelta(days=1))
        ahead = settings(redis_url, max_event_time_ahead_s=600)
        async with running(build_server, ahead) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub)
            error = await _refused_writing_nothing(
                stub,
                redis_client,
                [
                    write("c-1", {"avg_amount_30d": double(1.0)}),
                    write("c-2", {"avg_amount_30d": double(9.0)}, event_time=far),
                ],
            )
            soon = at(datetime.now(UTC) + timedelta(seconds=60))
            drifted = await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[write("c-2", {"avg_amount_30d": double(2.0)}, event_time=soon)]
                )
            )
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        [(field, description)] = [(v.field, v.description) for v in error.violations]
        assert field == "writes[1].event_time"
        assert 86_000 < float(description.split()[1]) <= 86_400, description
        assert "s after the writer's clock; at most 600 s ahead is taken" in description
        assert drifted.values_written == 1

    async def test_bulk_write_streams_batches_and_stops_at_a_bad_one(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """BulkWriteFeatures writes each streamed batch; a bad batch is refused whole, named by
        its index, and ends the call with the earlier batches written."""

        async def batches(bad_at: int | None) -> AsyncIterator[pb.BulkWriteFeaturesRequest]:
            for b in range(3):
                value = value_pb.FeatureValue(int64_value=1) if b == bad_at else double(float(b))
                yield pb.BulkWriteFeaturesRequest(
                    writes=[write(f"c-{b}-{i}", {"avg_amount_30d": value}) for i in range(100)]
                )

        async with running(build_server, settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            await _apply(stub)
            result = await stub.BulkWriteFeatures(batches(None))
            await redis_client.flushall()
            await _apply(stub)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.BulkWriteFeatures(batches(1))
            written = sorted(await redis_client.keys("fs:{customer:*"))
        assert (result.batches, result.values_written, result.values_skipped_stale) == (3, 300, 0)
        error = rpc_error(info)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.violations[0].field == "requests[1].writes[0].values['avg_amount_30d']"
        assert len(written) == 100
        assert all(key.startswith(b"fs:{customer:c-0-") for key in written)
