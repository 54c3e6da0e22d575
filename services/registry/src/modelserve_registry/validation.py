"""Validation runs: a smoke test and a regression test of a version, run through inference.

The smoke test loads the candidate in inference (Triton) and runs its sample inputs (or one
synthesized row when it has none): every declared output must come back with its declared
type and shape, all finite. The regression test scores the model's validation set with the
candidate and with the current PRODUCTION version (the one aliased `champion` when that one is
in PRODUCTION, else the newest PRODUCTION version) and passes when the candidate is not worse
by more than the tolerance. Versions loaded only for the run are unloaded afterwards.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import structlog
from sklearn.metrics import log_loss, roc_auc_score

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.inference.v1 import inference_service_pb2_grpc as inference_grpc
from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.type.v1 import tensor_pb2
from modelserve_registry.convert import timestamp
from modelserve_registry.metadata import check_inputs_against_signature
from modelserve_registry.resources import DataType, Model, ModelVersion, Stage, TensorSpec
from modelserve_runtime.convert import numpy_to_tensor, tensor_to_numpy
from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    UnavailableError,
)

log = structlog.get_logger()

Arrays = dict[str, npt.NDArray[np.generic]]
T = TypeVar("T")

_HIGHER_IS_BETTER = {
    pb.VALIDATION_METRIC_ACCURACY: True,
    pb.VALIDATION_METRIC_ROC_AUC: True,
    pb.VALIDATION_METRIC_LOG_LOSS: False,
    pb.VALIDATION_METRIC_MEAN_ABSOLUTE_ERROR: False,
}
_NUMPY_TYPES: dict[DataType, type[np.generic]] = {
    DataType.BOOL: np.bool_,
    DataType.INT32: np.int32,
    DataType.INT64: np.int64,
    DataType.FP32: np.float32,
    DataType.FP64: np.float64,
    DataType.BYTES: np.bytes_,
}


class ModelRunner(Protocol):
    """Runs versions for a validation: inference in production, anything that serves them."""

    async def is_ready(self, name: str) -> bool:
        """Whether the version is already READY (then the run neither loads nor unloads it)."""
        ...

    async def load(self, name: str) -> None:
        """Loads the version and returns once it is READY; raises when it FAILED."""
        ...

    async def infer(self, name: str, inputs: Sequence[tensor_pb2.Tensor]) -> Arrays:
        """The version's outputs on `inputs`, by name."""
        ...

    async def unload(self, name: str) -> None:
        """Unloads a version loaded for the run."""
        ...


class InferenceServiceRunner:
    """A ModelRunner over the inference service's own RPCs."""

    def __init__(
        self,
        channel: Callable[[], Awaitable[grpc.aio.Channel]],
        *,
        load_timeout_s: float,
        infer_timeout_s: float,
    ) -> None:
        self._channel = channel
        self._load_timeout_s = load_timeout_s
        self._infer_timeout_s = infer_timeout_s

    async def _stub(self) -> inference_grpc.InferenceServiceAsyncStub:
        return inference_grpc.InferenceServiceStub(await self._channel())

    async def is_ready(self, name: str) -> bool:
        response = await self._call(
            (await self._stub()).ListModelVersions(
                inference_pb.ListModelVersionsRequest(), timeout=self._infer_timeout_s
            ),
            "list the versions inference holds",
        )
        return any(
            v.name == name and v.state == inference_pb.MODEL_VERSION_STATE_READY
            for v in response.model_versions
        )

    async def load(self, name: str) -> None:
        response = await self._call(
            (await self._stub()).LoadModelVersion(
                inference_pb.LoadModelVersionRequest(name=name), timeout=self._load_timeout_s
            ),
            f"load {name}",
        )
        loaded = response.model_version
        if loaded.state != inference_pb.MODEL_VERSION_STATE_READY:
            raise RuntimeError(
                f"inference could not load it: {inference_pb.ModelVersionState.Name(loaded.state)}"
                f" {loaded.reason}".strip()
            )

    async def infer(self, name: str, inputs: Sequence[tensor_pb2.Tensor]) -> Arrays:
        response = await self._call(
            (await self._stub()).Infer(
                inference_pb.InferRequest(name=name, inputs=inputs), timeout=self._infer_timeout_s
            ),
            f"run {name}",
        )
        return {t.name: tensor_to_numpy(t, t.name) for t in response.outputs}

    async def unload(self, name: str) -> None:
        await self._call(
            (await self._stub()).UnloadModelVersion(
                inference_pb.UnloadModelVersionRequest(name=name), timeout=self._load_timeout_s
            ),
            f"unload {name}",
        )

    @staticmethod
    async def _call(call: Awaitable[T], what: str) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise RuntimeError(f"inference refused to {what}: {exc.details()}") from exc
            raise UnavailableError(
                f"inference could not {what}: {exc.code().name} {exc.details()}",
                reason="INFERENCE_UNAVAILABLE",
                metadata={"upstream_code": exc.code().name},
            ) from exc


@dataclass(frozen=True, slots=True)
class Score:
    """A validation set scored by one version."""

    version: str
    value: float


def score(metric: int, labels: npt.NDArray[np.generic], output: npt.NDArray[np.generic]) -> float:
    """The validation set's score: `output` (per row probabilities or a value) against labels."""
    predicted = np.asarray(output, dtype=np.float64)
    if predicted.ndim > 1 and predicted.shape[-1] == 1:
        predicted = predicted.reshape(predicted.shape[0])
    truth = np.asarray(labels)
    if metric == pb.VALIDATION_METRIC_MEAN_ABSOLUTE_ERROR:
        return float(np.mean(np.abs(predicted.reshape(truth.shape[0]) - truth.astype(np.float64))))
    if predicted.ndim == 1:
        # One probability per row: that of the positive class.
        predicted = np.stack([1.0 - predicted, predicted], axis=1)
    if metric == pb.VALIDATION_METRIC_ACCURACY:
        return float(np.mean(np.argmax(predicted, axis=1) == truth.astype(np.int64)))
    if metric == pb.VALIDATION_METRIC_ROC_AUC:
        return float(roc_auc_score(truth, predicted[:, -1]))
    # float32 probabilities miss summing to one by a few ulps; log loss wants them exact.
    normalized = predicted / predicted.sum(axis=1, keepdims=True)
    return float(log_loss(truth, normalized, labels=list(range(predicted.shape[1]))))


def _synthesized(inputs: Sequence[TensorSpec]) -> list[tensor_pb2.Tensor]:
    """One row of zeros per input, for a version registered without sample inputs."""
    tensors = []
    for spec in inputs:
        shape = [1] + [d if d > 0 else 1 for d in spec.shape[1:]]
        dtype = _NUMPY_TYPES[spec.datatype or DataType.FP32]
        tensors.append(numpy_to_tensor(spec.name, np.zeros(shape, dtype=dtype)))
    return tensors


def _check_outputs(version: ModelVersion, outputs: Arrays, rows: int) -> str | None:
    """Why the smoke test's outputs are wrong, or None when they are right."""
    for spec in version.signature.outputs:
        array = outputs.get(spec.name)
        if array is None:
            return f"output {spec.name!r} is missing"
        expected = _NUMPY_TYPES.get(spec.datatype or DataType.FP32)
        if expected is not None and array.dtype.type is not expected:
            return f"output {spec.name!r} is {array.dtype}, the signature declares {spec.datatype}"
        if array.shape[0] != rows:
            return f"output {spec.name!r} has {array.shape[0]} rows for {rows} input rows"
        declared = spec.shape[1:]
        actual = array.shape[1:]
        if len(declared) == len(actual) and any(
            d != -1 and d != a for d, a in zip(declared, actual, strict=True)
        ):
            return (
                f"output {spec.name!r} has shape {list(array.shape)}, declared {list(spec.shape)}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return f"output {spec.name!r} holds NaN or inf"
    return None


class Validator:
    """Runs validations through a ModelRunner."""

    def __init__(self, runner: ModelRunner, *, tolerance: float, batch_rows: int) -> None:
        self._runner = runner
        self._tolerance = tolerance
        self._batch_rows = batch_rows

    async def run(
        self,
        version: ModelVersion,
        model: Model,
        production: Sequence[ModelVersion],
        principal: str,
        now: datetime,
    ) -> pb.ValidationRun:
        """Validates `version`; `production` are the model's PRODUCTION versions. A check that
        fails gives a FAILED run; inference being unreachable is UNAVAILABLE (nothing recorded)."""
        run = pb.ValidationRun(principal=principal, tolerance=self._tolerance)
        baseline = _baseline(version, production)
        validation_set = (
            pb.ValidationSet.FromString(model.validation_set) if model.validation_set else None
        )
        if validation_set is not None:
            violations: list[FieldViolation] = []
            check_inputs_against_signature(
                "validation_set.inputs", validation_set.inputs, version.signature, violations
            )
            if violations:
                return self._finish(
                    run,
                    now,
                    False,
                    "regression test: the model's validation set does not fit this version's"
                    " signature: " + "; ".join(f"{v.field}: {v.description}" for v in violations),
                )
        loaded: list[str] = []
        try:
            try:
                await self._ensure_loaded(version.name, loaded)
                sample = list(pb.ModelVersion.FromString(version.extras).sample_inputs)
                synthesized = not sample
                inputs = sample or _synthesized(version.signature.inputs)
                outputs = await self._runner.infer(version.name, inputs)
            except RuntimeError as exc:
                return self._finish(run, now, False, f"smoke test: {exc}")
            rows = int(tensor_to_numpy(inputs[0]).shape[0])
            wrong = _check_outputs(version, outputs, rows)
            if wrong is not None:
                return self._finish(run, now, False, f"smoke test: {wrong}")
            run.smoke_passed = True
            smoke = (
                "smoke test passed on one synthesized row (the version has no sample inputs)"
                if synthesized
                else f"smoke test passed on {rows} sample rows"
            )
            if validation_set is None:
                return self._finish(
                    run, now, True, f"{smoke}; no regression test: the model has no validation set"
                )
            run.metric = validation_set.metric
            try:
                candidate = await self._score(version.name, validation_set)
            except (RuntimeError, InvalidArgumentError, ValueError) as exc:
                return self._finish(run, now, False, f"regression test: {version.name}: {exc}")
            run.candidate_score = candidate
            metric = pb.ValidationMetric.Name(validation_set.metric).removeprefix(
                "VALIDATION_METRIC_"
            )
            if baseline is None:
                return self._finish(
                    run,
                    now,
                    True,
                    f"{smoke}; {metric} {candidate:.4f} on the validation set, no PRODUCTION"
                    " version to compare with",
                )
            try:
                await self._ensure_loaded(baseline.name, loaded)
                base = await self._score(baseline.name, validation_set)
            except (RuntimeError, InvalidArgumentError, ValueError) as exc:
                return self._finish(
                    run, now, False, f"regression test: the baseline {baseline.name}: {exc}"
                )
            run.baseline_version = baseline.name
            run.baseline_score = base
            higher = _HIGHER_IS_BETTER[validation_set.metric]
            worse_by = (base - candidate) if higher else (candidate - base)
            verdict = (
                f"{metric} {candidate:.4f} against {base:.4f} of {baseline.name}"
                f" (tolerance {self._tolerance:g})"
            )
            if worse_by > self._tolerance:
                return self._finish(
                    run, now, False, f"regression test: worse by {worse_by:.4f}: {verdict}"
                )
            return self._finish(run, now, True, f"{smoke}; regression test passed: {verdict}")
        finally:
            for name in loaded:
                try:
                    await self._runner.unload(name)
                except Exception as exc:  # a leftover load is logged, not fatal
                    log.warning("validation_unload_failed", model_version=name, error=str(exc))

    async def _ensure_loaded(self, name: str, loaded: list[str]) -> None:
        if await self._runner.is_ready(name):
            return
        await self._runner.load(name)
        loaded.append(name)

    async def _score(self, name: str, validation_set: pb.ValidationSet) -> float:
        arrays = {t.name: tensor_to_numpy(t, t.name) for t in validation_set.inputs}
        rows = next(iter(arrays.values())).shape[0]
        parts: list[npt.NDArray[np.generic]] = []
        for start in range(0, rows, self._batch_rows):
            batch = [
                numpy_to_tensor(n, np.ascontiguousarray(a[start : start + self._batch_rows]))
                for n, a in arrays.items()
            ]
            outputs = await self._runner.infer(name, batch)
            if validation_set.output not in outputs:
                raise RuntimeError(f"it has no output {validation_set.output!r}")
            parts.append(outputs[validation_set.output])
        labels = tensor_to_numpy(validation_set.labels, "validation_set.labels")
        return score(validation_set.metric, labels, np.concatenate(parts))

    @staticmethod
    def _finish(
        run: pb.ValidationRun, now: datetime, passed: bool, reason: str
    ) -> pb.ValidationRun:
        run.state = pb.VALIDATION_STATE_PASSED if passed else pb.VALIDATION_STATE_FAILED
        run.reason = reason
        run.create_time.CopyFrom(timestamp(now))
        return run


def _baseline(version: ModelVersion, production: Sequence[ModelVersion]) -> ModelVersion | None:
    """The PRODUCTION version a candidate is compared with: `champion`, else the newest."""
    others = [v for v in production if v.version != version.version and v.stage is Stage.PRODUCTION]
    for other in others:
        if "champion" in other.aliases:
            return other
    return max(others, key=lambda v: v.version, default=None)


def no_runner_error() -> FailedPreconditionError:
    """ValidateModelVersion on a registry that has no inference service to run versions."""
    return FailedPreconditionError(
        "this registry has no inference service to validate with (set inference_target or"
        " register `inference` in discovery)",
        reason="NO_INFERENCE",
    )
