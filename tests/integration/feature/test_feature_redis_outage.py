"""The feature service while its redis-server is stopped and started again on the same port."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from feature_testing import customer_view, double, entity, settings, write
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import eventually, running

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve_cli.stack import RedisProcess, free_port
from modelserve_feature.server import build_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, on a fixed free port so it can come back on it."""
    server = RedisProcess(tmp_path / "redis", port=free_port())
    server.start()
    yield server
    server.stop()


async def _wait_for_health(
    health: health_pb2_grpc.HealthStub, wanted: int, timeout_s: float = 10.0
) -> None:
    async def reached() -> bool:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        return bool(answer.status == wanted)

    await eventually(reached, f"health {wanted}", within_s=timeout_s)


class TestRedisOutage:
    async def test_fails_fast_reports_not_serving_and_recovers(
        self, own_redis: RedisProcess
    ) -> None:
        """With Redis hung (SIGSTOP) or stopped, a read fails UNAVAILABLE well within the
        caller's deadline (saying that Redis timed out, or how it failed) and health turns
        NOT_SERVING; once Redis answers again (SIGCONT, or
        a new redis-server on the same port) health returns to SERVING and reads and writes
        work without a restart of the service."""
        read = pb.GetOnlineFeaturesRequest(
            entities=[entity("c-1")], features=["customer:avg_amount_30d"]
        )
        async with running(
            build_server, settings(own_redis.url, health_interval_s=0.1, redis_timeout_s=5.0)
        ) as (_, channel, _app):
            stub = pb_grpc.FeatureServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(writes=[write("c-1", {"avg_amount_30d": double(4.0)})])
            )
            await _wait_for_health(health, SERVING)

            assert own_redis.pid is not None
            os.kill(own_redis.pid, signal.SIGSTOP)  # hung: accepts, never answers
            try:
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as hung:
                    # The caller's deadline is shorter than the service's Redis timeout.
                    await stub.GetOnlineFeatures(read, timeout=1.0)
                hung_s = time.monotonic() - started
                await _wait_for_health(health, NOT_SERVING)
            finally:
                os.kill(own_redis.pid, signal.SIGCONT)
            await _wait_for_health(health, SERVING)
            await stub.GetOnlineFeatures(read, timeout=2.0)

            own_redis.stop()  # down: connections refused
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetOnlineFeatures(read, timeout=2.0)
            elapsed = time.monotonic() - started
            await _wait_for_health(health, NOT_SERVING)

            own_redis.start()
            await _wait_for_health(health, SERVING)
            # The restarted server kept nothing (persistence is off): define and write again.
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(writes=[write("c-1", {"avg_amount_30d": double(5.0)})])
            )
            response = await stub.GetOnlineFeatures(read, timeout=2.0)
        assert hung.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "redis did not answer (read): TimeoutError" in (hung.value.details() or "")
        assert hung_s < 1.0
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "redis" in (info.value.details() or "")
        assert elapsed < 1.0
        assert response.results[0].values["customer:avg_amount_30d"].double_value == 5.0
