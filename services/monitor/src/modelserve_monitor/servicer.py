"""MonitorService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve_monitor.alerts import Alert, AlertEvaluator, AlertState, Severity
from modelserve_monitor.drift import DriftTest
from modelserve_monitor.monitor import DistributionSummary, Monitor, VersionSummary
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

    def __init__(self, monitor: Monitor, alerts: AlertEvaluator) -> None:
        self._monitor = monitor
        self._alerts = alerts

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
