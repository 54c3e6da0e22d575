"""Checks of the metadata that rides along with models, versions and deployments: labels and
tags, sample inputs, metrics, lineage, validation sets, inference settings, hybrid lookup and
rollout strategies. Each check appends FieldViolations and returns the canonical stored form."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.type.v1 import tensor_pb2
from modelserve_registry.resources import Signature, TensorSpec
from modelserve_runtime.convert import tensor_to_numpy
from modelserve_runtime.errors import FieldViolation, InvalidArgumentError

MAX_PAIRS = 32
MAX_PAIR_VALUE_CHARS = 256
_PAIR_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}")
MAX_SAMPLE_BYTES = 1024 * 1024
MAX_METRICS = 64
MAX_VALIDATION_ROWS = 100_000
MAX_BATCH_SIZE = 4096
MAX_INSTANCES = 16
MAX_GPU_ID = 63
MAX_QUEUE_DELAY_US = 1_000_000
MIN_INTERVAL_S = 1.0
MIN_SAMPLE_SIZE = 10
#: The A/B metrics and whether a higher value is better.
AB_TEST_HIGHER_IS_BETTER = {
    pb.AB_TEST_METRIC_ERROR_RATE: False,
    pb.AB_TEST_METRIC_ACCURACY: True,
    pb.AB_TEST_METRIC_OUTCOME_MEAN: True,
    pb.AB_TEST_METRIC_ABSOLUTE_ERROR: False,
}
MAX_INTERVAL_S = 24 * 3600.0
_VERSION_NAME = re.compile("models/([a-z][a-z0-9-]{0,62})/versions/([1-9][0-9]{0,17})")
_ENTITY_TYPE = re.compile("[a-z][a-z0-9_-]{0,62}")


def check_pairs(
    field: str, pairs: Mapping[str, str], violations: list[FieldViolation]
) -> tuple[tuple[str, str], ...]:
    """Labels or tags: at most 32, keys 1-63 of [A-Za-z0-9_.-/], values at most 256 characters."""
    if len(pairs) > MAX_PAIRS:
        violations.append(FieldViolation(field, f"at most {MAX_PAIRS} entries, got {len(pairs)}"))
    for key, value in pairs.items():
        if not _PAIR_KEY.fullmatch(key):
            violations.append(
                FieldViolation(
                    f"{field}[{key!r}]", "keys are 1-63 of [A-Za-z0-9_.-/], starting alphanumeric"
                )
            )
        if len(value) > MAX_PAIR_VALUE_CHARS:
            violations.append(
                FieldViolation(f"{field}[{key!r}]", f"at most {MAX_PAIR_VALUE_CHARS} characters")
            )
    return tuple(sorted(pairs.items()))


def _spec_matches(spec: TensorSpec, array: npt.NDArray[np.generic]) -> str | None:
    """Why `array` does not fit `spec` (batch dimension free), or None when it does."""
    if len(spec.shape) != array.ndim:
        return f"has {array.ndim} dimensions, the signature declares {list(spec.shape)}"
    for declared, actual in zip(spec.shape[1:], array.shape[1:], strict=True):
        if declared != -1 and declared != actual:
            return f"has shape {list(array.shape)}, the signature declares {list(spec.shape)}"
    return None


def check_inputs_against_signature(
    field: str,
    tensors: Sequence[tensor_pb2.Tensor],
    signature: Signature,
    violations: list[FieldViolation],
) -> int:
    """Checks that `tensors` are exactly the signature's inputs with rows along the first
    dimension, all with the same number of rows; returns that number (0 when invalid)."""
    by_name = {spec.name: spec for spec in signature.inputs}
    seen: set[str] = set()
    rows: set[int] = set()
    for i, tensor in enumerate(tensors):
        path = f"{field}[{i}]"
        spec = by_name.get(tensor.name)
        if spec is None:
            violations.append(
                FieldViolation(
                    f"{path}.name",
                    f"{tensor.name!r} is not an input of the signature"
                    f" ({', '.join(sorted(by_name))})",
                )
            )
            continue
        if tensor.name in seen:
            violations.append(FieldViolation(f"{path}.name", f"{tensor.name!r} appears twice"))
            continue
        seen.add(tensor.name)
        try:
            array = tensor_to_numpy(tensor, path)
        except InvalidArgumentError as exc:
            violations.extend(exc.violations)
            continue
        if spec.datatype is not None and tensor_pb2.DataType.Name(tensor.datatype) != (
            f"DATA_TYPE_{spec.datatype.value}"
        ):
            violations.append(
                FieldViolation(
                    f"{path}.datatype",
                    f"is {tensor_pb2.DataType.Name(tensor.datatype)}, the signature declares"
                    f" DATA_TYPE_{spec.datatype.value}",
                )
            )
        mismatch = _spec_matches(spec, array)
        if mismatch is not None:
            violations.append(FieldViolation(f"{path}.shape", mismatch))
            continue
        if array.shape[0] < 1:
            violations.append(FieldViolation(f"{path}.shape", "needs at least one row"))
        if not spec.allow_non_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
            violations.append(
                FieldViolation(
                    f"{path}.contents",
                    "must be finite (no NaN or inf), as the signature's input does not allow them",
                )
            )
        rows.add(int(array.shape[0]))
    if tensors:
        missing = sorted(set(by_name) - seen)
        if missing:
            violations.append(FieldViolation(field, f"missing the inputs {', '.join(missing)}"))
    if len(rows) > 1:
        violations.append(
            FieldViolation(field, f"every input needs the same number of rows, got {sorted(rows)}")
        )
    return rows.pop() if len(rows) == 1 else 0


def check_version_extras(
    message: pb.ModelVersion, signature: Signature, violations: list[FieldViolation]
) -> tuple[bytes, str]:
    """Sample inputs, metrics and lineage of an upload; returns them as a serialized
    ModelVersion holding only those fields, and the parent version's name (or "")."""
    field = "upload.model_version"
    extras = pb.ModelVersion(
        sample_inputs=message.sample_inputs, metrics=message.metrics, lineage=message.lineage
    )
    if message.sample_inputs:
        size = sum(t.ByteSize() for t in message.sample_inputs)
        if size > MAX_SAMPLE_BYTES:
            violations.append(
                FieldViolation(f"{field}.sample_inputs", f"at most {MAX_SAMPLE_BYTES} bytes in all")
            )
        else:
            check_inputs_against_signature(
                f"{field}.sample_inputs", message.sample_inputs, signature, violations
            )
    if len(message.metrics) > MAX_METRICS:
        violations.append(FieldViolation(f"{field}.metrics", f"at most {MAX_METRICS} metrics"))
    for key, value in message.metrics.items():
        if not _PAIR_KEY.fullmatch(key):
            violations.append(FieldViolation(f"{field}.metrics[{key!r}]", "is not a valid name"))
        if not math.isfinite(value):
            violations.append(FieldViolation(f"{field}.metrics[{key!r}]", "must be finite"))
    lineage = message.lineage
    if lineage.dataset_sha256 and not re.fullmatch("[0-9a-f]{64}", lineage.dataset_sha256):
        violations.append(
            FieldViolation(f"{field}.lineage.dataset_sha256", "must be 64 lowercase hex digits")
        )
    check_pairs(f"{field}.lineage.parameters", lineage.parameters, violations)
    if lineage.parent_version and not _VERSION_NAME.fullmatch(lineage.parent_version):
        violations.append(
            FieldViolation(
                f"{field}.lineage.parent_version", "must be models/{model}/versions/{version}"
            )
        )
    return extras.SerializeToString(deterministic=True), lineage.parent_version


def check_validation_set(
    field: str, message: pb.ValidationSet, violations: list[FieldViolation]
) -> bytes:
    """A validation set's shape: inputs with one row count, labels [rows], an output and a
    metric. The inputs are checked against each version's signature when it is validated."""
    if not message.inputs:
        violations.append(FieldViolation(f"{field}.inputs", "at least one input is required"))
    rows: set[int] = set()
    for i, tensor in enumerate(message.inputs):
        try:
            array = tensor_to_numpy(tensor, f"{field}.inputs[{i}]")
        except InvalidArgumentError as exc:
            violations.extend(exc.violations)
            continue
        if not tensor.name:
            violations.append(FieldViolation(f"{field}.inputs[{i}].name", "must be set"))
        if array.ndim < 1 or array.shape[0] < 1:
            violations.append(FieldViolation(f"{field}.inputs[{i}].shape", "needs rows"))
        else:
            rows.add(int(array.shape[0]))
    if len(rows) > 1:
        violations.append(
            FieldViolation(f"{field}.inputs", f"every input needs the same rows, got {rows}")
        )
    try:
        labels = tensor_to_numpy(message.labels, f"{field}.labels")
    except InvalidArgumentError as exc:
        violations.extend(exc.violations)
    else:
        if labels.ndim != 1 or (rows and labels.shape[0] not in rows):
            violations.append(
                FieldViolation(
                    f"{field}.labels.shape", f"must be [rows] = {sorted(rows)}, got {labels.shape}"
                )
            )
        if labels.shape and labels.shape[0] > MAX_VALIDATION_ROWS:
            violations.append(
                FieldViolation(f"{field}.labels", f"at most {MAX_VALIDATION_ROWS} rows")
            )
        classes = message.metric in (
            pb.VALIDATION_METRIC_ACCURACY,
            pb.VALIDATION_METRIC_ROC_AUC,
            pb.VALIDATION_METRIC_LOG_LOSS,
        )
        if classes and labels.dtype.kind not in "iub":
            violations.append(
                FieldViolation(f"{field}.labels.datatype", "class labels must be integers")
            )
    if not message.output:
        violations.append(FieldViolation(f"{field}.output", "must name an output"))
    if message.metric not in pb.ValidationMetric.values() or (
        message.metric == pb.VALIDATION_METRIC_UNSPECIFIED
    ):
        violations.append(FieldViolation(f"{field}.metric", "must be set"))
    return message.SerializeToString(deterministic=True)


def _duration_s(duration: object) -> float:
    seconds = getattr(duration, "seconds", 0)
    nanos = getattr(duration, "nanos", 0)
    return float(seconds) + float(nanos) / 1e9


def check_inference(message: pb.InferenceConfig, violations: list[FieldViolation]) -> bytes:
    """Per-deployment Triton settings; empty bytes when every field is at its default."""
    field = "deployment.inference"
    if message.backend not in pb.Backend.values():
        violations.append(FieldViolation(f"{field}.backend", "is not a known backend"))
    if not 0 <= message.max_batch_size <= MAX_BATCH_SIZE:
        violations.append(
            FieldViolation(f"{field}.max_batch_size", f"must be 0 (default) to {MAX_BATCH_SIZE}")
        )
    limit = message.max_batch_size or MAX_BATCH_SIZE
    for i, size in enumerate(message.preferred_batch_sizes):
        if not 1 <= size <= limit:
            violations.append(
                FieldViolation(f"{field}.preferred_batch_sizes[{i}]", f"must be 1 to {limit}")
            )
    if message.HasField("max_queue_delay_us") and not (
        0 <= message.max_queue_delay_us <= MAX_QUEUE_DELAY_US
    ):
        violations.append(
            FieldViolation(f"{field}.max_queue_delay_us", f"must be 0 to {MAX_QUEUE_DELAY_US}")
        )
    if not 0 <= message.instance_count <= MAX_INSTANCES:
        violations.append(
            FieldViolation(f"{field}.instance_count", f"must be 0 (one) to {MAX_INSTANCES}")
        )
    if message.device not in pb.Device.values():
        violations.append(FieldViolation(f"{field}.device", "is not a known device"))
    if message.gpus and message.device != pb.DEVICE_GPU:
        violations.append(FieldViolation(f"{field}.gpus", "is only for device DEVICE_GPU"))
    seen: set[int] = set()
    for i, gpu in enumerate(message.gpus):
        if not 0 <= gpu <= MAX_GPU_ID:
            violations.append(FieldViolation(f"{field}.gpus[{i}]", f"must be 0 to {MAX_GPU_ID}"))
        elif gpu in seen:
            violations.append(FieldViolation(f"{field}.gpus[{i}]", f"repeats GPU {gpu}"))
        seen.add(gpu)
    if message == pb.InferenceConfig():
        return b""
    return message.SerializeToString(deterministic=True)


def check_hybrid(message: pb.HybridLookup, violations: list[FieldViolation]) -> bytes:
    """Hybrid lookup settings; empty bytes when off and unset."""
    field = "deployment.hybrid"
    if message.enabled:
        if _duration_s(message.max_age) <= 0:
            violations.append(FieldViolation(f"{field}.max_age", "must be positive when enabled"))
        if not _ENTITY_TYPE.fullmatch(message.entity_type):
            violations.append(
                FieldViolation(f"{field}.entity_type", "must be an entity type: 1-63 of [a-z0-9_-]")
            )
    if message == pb.HybridLookup():
        return b""
    return message.SerializeToString(deterministic=True)


def check_strategy(
    field: str, message: pb.RolloutStrategy, violations: list[FieldViolation]
) -> bytes:
    """A rollout strategy: canary steps rising to 100 with an interval, or blue-green with an
    observation time, and a sane gate. Empty bytes when nothing is set."""
    if message == pb.RolloutStrategy():
        return b""
    kind = message.WhichOneof("kind")
    if kind is None:
        violations.append(FieldViolation(field, "must set canary, blue_green or ab_test"))
    elif kind == "ab_test":
        _check_ab_test(f"{field}.ab_test", message.ab_test, violations)
    elif kind == "canary":
        steps = list(message.canary.steps)
        if not steps:
            violations.append(FieldViolation(f"{field}.canary.steps", "at least one step"))
        elif any(not 1 <= s <= 100 for s in steps) or steps != sorted(set(steps)):
            violations.append(
                FieldViolation(f"{field}.canary.steps", "each 1-100, strictly rising")
            )
        elif steps[-1] != 100:
            violations.append(FieldViolation(f"{field}.canary.steps", "the last step must be 100"))
        _check_interval(f"{field}.canary.interval", message.canary.interval, violations)
    else:
        _check_interval(f"{field}.blue_green.observe", message.blue_green.observe, violations)
    gate = message.gate
    if gate.HasField("max_error_rate") and not 0 <= gate.max_error_rate <= 1:
        violations.append(FieldViolation(f"{field}.gate.max_error_rate", "must be 0-1"))
    if gate.max_p99_latency_ms < 0:
        violations.append(FieldViolation(f"{field}.gate.max_p99_latency_ms", "must be >= 0"))
    if gate.min_requests < 0:
        violations.append(FieldViolation(f"{field}.gate.min_requests", "must be >= 0"))
    if gate.HasField("max_wait") and _duration_s(gate.max_wait) <= 0:
        violations.append(FieldViolation(f"{field}.gate.max_wait", "must be positive"))
    return message.SerializeToString(deterministic=True)


def _check_ab_test(
    field: str, message: pb.AbTestStrategy, violations: list[FieldViolation]
) -> None:
    if not 1 <= message.candidate_percent <= 99:
        violations.append(FieldViolation(f"{field}.candidate_percent", "must be 1-99"))
    if message.sample_size < MIN_SAMPLE_SIZE:
        violations.append(
            FieldViolation(f"{field}.sample_size", f"must be at least {MIN_SAMPLE_SIZE}")
        )
    if message.metric not in AB_TEST_HIGHER_IS_BETTER:
        violations.append(FieldViolation(f"{field}.metric", "must be set"))
    if not 0 <= message.alpha <= 0.5:
        violations.append(FieldViolation(f"{field}.alpha", "must be 0 (0.05) to 0.5"))
    if message.HasField("check_interval"):
        _check_interval(f"{field}.check_interval", message.check_interval, violations)
    if message.HasField("max_duration") and _duration_s(message.max_duration) <= 0:
        violations.append(FieldViolation(f"{field}.max_duration", "must be positive"))


def _check_interval(field: str, duration: object, violations: list[FieldViolation]) -> None:
    seconds = _duration_s(duration)
    if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
        violations.append(FieldViolation(field, "must be 1 s to 24 h"))


def interval_s(strategy: pb.RolloutStrategy) -> float:
    """How long each step of the strategy runs before its gate is read (for an A/B test: how
    often its experiment report is read)."""
    kind = strategy.WhichOneof("kind")
    if kind == "canary":
        return _duration_s(strategy.canary.interval)
    if kind == "ab_test":
        test = strategy.ab_test
        return _duration_s(test.check_interval) if test.HasField("check_interval") else 60.0
    return _duration_s(strategy.blue_green.observe)


def steps_of(strategy: pb.RolloutStrategy) -> list[int]:
    """The candidate's percent at each step: the canary's steps, [100] for blue-green, the
    test's split for an A/B test."""
    kind = strategy.WhichOneof("kind")
    if kind == "canary":
        return list(strategy.canary.steps)
    if kind == "ab_test":
        return [strategy.ab_test.candidate_percent]
    return [100]


def max_wait_s(strategy: pb.RolloutStrategy) -> float:
    """The longest a step may stay inconclusive: the gate's max_wait, or 10 intervals; for
    an A/B test its max_duration (seven days by default), counted from its start."""
    if strategy.WhichOneof("kind") == "ab_test":
        test = strategy.ab_test
        return _duration_s(test.max_duration) if test.HasField("max_duration") else 7 * 86400.0
    if strategy.gate.HasField("max_wait"):
        return _duration_s(strategy.gate.max_wait)
    return 10 * interval_s(strategy)
