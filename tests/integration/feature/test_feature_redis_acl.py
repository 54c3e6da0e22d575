"""The feature service on a real Redis that requires a password: an ACL user limited to the
store's keys, the `default` user's `requirepass`, and wrong credentials failing clearly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from feature_testing import customer_view, double, entity, rpc_error, write
from pydantic import SecretStr
from redis_topologies import (
    ACL_PASSWORD,
    ACL_USER,
    ADMIN_PASSWORD,
    RedisServer,
    acl_server,
    feature_service,
)

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve_feature.config import FeatureSettings
from modelserve_runtime.errors import UnavailableError
from modelserve_runtime.redis_connect import RedisConnection

AVG = "customer:avg_amount_30d"


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    """One ACL server for the module."""
    async with acl_server(tmp_path_factory.mktemp("acl")) as started:
        yield started


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """The `default` user, on a clean keyspace."""
    client = aioredis.Redis(port=server.port, password=ADMIN_PASSWORD)
    await client.flushall()
    yield client
    await client.aclose()


def _url(server: RedisServer) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


async def _round_trip(settings: FeatureSettings) -> float:
    """Applies the view, writes one value and reads it back through the service."""
    async with feature_service(settings) as service:
        stub = service.stub
        await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
        await stub.WriteFeatures(
            pb.WriteFeaturesRequest(writes=[write("c-1", {"avg_amount_30d": double(7.5)})])
        )
        response = await stub.GetOnlineFeatures(
            pb.GetOnlineFeaturesRequest(entities=[entity("c-1")], features=[AVG])
        )
    return response.results[0].values[AVG].double_value


class TestPasswordsAndAclUsers:
    async def test_an_acl_user_limited_to_the_store_keys_is_enough(
        self, server: RedisServer, admin: aioredis.Redis
    ) -> None:
        """Logged in as an ACL user that may touch only `fs:*` keys, the service defines views,
        writes and reads: every key it uses is under `fs:`, and it is that user Redis sees."""
        settings = FeatureSettings(
            redis=RedisConnection(
                url=_url(server), username=ACL_USER, password=SecretStr(ACL_PASSWORD)
            )
        )
        async with feature_service(settings) as service:
            stub = service.stub
            await stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=customer_view()))
            await stub.WriteFeatures(
                pb.WriteFeaturesRequest(writes=[write("c-1", {"avg_amount_30d": double(7.5)})])
            )
            response = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(entities=[entity("c-1")], features=[AVG])
            )
            clients = await admin.client_list()
        assert response.results[0].values[AVG].double_value == 7.5
        assert ACL_USER in {c["user"] for c in clients}
        keys = await admin.keys("*")
        assert keys
        assert all((k.decode() if isinstance(k, bytes) else k).startswith("fs:") for k in keys)

    async def test_the_default_user_password_from_the_url_or_a_file(
        self, server: RedisServer, admin: aioredis.Redis, tmp_path: Path
    ) -> None:
        """`requirepass` works as before through the password in `redis_url`, and through
        `redis.password_file` (a mounted secret with a trailing newline)."""
        secret = tmp_path / "redis-password"
        secret.write_text(ADMIN_PASSWORD + "\n")
        in_url = FeatureSettings(redis_url=f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/0")
        in_file = FeatureSettings(redis=RedisConnection(url=_url(server), password_file=secret))
        assert await _round_trip(in_url) == 7.5
        await admin.flushall()
        assert await _round_trip(in_file) == 7.5

    @pytest.mark.parametrize(
        ("username", "password"),
        [(ACL_USER, "wrong"), (None, "wrong"), (None, None)],
        ids=["wrong-acl-password", "wrong-requirepass", "no-password"],
    )
    async def test_wrong_credentials_fail_clearly(
        self, server: RedisServer, username: str | None, password: str | None
    ) -> None:
        """A wrong or missing password fails the readiness check, and every call, with
        UNAVAILABLE and reason REDIS_AUTH_FAILED saying the credentials were refused."""
        settings = FeatureSettings(
            redis=RedisConnection(
                url=_url(server),
                username=username,
                password=None if password is None else SecretStr(password),
            )
        )
        async with feature_service(settings, ready=False) as service:
            with pytest.raises(UnavailableError) as ready:
                await service.app.check_ready()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await service.stub.GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest(entities=[entity("c-1")], features=[AVG])
                )
        assert ready.value.reason == "REDIS_AUTH_FAILED"
        assert "redis refused the credentials" in ready.value.message
        error = rpc_error(info)
        assert error.code is grpc.StatusCode.UNAVAILABLE
        assert error.reason == "REDIS_AUTH_FAILED"
        assert "check the username and password" in error.message
