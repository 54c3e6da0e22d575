"""The inference domain: which model versions Triton holds, their states, and running them."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import structlog

from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from modelserve_triton.model_config import (
    TensorSpec,
    build_model_config,
    conform_outputs,
    model_files,
)
from modelserve_triton.runner import TritonError

log = structlog.get_logger()

_VERSION_NAME = re.compile(r"^models/([a-z][a-z0-9-]{0,62})/versions/([1-9][0-9]{0,9})$")
_NUMPY_TYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "BOOL": np.bool_,
    "BYTES": np.object_,
}


class VersionState(Enum):
    """Life cycle of a version inside Triton."""

    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True, slots=True)
class VersionArtifact:
    """What is needed to load a version: its signature and its ONNX bytes."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    onnx: bytes


@dataclass(slots=True)
class HeldVersion:
    """A version this service holds, and its state."""

    name: str
    model: str
    version: int
    state: VersionState
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    reason: str = ""
    onnx: bytes = field(default=b"", repr=False)


class ArtifactSource(Protocol):
    """Where versions come from (the registry)."""

    async def fetch(self, name: str) -> VersionArtifact:
        """The signature and artifact of `models/{m}/versions/{v}`."""
        ...


class TritonModels(Protocol):
    """The Triton operations this domain needs."""

    async def load(
        self,
        model_name: str,
        config: Mapping[str, Any],
        files: Mapping[str, bytes],
        *,
        timeout_s: float | None = None,
    ) -> None: ...

    async def unload(self, model_name: str, *, timeout_s: float | None = None) -> None: ...

    async def infer(
        self,
        model_name: str,
        version: int,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, npt.NDArray[Any]]: ...


def parse_version_name(name: str, field_path: str = "name") -> tuple[str, int]:
    """`models/{m}/versions/{v}` as (m, v); InvalidArgumentError naming the field otherwise."""
    match = _VERSION_NAME.match(name)
    if match is None:
        raise InvalidArgumentError.for_field(
            field_path, f"{name!r} is not of the form models/{{model}}/versions/{{version}}"
        )
    return match.group(1), int(match.group(2))


class ModelVersions:
    """Loads versions into Triton (all versions of a model in one load), tracks and runs them."""

    def __init__(
        self,
        source: ArtifactSource,
        triton: TritonModels,
        *,
        triton_endpoint: str,
        max_batch_size: int,
        max_queue_delay_us: int,
        infer_timeout_s: float,
        load_timeout_s: float,
    ) -> None:
        self._source = source
        self._triton = triton
        self.triton_endpoint = triton_endpoint
        self._max_batch_size = max_batch_size
        self._max_queue_delay_us = max_queue_delay_us
        self._infer_timeout_s = infer_timeout_s
        self._load_timeout_s = load_timeout_s
        self._held: dict[str, HeldVersion] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}

    def list(self) -> list[HeldVersion]:
        """Every held version, ordered by name."""
        return sorted(self._held.values(), key=lambda v: (v.model, v.version))

    def get(self, name: str) -> HeldVersion:
        """One held version; NotFoundError when it is not held."""
        held = self._held.get(name)
        if held is None:
            raise NotFoundError(
                f"model version {name} is not loaded",
                reason="VERSION_NOT_LOADED",
                metadata={"name": name},
            )
        return held

    async def load(self, name: str) -> HeldVersion:
        """Fetches and loads a version; returns it READY or FAILED (with the reason)."""
        model, version = parse_version_name(name)
        async with self._model_locks.setdefault(model, asyncio.Lock()):
            current = self._held.get(name)
            if current is not None and current.state is VersionState.READY:
                return current
            held = HeldVersion(name=name, model=model, version=version, state=VersionState.LOADING)
            self._held[name] = held
            try:
                artifact = await self._source.fetch(name)
            except Exception:
                del self._held[name]
                raise
            held.inputs, held.outputs, held.onnx = artifact.inputs, artifact.outputs, artifact.onnx
            try:
                await self._load_model(model)
            except TritonError as exc:
                held.state, held.reason = VersionState.FAILED, str(exc)
                held.onnx = b""
                log.error("model_version_failed", version=name, reason=held.reason)
                return held
            for other in self._held.values():
                if other.model == model and other.onnx:
                    other.state = VersionState.READY
            log.info("model_version_ready", version=name)
            return held

    async def unload(self, name: str) -> None:
        """Removes a version; the model's other versions stay loaded."""
        model, _ = parse_version_name(name)
        async with self._model_locks.setdefault(model, asyncio.Lock()):
            held = self.get(name)
            held.state = VersionState.UNLOADING
            del self._held[name]
            try:
                if any(v.model == model and v.onnx for v in self._held.values()):
                    await self._load_model(model)
                else:
                    await self._triton.unload(model, timeout_s=self._load_timeout_s)
            except TritonError as exc:
                raise UnavailableError(f"triton could not unload {name}: {exc}") from exc
            log.info("model_version_unloaded", version=name)

    async def _load_model(self, model: str) -> None:
        versions = {v.version: v for v in self._held.values() if v.model == model and v.onnx}
        newest = versions[max(versions)]
        config = build_model_config(
            model,
            newest.inputs,
            newest.outputs,
            max_batch_size=self._max_batch_size,
            max_queue_delay_us=self._max_queue_delay_us,
        )
        files = model_files({number: v.onnx for number, v in versions.items()})
        await self._triton.load(model, config, files, timeout_s=self._load_timeout_s)

    async def infer(
        self, name: str, inputs: Mapping[str, npt.NDArray[Any]], output_names: Sequence[str]
    ) -> dict[str, npt.NDArray[Any]]:
        """Runs a READY version; inputs are checked against its signature first."""
        parse_version_name(name)
        held = self.get(name)
        if held.state is not VersionState.READY:
            raise FailedPreconditionError(
                f"model version {name} is {held.state.value}, not READY",
                reason="VERSION_NOT_READY",
                metadata={"name": name, "state": held.state.value},
            )
        arrays = self._check_inputs(held, inputs)
        sizes = sorted({array.shape[0] for array in arrays.values()})
        if len(sizes) != 1 or not 1 <= sizes[0] <= self._max_batch_size:
            raise InvalidArgumentError.for_field(
                "inputs",
                f"every input needs the same batch size, from 1 to {self._max_batch_size};"
                f" got {sizes}",
            )
        known = {o.name: o.shape for o in held.outputs}
        wanted = list(output_names) or list(known)
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise InvalidArgumentError.for_field(
                "output_names", f"unknown outputs {unknown}; the version has {sorted(known)}"
            )
        try:
            outputs = await self._triton.infer(
                held.model, held.version, arrays, wanted, timeout_s=self._infer_timeout_s
            )
        except TritonError as exc:
            if exc.status == "StatusCode.INVALID_ARGUMENT":
                raise InvalidArgumentError(
                    f"triton refused the inputs of {name}: {exc}", reason="TRITON_REFUSED_INPUT"
                ) from exc
            raise UnavailableError(
                f"triton failed to run {name}: {exc}", reason="TRITON_UNAVAILABLE"
            ) from exc
        return conform_outputs(outputs, known)

    @staticmethod
    def _check_inputs(
        held: HeldVersion, inputs: Mapping[str, npt.NDArray[Any]]
    ) -> dict[str, npt.NDArray[Any]]:
        violations: list[FieldViolation] = []
        arrays: dict[str, npt.NDArray[Any]] = {}
        expected = {spec.name: spec for spec in held.inputs}
        for name in inputs:
            if name not in expected:
                violations.append(FieldViolation(f"inputs[{name}]", f"not an input of {held.name}"))
        for spec in held.inputs:
            array = inputs.get(spec.name)
            if array is None:
                violations.append(
                    FieldViolation(f"inputs[{spec.name}]", "required input is missing")
                )
                continue
            if array.ndim != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=False)
            ):
                violations.append(
                    FieldViolation(
                        f"inputs[{spec.name}].shape",
                        f"expected {list(spec.shape)}, got {list(array.shape)}",
                    )
                )
                continue
            target = np.dtype(_NUMPY_TYPES.get(spec.datatype, array.dtype))
            if (array.dtype == np.object_) != (target == np.object_):
                violations.append(
                    FieldViolation(f"inputs[{spec.name}].datatype", f"expected {spec.datatype}")
                )
                continue
            arrays[spec.name] = array.astype(target, copy=False)
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        return arrays
