"""The prediction log through an outage of its Redis: the router keeps answering while the
Redis of its stream is away, holds the records, and writes every one once Redis is back.

Features come from the feature service on the dependencies' Redis, so only the stream's Redis
goes away.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from router_testing import STREAM, V1, WAIT_S, Dependencies, deploy, request, router
from support import eventually, running

from modelserve_cli.stack import RedisProcess
from modelserve_feature import server as feature_server
from modelserve_feature.config import FeatureSettings
from modelserve_runtime.prediction_log import decode_record

pytestmark = pytest.mark.triton


async def _logged(client: aioredis.Redis) -> list[str]:
    """The request ids on the stream, in order."""
    try:
        entries = await client.xrange(STREAM)
    except (aioredis.RedisError, OSError):
        return []
    return [decode_record(fields).request_id for _, fields in entries]


class TestStreamOutage:
    async def test_no_record_lost_while_redis_is_away(
        self, dependencies: Dependencies, tmp_path: Path
    ) -> None:
        """Requests answered while the stream's Redis is down are all on the stream, in order
        and once each, after it comes back; none is dropped."""
        deps = dependencies
        await deploy(deps, "log-outage", V1)
        stream_redis = RedisProcess(tmp_path / "stream-redis")
        stream_redis.start()
        stream = aioredis.Redis.from_url(stream_redis.url, socket_connect_timeout=0.5)
        try:
            async with (
                running(feature_server.build_server, FeatureSettings(redis_url=deps.redis.url)) as (
                    feature_grpc,
                    _,
                    _,
                ),
                router(
                    deps,
                    redis_url=stream_redis.url,
                    feature_reader="service",
                    feature_target=f"127.0.0.1:{feature_grpc.port}",
                    prediction_log_retry_max_s=0.1,
                ) as (stub, app),
            ):
                first = request("log-outage")
                first.request_id = "before"
                await stub.Predict(first)
                await eventually(
                    lambda: _logged_is(stream, ["before"]), "the first record", within_s=WAIT_S
                )
                stream_redis.stop()
                during = [f"during-{i:02d}" for i in range(20)]
                for request_id in during:
                    message = request("log-outage")
                    message.request_id = request_id
                    response = await stub.Predict(message)
                    assert response.model_version == V1 and not response.degraded
                assert app.prediction_log.buffered > 0
                # Persistence is off: the restarted server holds what came after the outage.
                stream_redis.start()
                await eventually(
                    lambda: _logged_is(stream, during), "the records of the outage", within_s=WAIT_S
                )
                assert app.prediction_log.dropped == 0
                # Written twice or more (tried while Redis was away), each is still whole
                # and once: its features and its outputs, one of each name.
                for _, fields in await stream.xrange(STREAM):
                    record = decode_record(fields)
                    names = [o.name for o in record.outputs]
                    assert names and len(names) == len(set(names)), record
                    assert len(record.features) > 0, record
        finally:
            await stream.aclose()
            stream_redis.stop()


async def _logged_is(client: aioredis.Redis, request_ids: list[str]) -> bool:
    return await _logged(client) == request_ids
