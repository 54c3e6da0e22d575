"""MonitorService reading the prediction log from a real Redis, through a real gRPC server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from support import running

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.aggregate import SEP
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.consumer import _refuses_the_data
from modelserve_monitor.server import MonitorApp, build_server
from modelserve_monitor.store import PREFIX
from modelserve_runtime.errors import decode_rpc_error
from modelserve_runtime.prediction_log import (
    DEFAULT_STREAM,
    RECORD_FIELD,
    PredictionLogWriter,
    encode_record,
)

V1 = "models/fraud/versions/1"
V2 = "models/fraud/versions/2"
DEADLINE_S = 10.0
POLL_S = 0.02


def _settings(redis_url: str) -> MonitorSettings:
    return MonitorSettings(redis_url=redis_url, consumer_name="monitor-test", block_ms=200)


def _record(
    request_id: str,
    version: str,
    latency_us: int,
    *,
    endpoint: str = "fraud",
    error: bool = False,
    degraded: bool = False,
) -> rec_pb.PredictionRecord:
    return rec_pb.PredictionRecord(
        request_id=request_id,
        endpoint=endpoint,
        model_version=version,
        latency_us=latency_us,
        status=rec_pb.PREDICTION_STATUS_ERROR if error else rec_pb.PREDICTION_STATUS_OK,
        error_code="UNAVAILABLE" if error else "",
        degraded=degraded,
    )


async def _stats_once_counted(
    stub: pb_grpc.MonitorServiceAsyncStub, endpoint: str, count: int
) -> pb.GetEndpointStatsResponse:
    """Asks until the endpoint has `count` requests; fails the test after the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    last = "no answer"
    while loop.time() < deadline:
        try:
            response = await stub.GetEndpointStats(pb.GetEndpointStatsRequest(endpoint=endpoint))
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            last = "NOT_FOUND"
        else:
            if response.request_count >= count:
                return response
            last = f"{response.request_count} requests"
        await asyncio.sleep(POLL_S)
    pytest.fail(f"{endpoint}: expected {count} requests within {DEADLINE_S}s, last saw {last}")


class TestMonitorService:
    async def test_counts_errors_and_percentiles_per_version(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Records of two versions add up to per-version counts and numpy's latency percentiles."""
        rng = np.random.default_rng(42)
        latencies = {
            V1: rng.integers(500, 40_000, size=240),
            V2: rng.integers(800, 90_000, size=60),
        }
        records = [
            _record(
                f"{version[-1]}-{i}", version, int(latency), error=i % 10 == 3, degraded=i % 20 == 7
            )
            for version, values in latencies.items()
            for i, latency in enumerate(values)
        ]
        async with running(build_server, _settings(redis_url)) as (_, channel, _app):
            writer = PredictionLogWriter(redis_client)
            # In chunks: each append holds its own pooled connection while it runs.
            for start in range(0, len(records), 50):
                for record in records[start : start + 50]:
                    writer.append(record)
                await writer.flush()
            assert writer.dropped == 0
            response = await _stats_once_counted(pb_grpc.MonitorServiceStub(channel), "fraud", 300)
        assert response.endpoint == "fraud"
        assert response.request_count == 300
        assert [v.model_version for v in response.versions] == [V1, V2]
        for version in response.versions:
            values = latencies[version.model_version]
            # From a log-linear histogram: within its bucket width (1/16) of the exact value.
            expected = np.percentile(values / 1000.0, [50, 95, 99])
            assert version.request_count == len(values)
            assert version.error_count == sum(1 for i in range(len(values)) if i % 10 == 3)
            assert version.degraded_count == sum(1 for i in range(len(values)) if i % 20 == 7)
            assert [version.latency_p50_ms, version.latency_p95_ms, version.latency_p99_ms] == (
                pytest.approx(expected.tolist(), rel=0.04)
            )

    async def test_duplicate_delivery_is_counted_once(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """The same record appended twice (same request id) counts as one request."""
        duplicate = _record("dup-1", V1, 1500)
        async with running(build_server, _settings(redis_url)) as (_, channel, app):
            assert isinstance(app, MonitorApp)
            writer = PredictionLogWriter(redis_client)
            for record in (duplicate, duplicate, _record("after-dup", V1, 2500)):
                writer.append(record)
                await writer.flush()
            await _stats_once_counted(pb_grpc.MonitorServiceStub(channel), "fraud", 2)
            await app.consumer.drain(DEADLINE_S)
            response = await pb_grpc.MonitorServiceStub(channel).GetEndpointStats(
                pb.GetEndpointStatsRequest(endpoint="fraud")
            )
        assert await redis_client.xlen(DEFAULT_STREAM) == 3
        assert response.request_count == 2
        assert app.consumer.duplicates == 1

    async def test_malformed_entries_do_not_stop_counting(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Malformed entries are counted, acknowledged and skipped; later records still count."""
        async with running(build_server, _settings(redis_url)) as (_, channel, app):
            assert isinstance(app, MonitorApp)
            await redis_client.xadd(DEFAULT_STREAM, {b"something": b"else"})
            await redis_client.xadd(DEFAULT_STREAM, {RECORD_FIELD: b"\xff\xff\xff\xff"})
            await redis_client.xadd(
                DEFAULT_STREAM, encode_record(_record("no-endpoint", V1, 1, endpoint=""))
            )
            for i in range(5):
                await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"ok-{i}", V1, 1000)))
            response = await _stats_once_counted(pb_grpc.MonitorServiceStub(channel), "fraud", 5)
            await app.consumer.drain(DEADLINE_S)
            pending = await redis_client.xpending(DEFAULT_STREAM, "monitor")
        assert response.request_count == 5
        assert app.consumer.malformed == 3
        assert pending["pending"] == 0

    async def test_records_redis_refuses_do_not_stop_counting(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A counter key of endpoint `poisoned` that something else overwrote with a string:
        Redis refuses every batch holding one of its records. Those records are acknowledged
        uncounted (refused, logged) and the rest of their batches, before and after, still
        count; nothing stays pending and the foreign key is left as it was."""
        foreign = f"{PREFIX}:agg:poisoned{SEP}{V1}:total"
        await redis_client.set(foreign, "another tool's")
        async with running(build_server, _settings(redis_url)) as (_, channel, app):
            assert isinstance(app, MonitorApp)
            for i in range(6):
                if i in (1, 4):
                    record = _record(f"bad-{i}", V1, 1000, endpoint="poisoned")
                    await redis_client.xadd(DEFAULT_STREAM, encode_record(record))
                await redis_client.xadd(DEFAULT_STREAM, encode_record(_record(f"ok-{i}", V1, 1000)))
            response = await _stats_once_counted(pb_grpc.MonitorServiceStub(channel), "fraud", 6)
            await app.consumer.drain(DEADLINE_S)
            pending = await redis_client.xpending(DEFAULT_STREAM, "monitor")
            later = _record("ok-later", V1, 1000)
            await redis_client.xadd(DEFAULT_STREAM, encode_record(later))
            again = await _stats_once_counted(pb_grpc.MonitorServiceStub(channel), "fraud", 7)
        assert response.request_count == 6
        assert again.request_count == 7
        assert (app.consumer.refused, app.consumer.duplicates) == (2, 0)
        assert pending["pending"] == 0
        assert await redis_client.get(foreign) == b"another tool's"

    async def test_only_refusals_of_the_data_are_refused_record_by_record(
        self, redis_client: aioredis.Redis
    ) -> None:
        """Errors from a real Redis: a key of another kind and a counter that cannot take the
        increment are about one batch's data (its records are counted one by one, the ones
        Redis refuses dropped); out of memory, missing permissions and a failing script are
        not (the batch waits in the stream and is retried whole)."""
        await redis_client.set("not-a-hash", "x")
        await redis_client.hset("counters", "n", "not a number")
        await redis_client.acl_setuser("reader", enabled=True, nopass=True, commands=["+get"])

        async def error(call: Awaitable[object]) -> redis.ResponseError:
            with pytest.raises(redis.ResponseError) as info:
                await call
            return info.value

        data = [
            await error(redis_client.hincrby("not-a-hash", "n", 1)),
            await error(redis_client.hincrby("counters", "n", 1)),
            await error(redis_client.hincrbyfloat("counters", "n", 1.5)),
            await error(redis_client.eval("return redis.call('HINCRBY', KEYS[1], 'n', 1)", 1, "not-a-hash")),
        ]  # fmt: skip
        others = [
            await error(redis_client.eval("return nil + 1", 0)),
        ]
        reader = aioredis.Redis(
            connection_pool=redis_client.connection_pool.__class__(
                **{**redis_client.connection_pool.connection_kwargs, "username": "reader"}
            )
        )
        try:
            others.append(await error(reader.hincrby("counters", "m", 1)))
        finally:
            await reader.aclose()
        await redis_client.config_set("maxmemory", "1")
        try:
            others.append(await error(redis_client.hincrby("counters", "m", 1)))
        finally:
            await redis_client.config_set("maxmemory", "0")
        assert [_refuses_the_data(e) for e in data] == [True] * 4
        assert [_refuses_the_data(e) for e in others] == [False] * 3
        assert [type(e).__name__ for e in others[1:]] == ["NoPermissionError", "OutOfMemoryError"]

    async def test_records_logged_before_start_are_counted(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A new consumer group reads the stream from its first entry, not only what comes later."""
        writer = PredictionLogWriter(redis_client)
        for i in range(7):
            writer.append(_record(f"early-{i}", V2, 1000))
        await writer.flush()
        async with running(build_server, _settings(redis_url)) as (_, channel, _app):
            response = await _stats_once_counted(pb_grpc.MonitorServiceStub(channel), "fraud", 7)
        assert response.request_count == 7

    async def test_consumer_recovers_when_the_stream_is_deleted(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """Deleting the stream under the consumer does not stop it: it re-creates its group."""
        async with running(build_server, _settings(redis_url)) as (_, channel, _app):
            stub = pb_grpc.MonitorServiceStub(channel)
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record("before", V1, 1000)))
            await _stats_once_counted(stub, "fraud", 1)
            await redis_client.delete(DEFAULT_STREAM)
            await redis_client.xadd(DEFAULT_STREAM, encode_record(_record("after", V1, 1000)))
            response = await _stats_once_counted(stub, "fraud", 2)
        assert response.request_count == 2

    async def test_empty_endpoint_is_invalid_argument(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """A request without an endpoint is refused with a field violation naming `endpoint`."""
        async with running(build_server, _settings(redis_url)) as (_, channel, _app):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.MonitorServiceStub(channel).GetEndpointStats(
                    pb.GetEndpointStatsRequest()
                )
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.domain == "monitor.modelserve"
        assert [v.field for v in error.violations] == ["endpoint"]

    async def test_unknown_endpoint_is_not_found(
        self, redis_url: str, redis_client: aioredis.Redis
    ) -> None:
        """An endpoint with no records is NOT_FOUND, with the endpoint in the ErrorInfo."""
        async with running(build_server, _settings(redis_url)) as (_, channel, _app):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.MonitorServiceStub(channel).GetEndpointStats(
                    pb.GetEndpointStatsRequest(endpoint="nobody-calls-me")
                )
        error = decode_rpc_error(info.value)
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.reason == "ENDPOINT_NOT_FOUND"
        assert error.metadata == {"endpoint": "nobody-calls-me"}
