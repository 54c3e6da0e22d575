"""How the router reaches its own dependencies: an API key for a registry that has auth on, and
the `redis` settings block (an ACL user's credentials) for Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from router_testing import (
    MODEL_ID,
    V1,
    V2,
    WAIT_S,
    Dependencies,
    deploy,
    records,
    request,
    router,
    router_settings,
)
from structlog.testing import capture_logs
from support import eventually, running

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve_registry import server as registry_server
from modelserve_registry.config import RegistrySettings
from modelserve_router.server import build_server
from modelserve_runtime.auth import AuthSettings, Role, new_api_key
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import RegistryAdminClient, RegistryClient
from modelserve_runtime.errors import UnavailableError, decode_rpc_error

pytestmark = pytest.mark.triton

#: Cheap scrypt for tests; production keys use the default cost.
TEST_SCRYPT_N = 16


@dataclass
class SecuredRegistry:
    """A registry with auth on, holding the demo model's two versions under their usual names
    and `deployments/secured` routed to version 1."""

    target: str
    viewer_key: str
    """A `viewer` key: what the router needs to follow deployments."""
    registry: registry_grpc.RegistryServiceAsyncStub
    """With an admin key on every call."""


@pytest.fixture
async def secured(tmp_path: Path, dependencies: Dependencies) -> AsyncIterator[SecuredRegistry]:
    deps = dependencies
    viewer_key, viewer = new_api_key("router", [Role.VIEWER], n=TEST_SCRYPT_N)
    admin_key, admin = new_api_key("ada", [Role.ADMIN], n=TEST_SCRYPT_N)
    settings = RegistrySettings(
        data_dir=tmp_path / "registry",
        production_traffic_only=False,
        require_validation=False,
        auth=AuthSettings(enabled=True, keys=[viewer, admin]),
    )
    source = RegistryClient(deps.registry_channel)
    async with running(registry_server.build_server, settings) as (server, _, _):
        target = f"127.0.0.1:{server.port}"
        async with create_channel(target, default_timeout_s=WAIT_S, api_key=admin_key) as channel:
            admin_client = RegistryAdminClient(channel)
            await admin_client.create_model(MODEL_ID)
            for version in (V1, V2):
                template = await deps.registry.GetModelVersion(
                    registry_pb.GetModelVersionRequest(name=version)
                )
                uploaded = await admin_client.upload_model_version(
                    f"models/{MODEL_ID}",
                    registry_pb.ModelVersion(
                        format=registry_pb.ARTIFACT_FORMAT_ONNX,
                        signature=template.model_version.signature,
                    ),
                    await source.read_artifact(version),
                )
                assert uploaded.name == version
            await admin_client.set_traffic("secured", {V1: 100})
            yield SecuredRegistry(target, viewer_key, registry_grpc.RegistryServiceStub(channel))


class TestRegistryApiKey:
    async def test_follows_deployments_only_with_its_key(
        self, dependencies: Dependencies, secured: SecuredRegistry
    ) -> None:
        """With the registry's auth on, a router given a viewer key answers and follows a
        deployment change; one without a key answers UNAVAILABLE (the registry refused it as
        UNAUTHENTICATED), and its deployment watch never delivers anything."""
        deps = dependencies
        with capture_logs() as logs:
            async with (
                router(deps, registry_target=secured.target) as (keyless, keyless_app),
                router(
                    deps,
                    registry_target=secured.target,
                    registry_api_key=secured.viewer_key,
                    inference_api_key="inference-ignores-it",
                ) as (keyed, keyed_app),
            ):
                first = await keyed.Predict(request("secured"))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await keyless.Predict(request("secured"))
                await secured.registry.UpdateDeployment(
                    registry_pb.UpdateDeploymentRequest(
                        deployment=registry_pb.Deployment(
                            name="deployments/secured",
                            traffic=[registry_pb.TrafficTarget(model_version=V2, percent=100)],
                        )
                    )
                )

                async def followed() -> bool:
                    return (await keyed.Predict(request("secured"))).model_version == V2

                await eventually(followed, "the keyed router following the change", within_s=WAIT_S)
                keyless_routes = dict(keyless_app.routes.snapshot.routes)
                keyed_revision = keyed_app.routes.snapshot.routes["secured"].revision
        assert first.model_version == V1
        error = decode_rpc_error(refused.value)
        assert (error.code, error.metadata.get("upstream_code")) == (
            grpc.StatusCode.UNAVAILABLE,
            "UNAUTHENTICATED",
        )
        assert keyless_routes == {}
        assert keyed_revision == 2
        lost = [e for e in logs if e["event"] == "deployment_watch_lost"]
        assert lost and all("UNAUTHENTICATED" in e["error"] for e in lost)


class TestRedisConnection:
    async def test_acl_user_from_the_redis_block(self, dependencies: Dependencies) -> None:
        """A router given an ACL user and password in `redis` (no `redis_url`) reads features
        and logs its record as that user; with a wrong password it never turns ready."""
        deps = dependencies
        await deploy(deps, "acl", V1)
        admin = aioredis.Redis.from_url(deps.redis.url)
        await admin.acl_setuser(
            "router-acl",
            enabled=True,
            passwords=["+router-secret"],
            keys=["*"],
            commands=["+@all"],
            reset=True,
        )
        block = {"url": deps.redis.url, "username": "router-acl"}
        try:
            async with router(
                deps, redis_url=None, redis={**block, "password": "router-secret"}
            ) as (stub, app):
                answer = await stub.Predict(request("acl"))
                await app.prediction_log.flush()
                users = {c["user"] for c in await admin.client_list()}
            logged = await records(deps, answer.request_id)
            with pytest.raises(UnavailableError, match="redis does not answer"):
                async with running(
                    build_server,
                    router_settings(deps, redis_url=None, redis={**block, "password": "wrong"}),
                ):
                    pass
        finally:
            await admin.acl_deluser("router-acl")
            await admin.aclose()
        assert answer.model_version == V1
        assert "router-acl" in users
        assert [r.model_version for r in logged] == [V1]
