"""The inference domain: which model versions Triton holds, their states, and running them."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import structlog

from modelserve_runtime.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    ModelServeError,
    NotFoundError,
    ResourceExhaustedError,
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
_TRITON_TYPES = {np.dtype(t): name for name, t in _NUMPY_TYPES.items()}


class VersionState(Enum):
    """Life cycle of a version inside Triton."""

    LOADING = "LOADING"
    WARMING = "WARMING"
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
    """Loads versions into Triton (all versions of a model in one load), warms, tracks and runs them.

    A version turns READY only after warmup requests at the batch sizes in
    `warmup_batch_sizes` have run on it, so the first caller does not pay for cold caches.
    """

    def __init__(
        self,
        source: ArtifactSource,
        triton: TritonModels,
        *,
        triton_endpoint: str,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int = 0,
        infer_timeout_s: float,
        load_timeout_s: float,
        warmup_batch_sizes: Sequence[int] = (1,),
        reject_non_finite: bool = True,
    ) -> None:
        self._source = source
        self._triton = triton
        self.triton_endpoint = triton_endpoint
        self._max_batch_size = max_batch_size
        self._max_queue_delay_us = max_queue_delay_us
        self._max_queue_size = max_queue_size
        self._infer_timeout_s = infer_timeout_s
        self._load_timeout_s = load_timeout_s
        self._warmup_batch_sizes = sorted({min(b, max_batch_size) for b in warmup_batch_sizes})
        self._reject_non_finite = reject_non_finite
        self._held: dict[str, HeldVersion] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}
        self._triton_up = True

    @property
    def triton_up(self) -> bool:
        """False from the moment Triton is found down until every version is reloaded."""
        return self._triton_up

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

    def resolve(self, model: str, version: str = "") -> HeldVersion:
        """A held version by Triton model name and version string; the newest READY one of the
        model when `version` is empty. NotFoundError when nothing matches."""
        if version:
            if not version.isdigit() or int(version) < 1:
                raise InvalidArgumentError.for_field(
                    "model_version", f"{version!r} is not a positive version number"
                )
            return self.get(f"models/{model}/versions/{int(version)}")
        of_model = [v for v in self.list() if v.model == model]
        ready = [v for v in of_model if v.state is VersionState.READY]
        if ready or of_model:
            return (ready or of_model)[-1]
        raise NotFoundError(
            f"model {model} has no loaded version",
            reason="MODEL_NOT_LOADED",
            metadata={"model": model},
        )

    async def load(self, name: str) -> HeldVersion:
        """Fetches, loads and warms a version; returns it READY or FAILED (with the reason)."""
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
                self._fail(held, str(exc))
                return held
            await self._warm_model(model)
            return held

    async def unload(self, name: str) -> None:
        """Removes a version; the model's other versions stay loaded."""
        model, _ = parse_version_name(name)
        async with self._model_locks.setdefault(model, asyncio.Lock()):
            held = self.get(name)
            held.state = VersionState.UNLOADING
            del self._held[name]
            try:
                await self._load_model(model)
            except TritonError as exc:
                raise UnavailableError(f"triton could not unload {name}: {exc}") from exc
            log.info("model_version_unloaded", version=name)

    def mark_triton_down(self, reason: str) -> None:
        """Triton is gone: every version it held is LOADING again until `reload_all` ends."""
        self._triton_up = False
        for held in self._held.values():
            if held.onnx:
                held.state, held.reason = VersionState.LOADING, f"triton restarting: {reason}"

    async def reload_all(self) -> None:
        """Loads and warms every held version into a fresh Triton, model by model."""
        for model in sorted({v.model for v in self._held.values() if v.onnx}):
            async with self._model_locks.setdefault(model, asyncio.Lock()):
                try:
                    await self._load_model(model)
                except TritonError as exc:
                    for held in self._of_model(model):
                        self._fail(held, f"reload after triton restart failed: {exc}")
                    continue
                await self._warm_model(model)
        self._triton_up = True

    def _of_model(self, model: str) -> tuple[HeldVersion, ...]:
        """The model's versions that Triton should hold (those with an artifact)."""
        return tuple(v for v in self._held.values() if v.model == model and v.onnx)

    def _fail(self, held: HeldVersion, reason: str) -> None:
        held.state, held.reason, held.onnx = VersionState.FAILED, reason, b""
        log.error("model_version_failed", version=held.name, reason=reason)

    async def _load_model(self, model: str) -> None:
        """Makes Triton hold exactly the model's versions that have an artifact."""
        versions = {v.version: v for v in self._of_model(model)}
        if not versions:
            await self._triton.unload(model, timeout_s=self._load_timeout_s)
            return
        newest = versions[max(versions)]
        config = build_model_config(
            model,
            newest.inputs,
            newest.outputs,
            max_batch_size=self._max_batch_size,
            max_queue_delay_us=self._max_queue_delay_us,
            max_queue_size=self._max_queue_size,
        )
        files = model_files({number: v.onnx for number, v in versions.items()})
        await self._triton.load(model, config, files, timeout_s=self._load_timeout_s)

    async def _warm_model(self, model: str) -> None:
        """Warms each version of the model that is not READY yet, then declares it READY.

        A (re)load may have replaced every version inside Triton; the ones already READY keep
        serving while the new ones warm, so they are warmed too but stay READY meanwhile.
        """
        for held in sorted(self._of_model(model), key=lambda v: v.version):
            ready = held.state is VersionState.READY
            if not ready:
                held.state = VersionState.WARMING
            try:
                await self._warm(held)
            except TritonError as exc:
                self._fail(held, f"warmup failed: {exc}")
                try:
                    await self._load_model(model)
                except TritonError as reload_error:
                    log.error("model_reload_failed", model=model, reason=str(reload_error))
                continue
            if not ready:
                held.state, held.reason = VersionState.READY, ""
                log.info("model_version_ready", version=held.name)

    async def _warm(self, held: HeldVersion) -> None:
        """Runs the version once per warmup batch size on inputs synthesized from its signature.

        The registry stores no sample inputs yet, so zeros of the signature's dtype and shape
        stand in for them (a -1 beyond the batch dimension becomes 1).
        """
        started = time.perf_counter()
        names = [o.name for o in held.outputs]
        for batch in self._warmup_batch_sizes:
            inputs = {spec.name: synthesize(spec, batch) for spec in held.inputs}
            await self._triton.infer(
                held.model, held.version, inputs, names, timeout_s=self._load_timeout_s
            )
        log.info(
            "model_version_warmed",
            version=held.name,
            batch_sizes=self._warmup_batch_sizes,
            seconds=round(time.perf_counter() - started, 3),
        )

    async def infer(
        self,
        name: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
        *,
        deadline_s: float | None = None,
        exact_dtypes: bool = False,
    ) -> dict[str, npt.NDArray[Any]]:
        """Runs a READY version; inputs are checked against its signature first.

        `deadline_s` is the time the caller has left; Triton gets no more than that.
        With `exact_dtypes` each input must have its signature's dtype, else inputs are cast.
        """
        parse_version_name(name)
        held = self.get(name)
        self._check_ready(held)
        arrays = self._check_inputs(held, inputs, exact_dtypes=exact_dtypes)
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
        timeout_s = (
            self._infer_timeout_s if deadline_s is None else min(deadline_s, self._infer_timeout_s)
        )
        if timeout_s <= 0:
            raise DeadlineExceededError(
                f"the deadline of the call to {name} had passed before triton was called"
            )
        try:
            outputs = await self._triton.infer(
                held.model, held.version, arrays, wanted, timeout_s=timeout_s
            )
        except TritonError as exc:
            raise _infer_error(name, exc) from exc
        return conform_outputs(outputs, known)

    @staticmethod
    def _check_ready(held: HeldVersion) -> None:
        if held.state is VersionState.READY:
            return
        details = {"name": held.name, "state": held.state.value}
        message = f"model version {held.name} is {held.state.value}, not READY"
        if held.reason:
            message += f": {held.reason}"
        if held.state is VersionState.FAILED:
            raise FailedPreconditionError(message, reason="VERSION_FAILED", metadata=details)
        # LOADING or WARMING: it will be READY shortly, so a retry is the right answer.
        raise UnavailableError(message, reason="VERSION_NOT_READY", metadata=details)

    def _check_inputs(
        self, held: HeldVersion, inputs: Mapping[str, npt.NDArray[Any]], *, exact_dtypes: bool
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
            mismatch = (
                array.dtype != target
                if exact_dtypes
                else ((array.dtype == np.object_) != (target == np.object_))
            )
            if mismatch:
                got = _TRITON_TYPES.get(array.dtype, str(array.dtype))
                violations.append(
                    FieldViolation(
                        f"inputs[{spec.name}].datatype", f"expected {spec.datatype}, got {got}"
                    )
                )
                continue
            cast = array.astype(target, copy=False)
            if self._reject_non_finite and cast.dtype.kind == "f" and not np.isfinite(cast).all():
                violations.append(
                    FieldViolation(f"inputs[{spec.name}]", "contains NaN or infinity")
                )
                continue
            arrays[spec.name] = cast
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        return arrays


def synthesize(spec: TensorSpec, batch: int) -> npt.NDArray[Any]:
    """Zeros of the tensor's dtype for a batch of `batch` rows."""
    shape = (batch, *(1 if d < 0 else d for d in spec.shape[1:]))
    if spec.datatype == "BYTES":
        return np.full(shape, b"0", dtype=np.object_)
    return np.zeros(shape, dtype=_NUMPY_TYPES.get(spec.datatype, np.float32))


def _infer_error(name: str, exc: TritonError) -> ModelServeError:
    """Triton's refusal as the error that tells the caller what to do."""
    status = exc.status or ""
    if status == "StatusCode.INVALID_ARGUMENT":
        return InvalidArgumentError(
            f"triton refused the inputs of {name}: {exc}", reason="TRITON_REFUSED_INPUT"
        )
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return DeadlineExceededError(
            f"triton did not answer {name} within the deadline", reason="TRITON_DEADLINE"
        )
    # Triton answers a request its dynamic batcher's bounded queue cannot take with
    # UNAVAILABLE "Exceeds maximum queue size"; that is overload, not an outage.
    if status == "StatusCode.RESOURCE_EXHAUSTED" or "maximum queue size" in exc.message:
        return ResourceExhaustedError(
            f"triton's queue for {name} is full: {exc}", reason="TRITON_QUEUE_FULL"
        )
    return UnavailableError(f"triton failed to run {name}: {exc}", reason="TRITON_UNAVAILABLE")
