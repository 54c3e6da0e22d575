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
        """Opens ``<model_repository>/<model_version>/model.onnx`` for single-threaded CPU runs."""
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = ort.SessionOptions()
        # Triton runs one instance per stub process and scales with instance_count; one
        # intra-op thread per instance keeps instances from fighting over cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
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


def _error_response(exc: Exception) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
    )
