"""The command line reaching each Redis as the service that owns it does, from that service's
settings: `modelserve features materialize` into a master found through a real Sentinel and
into a real three-node cluster (`MODELSERVE_FEATURE_REDIS__*`), the batch and stream jobs'
Redis from the router's settings (`MODELSERVE_ROUTER_REDIS__*`); settings that cannot work
stop a command before it reads anything."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from click.testing import Result
from redis_topologies import MASTER_NAME, ClusterSetup, SentinelSetup, cluster_setup, sentinel_setup
from test_feature_materialize import (
    T0,
    customer_view,
    read,
    rows_table,
    setup_view,
    summary,
    write_parquet,
)
from typer.testing import CliRunner

from modelserve_cli.batch import JobConnection
from modelserve_cli.main import app
from modelserve_features.online import OnlineStore
from modelserve_runtime.errors import NotFoundError
from modelserve_runtime.redis_connect import RedisClient

ROWS = [("c-1", T0, 12.5, 3, "gold", True), ("c-2", T0 + 1, 7.0, 0, "new", False)]


async def _materialize(path: Path, env: dict[str, str], *args: str) -> Result:
    command = ["features", "materialize", str(path), "--view", "customer", *args]
    # The variables the feature service would have; none of the test run's own leak in.
    clean = {"MODELSERVE_FEATURE_REDIS_URL": None} | env
    return await asyncio.to_thread(CliRunner().invoke, app, command, env=clean)


async def _lands(client: RedisClient, path: Path, env: dict[str, str]) -> None:
    await setup_view(client)  # type: ignore[arg-type]
    result = await _materialize(path, env)
    assert result.exit_code == 0, result.output
    assert summary(result)["entities written"] == "2"
    c1, c2 = await read(client, "c-1", "c-2")  # type: ignore[arg-type]
    assert (c1["segment"].value, c1["vip"].value, c2["avg_amount_30d"].value) == ("gold", True, 7.0)
    assert c1["segment"].event_time_us == T0 * 1_000_000


@pytest.fixture
async def sentinel(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SentinelSetup]:
    async with sentinel_setup(tmp_path_factory.mktemp("sentinel")) as setup:
        yield setup


@pytest.fixture
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ClusterSetup]:
    async with cluster_setup(tmp_path_factory.mktemp("cluster")) as setup:
        yield setup


class TestMaterializeTopologies:
    async def test_a_master_found_through_sentinel(
        self, sentinel: SentinelSetup, tmp_path: Path
    ) -> None:
        path = write_parquet(tmp_path / "t.parquet", rows_table(ROWS))
        master = aioredis.Redis(port=await sentinel.master_port())
        try:
            await _lands(
                master,
                path,
                {
                    "MODELSERVE_FEATURE_REDIS__MODE": "sentinel",
                    "MODELSERVE_FEATURE_REDIS__NODES": f"127.0.0.1:{sentinel.sentinel.port}",
                    "MODELSERVE_FEATURE_REDIS__MASTER_NAME": MASTER_NAME,
                },
            )
        finally:
            await master.aclose()

    async def test_the_services_yaml_file_as_the_service_reads_it(
        self, sentinel: SentinelSetup, tmp_path: Path
    ) -> None:
        """`--config` (or MODELSERVE_CONFIG): the feature service's own YAML file names the
        Sentinel, the master and the database; the environment names nothing."""
        path = write_parquet(tmp_path / "t.parquet", rows_table(ROWS))
        config = tmp_path / "feature.yaml"
        config.write_text(
            "server:\n  port: 50053\n"
            "redis:\n"
            "  mode: sentinel\n"
            f"  nodes: ['127.0.0.1:{sentinel.sentinel.port}']\n"
            f"  master_name: {MASTER_NAME}\n"
            "  db: 3\n"
        )
        master = aioredis.Redis(port=await sentinel.master_port(), db=3)
        try:
            await _lands(master, path, {"MODELSERVE_CONFIG": str(config)})
        finally:
            await master.aclose()

    async def test_a_cluster(self, cluster: ClusterSetup, tmp_path: Path) -> None:
        path = write_parquet(tmp_path / "t.parquet", rows_table(ROWS))
        client = aioredis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        try:
            await _lands(
                client,
                path,
                {
                    "MODELSERVE_FEATURE_REDIS__MODE": "cluster",
                    "MODELSERVE_FEATURE_REDIS__NODES": cluster.seeds[1],
                },
            )
        finally:
            await client.aclose()

    @pytest.mark.parametrize(
        ("env", "args", "message"),
        [
            (
                {"MODELSERVE_FEATURE_REDIS__MODE": "sentinel"},
                (),
                "MODELSERVE_FEATURE_REDIS",
            ),
            (
                {
                    "MODELSERVE_FEATURE_REDIS__MODE": "sentinel",
                    "MODELSERVE_FEATURE_REDIS__NODES": "127.0.0.1:1",
                    "MODELSERVE_FEATURE_REDIS__MASTER_NAME": "m",
                },
                ("--redis-url", "redis://127.0.0.1:1/0"),
                "redis_url is the shorthand for standalone mode",
            ),
            ({}, ("--config", "no-such.yaml"), "config file no-such.yaml does not exist"),
        ],
    )
    async def test_settings_that_cannot_work_stop_it_before_it_reads(
        self, tmp_path: Path, env: dict[str, str], args: tuple[str, ...], message: str
    ) -> None:
        """A sentinel mode without its nodes and master name, or a standalone url beside a
        sentinel mode: one line naming the setting, exit 1, nothing read."""
        result = await _materialize(tmp_path / "missing.parquet", env, *args)
        assert result.exit_code == 1
        assert message in result.output
        assert "missing.parquet" not in result.output


class TestJobConnection:
    async def test_the_jobs_redis_is_the_routers_and_the_features_follow_their_settings(
        self,
        sentinel: SentinelSetup,
        redis_url: str,
        redis_client: aioredis.Redis,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Batch and stream jobs write to the Redis the router's settings name (here a master
        behind a Sentinel), and read features where the feature service's settings say (here
        a standalone server); without those, features share the router's Redis."""
        for name in ("MODELSERVE_REDIS_URL", "MODELSERVE_FEATURE_REDIS_URL"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MODELSERVE_ROUTER_REDIS__MODE", "sentinel")
        monkeypatch.setenv("MODELSERVE_ROUTER_REDIS__NODES", f"127.0.0.1:{sentinel.sentinel.port}")
        monkeypatch.setenv("MODELSERVE_ROUTER_REDIS__MASTER_NAME", MASTER_NAME)
        master = aioredis.Redis(port=await sentinel.master_port())
        on_master = dataclasses.replace(customer_view(), name="job_view_on_master")
        standalone = dataclasses.replace(customer_view(), name="job_view_standalone")
        try:
            await OnlineStore(master).apply_view(on_master)
            await OnlineStore(redis_client).apply_view(standalone)
            async with JobConnection("127.0.0.1:1", "127.0.0.1:1", None, None, None, 5) as clients:
                await clients.redis.set("job:probe", "router")
                assert await clients.features.views([on_master.name])
            assert await master.get("job:probe") == b"router"

            monkeypatch.setenv("MODELSERVE_FEATURE_REDIS_URL", redis_url)
            async with JobConnection("127.0.0.1:1", "127.0.0.1:1", None, None, None, 5) as clients:
                assert await clients.features.views([standalone.name])
                with pytest.raises(NotFoundError):
                    await clients.features.views([on_master.name])
                await clients.redis.set("job:probe", "again")
            assert await master.get("job:probe") == b"again"
        finally:
            await master.aclose()
