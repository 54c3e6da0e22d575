"""Wires the monitor service: Redis client, store, registry catalog and baseline resolver,
stream consumer, monitor, servicer, server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
import redis.asyncio as redis
import structlog

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve_monitor.alerts import AlertEvaluator, AlertLog, evaluate_forever, rules_from
from modelserve_monitor.baseline import BaselineResolver
from modelserve_monitor.canary import CanaryJudge, CanaryThresholds
from modelserve_monitor.catalog import RegistryCatalog
from modelserve_monitor.config import MonitorSettings
from modelserve_monitor.consumer import PredictionLogConsumer
from modelserve_monitor.drift import DriftThresholds
from modelserve_monitor.experiment import ExperimentAnalysis
from modelserve_monitor.metrics import export_forever
from modelserve_monitor.monitor import Clock, Monitor
from modelserve_monitor.outage import RedisOutageInterceptor
from modelserve_monitor.servicer import MonitorServicer
from modelserve_monitor.store import AggregateStore, StoreTtls
from modelserve_monitor.webhook import AlertWebhook, RetryPolicy
from modelserve_runtime.discovery import create_discovery
from modelserve_runtime.errors import UnavailableError
from modelserve_runtime.redis_connect import connect, ping
from modelserve_runtime.server import GrpcServer, build_grpc_server, run_service
from modelserve_runtime.waiting import cancel_all

SERVICE = "monitor"
log = structlog.get_logger()


class MonitorApp:
    """The monitor service's dependencies: Redis, the consumer, alerts, webhooks, the
    periodic tasks."""

    def __init__(
        self,
        client: redis.Redis,
        monitor: Monitor,
        consumer: PredictionLogConsumer,
        alerts: AlertEvaluator,
        webhooks: list[AlertWebhook],
        baselines: BaselineResolver,
        catalog: RegistryCatalog,
        tasks: list[asyncio.Task[None]],
    ) -> None:
        self.redis = client
        self.monitor = monitor
        self.consumer = consumer
        self.alerts = alerts
        self.webhooks = webhooks
        self.baselines = baselines
        self._catalog = catalog
        self._tasks = tasks

    async def check_ready(self) -> None:
        """Redis answers, the consumer group exists, and each webhook knows where it starts
        (so no alert change made after this is missed by a new webhook)."""
        try:
            await ping(self.redis)
            await self.consumer.ensure_group()
            for webhook in self.webhooks:
                await webhook.start_position()
        except redis.RedisError as exc:
            raise UnavailableError(f"redis does not answer: {exc}") from exc

    async def begin_shutdown(self) -> None:
        """Ends the WatchAlerts streams, which would otherwise hold the stop for its grace."""
        self.alerts.close_watches()

    async def close(self) -> None:
        await cancel_all(self._tasks)
        await self.consumer.close()
        await self._catalog.close()
        await self.redis.aclose()


async def build_server(
    settings: MonitorSettings, *, clock: Clock = time.time
) -> tuple[GrpcServer, MonitorApp]:
    """Builds the server bound to its port, and the app whose consumer is already reading.

    `clock` places records in time buckets and ends the windows; tests pass their own.
    """
    # The blocking stream read holds its connection for up to block_ms, so the socket
    # timeout outlasts it (the settings see to that).
    connection = settings.redis_connection()
    log.info("redis_configured", redis=connection.describe())
    client = connect(connection)
    if not isinstance(client, redis.Redis):
        raise TypeError(
            "the monitor needs a standalone or sentinel Redis (settings refuse cluster)"
        )
    store = AggregateStore(
        client,
        ttls=StoreTtls(seen_s=settings.dedup_ttl_s, prediction_s=settings.prediction_ttl_s),
        baseline_records=settings.baseline_records,
    )
    monitor = Monitor(
        store,
        thresholds=DriftThresholds(
            psi=settings.drift_psi_threshold, p_value=settings.drift_p_value
        ),
        clock=clock,
    )
    api_key = settings.registry_api_key
    catalog = RegistryCatalog(
        settings.registry_target,
        create_discovery(settings.discovery),
        api_key=api_key.get_secret_value() if api_key is not None else None,
        timeout_s=settings.registry_timeout_s,
        tls=settings.registry_tls,
    )
    baselines = BaselineResolver(
        store,
        catalog,
        clock=clock,
        retry_s=settings.baseline_retry_s,
        retry_max_s=settings.baseline_retry_max_s,
    )
    consumer = PredictionLogConsumer(
        client,
        store,
        stream=settings.stream,
        group=settings.consumer_group,
        consumer=settings.consumer_name,
        block_ms=settings.block_ms,
        batch_size=settings.batch_size,
        claim_min_idle_ms=settings.claim_min_idle_ms,
        clock=clock,
        on_versions=baselines.notice,
    )

    alert_log = AlertLog(client, max_events=settings.alerts.events_max_len)
    alerts = AlertEvaluator(
        alert_log, monitor, rules_from(settings.alerts), clock, block_ms=settings.block_ms
    )
    hooks = settings.alerts.webhook
    policy = RetryPolicy(
        timeout_s=hooks.timeout_s,
        max_attempts=hooks.max_attempts,
        backoff_s=hooks.backoff_s,
        backoff_max_s=hooks.backoff_max_s,
    )
    webhooks = [
        AlertWebhook(client, alert_log, url, policy=policy, block_ms=settings.block_ms)
        for url in hooks.urls
    ]
    servicer = MonitorServicer(
        monitor,
        alerts,
        CanaryJudge(store, CanaryThresholds(**settings.canary.model_dump()), clock),
        ExperimentAnalysis(store, clock),
    )

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_MonitorServiceServicer_to_server(servicer, server)
        return [pb.DESCRIPTOR.services_by_name["MonitorService"].full_name]

    grpc_server = build_grpc_server(
        SERVICE, settings, register, inner_interceptors=[RedisOutageInterceptor()]
    )
    consumer.start()
    tasks = [
        asyncio.create_task(baselines.run(), name="monitor-baselines"),
        asyncio.create_task(
            export_forever(monitor, settings.metrics_interval_s), name="monitor-window-metrics"
        ),
        asyncio.create_task(
            evaluate_forever(alerts, settings.alerts.interval_s), name="monitor-alerts"
        ),
        *(
            asyncio.create_task(webhook.run(), name=f"monitor-webhook-{i}")
            for i, webhook in enumerate(webhooks)
        ),
    ]
    return grpc_server, MonitorApp(
        client, monitor, consumer, alerts, webhooks, baselines, catalog, tasks
    )


def main() -> None:
    """Console script `modelserve-monitor`."""
    run_service(SERVICE, MonitorSettings, build_server)


if __name__ == "__main__":
    main()
