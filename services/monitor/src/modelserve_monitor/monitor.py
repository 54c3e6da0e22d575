"""The monitor's answers: windowed figures per version, drift against a baseline, outcomes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from modelserve_monitor.aggregate import FeatureAggregate, Increment, VersionAggregate
from modelserve_monitor.drift import (
    DriftStatistic,
    DriftThresholds,
    chi_square,
    kolmogorov_smirnov,
    psi,
)
from modelserve_monitor.histogram import Histogram, bucket_bounds
from modelserve_monitor.store import AggregateStore, BaselineSource, Window
from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
)

#: Seconds since the epoch; tests pass their own.
Clock = Callable[[], float]

#: The name a drift result uses for the predictions.
PREDICTION = "prediction"
#: Outcome values must stay below this magnitude, so their squares stay finite.
MAX_OUTCOME_VALUE = 1e100


@dataclass(frozen=True, slots=True)
class DistributionSummary:
    """Count, exact mean, quantiles and non-empty buckets (lower, upper, count) of some values."""

    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    buckets: list[tuple[float, float, int]]

    @classmethod
    def of(cls, histogram: Histogram) -> DistributionSummary:
        buckets = [(*bucket_bounds(i), histogram.counts[i]) for i in sorted(histogram.counts)]
        return cls(
            count=histogram.total,
            mean=histogram.mean,
            p50=histogram.quantile(0.50),
            p95=histogram.quantile(0.95),
            p99=histogram.quantile(0.99),
            buckets=buckets,
        )


@dataclass(frozen=True, slots=True)
class FeatureSummary:
    """One feature: appearances, missing rate, numeric distribution, category counts."""

    feature: str
    count: int
    missing_rate: float
    values: DistributionSummary
    categories: list[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class OutcomeSummary:
    """Ground truth joined to the version's predictions."""

    count: int
    label_count: int
    accuracy: float
    value_count: int
    mean_absolute_error: float


@dataclass(frozen=True, slots=True)
class VersionSummary:
    """What the records of one model version add up to over a window."""

    model_version: str
    request_count: int
    error_count: int
    degraded_count: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    predictions: DistributionSummary
    features: list[FeatureSummary]
    outcomes: OutcomeSummary


@dataclass(frozen=True, slots=True)
class EndpointSummary:
    """An endpoint's total and its versions, ordered by version name."""

    endpoint: str
    window: Window
    request_count: int
    versions: list[VersionSummary]


@dataclass(frozen=True, slots=True)
class DriftResult:
    """The drift of one feature, or of the predictions."""

    feature: str
    baseline_count: int
    window_count: int
    statistics: list[DriftStatistic]

    @property
    def drifted(self) -> bool:
        return any(s.drifted for s in self.statistics)


@dataclass(frozen=True, slots=True)
class DriftReport:
    """A version's window compared with its baseline: the predictions, then each feature."""

    endpoint: str
    model_version: str
    window: Window
    baseline_source: str
    baseline_count: int
    window_count: int
    results: list[DriftResult]


@dataclass(frozen=True, slots=True)
class Baseline:
    """What a version's window is compared with.

    `features` is None while the first records that make it are still coming in (only for
    `first_records`); the prediction baseline is always the first records, so `complete` says
    whether those are all in.
    """

    source: BaselineSource
    count: int
    features: dict[str, FeatureAggregate] | None
    first_records: VersionAggregate
    complete: bool


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """How a shadow version compared with the answers to the same requests over a window."""

    endpoint: str
    shadow_version: str
    window: Window
    request_count: int
    error_count: int
    pair_count: int
    compared_count: int
    agreement_rate: float
    mean_absolute_difference: float


@dataclass(frozen=True, slots=True)
class OutcomeRecorded:
    """The prediction an outcome was joined to; `counted` is False for a repeated outcome."""

    endpoint: str
    model_version: str
    prediction: float
    counted: bool


def _version_summary(name: str, aggregate: VersionAggregate) -> VersionSummary:
    latency = aggregate.latency_ms
    return VersionSummary(
        model_version=name,
        request_count=aggregate.requests,
        error_count=aggregate.errors,
        degraded_count=aggregate.degraded,
        latency_p50_ms=latency.quantile(0.50),
        latency_p95_ms=latency.quantile(0.95),
        latency_p99_ms=latency.quantile(0.99),
        predictions=DistributionSummary.of(aggregate.predictions),
        features=[_feature_summary(n, f) for n, f in sorted(aggregate.features.items())],
        outcomes=OutcomeSummary(
            count=aggregate.outcomes,
            label_count=aggregate.labels,
            accuracy=aggregate.correct / aggregate.labels if aggregate.labels else 0.0,
            value_count=aggregate.values,
            mean_absolute_error=(
                aggregate.absolute_error_sum / aggregate.values if aggregate.values else 0.0
            ),
        ),
    )


def _feature_summary(name: str, feature: FeatureAggregate) -> FeatureSummary:
    return FeatureSummary(
        feature=name,
        count=feature.count,
        missing_rate=feature.missing_rate,
        values=DistributionSummary.of(feature.values),
        categories=sorted(feature.categories.items(), key=lambda item: (-item[1], item[0])),
    )


class Monitor:
    """Answers questions about the figures that the prediction log consumer keeps in the store."""

    def __init__(
        self,
        store: AggregateStore,
        *,
        thresholds: DriftThresholds | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._store = store
        self._thresholds = thresholds or DriftThresholds()
        self._clock = clock

    async def endpoints(self) -> list[str]:
        """Every endpoint that records were counted for."""
        return await self._store.endpoints()

    async def versions(self, endpoint: str) -> list[str]:
        """The versions of an endpoint that records were counted for, ordered by name."""
        return await self._store.endpoint_versions(endpoint)

    async def version_window(
        self, endpoint: str, model_version: str, window: Window
    ) -> VersionSummary:
        """One version's figures over a window ending now."""
        aggregate = await self._store.window(endpoint, model_version, window, self._clock())
        return _version_summary(model_version, aggregate)

    async def baseline_prediction_mean(self, endpoint: str, model_version: str) -> float | None:
        """The mean prediction of the version's complete baseline; None until it is complete."""
        baseline = await self._store.baseline(endpoint, model_version)
        if baseline.requests < self._store.baseline_records or not baseline.predictions.total:
            return None
        return baseline.predictions.mean

    async def endpoint_stats(self, endpoint: str, window: Window) -> EndpointSummary:
        """The endpoint's figures; InvalidArgumentError when unnamed, NotFoundError when unseen."""
        if not endpoint:
            raise InvalidArgumentError.for_field("endpoint", "is required")
        names = await self._store.endpoint_versions(endpoint)
        if not names:
            raise NotFoundError(
                f"no prediction records for endpoint {endpoint!r}",
                reason="ENDPOINT_NOT_FOUND",
                metadata={"endpoint": endpoint},
            )
        now = self._clock()
        versions = [
            _version_summary(name, await self._store.window(endpoint, name, window, now))
            for name in names
        ]
        return EndpointSummary(
            endpoint=endpoint,
            window=window,
            request_count=sum(v.request_count for v in versions),
            versions=versions,
        )

    async def baseline(self, endpoint: str, model_version: str) -> Baseline:
        """The version's baseline: features from its model's validation set once that was
        decided (`BaselineResolver`), else from its first `baseline_records` records;
        predictions always from those first records."""
        first = await self._store.baseline(endpoint, model_version)
        complete = first.requests >= self._store.baseline_records
        decision = await self._store.baseline_decision(endpoint, model_version)
        if decision is not None and decision.source is BaselineSource.VALIDATION_SET:
            reference = await self._store.reference(endpoint, model_version)
            return Baseline(
                BaselineSource.VALIDATION_SET, decision.rows, reference.features, first, complete
            )
        return Baseline(
            BaselineSource.FIRST_RECORDS,
            first.requests,
            first.features if complete else None,
            first,
            complete,
        )

    async def drift_report(self, endpoint: str, model_version: str, window: Window) -> DriftReport:
        """Compares a version's window with its baseline, once the baseline is ready.

        With a validation set the features are compared at once and the predictions once the
        first `baseline_records` records are in (until then the prediction result has no
        statistics); without one, FailedPreconditionError until those records are in.
        """
        violations = [
            FieldViolation(name, "is required")
            for name, value in (("endpoint", endpoint), ("model_version", model_version))
            if not value
        ]
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        if window is Window.TOTAL:
            window = Window.ONE_HOUR
        if model_version not in await self._store.endpoint_versions(endpoint):
            raise NotFoundError(
                f"no prediction records for {model_version!r} on endpoint {endpoint!r}",
                reason="VERSION_NOT_FOUND",
                metadata={"endpoint": endpoint, "model_version": model_version},
            )
        baseline = await self.baseline(endpoint, model_version)
        if baseline.features is None:
            raise FailedPreconditionError(
                f"the baseline holds {baseline.count} of {self._store.baseline_records} records",
                reason="BASELINE_NOT_READY",
                metadata={
                    "endpoint": endpoint,
                    "model_version": model_version,
                    "baseline_count": str(baseline.count),
                },
            )
        current = await self._store.window(endpoint, model_version, window, self._clock())
        first_predictions = baseline.first_records.predictions
        if baseline.complete:
            results = [self._numeric(PREDICTION, first_predictions, current.predictions)]
        else:
            results = [
                DriftResult(PREDICTION, first_predictions.total, current.predictions.total, [])
            ]
        for name in sorted(set(baseline.features) | set(current.features)):
            before = baseline.features.get(name, FeatureAggregate())
            after = current.features.get(name, FeatureAggregate())
            if before.categorical or after.categorical:
                results.append(self._categorical(name, before.categories, after.categories))
            else:
                results.append(self._numeric(name, before.values, after.values))
        return DriftReport(
            endpoint=endpoint,
            model_version=model_version,
            window=window,
            baseline_source=baseline.source.value,
            baseline_count=baseline.count,
            window_count=current.requests,
            results=results,
        )

    async def largest_feature_psi(
        self, endpoint: str, model_version: str, window: Window
    ) -> tuple[str, float] | None:
        """The numeric feature whose window moved most from the baseline, by PSI, and that PSI;
        None while the baseline is not ready or no numeric feature has values on both sides."""
        baseline = await self.baseline(endpoint, model_version)
        if baseline.features is None:
            return None
        current = await self._store.window(endpoint, model_version, window, self._clock())
        largest: tuple[str, float] | None = None
        for name, after in sorted(current.features.items()):
            before = baseline.features.get(name)
            if before is None or before.categorical or after.categorical:
                continue
            if not (before.values.total and after.values.total):
                continue
            value = psi(before.values, after.values, self._thresholds.psi).statistic
            if largest is None or value > largest[1]:
                largest = (name, value)
        return largest

    def _numeric(self, name: str, baseline: Histogram, window: Histogram) -> DriftResult:
        statistics = []
        if baseline.total and window.total:
            statistics = [
                psi(baseline, window, self._thresholds.psi),
                kolmogorov_smirnov(baseline, window, self._thresholds.p_value),
            ]
        return DriftResult(name, baseline.total, window.total, statistics)

    def _categorical(
        self, name: str, baseline: dict[str, int], window: dict[str, int]
    ) -> DriftResult:
        before, after = sum(baseline.values()), sum(window.values())
        statistics = []
        if before and after:
            statistics = [chi_square(baseline, window, self._thresholds.p_value)]
        return DriftResult(name, before, after, statistics)

    async def shadow_report(
        self, endpoint: str, shadow_version: str, window: Window
    ) -> ShadowReport:
        """How often a shadow version agreed with the answers to the same requests.

        InvalidArgumentError naming each missing field; NotFoundError when the version has
        no records on the endpoint.
        """
        violations = [
            FieldViolation(name, "is required")
            for name, value in (("endpoint", endpoint), ("shadow_version", shadow_version))
            if not value
        ]
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        if shadow_version not in await self._store.endpoint_versions(endpoint):
            raise NotFoundError(
                f"no prediction records for {shadow_version!r} on endpoint {endpoint!r}",
                reason="VERSION_NOT_FOUND",
                metadata={"endpoint": endpoint, "model_version": shadow_version},
            )
        aggregate = await self._store.window(endpoint, shadow_version, window, self._clock())
        compared = aggregate.compared_pairs
        return ShadowReport(
            endpoint=endpoint,
            shadow_version=shadow_version,
            window=window,
            request_count=aggregate.requests,
            error_count=aggregate.errors,
            pair_count=aggregate.pairs,
            compared_count=compared,
            agreement_rate=aggregate.agreeing_pairs / compared if compared else 0.0,
            mean_absolute_difference=(
                aggregate.pair_difference_sum / compared if compared else 0.0
            ),
        )

    async def record_outcome(
        self, request_id: str, *, label: int | None = None, value: float | None = None
    ) -> OutcomeRecorded:
        """Joins a label or a value to the request's logged prediction; the first one counts.

        InvalidArgumentError without a request id or with neither (or both) outcomes;
        NotFoundError when the request's prediction is not (or no longer) remembered;
        FailedPreconditionError when the request logged no prediction of its version (it
        failed, or the fallback chain answered it: the outputs were not the version's).
        """
        violations = []
        if not request_id:
            violations.append(FieldViolation("request_id", "is required"))
        if (label is None) == (value is None):
            violations.append(
                FieldViolation("outcome", "exactly one of label or value is required")
            )
        elif value is not None and not (math.isfinite(value) and abs(value) < MAX_OUTCOME_VALUE):
            violations.append(
                FieldViolation("value", f"must be a finite number below {MAX_OUTCOME_VALUE:g}")
            )
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        logged = await self._store.logged_prediction(request_id)
        if logged is None:
            raise NotFoundError(
                f"no logged prediction for request {request_id!r}",
                reason="PREDICTION_NOT_FOUND",
                metadata={"request_id": request_id},
            )
        if logged.prediction is None:
            raise FailedPreconditionError(
                f"request {request_id!r} logged no prediction of its model version (it failed,"
                " or the fallback chain answered it)",
                reason="PREDICTION_MISSING",
                metadata={"request_id": request_id},
            )
        increments: list[Increment] = [("o_n", 1)]
        if label is not None:
            predicted = 1 if logged.prediction >= 0.5 else 0
            increments += [("o_ln", 1), ("o_lc", int(predicted == label))]
        if value is not None:
            error = abs(value - logged.prediction)
            # Sums of squares too, so A/B and canary tests have the variances.
            increments += [("o_vn", 1), ("o_vsum", value), ("o_vsq", value * value)]
            increments += [("o_abs", error), ("o_abs2", error * error)]
        counted = await self._store.add_outcome(request_id, logged, increments, self._clock())
        return OutcomeRecorded(logged.endpoint, logged.model_version, logged.prediction, counted)
