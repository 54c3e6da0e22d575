"""One prediction: route, gather features, run the model, log the record."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import prediction_record_pb2
from modelserve_features.convert import value_to_proto
from modelserve_features.online import FeatureResult, FeatureStatus
from modelserve_features.request_time import RequestFacts, compute_request_features
from modelserve_features.views import FeatureRef, Value
from modelserve_router.breaker import (
    Admission,
    CircuitBreakers,
    CircuitOpenError,
    counts_against_version,
)
from modelserve_router.cache import CacheKey, PredictionCache, cache_key
from modelserve_router.coalesce import ENDPOINT_BUDGET, WAIT_BOUNDED, Upstream
from modelserve_router.config import EndpointSettings
from modelserve_router.hybrid import PrecomputedLookup
from modelserve_router.limits import CallerRateLimits, InFlightLimit
from modelserve_router.routing import (
    Route,
    RouteChoice,
    RoutingTable,
    ServedVersion,
    Snapshot,
    choose,
    routing_keys,
)
from modelserve_router.shadow import ShadowMirror
from modelserve_router.sources import FeatureReader, ModelRunner, as_float
from modelserve_runtime.auth import ANONYMOUS
from modelserve_runtime.convert import DTYPES, numpy_to_tensor, tensor_to_numpy
from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    ModelServeError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from modelserve_runtime.prediction_log import PredictionLogWriter
from modelserve_runtime.tracing import current_trace_id, tracer
from modelserve_triton.model_config import conform_outputs

log = structlog.get_logger()

#: The entity type of features that come with the request rather than from the store.
REQUEST_ENTITY = "request"


class CallerTensors(Protocol):
    """A model input the caller sends whole (Open Inference Protocol) instead of features."""

    def for_version(
        self, model_version: str, signature: registry_pb.Signature
    ) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Value | None]]:
        """The tensors as `model_version` takes them, passed as they are, and the feature
        values they hold by feature ref (for the record); InvalidArgumentError naming each
        tensor that does not fit the signature."""
        ...


#: The longest caller-chosen request id. It travels as the `x-request-id` header of the calls
#: a request makes, and into the prediction log and the monitor's keys.
MAX_REQUEST_ID_LENGTH = 128


def check_request_id(request_id: str, field_name: str = "request_id") -> None:
    """InvalidArgumentError unless a caller's request id is empty (the router makes one) or up
    to MAX_REQUEST_ID_LENGTH visible ASCII characters (`!` to `~`): a header value cannot carry
    anything else, so the calls made for the request would fail."""
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgumentError.for_field(
            field_name,
            f"must be at most {MAX_REQUEST_ID_LENGTH} characters; got {len(request_id)}",
        )
    if request_id and not (
        request_id.isascii() and request_id.isprintable() and " " not in request_id
    ):
        raise InvalidArgumentError.for_field(
            field_name, f"must be visible ASCII characters (! to ~); got {request_id!r}"
        )


def request_budget(remaining_s: float | None, default_s: float, *, streamed: bool) -> float:
    """How long one request may take: the caller's deadline (`remaining_s`, None: none), at
    most an hour, else `default_s` (REQUEST_TIMEOUT_S). A request of a stream gets at most
    `default_s` too: the stream's deadline is for all its requests, not each one's."""
    if remaining_s is None:
        return default_s
    if streamed:
        return min(remaining_s, default_s)
    return min(remaining_s, 3600.0)


@dataclass(frozen=True, slots=True)
class PredictionInput:
    """A validated-shape Predict (or Open Inference Protocol ModelInfer) request, free of
    protobuf."""

    endpoint: str
    entities: Mapping[str, str]
    features: Mapping[str, Value | None]
    event_time: datetime | None = None
    user_agent: str = ""
    query: str = ""
    request_id: str = ""
    user_id: str = ""
    principal: str = ANONYMOUS
    """Who is calling (the API key's principal); keys the caller's rate limit."""
    routing_key: str = ""
    """The sticky key's value, whatever the deployment's `routing_key` names; when empty the
    key comes from `user_id` or `entities`."""
    model_version: str = ""
    """A version the caller pins instead of the traffic split (see `pin`)."""
    tensors: CallerTensors | None = None
    """The model's input as the caller sent it; None: assembled from features."""


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
    degraded: bool = False
    degraded_reason: str = ""
    """What failed and what answered instead; empty when not degraded."""


@dataclass(frozen=True, slots=True)
class VersionPlan:
    """What every request of one version needs from its signature, worked out on the first
    request rather than on each (a few tens of µs of parsing and lookups per request); the
    batch and streaming jobs build their rows from it as well."""

    refs: tuple[str, ...]
    stored: tuple[FeatureRef, ...]
    """The refs read from the store (not `request:`), parsed."""
    views: tuple[str, ...]
    """The views of `stored`, sorted, once each."""
    input_name: str
    input_dtype: np.dtype[Any]
    output_names: tuple[str, ...]
    output_shapes: dict[str, list[int]]
    allow_non_finite: bool = False
    """The input takes NaN and infinity (the signature says so): a feature without a value
    is NaN, the model's own missing value, instead of 0.0."""
    input_range: tuple[float, float] = (-math.inf, math.inf)
    """The finite values the input's dtype holds, [low, high) (see `value_range`)."""

    @classmethod
    def of(cls, signature: registry_pb.Signature) -> VersionPlan:
        refs = tuple(signature.feature_refs)
        stored = tuple(FeatureRef.parse(r) for r in refs if not r.startswith(REQUEST_ENTITY + ":"))
        first = signature.inputs[0] if signature.inputs else None
        input_dtype = (
            np.dtype(np.float32)
            if first is None
            else DTYPES.get(first.datatype, np.dtype(np.float32))
        )
        return cls(
            refs=refs,
            stored=stored,
            views=tuple(sorted({r.view for r in stored})),
            input_name="" if first is None else first.name,
            input_dtype=input_dtype,
            input_range=value_range(input_dtype),
            output_names=tuple(o.name for o in signature.outputs),
            output_shapes={o.name: list(o.shape) for o in signature.outputs},
            allow_non_finite=first is not None and first.allow_non_finite,
        )


@dataclass(frozen=True, slots=True)
class _Input:
    """A version's input for one request, and the feature values and statuses behind it."""

    plan: VersionPlan
    inputs: dict[str, npt.NDArray[Any]]
    values: dict[str, Value | None]
    missing: list[str]
    statuses: dict[str, FeatureStatus]


@dataclass(slots=True)
class _Endpoint:
    """What the router keeps per endpoint: its in-flight limit, its prediction cache and its
    micro-batching budget."""

    in_flight: InFlightLimit | None
    cache: PredictionCache | None
    budget_s: float | None = None


@dataclass(slots=True)
class _CacheUse:
    """One request's use of its endpoint's cache: the key its input made, and the features
    behind it, kept for the cached-prediction fallback."""

    cache: PredictionCache
    key: CacheKey | None = None
    features: dict[str, Value | None] = field(default_factory=dict)


class Predictor:
    """The router's data path."""

    def __init__(
        self,
        routes: RoutingTable,
        features: FeatureReader,
        runner: ModelRunner,
        prediction_log: PredictionLogWriter,
        shadows: ShadowMirror,
        *,
        shadow_timeout_s: float,
        breakers: CircuitBreakers | None = None,
        rate_limits: CallerRateLimits | None = None,
        endpoint_settings: Callable[[str], EndpointSettings] | None = None,
        precomputed: PrecomputedLookup | None = None,
        upstream: Upstream | None = None,
    ) -> None:
        """`breakers`, `rate_limits` and `endpoint_settings` (caches and in-flight limits)
        are None when off, and then cost a request nothing. `precomputed` answers for
        deployments whose hybrid lookup is on; the others never touch it. `upstream` (with
        micro-batching) learns how many requests each version has in the router."""
        self._routes = routes
        self._features = features
        self._runner = runner
        self._log = prediction_log
        self._shadows = shadows
        self._shadow_timeout_s = shadow_timeout_s
        self._breakers = breakers
        self._rate_limits = rate_limits
        self._endpoint_settings = endpoint_settings
        self._endpoints: dict[str, _Endpoint] = {}
        self._precomputed = precomputed
        self._upstream = upstream
        self._plans: dict[str, tuple[registry_pb.ModelVersion, VersionPlan]] = {}

    def _plan(self, model_version: str, version: registry_pb.ModelVersion) -> VersionPlan:
        """The version's plan, made again when the snapshot holds another message for it."""
        held = self._plans.get(model_version)
        if held is not None and held[0] is version:
            return held[1]
        plan = VersionPlan.of(version.signature)
        if len(self._plans) > 4 * len(self._endpoints) + 64:
            self._plans.clear()  # versions long gone from every snapshot
        self._plans[model_version] = (version, plan)
        return plan

    def in_flight(self, endpoint: str) -> int:
        """Requests of the endpoint in flight now, where it has an in-flight limit (else 0)."""
        state = self._endpoints.get(endpoint)
        return 0 if state is None or state.in_flight is None else state.in_flight.count

    def _endpoint(self, endpoint: str) -> _Endpoint:
        state = self._endpoints.get(endpoint)
        if state is None:
            # Made once the endpoint resolved, so only endpoints that exist get one.
            assert self._endpoint_settings is not None
            settings = self._endpoint_settings(endpoint)
            state = self._endpoints[endpoint] = _Endpoint(
                in_flight=(
                    None
                    if settings.max_in_flight is None
                    else InFlightLimit(
                        endpoint, settings.max_in_flight, settings.in_flight_retry_after_s
                    )
                ),
                cache=(
                    PredictionCache(
                        endpoint,
                        max_entries=settings.cache_max_entries,
                        ttl_s=settings.cache_ttl_s,
                        stale_s=settings.cache_stale_s,
                    )
                    if settings.cache_max_entries > 0
                    else None
                ),
                budget_s=(
                    None
                    if settings.coalesce_budget_ms is None
                    else settings.coalesce_budget_ms / 1000
                ),
            )
        return state

    async def predict(self, request: PredictionInput) -> PredictionResult:
        """Answers one request and appends its record to the prediction log, success or not;
        then mirrors it to the endpoint's shadow versions in the background."""
        started = time.perf_counter()
        received = Timestamp()
        received.GetCurrentTime()
        if not request.endpoint:
            raise InvalidArgumentError.for_field("endpoint", "must name an endpoint")
        check_request_id(request.request_id)
        if self._rate_limits is not None:
            self._rate_limits.take(request.principal)
        request_id = request.request_id or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(endpoint=request.endpoint, request_id=request_id)
        # One snapshot serves the whole request, so a flip mid-request is never half seen.
        snapshot, route = await self._routes.resolve(request.endpoint)
        not_ready: FailedPreconditionError | None = None
        if request.model_version:
            choice = pin(route, request.model_version)
        else:
            keys = (
                {route.routing_key: request.routing_key}
                if request.routing_key
                else routing_keys(request.user_id, request.entities)
            )
            try:
                choice = choose(route, snapshot.ready, keys)
            except FailedPreconditionError as exc:
                # No traffic target is READY (Triton died and inference is reloading it, a
                # version failed to load): the fallback chain answers if it can, else this.
                if exc.reason != "VERSION_NOT_READY":
                    raise
                not_ready = exc
                choice = RouteChoice(
                    next(t.model_version for t in route.traffic if t.percent > 0), "not_ready"
                )
        structlog.contextvars.bind_contextvars(version=choice.model_version)
        record = self._record(request, request_id, choice.model_version, choice.reason, received)
        cached: _CacheUse | None = None
        limit: InFlightLimit | None = None
        answered: PredictionResult | None = None
        budget_s: float | None = None
        if self._endpoint_settings is not None:
            endpoint = self._endpoint(route.endpoint)
            budget_s = endpoint.budget_s
            if endpoint.cache is not None and endpoint.cache.follow(route.revision):
                cached = _CacheUse(endpoint.cache)
            limit = endpoint.in_flight
            if limit is not None:
                limit.enter()
        try:
            try:
                if not_ready is not None:
                    raise not_ready
                result = None
                if route.hybrid is not None and self._precomputed is not None:
                    result = await self._answer_precomputed(
                        request, snapshot, route, choice.model_version, request_id
                    )
                if result is None:
                    result = await self._run(
                        request,
                        snapshot,
                        choice.model_version,
                        choice.reason,
                        request_id,
                        cached,
                        budget_s,
                    )
            except (UnavailableError, ResourceExhaustedError, FailedPreconditionError) as exc:
                if isinstance(exc, FailedPreconditionError) and exc is not not_ready:
                    raise
                result = await self._fall_back(
                    request, snapshot, route, choice, request_id, exc, cached
                )
                record.model_version = result.model_version
                record.route_reason = result.route_reason
                record.degraded = True
                record.degraded_reason = result.degraded_reason
        except BaseException as exc:
            _record_failure(record, exc)
            raise
        else:
            answered = result
            return result
        finally:
            if limit is not None:
                limit.leave()
            record.trace_id = current_trace_id()
            record.latency_us = int((time.perf_counter() - started) * 1e6)
            self._log.append(record if answered is None else _Answered(record, answered))
            _count(record)
            # After the answer, so the copies never compete with it.
            for shadow in route.shadow:
                self._shadows.submit(
                    self._shadow(request, snapshot, shadow, request_id, received),
                    model_version=shadow,
                )

    async def _answer_precomputed(
        self,
        request: PredictionInput,
        snapshot: Snapshot,
        route: Route,
        model_version: str,
        request_id: str,
    ) -> PredictionResult | None:
        """The answer of a batch job's fresh prediction for the request's entity, made by the
        chosen version (`precomputed`); None when there is none and the model must answer."""
        assert route.hybrid is not None and self._precomputed is not None
        signature = snapshot.versions[model_version].signature
        with tracer().start_as_current_span("router.precomputed"):
            outputs = await self._precomputed.answer(
                route.endpoint,
                route.hybrid,
                request.entities,
                model_version,
                {o.name: list(o.shape) for o in signature.outputs},
            )
        if outputs is None:
            return None
        return PredictionResult(
            outputs=outputs,
            model_version=model_version,
            route_reason="precomputed",
            request_id=request_id,
            trace_id=current_trace_id(),
        )

    async def _fall_back(
        self,
        request: PredictionInput,
        snapshot: Snapshot,
        route: Route,
        choice: RouteChoice,
        request_id: str,
        failure: ModelServeError,
        cached: _CacheUse | None,
    ) -> PredictionResult:
        """The deployment's fallback chain after the chosen version failed in inference, its
        breaker is open, or no traffic target is READY: the fallback version if it is another
        READY one, else a cached answer of the chosen version for the same input (up to the
        stale bound), else the declared default outputs; `failure` again when none answers."""
        why = _failed(choice.model_version, failure)
        fallback = route.fallback_version
        if fallback and fallback != choice.model_version and fallback in snapshot.ready:
            try:
                result = await self._run(request, snapshot, fallback, "fallback", request_id)
            except (UnavailableError, ResourceExhaustedError) as exc:
                why = f"{why}; fallback {_failed(fallback, exc)}"
            else:
                result.degraded = True
                result.degraded_reason = f"{why}; answered by fallback {fallback}"
                log.warning("prediction_degraded", reason=result.degraded_reason)
                return result
        if (
            cached is not None
            and cached.key is None
            and isinstance(failure, FailedPreconditionError)
        ):
            # The model never ran (no target READY), so the input the cache is keyed by was
            # never built: build it now. Without features (their store away too) the chain
            # goes on to the declared defaults; a bad request stays the caller's error.
            try:
                prepared = await self._input(request, snapshot, choice.model_version)
            except (UnavailableError, ResourceExhaustedError) as exc:
                log.warning("cached_fallback_without_input", error=str(exc))
            else:
                cached.key = cache_key(choice.model_version, prepared.inputs)
                cached.features = prepared.values
        entry = None if cached is None or cached.key is None else cached.cache.stale(cached.key)
        if cached is not None and entry is not None:
            age_s = cached.cache.age_s(entry)
            result = PredictionResult(
                outputs=dict(entry.outputs),
                model_version=entry.model_version,
                route_reason="cached_prediction",
                request_id=request_id,
                trace_id=current_trace_id(),
                features=cached.features,
                degraded=True,
                degraded_reason=(
                    f"{why}; answered by a cached prediction of {entry.model_version} "
                    f"made {age_s:.1f} s ago"
                ),
            )
            log.warning("prediction_degraded", reason=result.degraded_reason)
            return result
        if route.default_outputs:
            result = PredictionResult(
                outputs={t.name: tensor_to_numpy(t) for t in route.default_outputs},
                model_version="",
                route_reason="default_output",
                request_id=request_id,
                trace_id=current_trace_id(),
                degraded=True,
                degraded_reason=f"{why}; answered by the declared default outputs",
            )
            log.warning("prediction_degraded", reason=result.degraded_reason)
            return result
        raise failure

    def _record(
        self,
        request: PredictionInput,
        request_id: str,
        model_version: str,
        reason: str,
        received: Timestamp,
    ) -> prediction_record_pb2.PredictionRecord:
        return prediction_record_pb2.PredictionRecord(
            request_id=request_id,
            endpoint=request.endpoint,
            model_version=model_version,
            # Stays when a fallback answers and model_version becomes the answering one.
            routed_version=model_version,
            route_reason=reason,
            entities=dict(request.entities),
            request_time=received,
        )

    async def _shadow(
        self,
        request: PredictionInput,
        snapshot: Snapshot,
        model_version: str,
        request_id: str,
        received: Timestamp,
    ) -> None:
        """Runs one shadow copy and logs its record (marked shadow); never raises."""
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(version=model_version, shadow=True)
        record = self._record(request, request_id, model_version, "shadow", received)
        record.shadow = True
        answered: PredictionResult | None = None
        # The copy's own deadline bounds it, queued behind other copies as well (the task
        # is its own, so this stays with the copy).
        WAIT_BOUNDED.set(False)
        try:
            async with asyncio.timeout(self._shadow_timeout_s):
                result = await self._run(request, snapshot, model_version, "shadow", request_id)
        except Exception as exc:  # a shadow's failure must never reach anyone but the log
            _record_failure(record, exc)
            log.warning("shadow_failed", shadow_version=model_version, error_code=record.error_code)
        else:
            answered = result
        finally:
            record.trace_id = current_trace_id()
            record.latency_us = int((time.perf_counter() - started) * 1e6)
            self._log.append(record if answered is None else _Answered(record, answered))

    async def _input(
        self, request: PredictionInput, snapshot: Snapshot, model_version: str
    ) -> _Input:
        """The version's input for the request: the caller's tensors, or the row assembled
        from stored and request-time features in the order of its signature."""
        version = snapshot.versions[model_version]
        signature = version.signature
        plan = self._plan(model_version, version)
        if request.tensors is not None:
            # The caller sent the model's tensors (Open Inference Protocol): no features.
            inputs, values = request.tensors.for_version(model_version, signature)
            missing: list[str] = []
            statuses: dict[str, FeatureStatus] = {}
        else:
            if not plan.input_name or not plan.refs:
                raise FailedPreconditionError(
                    f"{model_version} declares no feature_refs; the router cannot build its input",
                    reason="NO_FEATURE_REFS",
                    metadata={"model_version": model_version},
                )
            stored = plan.stored
            with tracer().start_as_current_span("router.features"):
                entity_types = await self._features.entity_types(plan.views) if stored else {}
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
                plan.refs,
                stored_values,
                request.features,
                facts,
                model_version=model_version,
                allow_non_finite=plan.allow_non_finite,
            )
            missing = [ref for ref, status in statuses.items() if status is FeatureStatus.MISSING]
            not_present = {
                ref: status.value
                for ref, status in statuses.items()
                if status is not FeatureStatus.PRESENT
            }
            if not_present:
                log.warning("features_not_present", features=not_present)
            check_range(plan, row, model_version)
            inputs = {plan.input_name: np.asarray([row], dtype=plan.input_dtype)}
        return _Input(plan, inputs, values, missing, statuses)

    async def _run(
        self,
        request: PredictionInput,
        snapshot: Snapshot,
        model_version: str,
        reason: str,
        request_id: str,
        cached: _CacheUse | None = None,
        budget_s: float | None = None,
    ) -> PredictionResult:
        """Builds the version's input and runs it: from the endpoint's cache when `cached`
        holds a fresh answer for that input, else through the version's circuit breaker
        (CircuitOpenError, an UnavailableError, when it is open). `budget_s`: the endpoint's
        own micro-batching budget, if it has one."""
        served = snapshot.ready.get(model_version)
        if served is None:
            raise FailedPreconditionError(
                f"model version {model_version} is not READY in inference",
                reason="VERSION_NOT_READY",
                metadata={"model_version": model_version},
            )
        upstream = self._upstream
        if upstream is None:
            return await self._model(request, snapshot, served, reason, request_id, cached)
        upstream.enter(model_version, budget_s)
        # The coalescer reads the endpoint's budget from the context of the model call.
        token = ENDPOINT_BUDGET.set(budget_s)
        try:
            return await self._model(
                request, snapshot, served, reason, request_id, cached, upstream, budget_s
            )
        finally:
            ENDPOINT_BUDGET.reset(token)
            upstream.done(model_version, budget_s)

    async def _model(
        self,
        request: PredictionInput,
        snapshot: Snapshot,
        served: ServedVersion,
        reason: str,
        request_id: str,
        cached: _CacheUse | None,
        upstream: Upstream | None = None,
        budget_s: float | None = None,
    ) -> PredictionResult:
        """`_run`'s work once the version is READY: its input, then the cache or the model."""
        model_version = served.model_version
        if upstream is None:
            prepared = await self._input(request, snapshot, model_version)
        else:
            # Leaving wakes a lane held for company, which looks again once this request has
            # joined it (no await between leaving and joining).
            try:
                prepared = await self._input(request, snapshot, model_version)
            finally:
                upstream.leave(model_version, budget_s)
        plan, inputs, values = prepared.plan, prepared.inputs, prepared.values
        missing, statuses = prepared.missing, prepared.statuses
        if cached is not None:
            cached.key = cache_key(model_version, inputs)
            cached.features = values
            hit = cached.cache.fresh(cached.key)
            if hit is not None:
                return PredictionResult(
                    outputs=dict(hit.outputs),
                    model_version=model_version,
                    route_reason="cache",
                    request_id=request_id,
                    trace_id=current_trace_id(),
                    features=values,
                    missing_features=missing,
                    feature_statuses={ref: status.value for ref, status in statuses.items()},
                )
        output_names = plan.output_names
        breaker = None if self._breakers is None else self._breakers.get(model_version)
        if breaker is None:
            raw = await self._runner.run(served, inputs, output_names)
        else:
            admission = breaker.admit()
            if admission is Admission.REFUSED:
                raise CircuitOpenError(
                    f"the circuit breaker of {model_version} is open; it was not called",
                    metadata={"model_version": model_version},
                    retry_delay_s=breaker.retry_in_s(),
                )
            try:
                raw = await self._runner.run(served, inputs, output_names)
            except BaseException as exc:
                if counts_against_version(exc):
                    breaker.failed(admission)
                else:
                    breaker.abandoned(admission)
                raise
            breaker.succeeded(admission)
        outputs = conform_outputs(raw, plan.output_shapes)
        if cached is not None and cached.key is not None:
            cached.cache.put(cached.key, outputs)
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


def pin(route: Route, model_version: str) -> RouteChoice:
    """The version a caller pinned (`pinned`): a traffic target of the route at any share, or
    its fallback version, named in full or by its number. Shadow versions never answer a
    caller. NotFoundError for a version the route does not serve; InvalidArgumentError for a
    number that names versions of two models."""
    served = [t.model_version for t in route.traffic]
    if route.fallback_version:
        served.append(route.fallback_version)
    named = [v for v in dict.fromkeys(served) if model_version in (v, v.rsplit("/", 1)[-1])]
    if len(named) > 1:
        raise InvalidArgumentError.for_field(
            "model_version", f"{model_version!r} names {', '.join(named)}; send the full name"
        )
    if not named:
        raise NotFoundError(
            f"endpoint {route.endpoint} serves no version {model_version!r}",
            reason="VERSION_NOT_SERVED",
            metadata={"endpoint": route.endpoint, "model_version": model_version},
        )
    return RouteChoice(named[0], "pinned")


def _failed(model_version: str, failure: ModelServeError) -> str:
    """How a version failed, for a degraded reason: `circuit_open` when it was not called,
    `not_ready` when no traffic target was READY."""
    if isinstance(failure, CircuitOpenError):
        return f"{model_version} circuit_open"
    if isinstance(failure, FailedPreconditionError):
        return f"{model_version} not_ready"
    return f"{model_version} failed: {failure.reason or failure.code.name}"


#: Requests answered or failed after routing, whatever brought them (Predict, PredictStream,
#: the Open Inference Protocol); refusals before any work are in REFUSED (limits.py).
PREDICTIONS = Counter(
    "modelserve_router_predictions_total",
    "Requests by endpoint, the version routing chose (routed_version), the version that"
    " answered (model_version: a fallback's, empty for declared default outputs, the chosen"
    " one for a failure), status code, and whether a fallback answered (degraded).",
    ["endpoint", "routed_version", "model_version", "code", "degraded"],
)
_COUNTERS: dict[tuple[str, str, str, str, bool], Any] = {}
"""Counter children by labels: `labels()` looks them up under a lock each time."""


def _count(record: prediction_record_pb2.PredictionRecord) -> None:
    key = (
        record.endpoint,
        record.routed_version,
        record.model_version,
        record.error_code or "OK",
        record.degraded,
    )
    child = _COUNTERS.get(key)
    if child is None:
        labels = (*key[:4], "true" if key[4] else "false")
        child = _COUNTERS[key] = PREDICTIONS.labels(*labels)
    child.inc()


def _record_failure(record: prediction_record_pb2.PredictionRecord, exc: BaseException) -> None:
    record.status = prediction_record_pb2.PREDICTION_STATUS_ERROR
    if isinstance(exc, ModelServeError):
        record.error_code = exc.code.name
    elif isinstance(exc, TimeoutError | asyncio.CancelledError):
        record.error_code = "DEADLINE_EXCEEDED"
    else:
        record.error_code = "INTERNAL"


class _Answered:
    """An answered request's record, completed with the features and outputs when the
    prediction log writes it (in its background task) rather than before the answer: copying
    them into the record is a good part of what the record costs."""

    __slots__ = ("_record", "_result", "_serialized")

    def __init__(
        self, record: prediction_record_pb2.PredictionRecord, result: PredictionResult
    ) -> None:
        self._record = record
        self._result = result
        self._serialized: bytes | None = None

    @property
    def request_id(self) -> str:
        return self._record.request_id

    def SerializeToString(self) -> bytes:
        """The completed record; the same bytes however often the writer asks (it asks again
        for a batch it sends again after Redis was away)."""
        if self._serialized is None:
            _record_success(self._record, self._result)
            self._serialized = self._record.SerializeToString()
        return self._serialized


def _record_success(
    record: prediction_record_pb2.PredictionRecord, result: PredictionResult
) -> None:
    record.status = prediction_record_pb2.PREDICTION_STATUS_OK
    record.route_reason = result.route_reason
    for name, value in result.features.items():
        record.features[name].CopyFrom(value_to_proto(value))
    record.outputs.extend(numpy_to_tensor(n, a) for n, a in result.outputs.items())


def value_range(dtype: np.dtype[Any]) -> tuple[float, float]:
    """The finite values a numeric dtype holds, as [low, high): float32's largest value is
    exact as a float; an integer type's bound above is 2**bits-1, which no float below it
    rounds to. Any value for another dtype (bool, bytes): the cast decides."""
    if dtype.kind == "f":
        finfo = np.finfo(dtype)
        return float(finfo.min), math.nextafter(float(finfo.max), math.inf)
    if dtype.kind in "iu":
        iinfo = np.iinfo(dtype)
        return float(iinfo.min), float(iinfo.max) + 1.0
    return -math.inf, math.inf


def check_range(plan: VersionPlan, row: Sequence[float], model_version: str) -> None:
    """InvalidArgumentError naming each finite value of `row` (one per ref of `plan`) that the
    version's input dtype cannot hold: 1e39 is infinity as FP32, and casting it would hand the
    model a value nobody sent."""
    low, high = plan.input_range
    problems = [
        FieldViolation(
            _violation_field(ref),
            f"{value:g} is outside the range of {model_version}'s {plan.input_dtype.name} input",
        )
        for ref, value in zip(plan.refs, row, strict=True)
        if math.isfinite(value) and not low <= value < high
    ]
    if problems:
        raise InvalidArgumentError.from_violations(problems)


def _violation_field(ref: str) -> str:
    """The field a problem with a feature's value names: `features.<name>` for a value the
    caller sends (`request:` refs), else the stored feature's ref."""
    source, _, name = ref.partition(":")
    return f"features.{name}" if source == REQUEST_ENTITY else ref


def assemble_row(
    refs: Sequence[str],
    stored: Mapping[FeatureRef, FeatureResult],
    request_features: Mapping[str, Value | None],
    facts: RequestFacts,
    *,
    model_version: str = "the model",
    allow_non_finite: bool = False,
) -> tuple[list[float], dict[str, Value | None], dict[str, FeatureStatus]]:
    """The model's input row in `refs` order, the value of each ref, and the status of each
    stored one: a `request:` ref takes the caller's value or the shared request-time
    function's; a stored ref takes what the store read (its view's default when none is
    stored or it expired) or, when there is no value at all, 0.0, or NaN when the model's
    input takes NaN (`allow_non_finite`, from its signature).

    InvalidArgumentError names a request feature nobody supplies and a non-numeric value (NaN
    and infinity too, unless `allow_non_finite`).
    """
    missing_value = math.nan if allow_non_finite else 0.0
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
            row.append(
                missing_value
                if value is None
                else as_float(value, allow_non_finite=allow_non_finite)
            )
        except ValueError:
            problems.append(
                FieldViolation(
                    _violation_field(ref),
                    "must be a number" if allow_non_finite else "must be a finite number",
                )
            )
    if problems:
        raise InvalidArgumentError.from_violations(problems)
    return row, values, statuses
