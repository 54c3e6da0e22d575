"""Triton python-backend model that runs the version's model.onnx with onnxruntime, batched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

# onnxruntime reports element types as "tensor(<type>)"; these are the ones we cast to.
_ONNX_TO_NUMPY: dict[str, npt.DTypeLike] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class TritonPythonModel:
    """Serves one model version: every request in an execute() call shares one onnxruntime run."""

    def initialize(self, args: dict[str, str]) -> None:
        """Opens ``<model_repository>/<model_version>/model.onnx``: on a CPU instance for
        single-threaded CPU runs, on a GPU instance with the CUDA provider on its GPU."""
        check_numpy(np.__version__)
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = ort.SessionOptions()
        # Triton runs one instance per stub process and scales with instance_count; one
        # intra-op thread per instance keeps instances from fighting over cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        kind = args.get("model_instance_kind", "CPU")
        device_id = int(args.get("model_instance_device_id", "0"))
        if kind == "GPU" and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN installed from pip (nvidia-* beside it)
            # only once they are loaded; a failure here shows in check_session_device.
            ort.preload_dlls()
        self._session = ort.InferenceSession(
            str(path),
            sess_options=options,
            providers=execution_providers(kind, device_id, ort.get_available_providers()),
        )
        check_session_device(kind, device_id, self._session.get_providers())
        # An element type missing from the table (strings) is passed through uncast.
        self._input_dtypes: dict[str, npt.DTypeLike | None] = {
            meta.name: _ONNX_TO_NUMPY.get(meta.type) for meta in self._session.get_inputs()
        }
        config = json.loads(args["model_config"])
        self._output_dtypes: dict[str, npt.DTypeLike] = {
            output["name"]: pb_utils.triton_string_to_numpy(output["data_type"])
            for output in config.get("output", [])
        }
        self._output_names = [meta.name for meta in self._session.get_outputs()]

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answers each request; a failure becomes that request's error, never an exception."""
        responses: list[Any] = [None] * len(requests)
        feeds: list[dict[str, npt.NDArray[Any]]] = []
        positions: list[int] = []
        for position, request in enumerate(requests):
            try:
                feeds.append(self._read_inputs(request))
            except Exception as exc:  # a bad request must not fail the others in the batch
                responses[position] = _error_response(exc)
            else:
                positions.append(position)
        if feeds:
            for position, response in zip(positions, self._run_together(feeds), strict=True):
                responses[position] = response
        return responses

    def finalize(self) -> None:
        """Releases the onnxruntime session."""
        del self._session

    def _read_inputs(self, request: Any) -> dict[str, npt.NDArray[Any]]:
        arrays: dict[str, npt.NDArray[Any]] = {}
        for name, dtype in self._input_dtypes.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            array = np.asarray(tensor.as_numpy())
            arrays[name] = array if dtype is None else array.astype(dtype, copy=False)
        return arrays

    def _run_together(self, feeds: list[dict[str, npt.NDArray[Any]]]) -> list[Any]:
        """Runs all requests in one session call and splits the outputs back per request."""
        if len(feeds) == 1:
            return [self._run_one(feeds[0])]
        first_input = next(iter(self._input_dtypes))
        sizes = [len(feed[first_input]) for feed in feeds]
        try:
            batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}
            outputs = self._session.run(self._output_names, batch)
        except Exception:
            # One request the graph rejects would fail the whole batch: run each alone so
            # only that request gets the error.
            return [self._run_one(feed) for feed in feeds]
        bounds = np.cumsum(sizes)[:-1]
        parts = [np.split(output, bounds) for output in outputs]
        return [self._response([part[index] for part in parts]) for index in range(len(feeds))]

    def _run_one(self, feed: dict[str, npt.NDArray[Any]]) -> Any:
        try:
            return self._response(self._session.run(self._output_names, feed))
        except Exception as exc:
            return _error_response(exc)

    def _response(self, outputs: list[npt.NDArray[Any]]) -> Any:
        tensors = [
            pb_utils.Tensor(
                name, np.ascontiguousarray(value, dtype=self._output_dtypes.get(name, value.dtype))
            )
            for name, value in zip(self._output_names, outputs, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def check_numpy(version: str) -> None:
    """Refuses numpy 2: this python backend (nvidia-pytriton's Triton, which requires numpy<2)
    answers every output empty with it, which the caller would only see as a broken answer."""
    if int(version.split(".")[0]) >= 2:
        raise RuntimeError(
            f"numpy {version} in the environment Triton's python backend runs: this backend"
            " answers empty outputs with numpy 2; install numpy<2 there (modelserve pins 1.26.4)"
        )


def execution_providers(kind: str, device_id: int, available: list[str]) -> list[Any]:
    """The onnxruntime providers for a Triton instance of ``kind`` (CPU or GPU) on ``device_id``.

    A GPU instance runs on the CUDA provider with the CPU one behind it for the operators CUDA
    lacks; where onnxruntime has no CUDA provider the instance refuses to start, naming what
    is missing, rather than serving from the CPU while the deployment asked for a GPU.
    """
    if kind != "GPU":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            f"this instance runs on GPU {device_id}, but onnxruntime {ort.__version__} here has"
            f" no CUDAExecutionProvider (it has {', '.join(available)}): install onnxruntime-gpu"
            " in the environment Triton's python backend runs"
        )
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def check_session_device(kind: str, device_id: int, providers: list[str]) -> None:
    """Fails a GPU instance whose session did not get the CUDA provider: onnxruntime falls
    back to the CPU when CUDA's libraries fail to load, with only a warning in the log."""
    if kind == "GPU" and "CUDAExecutionProvider" not in providers:
        raise RuntimeError(
            f"onnxruntime could not start CUDA on GPU {device_id} (its CUDA and cuDNN libraries"
            " did not load; Triton's log has onnxruntime's warning) and would run on the CPU"
        )


def _error_response(exc: Exception) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
    )
