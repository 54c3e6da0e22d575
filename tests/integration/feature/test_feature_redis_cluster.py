"""The feature service on a real three-node Redis Cluster: views, reads and writes whose
entities live on every node, the refused-whole batch, stale writes, health."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from feature_testing import at, customer_view, double, entity, rpc_error, write
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from redis.crc import key_slot
from redis_topologies import ClusterSetup, cluster_setup, feature_service
from support import eventually

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_view_pb2 as view_pb
from modelserve.type.v1 import feature_value_pb2 as value_pb
from modelserve_feature.config import FeatureSettings
from modelserve_features.redis_store import (
    VIEWS_EPOCH_KEY,
    VIEWS_KEY,
    EntityKey,
    redis_key,
    view_history_key,
)
from modelserve_runtime.precomputed import precomputed_key, read_precomputed, write_precomputed
from modelserve_runtime.redis_connect import RedisConnection

AVG = "customer:avg_amount_30d"
SEGMENT = "customer:segment"


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ClusterSetup]:
    """One cluster for the module's tests."""
    async with cluster_setup(tmp_path_factory.mktemp("cluster")) as setup:
        yield setup


@pytest.fixture
async def clean(cluster: ClusterSetup) -> AsyncIterator[None]:
    """An empty keyspace on every node, and no script cached anywhere: each test's first write
    meets NOSCRIPT on every node."""
    client = aioredis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        await client.flushall()
        await client.script_flush()
        yield
    finally:
        await client.aclose()


def _settings(cluster: ClusterSetup, **overrides: object) -> FeatureSettings:
    return FeatureSettings(
        redis=RedisConnection(mode="cluster", nodes=cluster.seeds[:1]),
        **overrides,  # type: ignore[arg-type]
    )


def _spread(cluster: ClusterSetup, per_node: int) -> list[str]:
    """Customer ids, `per_node` of them on each node, in node order."""
    chosen: dict[int, list[str]] = {node.port: [] for node in cluster.nodes}
    i = 0
    while any(len(ids) < per_node for ids in chosen.values()):
        entity_id = f"c-{i}"
        port = cluster.node_of(key_slot(_key(entity_id).encode()))
        if len(chosen[port]) < per_node:
            chosen[port].append(entity_id)
        i += 1
    return [entity_id for ids in chosen.values() for entity_id in ids]


def _key(entity_id: str) -> str:
    return redis_key(EntityKey("customer", entity_id), "customer")


async def _keys_by_node(cluster: ClusterSetup) -> dict[int, set[str]]:
    """The customer value hashes each node holds, asked of each node directly."""
    found: dict[int, set[str]] = {}
    for node in cluster.nodes:
        client = aioredis.Redis(port=node.port)
        try:
            keys = await client.keys("fs:{customer:*")
            found[node.port] = {k.decode() if isinstance(k, bytes) else k for k in keys}
        finally:
            await client.aclose()
    return found


def _reads() -> float:
    return REGISTRY.get_sample_value("modelserve_feature_redis_seconds_count", {"op": "read"}) or 0


@pytest.mark.usefixtures("clean")
class TestClusterMode:
    async def test_views_writes_and_reads_span_every_node(self, cluster: ClusterSetup) -> None:
        """Views are applied, changed, listed and deleted (their keys share one slot); one
        WriteFeatures batch lands each entity on the node of its slot, every node getting
        some; one GetOnlineFeatures (one pipeline) reads them all back from all nodes."""
        ids = _spread(cluster, per_node=2)
        many = [f"bulk-{i}" for i in range(300)]
        async with feature_service(_settings(cluster)) as service:
            stub = service.stub
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            other = view_pb.FeatureView(
                name="featureViews/scratch",
                entity_type="customer",
                features=[view_pb.FeatureSpec(name="x", dtype=view_pb.FEATURE_DTYPE_INT64)],
            )
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=other))
            written = await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write(
                            entity_id,
                            {
                                "avg_amount_30d": double(float(i)),
                                "segment": value_pb.FeatureValue(string_value=f"s{i}"),
                            },
                        )
                        for i, entity_id in enumerate(ids)
                    ]
                )
            )
            bulk = await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[write(e, {"avg_amount_30d": double(1.5)}) for e in many]
                )
            )
            reads_before = _reads()
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    entities=[entity(e) for e in [*ids, "nobody"]], features=[AVG, SEGMENT]
                )
            )
            reads_after = _reads()
            bulk_read = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(entities=[entity(e) for e in many], features=[AVG])
            )
            changed = await stub.ApplyFeatureView(
                pb.ApplyFeatureViewRequest(
                    feature_view=customer_view(country=view_pb.FEATURE_DTYPE_STRING)
                )
            )
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[write(ids[0], {"country": value_pb.FeatureValue(string_value="NL")})]
                )
            )
            country = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    entities=[entity(ids[0])], features=["customer:country"]
                )
            )
            await stub.DeleteFeatureView(pb.DeleteFeatureViewRequest(name="featureViews/scratch"))
            listed = await stub.ListFeatureViews(pb.ListFeatureViewsRequest())
            first = await stub.GetFeatureView(
                pb.GetFeatureViewRequest(name="featureViews/customer", version=1)
            )
        by_node = await _keys_by_node(cluster)
        for node in cluster.nodes:
            mine = {
                _key(e) for e in ids if cluster.node_of(key_slot(_key(e).encode())) == node.port
            }
            assert len(mine) == 2
            assert mine <= by_node[node.port]
        assert written.values_written == 2 * len(ids)
        assert bulk.values_written == len(many)
        *found, nobody = response.results
        assert [r.entity.entity_id for r in found] == ids
        assert [r.values[AVG].double_value for r in found] == [float(i) for i in range(len(ids))]
        assert [r.values[SEGMENT].string_value for r in found] == [f"s{i}" for i in range(6)]
        assert {r.statuses[AVG] for r in found} == {pb.FEATURE_STATUS_PRESENT}
        assert nobody.statuses[AVG] == pb.FEATURE_STATUS_MISSING
        assert reads_after - reads_before == 1
        assert {r.values[AVG].double_value for r in bulk_read.results} == {1.5}
        assert changed.changed and changed.feature_view.version == 2
        assert country.results[0].values["customer:country"].string_value == "NL"
        assert [v.name for v in listed.feature_views] == ["featureViews/customer"]
        assert first.feature_view.version == 1
        slots = {key_slot(k.encode()) for k in (VIEWS_KEY, VIEWS_EPOCH_KEY, view_history_key("x"))}
        assert len(slots) == 1

    async def test_a_bad_batch_over_every_node_writes_nothing(self, cluster: ClusterSetup) -> None:
        """A batch whose entities live on all three nodes and whose last write has a value of
        the wrong dtype is INVALID_ARGUMENT naming that value, and no node is written."""
        ids = _spread(cluster, per_node=2)
        writes = [write(e, {"avg_amount_30d": double(1.0)}) for e in ids[:-1]]
        writes.append(write(ids[-1], {"avg_amount_30d": value_pb.FeatureValue(string_value="x")}))
        async with feature_service(_settings(cluster)) as service:
            stub = service.stub
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.WriteFeatures(pb.WriteFeaturesRequest(writes=writes))
        error = rpc_error(info)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == [
            f"writes[{len(ids) - 1}].values['avg_amount_30d']"
        ]
        assert "expected double, got string" in error.message
        assert await _keys_by_node(cluster) == {node.port: set() for node in cluster.nodes}

    async def test_older_values_are_skipped_on_every_node(self, cluster: ClusterSetup) -> None:
        """A batch older than what is stored, over entities on all three nodes, keeps every
        stored value (counted as skipped as stale) and still writes the entity that had none."""
        ids = _spread(cluster, per_node=2)
        newer = at(datetime(2026, 3, 1, tzinfo=UTC))
        older = at(datetime(2026, 2, 1, tzinfo=UTC))
        async with feature_service(_settings(cluster)) as service:
            stub = service.stub
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write(e, {"avg_amount_30d": double(2.0)}, event_time=newer)
                        for e in ids[:-1]
                    ]
                )
            )
            stale = await stub.WriteFeatures(
                pb.WriteFeaturesRequest(
                    writes=[
                        write(e, {"avg_amount_30d": double(1.0)}, event_time=older) for e in ids
                    ]
                )
            )
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(entities=[entity(e) for e in ids], features=[AVG])
            )
        assert (stale.values_written, stale.values_skipped_stale) == (1, len(ids) - 1)
        kept = response.results[:-1]
        assert {r.values[AVG].double_value for r in kept} == {2.0}
        assert {r.event_times[AVG].seconds for r in kept} == {newer.seconds}
        assert response.results[-1].values[AVG].double_value == 1.0

    async def test_a_write_checked_against_outdated_views_is_checked_again(
        self, cluster: ClusterSetup
    ) -> None:
        """When another process retypes a feature after this one cached the views, a write
        of the old dtype is caught before any script runs (the epoch cannot be checked inside
        a per-slot script): the views are reloaded and the write refused against the new
        definition."""
        ids = _spread(cluster, per_node=1)
        async with (
            feature_service(_settings(cluster)) as service_a,
            feature_service(_settings(cluster)) as service_b,
        ):
            a, b = service_a.stub, service_b.stub
            await a.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await a.WriteFeatures(
                pb.WriteFeaturesRequest(writes=[write(ids[0], {"avg_amount_30d": double(1.0)})])
            )
            retyped = customer_view()
            retyped.features[0].dtype = view_pb.FEATURE_DTYPE_STRING
            await b.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=retyped, force=True))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await a.WriteFeatures(
                    pb.WriteFeaturesRequest(
                        writes=[write(e, {"avg_amount_30d": double(3.0)}) for e in ids]
                    )
                )
        error = rpc_error(info)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "expected string, got double" in error.message

    async def test_health_follows_every_node(self, cluster: ClusterSetup) -> None:
        """Health is SERVING while every node answers PING, NOT_SERVING while one node hangs,
        and SERVING again (with reads working) once it answers again."""
        hung = cluster.nodes[1]
        ids = _spread(cluster, per_node=1)
        async with feature_service(
            _settings(cluster, health_interval_s=0.1, redis_timeout_s=0.5)
        ) as service:
            stub = service.stub
            health = health_pb2_grpc.HealthStub(service.channel)

            def status_is(wanted: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
                    return bool(answer.status == wanted)

                return check

            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await eventually(status_is(health_pb2.HealthCheckResponse.SERVING), "SERVING")
            hung.signal(signal.SIGSTOP)
            try:
                await eventually(
                    status_is(health_pb2.HealthCheckResponse.NOT_SERVING),
                    "NOT_SERVING while a node hangs",
                    within_s=3.0,
                )
            finally:
                hung.signal(signal.SIGCONT)
            await eventually(
                status_is(health_pb2.HealthCheckResponse.SERVING), "SERVING again", within_s=10
            )

            async def reads() -> bool:
                try:
                    await stub.GetOnlineFeatures(
                        pb.GetOnlineFeaturesRequest(
                            entities=[entity(e) for e in ids], features=[AVG]
                        )
                    )
                except grpc.aio.AioRpcError:
                    return False
                return True

            await eventually(reads, "reads work again", within_s=10)


@pytest.mark.usefixtures("clean")
class TestPrecomputedOnCluster:
    async def test_batch_predictions_land_on_every_node_and_read_back(
        self, cluster: ClusterSetup
    ) -> None:
        """A batch job's predictions, whose keys live on all three nodes, are each stored on
        their own key's node with their expiry, and read back whole by the router's reader."""
        client = aioredis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        try:
            ids = [f"c-{i}" for i in range(60)]
            nodes = {
                cluster.node_of(key_slot(precomputed_key("fraud", "customer", i).encode()))
                for i in ids
            }
            assert len(nodes) == 3
            at = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
            probabilities = np.linspace(0, 1, 120, dtype=np.float32).reshape(60, 2)
            written = await write_precomputed(
                client,
                endpoint="fraud",
                entity_type="customer",
                model_version="models/fraud/versions/3",
                entity_ids=ids,
                outputs={"probabilities": probabilities},
                computed_at=at,
                ttl_s=600,
                batch_size=25,
            )
            assert written == 60
            for i, entity_id in enumerate(ids):
                found = await read_precomputed(client, "fraud", "customer", entity_id)
                assert found is not None
                assert found.model_version == "models/fraud/versions/3"
                np.testing.assert_array_equal(
                    found.outputs["probabilities"], probabilities[i : i + 1]
                )
                ttl_ms = await client.pttl(precomputed_key("fraud", "customer", entity_id))
                assert 0 < ttl_ms <= 600_000
        finally:
            await client.aclose()
