"""Fixtures of the inference tests: a real registry holding two versions, a real inference
service that starts its own tritonserver (one of each per test module)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from inference_testing import MODEL_ID, V1, V2, RunningInference, local_settings, spec_proto
from reconcile_testing import RestartableRegistry
from support import running

from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve_demo import fraud
from modelserve_inference import server as inference_server
from modelserve_inference.config import InferenceSettings
from modelserve_inference.server import InferenceApp
from modelserve_registry import server as registry_server
from modelserve_registry.config import RegistrySettings
from modelserve_runtime.clients import RegistryAdminClient


@pytest.fixture(scope="module")
def fraud_models() -> dict[str, fraud.TrainedModel]:
    """The demo fraud model by version name: version 1 trained with seed 0, version 2 with 1."""
    return {V1: fraud.train(seed=0), V2: fraud.train(seed=1)}


@pytest.fixture(scope="module")
async def registry_target(
    tmp_path_factory: pytest.TempPathFactory, fraud_models: dict[str, fraud.TrainedModel]
) -> AsyncIterator[str]:
    """`host:port` of a real registry over a data directory in tmp, holding both versions."""
    settings = RegistrySettings(
        production_traffic_only=False, data_dir=tmp_path_factory.mktemp("registry")
    )
    async with running(registry_server.build_server, settings) as (grpc_server, channel, _):
        admin = RegistryAdminClient(channel)
        await admin.create_model(MODEL_ID, "demo fraud model")
        for seed, (name, trained) in enumerate(fraud_models.items()):
            signature = registry_pb.Signature(
                inputs=[spec_proto(s) for s in trained.inputs],
                outputs=[spec_proto(s) for s in trained.outputs],
                feature_refs=list(trained.feature_refs),
            )
            version = await admin.upload_model_version(
                f"models/{MODEL_ID}",
                registry_pb.ModelVersion(
                    description=f"demo fraud model, seed {seed}",
                    format=registry_pb.ARTIFACT_FORMAT_ONNX,
                    signature=signature,
                ),
                trained.onnx_bytes,
            )
            assert version.name == name
        yield f"127.0.0.1:{grpc_server.port}"


@pytest.fixture(scope="module")
def inference_settings(
    tmp_path_factory: pytest.TempPathFactory, registry_target: str
) -> InferenceSettings:
    """Settings of a local-mode service on the module's registry, polling Triton often."""
    return local_settings(tmp_path_factory, registry_target)


@pytest.fixture(scope="module")
async def inference_service(
    inference_settings: InferenceSettings,
) -> AsyncIterator[RunningInference]:
    """A real inference service that started its own tritonserver, for the module."""
    async with running(inference_server.build_server, inference_settings) as (srv, channel, app):
        assert isinstance(app, InferenceApp)
        yield RunningInference(srv, channel, app, pb_grpc.InferenceServiceStub(channel))


@pytest.fixture(scope="module")
def inference(inference_service: RunningInference) -> pb_grpc.InferenceServiceAsyncStub:
    """A stub on the module's inference service."""
    return inference_service.stub


@pytest.fixture(scope="module")
async def registry(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RestartableRegistry]:
    """An empty real registry on a port it keeps across restarts, for the module (the reconcile
    tests point the service at it in their `inference_settings`)."""
    async with RestartableRegistry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry
