"""Wires the monitor service: Redis client, stats, stream consumer, servicer, server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import redis.asyncio as redis

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.consumer import PredictionLogConsumer
from modelserve_monitor.servicer import MonitorServicer
from modelserve_monitor.stats import EndpointStats
from modelserve_runtime.errors import UnavailableError
from modelserve_runtime.server import GrpcServer, build_grpc_server, run_service

SERVICE = "monitor"


class MonitorApp:
    """The monitor service's dependencies: its Redis client and the stream consumer."""

    def __init__(
        self, client: redis.Redis, stats: EndpointStats, consumer: PredictionLogConsumer
    ) -> None:
        self.redis = client
        self.stats = stats
        self.consumer = consumer

    async def check_ready(self) -> None:
        try:
            await self.redis.ping()
            await self.consumer.ensure_group()
        except redis.RedisError as exc:
            raise UnavailableError(f"redis does not answer: {exc}") from exc

    async def close(self) -> None:
        await self.consumer.close()
        await self.redis.aclose()


async def build_server(settings: MonitorSettings) -> tuple[GrpcServer, MonitorApp]:
    """Builds the server bound to its port, and the app whose consumer is already reading."""
    # The blocking stream read holds its connection for up to block_ms, so the socket
    # timeout must outlast it.
    timeout_s = settings.redis_timeout_s + settings.block_ms / 1000
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    stats = EndpointStats(
        max_latency_samples=settings.max_latency_samples,
        max_remembered_records=settings.max_remembered_records,
    )
    consumer = PredictionLogConsumer(
        client,
        stats,
        stream=settings.stream,
        group=settings.consumer_group,
        consumer=settings.consumer_name,
        block_ms=settings.block_ms,
        batch_size=settings.batch_size,
    )

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_MonitorServiceServicer_to_server(MonitorServicer(stats), server)
        return [pb.DESCRIPTOR.services_by_name["MonitorService"].full_name]

    grpc_server = build_grpc_server(SERVICE, settings, register)
    consumer.start()
    return grpc_server, MonitorApp(client, stats, consumer)


def main() -> None:
    """Console script `modelserve-monitor`."""
    run_service(SERVICE, MonitorSettings, build_server)
