"""Wires the feature service: Redis client, domain, servicer, server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import redis.asyncio as redis

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve_feature.config import FeatureSettings
from modelserve_feature.servicer import FeatureServicer
from modelserve_feature.store import OnlineFeatures
from modelserve_features.redis_store import RedisFeatureStore
from modelserve_runtime.errors import UnavailableError
from modelserve_runtime.server import GrpcServer, build_grpc_server, run_service

SERVICE = "feature"


class FeatureApp:
    """The feature service's dependencies."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def check_ready(self) -> None:
        try:
            await self.redis.ping()
        except redis.RedisError as exc:
            raise UnavailableError(f"redis does not answer: {exc}") from exc

    async def close(self) -> None:
        await self.redis.aclose()


async def build_server(settings: FeatureSettings) -> tuple[GrpcServer, FeatureApp]:
    """Builds the server bound to its port, and the app holding its Redis client."""
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    features = OnlineFeatures(
        RedisFeatureStore(client),
        max_entities=settings.max_entities,
        max_features=settings.max_features,
    )

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_FeatureServiceServicer_to_server(FeatureServicer(features), server)
        return [pb.DESCRIPTOR.services_by_name["FeatureService"].full_name]

    return build_grpc_server(SERVICE, settings, register), FeatureApp(client)


def main() -> None:
    """Console script `modelserve-feature`."""
    run_service(SERVICE, FeatureSettings, build_server)
