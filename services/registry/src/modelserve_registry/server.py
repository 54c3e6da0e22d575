"""Wires the registry service: SQLite store, artifact store, domain, servicer, server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_registry.access import REGISTRY_POLICY
from modelserve_registry.artifacts import LocalArtifactStore
from modelserve_registry.config import RegistrySettings
from modelserve_registry.domain import Registry
from modelserve_registry.servicer import RegistryServicer
from modelserve_registry.store import SqliteRegistryStore
from modelserve_runtime.auth import ApiKeyAuthenticator, AuthInterceptor
from modelserve_runtime.server import GrpcServer, build_grpc_server, run_service

SERVICE = "registry"


class RegistryApp:
    """The registry service's dependencies: its record store and its artifact store."""

    def __init__(
        self, store: SqliteRegistryStore, artifacts: LocalArtifactStore, registry: Registry
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.registry = registry

    async def check_ready(self) -> None:
        """Opens the database (applying migrations) and sweeps unfinished uploads."""
        await self.store.open()
        await self.artifacts.open()

    async def begin_shutdown(self) -> None:
        """Ends the watch streams, which would otherwise hold the stop for its grace period."""
        await self.registry.end_watches()

    async def close(self) -> None:
        await self.store.close()


async def build_server(settings: RegistrySettings) -> tuple[GrpcServer, RegistryApp]:
    """Builds the server bound to its port, and the app holding its stores (not yet opened)."""
    store = SqliteRegistryStore(settings.db_path)
    artifacts = LocalArtifactStore(settings.artifacts_dir)
    registry = Registry(
        store,
        artifacts,
        max_artifact_bytes=settings.max_artifact_bytes,
        read_chunk_bytes=settings.read_chunk_bytes,
    )

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(registry), server)
        return [pb.DESCRIPTOR.services_by_name["RegistryService"].full_name]

    auth: list[grpc.aio.ServerInterceptor] = []
    if settings.auth.enabled:
        authenticator = ApiKeyAuthenticator(settings.auth.all_keys())
        auth.append(AuthInterceptor(authenticator, REGISTRY_POLICY))
    server = build_grpc_server(SERVICE, settings, register, inner_interceptors=auth)
    return server, RegistryApp(store, artifacts, registry)


def main() -> None:
    """Console script `modelserve-registry`."""
    run_service(SERVICE, RegistrySettings, build_server)
