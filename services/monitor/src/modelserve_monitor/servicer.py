"""MonitorService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve_monitor.alerts import (
    Alert,
    AlertEvaluator,
    AlertEvent,
    AlertEventType,
    AlertState,
    Severity,
)
from modelserve_monitor.canary import CanaryJudge, CanaryJudgement, CanaryThresholds, CanaryVerdict
from modelserve_monitor.drift import DriftTest
from modelserve_monitor.experiment import ExperimentAnalysis, ExperimentMetric, ExperimentVerdict
from modelserve_monitor.monitor import DistributionSummary, Monitor, VersionSummary
from modelserve_monitor.significance import ComparisonTest
from modelserve_monitor.store import Window
from modelserve_runtime.errors import InvalidArgumentError

_WINDOWS: dict[pb.Window.ValueType, Window] = {
    pb.WINDOW_UNSPECIFIED: Window.TOTAL,
    pb.WINDOW_ONE_MINUTE: Window.ONE_MINUTE,
    pb.WINDOW_FIVE_MINUTES: Window.FIVE_MINUTES,
    pb.WINDOW_ONE_HOUR: Window.ONE_HOUR,
}
_WINDOW_NAMES = {window: name for name, window in _WINDOWS.items()}
_TESTS = {
    DriftTest.PSI: pb.DRIFT_TEST_PSI,
    DriftTest.KOLMOGOROV_SMIRNOV: pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV,
    DriftTest.CHI_SQUARE: pb.DRIFT_TEST_CHI_SQUARE,
}

_ALERT_STATES: dict[pb.AlertState.ValueType, AlertState] = {
    pb.ALERT_STATE_PENDING: AlertState.PENDING,
    pb.ALERT_STATE_FIRING: AlertState.FIRING,
    pb.ALERT_STATE_RESOLVED: AlertState.RESOLVED,
}
_STATE_NAMES = {state: name for name, state in _ALERT_STATES.items()}
_SEVERITIES = {
    Severity.WARNING: pb.ALERT_SEVERITY_WARNING,
    Severity.CRITICAL: pb.ALERT_SEVERITY_CRITICAL,
}
_EVENT_TYPES = {
    AlertEventType.CURRENT: pb.ALERT_EVENT_TYPE_CURRENT,
    AlertEventType.SYNCED: pb.ALERT_EVENT_TYPE_SYNCED,
    AlertEventType.CHANGED: pb.ALERT_EVENT_TYPE_CHANGED,
    AlertEventType.DROPPED: pb.ALERT_EVENT_TYPE_DROPPED,
}
_CANARY_VERDICTS = {
    CanaryVerdict.PASS: pb.CANARY_VERDICT_PASS,
    CanaryVerdict.FAIL: pb.CANARY_VERDICT_FAIL,
    CanaryVerdict.INCONCLUSIVE: pb.CANARY_VERDICT_INCONCLUSIVE,
}
_CHECK_VERDICTS = {
    CanaryVerdict.PASS: pb.CANARY_CHECK_VERDICT_PASS,
    CanaryVerdict.FAIL: pb.CANARY_CHECK_VERDICT_FAIL,
    CanaryVerdict.INCONCLUSIVE: pb.CANARY_CHECK_VERDICT_INCONCLUSIVE,
    CanaryVerdict.NOT_APPLICABLE: pb.CANARY_CHECK_VERDICT_NOT_APPLICABLE,
}
_COMPARISON_TESTS = {
    ComparisonTest.TWO_PROPORTION_Z: pb.COMPARISON_TEST_TWO_PROPORTION_Z,
    ComparisonTest.MANN_WHITNEY_U: pb.COMPARISON_TEST_MANN_WHITNEY_U,
    ComparisonTest.KOLMOGOROV_SMIRNOV: pb.COMPARISON_TEST_KOLMOGOROV_SMIRNOV,
    ComparisonTest.WELCH_T: pb.COMPARISON_TEST_WELCH_T,
}
_METRICS: dict[pb.ExperimentMetric.ValueType, ExperimentMetric] = {
    pb.EXPERIMENT_METRIC_ERROR_RATE: ExperimentMetric.ERROR_RATE,
    pb.EXPERIMENT_METRIC_ACCURACY: ExperimentMetric.ACCURACY,
    pb.EXPERIMENT_METRIC_OUTCOME_MEAN: ExperimentMetric.OUTCOME_MEAN,
    pb.EXPERIMENT_METRIC_ABSOLUTE_ERROR: ExperimentMetric.ABSOLUTE_ERROR,
    pb.EXPERIMENT_METRIC_PREDICTION_MEAN: ExperimentMetric.PREDICTION_MEAN,
}
_METRIC_NAMES = {metric: name for name, metric in _METRICS.items()}
_EXPERIMENT_VERDICTS = {
    ExperimentVerdict.COLLECTING: pb.EXPERIMENT_VERDICT_COLLECTING,
    ExperimentVerdict.SIGNIFICANT: pb.EXPERIMENT_VERDICT_SIGNIFICANT,
    ExperimentVerdict.NOT_SIGNIFICANT: pb.EXPERIMENT_VERDICT_NOT_SIGNIFICANT,
}


def _window(value: pb.Window.ValueType) -> Window:
    window = _WINDOWS.get(value)
    if window is None:
        raise InvalidArgumentError.for_field("window", f"unknown window {value}")
    return window


def _distribution(summary: DistributionSummary) -> pb.Distribution:
    return pb.Distribution(
        count=summary.count,
        mean=summary.mean,
        p50=summary.p50,
        p95=summary.p95,
        p99=summary.p99,
        buckets=[
            pb.HistogramBucket(lower=lower, upper=upper, count=count)
            for lower, upper, count in summary.buckets
        ],
    )


def _version(v: VersionSummary) -> pb.VersionStats:
    return pb.VersionStats(
        model_version=v.model_version,
        request_count=v.request_count,
        error_count=v.error_count,
        degraded_count=v.degraded_count,
        latency_p50_ms=v.latency_p50_ms,
        latency_p95_ms=v.latency_p95_ms,
        latency_p99_ms=v.latency_p99_ms,
        predictions=_distribution(v.predictions),
        features=[
            pb.FeatureStats(
                feature=f.feature,
                count=f.count,
                missing_rate=f.missing_rate,
                values=_distribution(f.values),
                categories=[pb.CategoryCount(value=c, count=n) for c, n in f.categories],
            )
            for f in v.features
        ],
        outcomes=pb.OutcomeStats(
            count=v.outcomes.count,
            label_count=v.outcomes.label_count,
            accuracy=v.outcomes.accuracy,
            value_count=v.outcomes.value_count,
            mean_absolute_error=v.outcomes.mean_absolute_error,
        ),
    )


class MonitorServicer(pb_grpc.MonitorServiceServicer):
    """Translates MonitorService calls to the Monitor."""

    def __init__(
        self,
        monitor: Monitor,
        alerts: AlertEvaluator,
        canary: CanaryJudge,
        experiments: ExperimentAnalysis,
    ) -> None:
        self._monitor = monitor
        self._alerts = alerts
        self._canary = canary
        self._experiments = experiments

    async def GetEndpointStats(
        self, request: pb.GetEndpointStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetEndpointStatsResponse:
        summary = await self._monitor.endpoint_stats(request.endpoint, _window(request.window))
        return pb.GetEndpointStatsResponse(
            endpoint=summary.endpoint,
            request_count=summary.request_count,
            versions=[_version(v) for v in summary.versions],
            window=_WINDOW_NAMES[summary.window],
        )

    async def GetDriftReport(
        self, request: pb.GetDriftReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetDriftReportResponse:
        report = await self._monitor.drift_report(
            request.endpoint, request.model_version, _window(request.window)
        )
        return pb.GetDriftReportResponse(
            endpoint=report.endpoint,
            model_version=report.model_version,
            window=_WINDOW_NAMES[report.window],
            baseline_source=report.baseline_source,
            baseline_count=report.baseline_count,
            window_count=report.window_count,
            results=[
                pb.DriftResult(
                    feature=r.feature,
                    baseline_count=r.baseline_count,
                    window_count=r.window_count,
                    statistics=[
                        pb.DriftStatistic(
                            test=_TESTS[s.test],
                            statistic=s.statistic,
                            p_value=s.p_value,
                            threshold=s.threshold,
                            drifted=s.drifted,
                        )
                        for s in r.statistics
                    ],
                    drifted=r.drifted,
                )
                for r in report.results
            ],
        )

    async def RecordOutcome(
        self, request: pb.RecordOutcomeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RecordOutcomeResponse:
        kind = request.WhichOneof("outcome")
        recorded = await self._monitor.record_outcome(
            request.request_id,
            label=request.label if kind == "label" else None,
            value=request.value if kind == "value" else None,
        )
        return pb.RecordOutcomeResponse(
            endpoint=recorded.endpoint,
            model_version=recorded.model_version,
            prediction=recorded.prediction,
            counted=recorded.counted,
        )

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAlertsResponse:
        state = _ALERT_STATES.get(request.state)
        if state is None and request.state != pb.ALERT_STATE_UNSPECIFIED:
            raise InvalidArgumentError.for_field("state", f"unknown state {request.state}")
        alerts, next_token = await self._alerts.list_alerts(
            endpoint=request.endpoint,
            state=state,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListAlertsResponse(alerts=[_alert(a) for a in alerts], next_page_token=next_token)

    async def WatchAlerts(
        self, request: pb.WatchAlertsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchAlertsResponse]:
        async for event in self._alerts.watch(request.endpoint, request.after_sequence):
            yield pb.WatchAlertsResponse(event=_alert_event(event))

    async def JudgeCanary(
        self, request: pb.JudgeCanaryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.JudgeCanaryResponse:
        # Every field is `optional`: the ones the caller set override the defaults.
        overrides = {field.name: value for field, value in request.thresholds.ListFields()}
        judgement = await self._canary.judge(
            request.endpoint,
            request.canary_version,
            request.stable_version,
            _window(request.window),
            overrides,
        )
        return _judgement(judgement)

    async def GetShadowReport(
        self, request: pb.GetShadowReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetShadowReportResponse:
        report = await self._monitor.shadow_report(
            request.endpoint, request.shadow_version, _window(request.window)
        )
        return pb.GetShadowReportResponse(
            endpoint=report.endpoint,
            shadow_version=report.shadow_version,
            window=_WINDOW_NAMES[report.window],
            request_count=report.request_count,
            error_count=report.error_count,
            pair_count=report.pair_count,
            compared_count=report.compared_count,
            agreement_rate=report.agreement_rate,
            mean_absolute_difference=report.mean_absolute_difference,
        )

    async def GetExperimentReport(
        self, request: pb.GetExperimentReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetExperimentReportResponse:
        metric = _METRICS.get(request.metric)
        if metric is None and request.metric != pb.EXPERIMENT_METRIC_UNSPECIFIED:
            raise InvalidArgumentError.for_field("metric", f"unknown metric {request.metric}")
        report = await self._experiments.report(
            request.endpoint,
            list(request.arms),
            metric,
            request.sample_size,
            request.alpha,
            _window(request.window),
            request.experiment_id,
        )
        return pb.GetExperimentReportResponse(
            endpoint=report.endpoint,
            metric=_METRIC_NAMES[report.metric],
            window=_WINDOW_NAMES[report.window],
            sample_size=report.sample_size,
            alpha=report.alpha,
            verdict=_EXPERIMENT_VERDICTS[report.verdict],
            progress=report.progress,
            reason=report.reason,
            arms=[
                pb.ExperimentArm(
                    model_version=arm.model_version,
                    sample_count=arm.sample_count,
                    progress=arm.progress,
                    value=arm.value,
                    comparison=(
                        pb.ArmComparison(
                            test=_COMPARISON_TESTS[c.test],
                            difference=c.difference,
                            relative_difference=c.relative_difference,
                            ci_lower=c.ci_lower,
                            ci_upper=c.ci_upper,
                            statistic=c.statistic,
                            p_value=c.p_value,
                            alpha=c.alpha,
                            significant=c.significant,
                        )
                        if (c := arm.comparison)
                        else None
                    ),
                )
                for arm in report.arms
            ],
        )

    async def StartExperiment(
        self, request: pb.StartExperimentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StartExperimentResponse:
        start = await self._experiments.start(
            request.endpoint, list(request.arms), request.experiment_id
        )
        return pb.StartExperimentResponse(
            endpoint=request.endpoint,
            experiment_id=request.experiment_id,
            arms=start.arms,
            start_time=_timestamp(start.started_at),
            started=start.started,
        )


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def _alert(alert: Alert) -> pb.Alert:
    return pb.Alert(
        rule=alert.rule,
        endpoint=alert.endpoint,
        model_version=alert.model_version,
        severity=_SEVERITIES[alert.severity],
        state=_STATE_NAMES[alert.state],
        value=alert.value,
        threshold=alert.threshold,
        active_since=_timestamp(alert.active_since),
        fire_time=_timestamp(alert.fired_at),
        resolve_time=_timestamp(alert.resolved_at),
    )


def _alert_event(event: AlertEvent) -> pb.AlertEvent:
    return pb.AlertEvent(
        sequence=event.sequence,
        type=_EVENT_TYPES[event.type],
        alert=_alert(event.alert) if event.alert else None,
        previous_state=(
            _STATE_NAMES[event.previous_state]
            if event.previous_state
            else pb.ALERT_STATE_UNSPECIFIED
        ),
        change_time=_timestamp(event.time),
    )


def _thresholds(thresholds: CanaryThresholds) -> pb.CanaryThresholds:
    return pb.CanaryThresholds(
        alpha=thresholds.alpha,
        min_requests=thresholds.min_requests,
        min_outcomes=thresholds.min_outcomes,
        max_error_rate_increase=thresholds.max_error_rate_increase,
        max_latency_increase=thresholds.max_latency_increase,
        max_prediction_shift=thresholds.max_prediction_shift,
        max_accuracy_decrease=thresholds.max_accuracy_decrease,
        max_absolute_error_increase=thresholds.max_absolute_error_increase,
    )


def _judgement(judgement: CanaryJudgement) -> pb.JudgeCanaryResponse:
    return pb.JudgeCanaryResponse(
        endpoint=judgement.endpoint,
        canary_version=judgement.canary_version,
        stable_version=judgement.stable_version,
        window=_WINDOW_NAMES[judgement.window],
        verdict=_CANARY_VERDICTS[judgement.verdict],
        reason=judgement.reason,
        checks=[
            pb.CanaryCheck(
                name=c.name,
                test=_COMPARISON_TESTS[c.test],
                verdict=_CHECK_VERDICTS[c.verdict],
                canary_value=c.canary_value,
                stable_value=c.stable_value,
                effect=c.effect,
                tolerance=c.tolerance,
                statistic=c.statistic,
                p_value=c.p_value,
                alpha=c.alpha,
                canary_count=c.canary_count,
                stable_count=c.stable_count,
                min_count=c.min_count,
                reason=c.reason,
            )
            for c in judgement.checks
        ],
        thresholds=_thresholds(judgement.thresholds),
        judge_time=_timestamp(judgement.judged_at),
    )
