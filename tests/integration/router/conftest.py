"""Fixtures of the router's integration tests, shared by the whole directory: a real
redis-server of its own (a test stops and resumes it), a real registry holding two versions of
the demo model, a real inference service that started its own tritonserver with both loaded,
and the demo features in Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from router_testing import V1, V2, Dependencies, register_demo_model, reload
from support import running

from modelserve.inference.v1 import inference_service_pb2_grpc as inference_grpc
from modelserve.registry.v1 import registry_service_pb2_grpc as registry_grpc
from modelserve_cli.stack import RedisProcess, StackError
from modelserve_demo import fraud
from modelserve_features.online import FeatureWrite, OnlineStore
from modelserve_features.redis_store import EntityKey
from modelserve_inference import server as inference_server
from modelserve_inference.config import InferenceSettings
from modelserve_inference.server import InferenceApp
from modelserve_registry import server as registry_server
from modelserve_registry.config import RegistrySettings
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import InferenceClient, RegistryAdminClient


@pytest.fixture(scope="package")
def router_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server for these tests alone, so one of them may pause it."""
    server = RedisProcess(tmp_path_factory.mktemp("router-redis"))
    try:
        server.start()
    except StackError as exc:
        pytest.fail(f"{exc}; `make test` installs redis-server")
    yield server
    server.stop()


@pytest.fixture(scope="package")
async def dependencies(
    tmp_path_factory: pytest.TempPathFactory, router_redis: RedisProcess
) -> AsyncIterator[Dependencies]:
    """Registry and inference in this process, versions 1 (seed 0) and 2 (seed 1) of the demo
    model READY in inference's Triton, the demo customers' features in Redis."""
    # These tests route to versions nobody approved, as the laptop stack does.
    registry_settings = RegistrySettings(
        data_dir=tmp_path_factory.mktemp("registry"), production_traffic_only=False
    )
    async with running(registry_server.build_server, registry_settings) as (
        registry_grpc_server,
        registry_channel,
        _,
    ):
        await register_demo_model(RegistryAdminClient(registry_channel))
        registry_target = f"127.0.0.1:{registry_grpc_server.port}"
        inference_settings = InferenceSettings(
            triton_mode="local",
            triton_work_dir=tmp_path_factory.mktemp("triton"),
            registry_target=registry_target,
            # Triton holds what LoadModelVersion loads and nothing else, so a test can take a
            # version that deployments route to out of Triton behind the router.
            reconcile=False,
        )
        async with running(inference_server.build_server, inference_settings) as (
            inference_grpc_server,
            inference_channel,
            app,
        ):
            assert isinstance(app, InferenceApp)
            deps = Dependencies(
                redis=router_redis,
                registry_target=registry_target,
                inference_target=f"127.0.0.1:{inference_grpc_server.port}",
                triton_endpoint=app.runner.url,
                registry=registry_grpc.RegistryServiceStub(registry_channel),
                inference=inference_grpc.InferenceServiceStub(inference_channel),
                registry_channel=registry_channel,
            )
            for name in (V1, V2):
                await reload(deps, name)
            client = aioredis.Redis.from_url(router_redis.url)
            try:
                store = OnlineStore(client)
                await store.apply_view(fraud.feature_view())
                await store.write(
                    [
                        FeatureWrite(EntityKey(fraud.ENTITY_TYPE, customer), fraud.VIEW, values)
                        for customer, values in fraud.demo_customers().items()
                    ]
                )
            finally:
                await client.aclose()
            yield deps


@pytest.fixture
async def store(dependencies: Dependencies) -> AsyncIterator[aioredis.Redis]:
    """A client on the router's Redis, where batch jobs write their predictions and the
    streaming tests keep their streams."""
    client = aioredis.Redis.from_url(dependencies.redis.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def inference(dependencies: Dependencies) -> AsyncIterator[InferenceClient]:
    """An InferenceService client on the test's inference service."""
    async with create_channel(dependencies.inference_target) as channel:
        yield InferenceClient(channel, timeout_s=30)
