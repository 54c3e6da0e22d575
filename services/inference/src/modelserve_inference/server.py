"""Wires the inference service: Triton (started here in local mode), the registry, the servicer."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve_inference.config import InferenceSettings
from modelserve_inference.models import ModelVersions
from modelserve_inference.registry_source import RegistryArtifactSource
from modelserve_inference.servicer import InferenceServicer
from modelserve_runtime.channels import create_channel
from modelserve_runtime.clients import RegistryClient
from modelserve_runtime.discovery import create_discovery
from modelserve_runtime.errors import UnavailableError
from modelserve_runtime.server import GrpcServer, build_grpc_server, run_service
from modelserve_triton.process import TritonOptions, TritonServer
from modelserve_triton.runner import TritonError, TritonRunner

SERVICE = "inference"


class InferenceApp:
    """Owns Triton (in local mode), the Triton client and the registry channel."""

    def __init__(
        self,
        runner: TritonRunner,
        registry_channel: grpc.aio.Channel,
        triton: TritonServer | None,
    ) -> None:
        self.runner = runner
        self.registry_channel = registry_channel
        self.triton = triton

    async def check_ready(self) -> None:
        try:
            ready = await self.runner.is_server_ready(timeout_s=5)
        except TritonError as exc:
            raise UnavailableError(f"triton does not answer: {exc}") from exc
        if not ready:
            raise UnavailableError("triton is not ready")

    async def close(self) -> None:
        await self.runner.close()
        await self.registry_channel.close()
        if self.triton is not None:
            await self.triton.stop()


async def build_server(settings: InferenceSettings) -> tuple[GrpcServer, InferenceApp]:
    """Starts Triton in local mode, then builds the server bound to its port."""
    triton: TritonServer | None = None
    triton_url = settings.triton_url
    if settings.triton_mode == "local":
        triton = TritonServer(
            TritonOptions(
                work_dir=settings.triton_work_dir,
                grpc_port=settings.triton_grpc_port,
                trace_otlp_endpoint=settings.triton_trace_endpoint,
                extra_args=(
                    "--trace-config=opentelemetry,bsp_schedule_delay="
                    f"{settings.triton_trace_export_delay_ms}",
                )
                if settings.triton_trace_endpoint
                else (),
            )
        )
        await triton.start(timeout=settings.triton_start_timeout_s)
        triton_url = triton.grpc_endpoint
    registry_target = settings.registry_target or await create_discovery(
        settings.discovery
    ).resolve("registry")
    registry_channel = create_channel(registry_target, max_message_bytes=64 * 1024 * 1024)
    runner = TritonRunner(triton_url)
    versions = ModelVersions(
        RegistryArtifactSource(RegistryClient(registry_channel)),
        runner,
        triton_endpoint=triton_url,
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
        infer_timeout_s=settings.infer_timeout_s,
        load_timeout_s=settings.load_timeout_s,
    )

    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(versions), server)
        return [pb.DESCRIPTOR.services_by_name["InferenceService"].full_name]

    app = InferenceApp(runner, registry_channel, triton)
    return build_grpc_server(SERVICE, settings, register), app


def main() -> None:
    """Console script `modelserve-inference`."""
    run_service(SERVICE, InferenceSettings, build_server)
