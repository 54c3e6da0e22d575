"""Triton model configs and load-request files for ONNX models: run by the python backend
(onnxruntime inside model.py), or by Triton's native onnxruntime backend where it is installed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy.typing as npt

#: Triton's tensor datatypes (as the inference protocol names them) that configs accept.
TRITON_DATATYPES: frozenset[str] = frozenset(
    {"BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "FP16", "FP32", "FP64", "BYTES"}
)
#: The python backend running the packaged model.py, which runs the ONNX file with onnxruntime.
PYTHON_BACKEND = "python"
#: Triton's native ONNX Runtime backend (not shipped by the nvidia-pytriton wheel).
ONNXRUNTIME_BACKEND = "onnxruntime"
#: Where model instances run: CPU cores, or GPUs through onnxruntime's CUDA execution provider.
CPU = "cpu"
GPU = "gpu"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named tensor of a model's signature.

    ``datatype`` is Triton's name for the element type ("FP32", "INT64", ...) and
    ``shape`` includes the leading batch dimension, written -1.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    allow_non_finite: bool = False
    """Float inputs only: NaN and infinity are valid values (a model that reads NaN as a
    missing value); otherwise they are refused before Triton is called."""

    def __post_init__(self) -> None:
        if self.datatype not in TRITON_DATATYPES:
            raise ValueError(f"unknown Triton datatype {self.datatype!r} for tensor {self.name!r}")


def _tensor_config(spec: TensorSpec, *, batched: bool) -> dict[str, Any]:
    dims = list(spec.shape[1:] if batched else spec.shape)
    config: dict[str, Any] = {"name": spec.name, "data_type": f"TYPE_{_config_type(spec)}"}
    if dims:
        config["dims"] = dims
    else:
        # A tensor with only a batch dimension ([-1]) has no per-item dims, which Triton
        # does not accept; the usual spelling is dims [1] reshaped to a scalar per item.
        config["dims"] = [1]
        config["reshape"] = {"shape": []}
    return config


def _config_type(spec: TensorSpec) -> str:
    # The config proto calls BYTES "STRING"; every other name is the same.
    return "STRING" if spec.datatype == "BYTES" else spec.datatype


def build_model_config(
    model_name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_batch_size: int = 256,
    backend: str = PYTHON_BACKEND,
    max_queue_delay_us: int = 0,
    max_queue_size: int = 0,
    instance_count: int = 1,
    preferred_batch_sizes: Sequence[int] = (),
    device: str = CPU,
    gpus: Sequence[int] = (),
) -> dict[str, Any]:
    """Returns a Triton model config, JSON-able, for ``load_model(config=json.dumps(...))``.

    With ``max_batch_size > 0`` the batch dimension is stripped from every tensor's
    dims and the dynamic batcher is on, forming ``preferred_batch_sizes`` when it can;
    all versions sent in the load stay loaded.
    ``device`` GPU runs ``instance_count`` instances on each of ``gpus`` (every GPU Triton
    sees when empty); both backends then run the model with onnxruntime's CUDA provider.
    ``max_queue_size > 0`` bounds the batcher's queue: Triton refuses what does not fit
    at once instead of letting it wait; 0 leaves the queue unbounded.
    """
    if device not in (CPU, GPU):
        raise ValueError(f"device must be {CPU!r} or {GPU!r}, got {device!r}")
    if gpus and device != GPU:
        raise ValueError("gpus are only for device 'gpu'")
    batched = max_batch_size > 0
    if batched:
        for spec in (*inputs, *outputs):
            if not spec.shape or spec.shape[0] != -1:
                raise ValueError(
                    f"tensor {spec.name!r} has shape {spec.shape}; a batched model needs a"
                    " leading -1 batch dimension"
                )
    config: dict[str, Any] = {
        "name": model_name,
        "backend": backend,
        "max_batch_size": max_batch_size,
        "input": [_tensor_config(spec, batched=batched) for spec in inputs],
        "output": [_tensor_config(spec, batched=batched) for spec in outputs],
        "version_policy": {"all": {}},
        "instance_group": [_instance_group(device, instance_count, gpus)],
    }
    if batched:
        batching: dict[str, Any] = {"max_queue_delay_microseconds": max_queue_delay_us}
        if preferred_batch_sizes:
            batching["preferred_batch_size"] = list(preferred_batch_sizes)
        if max_queue_size > 0:
            batching["default_queue_policy"] = {"max_queue_size": max_queue_size}
        config["dynamic_batching"] = batching
    return config


def _instance_group(device: str, count: int, gpus: Sequence[int]) -> dict[str, Any]:
    if device == CPU:
        return {"kind": "KIND_CPU", "count": count}
    group: dict[str, Any] = {"kind": "KIND_GPU", "count": count}
    if gpus:
        group["gpus"] = list(gpus)
    return group


def backend_source() -> bytes:
    """Returns the source of the python-backend model that runs ONNX files with onnxruntime."""
    return resources.files("modelserve_triton.backend").joinpath("model.py").read_bytes()


def model_files(
    versions: Mapping[int, bytes], *, backend: str = PYTHON_BACKEND
) -> dict[str, bytes]:
    """Returns the ``files`` of a load request: each version's ONNX model and, for the python
    backend, the model.py that runs it (the native onnxruntime backend needs only the file).

    ``versions`` maps a version number to its ONNX bytes; load them all in one request
    so that Triton keeps every one of them loaded.
    """
    if not versions:
        raise ValueError("at least one model version is needed")
    source = backend_source() if backend == PYTHON_BACKEND else None
    files: dict[str, bytes] = {}
    for version, onnx_bytes in sorted(versions.items()):
        if version < 1:
            raise ValueError(f"model versions are positive integers, got {version}")
        files[f"file:{version}/model.onnx"] = onnx_bytes
        if source is not None:
            files[f"file:{version}/model.py"] = source
    return files


def conform_outputs(
    outputs: Mapping[str, npt.NDArray[Any]], shapes: Mapping[str, Sequence[int]]
) -> dict[str, npt.NDArray[Any]]:
    """Gives each output the rank its signature declares.

    A per-row scalar output (signature shape [-1]) needs config dims [1] with a reshape to
    [] (see _tensor_config), and Triton then answers it as [N, 1]; this returns it as [N].
    Outputs without a declared shape are returned unchanged.
    """
    conformed: dict[str, npt.NDArray[Any]] = {}
    for name, array in outputs.items():
        shape = shapes.get(name)
        if shape is not None and len(shape) == 1 and array.ndim == 2 and array.shape[1] == 1:
            array = array.reshape(-1)
        conformed[name] = array
    return conformed
