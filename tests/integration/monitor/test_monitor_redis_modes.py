"""The monitor on real Redis topologies: an ACL user confined to the monitor's keys, and a
master found through a real Sentinel, again after the Sentinel promoted the replica."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from integration.feature.redis_topologies import (
    ADMIN_PASSWORD,
    MASTER_NAME,
    RedisServer,
    SentinelSetup,
    acl_server,
    sentinel_setup,
)
from support import eventually, running

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.server import MonitorApp, build_server
from modelserve_runtime.errors import UnavailableError, decode_rpc_error
from modelserve_runtime.prediction_log import DEFAULT_STREAM, encode_record
from modelserve_runtime.redis_connect import RedisConnection

MONITOR_USER, MONITOR_PASSWORD = "monitor", "monitor-secret"
V1 = "models/fraud/versions/1"


def _record(request_id: str) -> rec_pb.PredictionRecord:
    return rec_pb.PredictionRecord(
        request_id=request_id,
        endpoint="fraud",
        model_version=V1,
        latency_us=1000,
        status=rec_pb.PREDICTION_STATUS_OK,
    )


async def _append(client: aioredis.Redis, *request_ids: str) -> None:
    for request_id in request_ids:
        await client.xadd(DEFAULT_STREAM, encode_record(_record(request_id)))  # type: ignore[arg-type]


async def _counted(stub: pb_grpc.MonitorServiceAsyncStub, count: int) -> None:
    async def check() -> bool:
        try:
            response = await stub.GetEndpointStats(pb.GetEndpointStatsRequest(endpoint="fraud"))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE), exc
            return False
        return response.request_count == count

    await eventually(check, f"{count} records counted", within_s=30, every_s=0.05)


@pytest.fixture
async def acl(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    """A server with `requirepass` and an ACL user MONITOR_USER that may touch only
    `modelserve:*` keys (the stream and the monitor's own)."""
    async with acl_server(tmp_path_factory.mktemp("acl")) as server:
        admin = aioredis.Redis(port=server.port, password=ADMIN_PASSWORD)
        try:
            await admin.acl_setuser(
                MONITOR_USER,
                enabled=True,
                passwords=[f"+{MONITOR_PASSWORD}"],
                keys=["modelserve:*"],
                commands=["+@all"],
            )
        finally:
            await admin.aclose()
        yield server


@pytest.fixture
async def sentinel(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SentinelSetup]:
    """A master, a replica and a Sentinel of this test alone (the test kills the master)."""
    async with sentinel_setup(tmp_path_factory.mktemp("sentinel")) as setup:
        yield setup


class TestRedisModes:
    async def test_an_acl_user_confined_to_the_monitor_keys_is_enough(
        self, acl: RedisServer
    ) -> None:
        """Logged in as an ACL user allowed only `modelserve:*` keys, the monitor counts the
        log (its scripts touch no other key); with Redis gone a call answers UNAVAILABLE."""
        url = f"redis://127.0.0.1:{acl.port}/0"
        settings = MonitorSettings(
            redis=RedisConnection(url=url, username=MONITOR_USER, password=MONITOR_PASSWORD),
            consumer_name="acl-test",
            block_ms=100,
            baseline_records=2,
        )
        writer = aioredis.Redis(port=acl.port, password=ADMIN_PASSWORD)
        try:
            async with running(build_server, settings) as (_, channel, app):
                assert isinstance(app, MonitorApp)
                await _append(writer, "r1", "r2", "r3", "r1")
                stub = pb_grpc.MonitorServiceStub(channel)
                await _counted(stub, 3)
                assert app.consumer.duplicates == 1
                acl.stop()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetEndpointStats(pb.GetEndpointStatsRequest(endpoint="fraud"))
                error = decode_rpc_error(info.value)
                assert (error.code, error.reason) == (
                    grpc.StatusCode.UNAVAILABLE,
                    "REDIS_UNAVAILABLE",
                )
        finally:
            await writer.aclose()

    async def test_a_wrong_password_fails_readiness(self, acl: RedisServer) -> None:
        """A password Redis refuses makes the monitor not ready, saying Redis does not answer."""
        wrong = MonitorSettings(
            redis=RedisConnection(
                url=f"redis://127.0.0.1:{acl.port}/0", username=MONITOR_USER, password="not-it"
            ),
            consumer_name="acl-test",
        )
        with pytest.raises(UnavailableError, match="redis does not answer"):
            async with running(build_server, wrong):
                pass

    async def test_sentinel_mode_follows_the_master_through_a_failover(
        self, sentinel: SentinelSetup
    ) -> None:
        """The monitor reads the log on the master the Sentinel names; once that master is
        killed and the replica promoted, it goes on counting there without a restart, and
        nothing counted before is lost or counted again."""
        settings = MonitorSettings(
            redis=RedisConnection(
                mode="sentinel",
                nodes=[f"127.0.0.1:{sentinel.sentinel.port}"],
                master_name=MASTER_NAME,
                timeout_s=0.5,
            ),
            consumer_name="sentinel-test",
            block_ms=100,
        )
        master = aioredis.Redis(port=sentinel.master.port)
        try:
            async with running(build_server, settings) as (_, channel, _app):
                stub = pb_grpc.MonitorServiceStub(channel)
                await _append(master, *(f"before-{i}" for i in range(10)))
                await _counted(stub, 10)
                # Every write reached the replica before the master dies.
                assert await master.execute_command("WAIT", 1, 5000) == 1
                sentinel.master.stop()
                await eventually(lambda: _promoted(sentinel), "the replica promoted", within_s=30)
                promoted = aioredis.Redis(port=sentinel.replica.port)
                try:
                    await _append(promoted, *(f"after-{i}" for i in range(10)), "before-3")
                    await _counted(stub, 20)
                finally:
                    await promoted.aclose()
        finally:
            await master.aclose()


async def _promoted(setup: SentinelSetup) -> bool:
    return await setup.master_port() == setup.replica.port
