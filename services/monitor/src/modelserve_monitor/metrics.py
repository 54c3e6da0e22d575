"""Windowed figures of every endpoint and version as Prometheus gauges, recomputed periodically."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis
import structlog
from prometheus_client import Gauge

from modelserve_monitor.monitor import Monitor
from modelserve_monitor.store import Window

log = structlog.get_logger()

#: The windows exported, with their label values.
WINDOWS = {Window.ONE_MINUTE: "1m", Window.FIVE_MINUTES: "5m", Window.ONE_HOUR: "1h"}
_LABELS = ["endpoint", "version", "window"]

REQUESTS = Gauge("modelserve_monitor_requests", "Requests logged in the window.", _LABELS)
ERRORS = Gauge("modelserve_monitor_errors", "Requests that ended in an error.", _LABELS)
DEGRADED = Gauge("modelserve_monitor_degraded", "Requests answered by a fallback.", _LABELS)
LATENCY = Gauge(
    "modelserve_monitor_latency_ms", "Router latency percentiles.", [*_LABELS, "quantile"]
)
PREDICTION_MEAN = Gauge("modelserve_monitor_prediction_mean", "Mean prediction.", _LABELS)
FEATURE_MISSING = Gauge(
    "modelserve_monitor_feature_missing_rate", "Share of missing values.", [*_LABELS, "feature"]
)
ACCURACY = Gauge("modelserve_monitor_accuracy", "Share of labels predicted right.", _LABELS)


async def export_windows(monitor: Monitor, endpoints: list[str]) -> None:
    """Sets the gauges from the current windows of the given endpoints."""
    for endpoint in endpoints:
        for window, label in WINDOWS.items():
            summary = await monitor.endpoint_stats(endpoint, window)
            for v in summary.versions:
                labels = (endpoint, v.model_version, label)
                REQUESTS.labels(*labels).set(v.request_count)
                ERRORS.labels(*labels).set(v.error_count)
                DEGRADED.labels(*labels).set(v.degraded_count)
                for quantile, value in (
                    ("0.5", v.latency_p50_ms),
                    ("0.95", v.latency_p95_ms),
                    ("0.99", v.latency_p99_ms),
                ):
                    LATENCY.labels(*labels, quantile).set(value)
                PREDICTION_MEAN.labels(*labels).set(v.predictions.mean)
                ACCURACY.labels(*labels).set(v.outcomes.accuracy)
                for feature in v.features:
                    FEATURE_MISSING.labels(*labels, feature.feature).set(feature.missing_rate)


async def export_forever(monitor: Monitor, interval_s: float) -> None:
    """Re-exports every `interval_s`; a failure is logged and retried at the next turn."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await export_windows(monitor, await monitor.endpoints())
        except redis.RedisError as exc:
            log.warning("window_metrics_failed", error=str(exc))
