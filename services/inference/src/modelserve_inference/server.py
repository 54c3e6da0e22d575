"""Wires the inference service: Triton (started here in local mode), its supervisor, the
registry and the reconcile loop that follows it, the InferenceService and Open Inference
Protocol servicers, Triton's statistics."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve_inference import oip_servicer
from modelserve_inference.config import InferenceSettings
from modelserve_inference.models import ArtifactSource, ModelVersions
from modelserve_inference.oip_servicer import OpenInferenceServicer
from modelserve_inference.reconcile import PinFile, Reconciler
from modelserve_inference.registry_source import RegistryArtifactSource, RegistryDeploymentFeed
from modelserve_inference.servicer import InferenceServicer
from modelserve_inference.supervisor import TritonHost, TritonSupervisor
from modelserve_inference.triton_host import LocalTriton, RemoteTriton
from modelserve_inference.triton_stats import TritonStatistics
from modelserve_inference.version_metrics import export_version_states, stop_exporting
from modelserve_inference.workers import (
    Owner,
    OwnerLoads,
    OwnerMirror,
    WorkerInferenceServicer,
)
from modelserve_runtime.channels import channel_credentials, create_channel
from modelserve_runtime.clients import RegistryClient
from modelserve_runtime.discovery import create_discovery
from modelserve_runtime.errors import UnavailableError
from modelserve_runtime.server import (
    WORKER_ENV,
    GrpcServer,
    ServiceApp,
    build_grpc_server,
    run_service,
)
from modelserve_triton.http import TritonHttpRunner
from modelserve_triton.process import TritonOptions, TritonServer
from modelserve_triton.runner import TritonError, TritonRunner

SERVICE = "inference"
#: How long one liveness probe or statistics read may take.
_PROBE_TIMEOUT_S = 2.0


class InferenceApp:
    """Owns Triton (in local mode), its supervisor, the reconcile loop, the Triton client and
    the registry channel."""

    def __init__(
        self,
        runner: TritonRunner,
        registry_channel: grpc.aio.Channel,
        triton: TritonServer | None,
        versions: ModelVersions,
        supervisor: TritonSupervisor,
        statistics: TritonStatistics,
        reconciler: Reconciler | None = None,
        http_runner: TritonHttpRunner | None = None,
        owner_dir: Path | None = None,
    ) -> None:
        """`owner_dir` holds the socket other workers follow this process on, if any."""
        self.runner = runner
        self.http_runner = http_runner
        self.registry_channel = registry_channel
        self.triton = triton
        self.versions = versions
        self.supervisor = supervisor
        self.statistics = statistics
        self.reconciler = reconciler
        self.owner_dir = owner_dir

    def worker_env(self) -> dict[str, str]:
        """What the other workers need from this process (see workers.py)."""
        if self.owner_dir is None:
            return {}
        return Owner(
            address=f"unix:{self.owner_dir / 'owner.sock'}",
            triton_url=self.runner.url,
            triton_http_url=self.versions.triton_http_endpoint,
        ).to_env()

    async def check_ready(self) -> None:
        try:
            ready = await self.runner.is_server_ready(timeout_s=5)
        except TritonError as exc:
            raise UnavailableError(f"triton does not answer: {exc}") from exc
        if not ready or not self.versions.triton_up:
            raise UnavailableError("triton is not ready")

    async def begin_shutdown(self) -> None:
        """Ends the WatchModelStates streams, which would otherwise hold the stop for its
        grace period; in-flight calls drain within it."""
        self.versions.feed.end_watches()

    async def close(self) -> None:
        if self.reconciler is not None:
            await self.reconciler.close()
        # The supervisor goes first, so that stopping Triton is not taken for a crash.
        await self.supervisor.close()
        await self.statistics.close()
        stop_exporting(self.versions)
        await self.versions.close()
        await self.runner.close()
        if self.http_runner is not None:
            await self.http_runner.close()
        await self.registry_channel.close()
        if self.triton is not None:
            await self.triton.stop()
        if self.owner_dir is not None:
            shutil.rmtree(self.owner_dir, ignore_errors=True)


async def build_server(settings: InferenceSettings) -> tuple[GrpcServer, InferenceApp]:
    """Starts Triton in local mode, then builds the server bound to its port."""
    triton: TritonServer | None = None
    triton_url = settings.triton_url
    triton_http_url = settings.triton_http_url or ""
    if settings.triton_mode == "local":
        triton = TritonServer(
            TritonOptions(
                work_dir=settings.triton_work_dir,
                grpc_port=settings.triton_grpc_port,
                http_port=settings.triton_http_port,
                trace_otlp_endpoint=settings.triton_trace_endpoint,
                extra_args=(
                    (
                        "--trace-config=opentelemetry,bsp_schedule_delay="
                        f"{settings.triton_trace_export_delay_ms}",
                    )
                    if settings.triton_trace_endpoint
                    else ()
                )
                + settings.triton_extra_args,
            )
        )
        await triton.start(timeout=settings.triton_start_timeout_s)
        triton_url = triton.grpc_endpoint
        triton_http_url = triton.http_endpoint
    registry_target = settings.registry_target or await create_discovery(
        settings.discovery
    ).resolve("registry")
    api_key = settings.registry_api_key
    registry_channel = create_channel(
        registry_target,
        max_message_bytes=64 * 1024 * 1024,
        api_key=api_key.get_secret_value() if api_key is not None else None,
        tls=settings.registry_tls,
    )
    if settings.triton_tls.enabled:
        # Triton's HTTP endpoint has no TLS: neither used here nor published to routers.
        triton_http_url = ""
    runner, http_runner = _triton_clients(settings, triton_url, triton_http_url)
    registry = RegistryClient(registry_channel)
    versions = _model_versions(
        settings,
        RegistryArtifactSource(registry),
        runner,
        http_runner,
        triton_http_url,
        # Known in local mode; a remote Triton says so itself when it lacks a backend.
        available_backends=triton.backends if triton is not None else None,
    )

    reconciler = (
        Reconciler(
            versions,
            RegistryDeploymentFeed(
                registry, versions.default_config, timeout_s=settings.watch_timeout_s
            ),
            unload_grace_s=settings.unload_grace_s,
            max_concurrent_loads=settings.max_concurrent_loads,
            retry_initial_s=settings.load_retry_initial_s,
            retry_max_s=settings.load_retry_max_s,
            watch_backoff_max_s=settings.watch_backoff_max_s,
            pin_file=PinFile(settings.pins_file or settings.triton_work_dir / "pins.json"),
        )
        if settings.reconcile
        else None
    )

    grpc_server = build_grpc_server(
        SERVICE, settings, _servicers(InferenceServicer(versions, reconciler), versions, runner)
    )
    owner_dir = None
    if settings.server.workers > 1:
        # The other workers follow this process over a socket of their own (see workers.py).
        owner_dir = Path(tempfile.mkdtemp(prefix="modelserve-inference-"))
        grpc_server.server.add_insecure_port(f"unix:{owner_dir / 'owner.sock'}")
    host: TritonHost = (
        LocalTriton(
            triton,
            runner,
            probe_timeout_s=_PROBE_TIMEOUT_S,
            start_timeout_s=settings.triton_start_timeout_s,
        )
        if triton is not None
        else RemoteTriton(
            runner,
            probe_timeout_s=_PROBE_TIMEOUT_S,
            poll_interval_s=settings.triton_poll_interval_s,
        )
    )
    supervisor = TritonSupervisor(
        host, versions, grpc_server.set_serving, poll_interval_s=settings.triton_poll_interval_s
    )
    supervisor.start()

    async def read_statistics() -> dict[str, object]:
        return await runner.statistics(timeout_s=_PROBE_TIMEOUT_S)

    statistics = TritonStatistics(read_statistics, interval_s=settings.triton_stats_interval_s)
    statistics.start()
    export_version_states(versions)
    if reconciler is not None:
        reconciler.start()
    app = InferenceApp(
        runner,
        registry_channel,
        triton,
        versions,
        supervisor,
        statistics,
        reconciler,
        http_runner=http_runner,
        owner_dir=owner_dir,
    )
    return grpc_server, app


def _servicers(
    inference: InferenceServicer, versions: ModelVersions, triton: TritonRunner
) -> Callable[[grpc.aio.Server], Sequence[str]]:
    """What `build_grpc_server` registers: `inference` as InferenceService and the Open
    Inference Protocol over `versions` (with Triton's own config and statistics)."""

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_InferenceServiceServicer_to_server(inference, server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            OpenInferenceServicer(versions, triton), server
        )
        return [
            pb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
            oip_servicer.SERVICE_NAME,
        ]

    return register


def _triton_clients(
    settings: InferenceSettings, triton_url: str, triton_http_url: str
) -> tuple[TritonRunner, TritonHttpRunner | None]:
    """The Triton gRPC client (with `triton_tls`), and with `triton_protocol: http` and an
    HTTP endpoint, the HTTP client that then sends inference requests."""
    tls = settings.triton_tls if settings.triton_tls.enabled else None
    runner = TritonRunner(
        triton_url,
        credentials=None if tls is None else channel_credentials(tls),
        server_name=None if tls is None else tls.server_name,
    )
    http_runner = (
        TritonHttpRunner(triton_http_url)
        if settings.triton_protocol == "http" and triton_http_url
        else None
    )
    return runner, http_runner


def _model_versions(
    settings: InferenceSettings,
    source: ArtifactSource,
    runner: TritonRunner,
    http_runner: TritonHttpRunner | None,
    triton_http_url: str,
    *,
    available_backends: frozenset[str] | None = None,
) -> ModelVersions:
    return ModelVersions(
        source,
        runner,
        triton_endpoint=runner.url,
        triton_http_endpoint=triton_http_url,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
        max_queue_size=settings.max_queue_size,
        backend=settings.backend,
        device=settings.device,
        gpus=settings.gpus,
        available_backends=available_backends,
        infer_timeout_s=settings.infer_timeout_s,
        load_timeout_s=settings.load_timeout_s,
        warmup_batch_sizes=settings.warmup_batch_sizes,
        reject_non_finite=settings.reject_non_finite,
        coalesce_in_flight=settings.coalesce_in_flight,
        inference=http_runner,
    )


class WorkerApp:
    """A worker after the first: its mirror of the first process's versions, its channel to
    that process and its own Triton clients."""

    def __init__(
        self,
        versions: ModelVersions,
        mirror: OwnerMirror,
        owner_channel: grpc.aio.Channel,
        runner: TritonRunner,
        http_runner: TritonHttpRunner | None,
        *,
        sync_timeout_s: float,
    ) -> None:
        self.versions = versions
        self.mirror = mirror
        self._owner_channel = owner_channel
        self._runner = runner
        self._http_runner = http_runner
        self._sync_timeout_s = sync_timeout_s

    async def check_ready(self) -> None:
        await self.mirror.wait_synced(self._sync_timeout_s)

    async def begin_shutdown(self) -> None:
        self.versions.feed.end_watches()

    async def close(self) -> None:
        await self.mirror.close()
        await self.versions.close()
        await self._runner.close()
        if self._http_runner is not None:
            await self._http_runner.close()
        await self._owner_channel.close()


async def build_worker(settings: InferenceSettings, owner: Owner) -> tuple[GrpcServer, WorkerApp]:
    """A worker after the first (see workers.py): Infer and the Open Inference Protocol from a
    mirror of `owner`'s versions, on the port it shares with it."""
    owner_channel = create_channel(owner.address, max_message_bytes=64 * 1024 * 1024)
    runner, http_runner = _triton_clients(settings, owner.triton_url, owner.triton_http_url)
    versions = _model_versions(settings, OwnerLoads(), runner, http_runner, owner.triton_http_url)

    servicer = WorkerInferenceServicer(
        versions, owner_channel, relay_timeout_s=2 * settings.load_timeout_s
    )
    grpc_server = build_grpc_server(SERVICE, settings, _servicers(servicer, versions, runner))
    mirror = OwnerMirror(
        owner_channel,
        versions,
        grpc_server.set_serving,
        stream_timeout_s=settings.watch_timeout_s,
        backoff_max_s=settings.watch_backoff_max_s,
    )
    mirror.start()
    app = WorkerApp(
        versions,
        mirror,
        owner_channel,
        runner,
        http_runner,
        sync_timeout_s=settings.triton_start_timeout_s,
    )
    return grpc_server, app


def main() -> None:
    """Console script `modelserve-inference`."""
    owner = Owner.from_env() if os.environ.get(WORKER_ENV) else None
    build: Callable[[InferenceSettings], Awaitable[tuple[GrpcServer, ServiceApp]]] = (
        build_server if owner is None else functools.partial(build_worker, owner=owner)
    )
    run_service(SERVICE, InferenceSettings, build, workers_allowed=True)


if __name__ == "__main__":
    main()
