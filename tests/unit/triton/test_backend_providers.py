"""The python-backend model.py's choice of onnxruntime providers for CPU and GPU instances.

model.py runs inside Triton's python backend, whose `triton_python_backend_utils` exists only
there; the functions tested here do not use it, so an empty module stands in for the import.
Loading on a real GPU is checked by `make test-gpu` (tests/gpu) where a GPU is present.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator

import onnxruntime as ort
import pytest

from modelserve_demo.fraud import train
from modelserve_triton.model_config import backend_source


@pytest.fixture(scope="module")
def model_py(tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.ModuleType]:
    path = tmp_path_factory.mktemp("backend") / "model.py"
    path.write_bytes(backend_source())
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
    try:
        spec = importlib.util.spec_from_file_location("modelserve_backend_model", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        if saved is None:
            del sys.modules["triton_python_backend_utils"]
        else:
            sys.modules["triton_python_backend_utils"] = saved


def test_a_cpu_instance_runs_on_the_cpu_provider_alone(model_py: types.ModuleType) -> None:
    """Even where CUDA is available, a CPU instance never lands on a GPU."""
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    assert model_py.execution_providers("CPU", 0, available) == ["CPUExecutionProvider"]


def test_a_gpu_instance_runs_on_cuda_on_its_own_gpu(model_py: types.ModuleType) -> None:
    """The CUDA provider first, on the instance's device, with the CPU behind it."""
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    assert model_py.execution_providers("GPU", 3, available) == [
        ("CUDAExecutionProvider", {"device_id": 3}),
        "CPUExecutionProvider",
    ]


def test_a_gpu_instance_without_cuda_in_onnxruntime_refuses_to_start(
    model_py: types.ModuleType,
) -> None:
    """onnxruntime's CPU build has no CUDA provider: the instance fails naming what to install
    instead of serving from the CPU."""
    available = ["AzureExecutionProvider", "CPUExecutionProvider"]

    with pytest.raises(RuntimeError, match=r"GPU 1.*no CUDAExecutionProvider.*onnxruntime-gpu"):
        model_py.execution_providers("GPU", 1, available)


def test_a_gpu_session_that_fell_back_to_the_cpu_is_refused(model_py: types.ModuleType) -> None:
    """onnxruntime drops CUDA with only a warning when its libraries fail to load; a session
    that ended up on the CPU alone fails a GPU instance and passes a CPU one."""
    session = ort.InferenceSession(train(seed=0).onnx_bytes, providers=["CPUExecutionProvider"])
    providers = session.get_providers()

    model_py.check_session_device("CPU", 0, providers)
    with pytest.raises(RuntimeError, match="could not start CUDA on GPU 0"):
        model_py.check_session_device("GPU", 0, providers)
    model_py.check_session_device("GPU", 0, ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_numpy_2_in_the_backend_is_refused_naming_the_fix(model_py: types.ModuleType) -> None:
    """The backend answers empty outputs under numpy 2 (seen on the GPU machine, whose image
    has numpy 2.5): an instance refuses to start instead, naming the version to install."""
    model_py.check_numpy("1.26.4")
    with pytest.raises(RuntimeError, match=r"numpy 2\.5\.2 .* install numpy<2"):
        model_py.check_numpy("2.5.2")
