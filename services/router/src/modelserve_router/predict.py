"""One prediction: route, gather features, run the model, log the record."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from modelserve.type.v1 import prediction_record_pb2
from modelserve_features.convert import value_to_proto
from modelserve_features.online import FeatureResult, FeatureStatus
from modelserve_features.request_time import RequestFacts, compute_request_features
from modelserve_features.views import FeatureRef, Value
from modelserve_router.routing import DeploymentTable
from modelserve_router.sources import FeatureReader, ModelRunner, as_float
from modelserve_runtime.convert import DTYPES, numpy_to_tensor
from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    ModelServeError,
)
from modelserve_runtime.prediction_log import PredictionLogWriter
from modelserve_runtime.tracing import current_trace_id, tracer
from modelserve_triton.model_config import conform_outputs

log = structlog.get_logger()

#: The entity type of features that come with the request rather than from the store.
REQUEST_ENTITY = "request"


@dataclass(frozen=True, slots=True)
class PredictionInput:
    """A validated-shape Predict request, free of protobuf."""

    endpoint: str
    entities: Mapping[str, str]
    features: Mapping[str, Value | None]
    event_time: datetime | None = None
    user_agent: str = ""
    query: str = ""
    request_id: str = ""


@dataclass(slots=True)
class PredictionResult:
    """The answer and how it was made."""

    outputs: dict[str, npt.NDArray[Any]]
    model_version: str
    route_reason: str
    request_id: str
    trace_id: str
    features: dict[str, Value | None] = field(default_factory=dict)
    missing_features: list[str] = field(default_factory=list)
    feature_statuses: dict[str, str] = field(default_factory=dict)
    """The status of each stored feature (present, missing, expired, defaulted)."""


class Predictor:
    """The router's data path."""

    def __init__(
        self,
        deployments: DeploymentTable,
        features: FeatureReader,
        runner: ModelRunner,
        prediction_log: PredictionLogWriter,
    ) -> None:
        self._deployments = deployments
        self._features = features
        self._runner = runner
        self._log = prediction_log

    async def predict(self, request: PredictionInput) -> PredictionResult:
        """Answers one request and appends its record to the prediction log, success or not."""
        started = time.perf_counter()
        received = Timestamp()
        received.GetCurrentTime()
        if not request.endpoint:
            raise InvalidArgumentError.for_field("endpoint", "must name an endpoint")
        request_id = request.request_id or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(endpoint=request.endpoint, request_id=request_id)
        choice = await self._deployments.choose(request.endpoint)
        structlog.contextvars.bind_contextvars(version=choice.model_version)
        record = prediction_record_pb2.PredictionRecord(
            request_id=request_id,
            endpoint=request.endpoint,
            model_version=choice.model_version,
            route_reason=choice.reason,
            entities=dict(request.entities),
            request_time=received,
        )
        try:
            result = await self._run(request, choice.model_version, choice.reason, request_id)
        except ModelServeError as exc:
            record.status = prediction_record_pb2.PREDICTION_STATUS_ERROR
            record.error_code = exc.code.name
            raise
        except Exception:
            record.status = prediction_record_pb2.PREDICTION_STATUS_ERROR
            record.error_code = "INTERNAL"
            raise
        else:
            record.status = prediction_record_pb2.PREDICTION_STATUS_OK
            for name, value in result.features.items():
                record.features[name].CopyFrom(value_to_proto(value))
            record.outputs.extend(numpy_to_tensor(n, a) for n, a in result.outputs.items())
            return result
        finally:
            record.trace_id = current_trace_id()
            record.latency_us = int((time.perf_counter() - started) * 1e6)
            self._log.append(record)

    async def _run(
        self, request: PredictionInput, model_version: str, reason: str, request_id: str
    ) -> PredictionResult:
        version = await self._deployments.version(model_version)
        signature = version.signature
        if not signature.inputs or not signature.feature_refs:
            raise FailedPreconditionError(
                f"{model_version} declares no feature_refs; the router cannot build its input",
                reason="NO_FEATURE_REFS",
                metadata={"model_version": model_version},
            )
        refs = list(signature.feature_refs)
        stored = [FeatureRef.parse(r) for r in refs if not r.startswith(REQUEST_ENTITY + ":")]
        with tracer().start_as_current_span("router.features"):
            entity_types = (
                await self._features.entity_types(sorted({r.view for r in stored}))
                if stored
                else {}
            )
            needed_types = sorted(set(entity_types.values()))
            missing_ids = [t for t in needed_types if not request.entities.get(t)]
            if missing_ids:
                violations = [
                    FieldViolation(
                        f"entities.{t}", f"{model_version} needs the id of a {t!r} entity"
                    )
                    for t in missing_ids
                ]
                raise InvalidArgumentError.from_violations(violations)
            entities = {t: request.entities[t] for t in needed_types}
            stored_values = await self._features.read(entities, stored) if stored else {}
        facts = RequestFacts(
            event_time=request.event_time or datetime.now(UTC),
            user_agent=request.user_agent,
            query=request.query,
        )
        row, values, statuses = assemble_row(
            refs, stored_values, request.features, facts, model_version=model_version
        )
        missing = [ref for ref, status in statuses.items() if status is FeatureStatus.MISSING]
        not_present = {
            ref: status.value
            for ref, status in statuses.items()
            if status is not FeatureStatus.PRESENT
        }
        if not_present:
            log.warning("features_not_present", features=not_present)
        first = signature.inputs[0]
        dtype = DTYPES.get(first.datatype, np.dtype(np.float32))
        inputs = {first.name: np.asarray([row], dtype=dtype)}
        outputs = conform_outputs(
            await self._runner.run(model_version, inputs, [o.name for o in signature.outputs]),
            {o.name: list(o.shape) for o in signature.outputs},
        )
        return PredictionResult(
            outputs=outputs,
            model_version=model_version,
            route_reason=reason,
            request_id=request_id,
            trace_id=current_trace_id(),
            features=values,
            missing_features=missing,
            feature_statuses={ref: status.value for ref, status in statuses.items()},
        )


def assemble_row(
    refs: Sequence[str],
    stored: Mapping[FeatureRef, FeatureResult],
    request_features: Mapping[str, Value | None],
    facts: RequestFacts,
    *,
    model_version: str = "the model",
) -> tuple[list[float], dict[str, Value | None], dict[str, FeatureStatus]]:
    """The model's input row in `refs` order, the value of each ref, and the status of each
    stored one: a `request:` ref takes the caller's value or the shared request-time
    function's; a stored ref takes what the store read (its view's default when none is
    stored or it expired) or 0.0 when there is no value at all.

    InvalidArgumentError names a request feature nobody supplies and a non-numeric value.
    """
    computed = compute_request_features(facts)
    values: dict[str, Value | None] = {}
    statuses: dict[str, FeatureStatus] = {}
    row: list[float] = []
    problems: list[FieldViolation] = []
    for ref in refs:
        source, _, name = ref.partition(":")
        value: Value | None
        if source == REQUEST_ENTITY:
            value = request_features.get(name)
            if value is None:
                value = computed.get(name)
            if value is None:
                problems.append(FieldViolation(f"features.{name}", f"required by {model_version}"))
                continue
        else:
            read = stored.get(FeatureRef(source, name))
            value = None if read is None else read.value
            statuses[ref] = FeatureStatus.MISSING if read is None else read.status
        values[ref] = value
        try:
            row.append(0.0 if value is None else as_float(value))
        except ValueError:
            problems.append(
                FieldViolation(
                    f"features.{name}" if source == REQUEST_ENTITY else ref, "must be numeric"
                )
            )
    if problems:
        raise InvalidArgumentError.from_violations(problems)
    return row, values, statuses
