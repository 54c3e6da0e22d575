"""Session fixtures for Triton: a real tritonserver, a runner on it, the demo model loaded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from otlp_receiver import OtlpReceiver

from modelserve_demo.fraud import TrainedModel, train
from modelserve_triton.http import TritonHttpRunner
from modelserve_triton.model_config import build_model_config, model_files
from modelserve_triton.process import TritonOptions, TritonServer
from modelserve_triton.runner import TritonRunner

FRAUD = "fraud"


@pytest.fixture(scope="session")
def triton_otlp() -> Iterator[OtlpReceiver]:
    """Receives the spans Triton exports over OTLP/HTTP."""
    receiver = OtlpReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
async def triton_server(
    tmp_path_factory: pytest.TempPathFactory, triton_otlp: OtlpReceiver
) -> AsyncIterator[TritonServer]:
    """A real tritonserver on free ports for the session, tracing every request."""
    server = TritonServer(
        TritonOptions(
            work_dir=tmp_path_factory.mktemp("triton"),
            trace_otlp_endpoint=triton_otlp.http_endpoint,
            # Export spans every 100 ms rather than every 5 s, so trace tests wait little.
            extra_args=("--trace-config=opentelemetry,bsp_schedule_delay=100",),
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def client_spans() -> InMemorySpanExporter:
    """The spans our side of the calls records."""
    return InMemorySpanExporter()


def _tracer(spans: InMemorySpanExporter) -> Tracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider.get_tracer("tests")


@pytest.fixture(scope="session")
async def triton_runner(
    triton_server: TritonServer, client_spans: InMemorySpanExporter
) -> AsyncIterator[TritonRunner]:
    """A runner on the session's Triton whose spans go to `client_spans`."""
    runner = TritonRunner(triton_server.grpc_endpoint, tracer=_tracer(client_spans))
    yield runner
    await runner.close()


@pytest.fixture(scope="session")
async def triton_http_runner(
    triton_server: TritonServer, client_spans: InMemorySpanExporter
) -> AsyncIterator[TritonHttpRunner]:
    """An HTTP runner on the session's Triton whose spans go to `client_spans`."""
    runner = TritonHttpRunner(triton_server.http_endpoint, tracer=_tracer(client_spans))
    yield runner
    await runner.close()


@pytest.fixture(params=["grpc", "http"])
def infer_runner(
    request: pytest.FixtureRequest,
    triton_runner: TritonRunner,
    triton_http_runner: TritonHttpRunner,
) -> TritonRunner | TritonHttpRunner:
    """Each way of running inference on the session's Triton: its gRPC and HTTP endpoints."""
    return triton_runner if request.param == "grpc" else triton_http_runner


@pytest.fixture(scope="session")
def fraud_models() -> dict[int, TrainedModel]:
    """Two versions of the demo fraud model, trained with different seeds."""
    return {1: train(seed=0), 2: train(seed=1)}


@pytest.fixture(scope="session")
async def fraud_model(
    triton_runner: TritonRunner, fraud_models: dict[int, TrainedModel]
) -> dict[int, TrainedModel]:
    """Model `fraud` with versions 1 and 2 loaded in one request; returns the trained models."""
    first = fraud_models[1]
    config = build_model_config(FRAUD, first.inputs, first.outputs)
    files = model_files({version: model.onnx_bytes for version, model in fraud_models.items()})
    await triton_runner.load(FRAUD, config, files)
    return fraud_models
