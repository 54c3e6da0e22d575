"""Wires the feature service: Redis client, online store, domain, servicer, server, health."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import grpc
import structlog

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve_feature.config import FeatureSettings
from modelserve_feature.servicer import FeatureServicer
from modelserve_feature.store import OnlineFeatures
from modelserve_features.online import OnlineStore
from modelserve_runtime.errors import UnavailableError
from modelserve_runtime.redis_connect import RedisClient, connect
from modelserve_runtime.server import GrpcServer, build_grpc_server, run_service

SERVICE = "feature"

log = structlog.get_logger()


class FeatureApp:
    """The feature service's dependencies, and the watch that keeps its health current:
    NOT_SERVING while Redis does not answer, SERVING again once it does."""

    def __init__(
        self, client: RedisClient, store: OnlineStore, server: GrpcServer, interval_s: float
    ) -> None:
        self.redis = client
        self.store = store
        self._server = server
        self._interval_s = interval_s
        self._watch: asyncio.Task[None] | None = None

    async def check_ready(self) -> None:
        await self.store.ping()
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_redis(), name="feature-redis-health")

    async def _watch_redis(self) -> None:
        serving = True
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.store.ping(self._interval_s)
                up = True
            except UnavailableError as exc:
                up = False
                if serving:
                    log.warning("redis_unavailable", error=exc.message)
            if up != serving:
                serving = up
                await self._server.set_serving(up)
                if up:
                    log.info("redis_available")

    async def begin_shutdown(self) -> None:
        """Nothing here streams forever; in-flight calls drain within the grace period."""

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.redis.aclose()


async def build_server(settings: FeatureSettings) -> tuple[GrpcServer, FeatureApp]:
    """Builds the server bound to its port, and the app holding its Redis client."""
    connection = settings.redis_connection()
    log.info("redis_configured", redis=connection.describe())
    client = connect(connection)
    store = OnlineStore(
        client,
        timeout_s=settings.redis_timeout_s,
        cache_ttl_s=settings.cache_ttl_s,
        cache_max_entries=settings.cache_max_entries,
        max_ahead_s=settings.max_event_time_ahead_s,
    )
    features = OnlineFeatures(
        store, max_entities=settings.max_entities, max_features=settings.max_features
    )

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_FeatureServiceServicer_to_server(FeatureServicer(features), server)
        return [pb.DESCRIPTOR.services_by_name["FeatureService"].full_name]

    grpc_server = build_grpc_server(SERVICE, settings, register)
    return grpc_server, FeatureApp(client, store, grpc_server, settings.health_interval_s)


def main() -> None:
    """Console script `modelserve-feature`."""
    run_service(SERVICE, FeatureSettings, build_server, workers_allowed=True)


if __name__ == "__main__":
    main()
