"""Wires the registry service: SQLite store, artifact store, domain, servicer, server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import structlog

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_registry.access import REGISTRY_POLICY
from modelserve_registry.artifacts import LocalArtifactStore
from modelserve_registry.config import RegistrySettings
from modelserve_registry.domain import Registry, parse_version_name
from modelserve_registry.rollout import MonitorGate, RolloutController
from modelserve_registry.servicer import RegistryServicer
from modelserve_registry.store import SqliteRegistryStore
from modelserve_registry.validation import InferenceServiceRunner, Validator
from modelserve_runtime.auth import ApiKeyAuthenticator, AuthInterceptor
from modelserve_runtime.channels import create_channel
from modelserve_runtime.config import ClientTlsSettings
from modelserve_runtime.discovery import create_discovery
from modelserve_runtime.server import GrpcServer, build_grpc_server, run_service

SERVICE = "registry"
log = structlog.get_logger()


class Peer:
    """A channel to another service, resolved through discovery on first use."""

    def __init__(
        self,
        service: str,
        target: str | None,
        tls: ClientTlsSettings,
        settings: RegistrySettings,
    ) -> None:
        self._service = service
        self._target = target
        self._tls = tls
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None

    async def channel(self) -> grpc.aio.Channel:
        """The channel, created on the first call."""
        if self._channel is None:
            target = self._target or await create_discovery(self._settings.discovery).resolve(
                self._service
            )
            self._channel = create_channel(
                target, max_message_bytes=64 * 1024 * 1024, tls=self._tls
            )
        return self._channel

    async def close(self) -> None:
        """Closes the channel if one was made."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class RegistryApp:
    """The registry service's dependencies: its stores, its peers and the rollout controller."""

    def __init__(
        self,
        store: SqliteRegistryStore,
        artifacts: LocalArtifactStore,
        registry: Registry,
        rollouts: RolloutController,
        peers: Sequence[Peer],
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.registry = registry
        self.rollouts = rollouts
        self._peers = peers
        self._swept = False

    async def check_ready(self) -> None:
        """Opens the database (applying migrations), sweeps unfinished uploads and artifacts
        that no version uses, and starts the rollout controller."""
        await self.store.open()
        await self.artifacts.open()
        if not self._swept:
            removed = await self.registry.sweep_unreferenced_artifacts()
            if removed:
                log.info("unreferenced_artifacts_removed", count=removed)
            self._swept = True
        self.rollouts.start_background()

    async def begin_shutdown(self) -> None:
        """Ends the watch streams, which would otherwise hold the stop for its grace period,
        and stops the rollout controller."""
        await self.rollouts.stop()
        await self.registry.end_watches()

    async def close(self) -> None:
        await self.rollouts.stop()
        for peer in self._peers:
            await peer.close()
        await self.store.close()


async def build_server(settings: RegistrySettings) -> tuple[GrpcServer, RegistryApp]:
    """Builds the server bound to its port, and the app holding its stores (not yet opened)."""
    store = SqliteRegistryStore(settings.db_path)
    artifacts = LocalArtifactStore(settings.artifacts_dir)
    inference = Peer("inference", settings.inference_target, settings.inference_tls, settings)
    monitor = Peer("monitor", settings.monitor_target, settings.monitor_tls, settings)
    validator = Validator(
        InferenceServiceRunner(
            inference.channel,
            load_timeout_s=settings.validation_load_timeout_s,
            infer_timeout_s=settings.validation_infer_timeout_s,
        ),
        tolerance=settings.validation_tolerance,
        batch_rows=settings.validation_batch_rows,
    )
    registry = Registry(
        store,
        artifacts,
        max_artifact_bytes=settings.max_artifact_bytes,
        read_chunk_bytes=settings.read_chunk_bytes,
        production_only=settings.production_traffic_only,
        require_validation=settings.require_validation,
        validator=validator,
    )
    rollouts = RolloutController(
        store,
        MonitorGate(monitor.channel, timeout_s=settings.gate_timeout_s),
        notify=registry.notify_deployment_change,
        get_deployment=registry.get_deployment,
        parse_version=parse_version_name,
        production_only=settings.production_traffic_only,
        tick_s=settings.rollout_tick_s,
    )

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(registry, rollouts), server)
        return [pb.DESCRIPTOR.services_by_name["RegistryService"].full_name]

    auth: list[grpc.aio.ServerInterceptor] = []
    if settings.auth.enabled:
        authenticator = ApiKeyAuthenticator(settings.auth.all_keys())
        auth.append(
            AuthInterceptor(
                authenticator,
                REGISTRY_POLICY,
                certificate_roles=settings.server.tls.client_roles,
            )
        )
    server = build_grpc_server(SERVICE, settings, register, inner_interceptors=auth)
    return server, RegistryApp(store, artifacts, registry, rollouts, (inference, monitor))


def main() -> None:
    """Console script `modelserve-registry`."""
    run_service(SERVICE, RegistrySettings, build_server)


if __name__ == "__main__":
    main()
