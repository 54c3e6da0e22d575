"""Settings of the monitor service (env prefix MODELSERVE_MONITOR_)."""

from __future__ import annotations

import os
import socket
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.config import ServiceSettings
from modelserve_runtime.prediction_log import DEFAULT_STREAM


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class AlertRuleSettings(BaseModel):
    """One alert rule: the threshold, how long it must hold, how urgent it is, over which window."""

    model_config = {"frozen": True, "extra": "forbid"}

    threshold: float
    """The rule holds while the measured value is above this."""
    for_s: float = Field(ge=0)
    """How long the rule must hold before its alert fires."""
    severity: Literal["warning", "critical"]
    """How urgent the alert is."""
    window: Literal["1m", "5m", "1h"] = "5m"
    """The window the value is measured over."""
    min_requests: int = Field(default=20, ge=1)
    """Fewer requests than this in the window never make the rule hold."""


class LatencyRuleSettings(AlertRuleSettings):
    """`model_latency_high`: p99 latency above 200 ms for 2 minutes is a warning."""

    threshold: float = 200.0
    for_s: float = Field(default=120.0, ge=0)
    severity: Literal["warning", "critical"] = "warning"


class ErrorRateRuleSettings(AlertRuleSettings):
    """`error_rate_high`: more than 1 % errors for 2 minutes is critical."""

    threshold: float = 0.01
    for_s: float = Field(default=120.0, ge=0)
    severity: Literal["warning", "critical"] = "critical"


class PredictionDriftRuleSettings(AlertRuleSettings):
    """`prediction_drift`: the mean prediction 0.1 away from the baseline's for 5 minutes."""

    threshold: float = 0.1
    for_s: float = Field(default=300.0, ge=0)
    severity: Literal["warning", "critical"] = "critical"


class WebhookSettings(BaseModel):
    """Where alert changes are POSTed, and how patiently."""

    model_config = {"frozen": True, "extra": "forbid"}

    urls: list[str] = []
    """http(s) URLs that receive every alert change as JSON (a JSON list in the environment)."""
    timeout_s: float = Field(default=5.0, gt=0)
    """How long one POST may take."""
    max_attempts: int = Field(default=5, ge=1)
    """Tries per change before it is logged, counted as failed and skipped."""
    backoff_s: float = Field(default=1.0, gt=0)
    """Pause before the first retry; it doubles with each retry."""
    backoff_max_s: float = Field(default=60.0, gt=0)
    """Longest pause between retries."""

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                # The URL itself is not echoed: its path may hold a token.
                raise ValueError("each webhook URL must be http:// or https:// with a host")
        return urls


class AlertSettings(BaseModel):
    """The alert rules and how often they are evaluated."""

    model_config = {"frozen": True, "extra": "forbid"}

    interval_s: float = Field(default=15.0, gt=0)
    """How often every rule is evaluated for every version."""
    events_max_len: int = Field(default=10_000, ge=1)
    """Alert changes kept (approximately) for WatchAlerts resumes and webhook catch-up."""
    webhook: WebhookSettings = WebhookSettings()
    """Webhooks that receive every alert change (`..._ALERTS__WEBHOOK__URLS='["https://..."]'`)."""
    model_latency_high: LatencyRuleSettings = LatencyRuleSettings()
    """p99 router latency in milliseconds."""
    error_rate_high: ErrorRateRuleSettings = ErrorRateRuleSettings()
    """Share of requests that ended in an error."""
    prediction_drift: PredictionDriftRuleSettings = PredictionDriftRuleSettings()
    """How far the mean prediction moved from the baseline's mean."""


class CanarySettings(BaseModel):
    """JudgeCanary's defaults; a request may override each."""

    model_config = {"frozen": True, "extra": "forbid"}

    alpha: float = Field(default=0.01, gt=0, lt=1)
    """False-FAIL rate of a judgement, split evenly over the checks that run (Bonferroni)."""
    min_requests: int = Field(default=500, ge=1)
    """Fewest requests (and predictions) each version needs in the window."""
    min_outcomes: int = Field(default=100, ge=1)
    """Fewest labels, or values, each version needs for an outcome check."""
    max_error_rate_increase: float = Field(default=0.0, ge=0)
    """Error-rate increase (absolute) tolerated before the error-rate check can fail."""
    max_latency_increase: float = Field(default=0.1, ge=0)
    """Relative median latency increase tolerated before the latency check can fail."""
    max_prediction_shift: float = Field(default=0.1, ge=0, le=1)
    """Kolmogorov-Smirnov distance of the predictions tolerated before that check can fail."""
    max_accuracy_decrease: float = Field(default=0.0, ge=0)
    """Accuracy decrease (absolute) tolerated before the accuracy check can fail."""
    max_absolute_error_increase: float = Field(default=0.0, ge=0)
    """Relative mean-absolute-error increase tolerated before that check can fail."""


class MonitorSettings(ServiceSettings):
    """The monitor service's settings."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_MONITOR_")

    redis_url: str = "redis://127.0.0.1:6379/0"
    """The Redis that holds the prediction log stream."""
    redis_timeout_s: float = Field(default=1.0, gt=0)
    """Deadline of each Redis command, on top of `block_ms` for the blocking read."""
    stream: str = Field(default=DEFAULT_STREAM, min_length=1)
    """The prediction log stream that the router appends to."""
    consumer_group: str = Field(default="monitor", min_length=1)
    """Consumer group the monitor reads the stream in; created (from the start) when missing."""
    consumer_name: str = Field(default_factory=_default_consumer_name, min_length=1)
    """This process's name within the group; `hostname-pid` by default."""
    block_ms: int = Field(default=1000, ge=1)
    """How long one read waits for new entries before it asks again."""
    batch_size: int = Field(default=500, ge=1)
    """Most stream entries read and acknowledged at once."""
    claim_min_idle_ms: int = Field(default=30_000, ge=1)
    """Entries another consumer left unacknowledged this long are claimed (XAUTOCLAIM) and counted."""
    dedup_ttl_s: int = Field(default=600, ge=1)
    """How long a counted record's identity is remembered, so a second delivery is not counted."""
    prediction_ttl_s: int = Field(default=3600, ge=1)
    """How long a request's prediction is kept in Redis for RecordOutcome to join (~150 B each)."""
    baseline_records: int = Field(default=1000, ge=1)
    """A version's first records that make its baseline for drift."""
    drift_psi_threshold: float = Field(default=0.2, gt=0)
    """PSI above this means drift."""
    drift_p_value: float = Field(default=0.01, gt=0, lt=1)
    """A Kolmogorov-Smirnov or chi-square p-value below this means drift."""
    metrics_interval_s: float = Field(default=15.0, gt=0)
    """How often the windowed figures on /metrics are recomputed."""
    alerts: AlertSettings = AlertSettings()
    """Alert rules (`MODELSERVE_MONITOR_ALERTS__ERROR_RATE_HIGH__THRESHOLD=0.05`, ...)."""
    canary: CanarySettings = CanarySettings()
    """JudgeCanary's default thresholds (`MODELSERVE_MONITOR_CANARY__MIN_REQUESTS=1000`, ...)."""
