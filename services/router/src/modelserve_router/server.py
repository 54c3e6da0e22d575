"""Wires the router: registry, feature reader, model runner, prediction log, servicer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import grpc
import redis.asyncio as redis
import structlog
from redis.exceptions import RedisClusterException
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from modelserve.router.v1 import router_service_pb2 as pb
from modelserve.router.v1 import router_service_pb2_grpc as pb_grpc
from modelserve_features.online import OnlineStore
from modelserve_router import oip
from modelserve_router.access import ROUTER_POLICY
from modelserve_router.breaker import CircuitBreakers
from modelserve_router.coalesce import CoalescingRunner
from modelserve_router.config import RateLimitSettings, RouterSettings
from modelserve_router.hybrid import PrecomputedLookup
from modelserve_router.limits import CallerRateLimits, Rate
from modelserve_router.predict import Predictor
from modelserve_router.routing import RoutingTable
from modelserve_router.servicer import RouterServicer
from modelserve_router.shadow import ShadowMirror
from modelserve_router.sources import (
    FeatureReader,
    InferenceServing,
    ModelRunner,
    RedisFeatureReader,
    ServiceFeatureReader,
    ServiceModelRunner,
    TritonModelRunner,
)
from modelserve_runtime.auth import PUBLIC_METHODS, ApiKeyAuthenticator, AuthInterceptor
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import FeatureClient, InferenceClient, RegistryClient
from modelserve_runtime.discovery import Discovery, create_discovery
from modelserve_runtime.errors import UnavailableError
from modelserve_runtime.prediction_log import PredictionLogWriter
from modelserve_runtime.redis_connect import RedisClient, connect, ping
from modelserve_runtime.server import GrpcServer, build_grpc_server, run_service
from modelserve_triton.oip_http import JsonRoute

SERVICE = "router"

log = structlog.get_logger()


class RouterApp:
    """The router's clients and background work."""

    def __init__(
        self,
        client: RedisClient,
        channels: list[grpc.aio.Channel],
        prediction_log: PredictionLogWriter,
        runner: ModelRunner,
        routes: RoutingTable,
        shadows: ShadowMirror,
        predictor: Predictor,
        direct: TritonModelRunner | None = None,
        *,
        prediction_log_flush_timeout_s: float = 5.0,
    ) -> None:
        self.redis = client
        self.direct = direct
        """The direct Triton runner, whose clients close with the app."""
        self.channels = channels
        self.prediction_log = prediction_log
        self.prediction_log_flush_timeout_s = prediction_log_flush_timeout_s
        self.runner = runner
        self.routes = routes
        self.shadows = shadows
        self.predictor = predictor

    async def check_ready(self) -> None:
        try:
            await ping(self.redis)
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            raise UnavailableError(f"redis does not answer: {exc}") from exc

    async def begin_shutdown(self) -> None:
        """Nothing here streams forever; in-flight calls drain within the grace period."""

    async def close(self) -> None:
        await self.routes.close()
        await self.shadows.close()
        await self.prediction_log.close(self.prediction_log_flush_timeout_s)
        if isinstance(self.runner, CoalescingRunner):
            await self.runner.close()
        if self.direct is not None:
            await self.direct.close()
        for channel in self.channels:
            await channel.close()
        await self.redis.aclose()


async def _target(explicit: str | None, discovery: Discovery, service: str) -> str:
    return explicit or await discovery.resolve(service)


def _rate(settings: RateLimitSettings) -> Rate | None:
    if settings.requests_per_s is None:
        return None
    return Rate(settings.requests_per_s, settings.burst)


def _rate_limits(settings: RouterSettings) -> CallerRateLimits | None:
    """The callers' token buckets, or None when no caller is limited."""
    if not settings.rate_limits_in_use:
        return None
    return CallerRateLimits(
        _rate(settings.rate_limit),
        {p: _rate(settings.principal_rate_limit(p)) for p in settings.principal_rate_limits},
    )


async def build_server(settings: RouterSettings) -> tuple[GrpcServer, RouterApp]:
    """Builds the router bound to its port, with the readers and runner its settings choose."""
    discovery = create_discovery(settings.discovery)
    connection = settings.redis_connection()
    log.info("redis_configured", redis=connection.describe())
    if settings.ready_poll_ms is not None:
        log.warning("setting_retired", setting="ready_poll_ms", instead="WatchModelStates")
    client = connect(connection)
    registry_key, inference_key = settings.registry_api_key, settings.inference_api_key
    registry_channel = create_channel(
        await _target(settings.registry_target, discovery, "registry"),
        api_key=None if registry_key is None else registry_key.get_secret_value(),
        tls=settings.registry_tls,
    )
    inference_channel = create_channel(
        await _target(settings.inference_target, discovery, "inference"),
        default_timeout_s=settings.inference_timeout_s,
        api_key=None if inference_key is None else inference_key.get_secret_value(),
        tls=settings.inference_tls,
    )
    channels = [registry_channel, inference_channel]
    features: FeatureReader
    if settings.feature_reader == "redis":
        features = RedisFeatureReader(OnlineStore(client, timeout_s=settings.feature_timeout_s))
    else:
        feature_channel = create_channel(
            await _target(settings.feature_target, discovery, "feature"),
            default_timeout_s=settings.feature_timeout_s,
            tls=settings.feature_tls,
        )
        channels.append(feature_channel)
        features = ServiceFeatureReader(
            FeatureClient(feature_channel, timeout_s=settings.feature_timeout_s)
        )
    inference = InferenceClient(inference_channel, timeout_s=settings.inference_timeout_s)
    direct: TritonModelRunner | None = None
    runner: ModelRunner
    if settings.model_runner == "triton":
        runner = direct = TritonModelRunner(
            timeout_s=settings.inference_timeout_s,
            protocol=settings.triton_protocol,
            tls=settings.triton_tls,
        )
    else:
        runner = ServiceModelRunner(inference)
    if settings.coalesce:
        runner = CoalescingRunner(
            runner,
            max_batch_rows=settings.coalesce_max_batch_rows,
            max_batches=settings.coalesce_max_batches,
            budget_s=settings.coalesce_budget_ms / 1000,
            timeout_s=settings.inference_timeout_s,
        )
    prediction_log = PredictionLogWriter(
        # Annotated for Redis only; a RedisCluster's pipeline takes the same XADDs.
        cast(redis.Redis, client),
        stream=settings.prediction_stream,
        max_len=settings.prediction_stream_max_len,
        max_pending=settings.prediction_log_buffer,
        retry_max_s=settings.prediction_log_retry_max_s,
        linger_s=settings.prediction_log_linger_ms / 1000,
    )
    routes = RoutingTable(
        RegistryClient(registry_channel),
        InferenceServing(inference, inference_channel),
        watch_timeout_s=settings.watch_timeout_s,
        backoff_max_s=settings.watch_backoff_max_s,
    )
    shadows = ShadowMirror(max_in_flight=settings.shadow_max_in_flight)
    predictor = Predictor(
        routes,
        features,
        runner,
        prediction_log,
        shadows,
        shadow_timeout_s=settings.shadow_timeout_s,
        upstream=runner.upstream if isinstance(runner, CoalescingRunner) else None,
        breakers=(
            CircuitBreakers(
                failure_threshold=settings.circuit_breaker.failure_threshold,
                cool_down_s=settings.circuit_breaker.cool_down_s,
            )
            if settings.circuit_breaker.enabled
            else None
        ),
        rate_limits=_rate_limits(settings),
        endpoint_settings=settings.endpoint if settings.endpoint_limits_in_use else None,
        precomputed=PrecomputedLookup(client, timeout_s=settings.feature_timeout_s),
    )
    routes.start()

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_RouterServiceServicer_to_server(
            RouterServicer(predictor, default_timeout_s=settings.request_timeout_s), server
        )
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            oip.OpenInferenceServicer(
                predictor, routes, default_timeout_s=settings.request_timeout_s
            ),
            server,
        )
        return [pb.DESCRIPTOR.services_by_name["RouterService"].full_name, oip.SERVICE_NAME]

    auth: list[grpc.aio.ServerInterceptor] = []
    if settings.auth.enabled:
        auth.append(
            AuthInterceptor(
                ApiKeyAuthenticator(settings.auth.all_keys()),
                {**ROUTER_POLICY, **oip.OIP_POLICY},
                public=PUBLIC_METHODS | oip.PUBLIC_OIP_METHODS,
                certificate_roles=settings.server.tls.client_roles,
            )
        )
    app = RouterApp(
        client,
        channels,
        prediction_log,
        runner,
        routes,
        shadows,
        predictor,
        direct,
        prediction_log_flush_timeout_s=settings.prediction_log_flush_timeout_s,
    )
    # Predict over HTTP too (JSON), beside the Open Inference Protocol, with SERVER__HTTP_PORT.
    predict_json = JsonRoute(
        "/v1/endpoints/{endpoint}:predict",
        f"/{pb.DESCRIPTOR.services_by_name['RouterService'].full_name}/Predict",
        pb.PredictRequest,
    )
    server = build_grpc_server(
        SERVICE, settings, register, inner_interceptors=auth, http_routes=[predict_json]
    )
    return server, app


def main() -> None:
    """Console script `modelserve-router`."""
    run_service(SERVICE, RouterSettings, build_server, workers_allowed=True)


if __name__ == "__main__":
    main()
