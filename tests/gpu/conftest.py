"""Fixtures of the GPU tests (`make test-gpu`): they need an NVIDIA GPU, and onnxruntime-gpu in
the environment Triton's python backend runs. `make test` does not collect them (CI has no GPU);
on a machine without a GPU they fail, they never skip."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import onnxruntime as ort
import pytest

# The inference tests' helpers (a registry in this process, state recording, the tiny model).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "inference"))

from inference_testing import RunningInference
from reconcile_testing import RestartableRegistry, reconciling_settings
from support import running

from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve_inference import server as inference_server
from modelserve_inference.server import InferenceApp


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here needs the GPU: check once, up front, and fail loudly without one."""
    if shutil.which("nvidia-smi") is None:
        pytest.exit("the GPU tests need an NVIDIA GPU: nvidia-smi is not on PATH", returncode=1)
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    if listed.returncode != 0 or "GPU 0" not in listed.stdout:
        pytest.exit(f"the GPU tests need an NVIDIA GPU: nvidia-smi -L: {listed}", returncode=1)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.exit(
            "the GPU tests need onnxruntime-gpu (this onnxruntime has "
            f"{ort.get_available_providers()})",
            returncode=1,
        )


@pytest.fixture(scope="module")
async def registry(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RestartableRegistry]:
    """An empty real registry for the module."""
    async with RestartableRegistry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
async def inference_service(
    tmp_path_factory: pytest.TempPathFactory, registry: RestartableRegistry
) -> AsyncIterator[RunningInference]:
    """A real inference service (local mode: it starts Triton) reconciling against `registry`."""
    settings = reconciling_settings(tmp_path_factory, registry, unload_grace_s=0.5)
    async with running(inference_server.build_server, settings) as (srv, channel, app):
        assert isinstance(app, InferenceApp)
        yield RunningInference(srv, channel, app, pb_grpc.InferenceServiceStub(channel))
