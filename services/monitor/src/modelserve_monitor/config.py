"""Settings of the monitor service (env prefix MODELSERVE_MONITOR_)."""

from __future__ import annotations

import os
import socket
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.config import ClientTlsSettings, ServiceSettings
from modelserve_runtime.prediction_log import DEFAULT_STREAM
from modelserve_runtime.redis_connect import RedisConnection, with_redis_url

#: Why the monitor refuses Redis Cluster, said where the setting is refused and in the README.
CLUSTER_REFUSED = (
    "redis.mode cluster is not supported by the monitor: it counts a batch of the prediction "
    "log and acknowledges it in one Lua script that touches the stream, the seen keys and the "
    "figures of every version in the batch, which a Redis Cluster allows only within one hash "
    "slot, and one slot would put the whole monitor on one shard anyway; use standalone or "
    "sentinel mode"
)


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


class FeatureDriftRuleSettings(AlertRuleSettings):
    """`feature_drift`: a feature's PSI against the baseline above 0.2 for 5 minutes is a warning."""

    threshold: float = 0.2
    for_s: float = Field(default=300.0, ge=0)
    severity: Literal["warning", "critical"] = "warning"
    min_requests: int = Field(default=200, ge=1)
    """PSI over 10 bins from fewer values than this is mostly noise."""


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
    feature_drift: FeatureDriftRuleSettings = FeatureDriftRuleSettings()
    """The largest PSI of a numeric feature against the version's baseline."""


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

    redis: RedisConnection = Field(default_factory=RedisConnection)
    """The Redis holding the prediction log and the figures: standalone or Sentinel, with
    credentials and TLS (`REDIS__*`); Cluster is refused (see CLUSTER_REFUSED)."""
    redis_url: str | None = None
    """Shorthand for a standalone Redis at this URL (`redis.url`); unset: `redis` decides."""
    redis_timeout_s: float = Field(default=1.0, gt=0)
    """Deadline of each Redis command, on top of `block_ms` for the blocking read: the
    socket timeout is their sum unless `redis.timeout_s` is set."""
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
    """A version's first records that make its prediction baseline, and its feature baseline
    when its model has no usable validation set."""
    registry_target: str | None = None
    """The registry's `host:port`, asked for each version's validation set; resolved through
    discovery (service `registry`) at each attempt when unset."""
    registry_api_key: SecretStr | None = None
    """The API key sent to the registry when it has auth on (the `viewer` role is enough)."""
    registry_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    """TLS of the calls to the registry (CA, client certificate for a registry that requires
    one); off: plaintext."""
    registry_timeout_s: float = Field(default=5.0, gt=0)
    """Deadline of each registry call."""
    baseline_retry_s: float = Field(default=30.0, gt=0)
    """After the registry could not be asked about a version, the wait before asking again;
    it doubles with each failure, up to `baseline_retry_max_s`."""
    baseline_retry_max_s: float = Field(default=600.0, gt=0)
    """The longest wait between two attempts to ask the registry about one version."""
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

    @field_validator("redis", mode="before")
    @classmethod
    def _no_cluster(cls, value: Any) -> Any:
        """Cluster mode is refused before anything else about it is checked."""
        mode = value.get("mode") if isinstance(value, dict) else getattr(value, "mode", None)
        if mode == "cluster":
            raise ValueError(CLUSTER_REFUSED)
        return value

    @model_validator(mode="after")
    def _redis_fits_the_monitor(self) -> MonitorSettings:
        """`redis_url` and `redis` must not contradict each other; the socket timeout must
        outlast the blocking read."""
        if "timeout_s" in self.redis.model_fields_set and self.redis.timeout_s <= (
            self.block_ms / 1000
        ):
            raise ValueError(
                f"redis.timeout_s ({self.redis.timeout_s} s) must be longer than block_ms "
                f"({self.block_ms} ms): the blocking stream read holds its connection that long"
            )
        self.redis_connection()
        return self

    def redis_connection(self) -> RedisConnection:
        """`redis` with `redis_url` applied and the socket timeout defaulting to
        `redis_timeout_s` + `block_ms`; ValueError naming `redis_url` when that makes it invalid."""
        return with_redis_url(
            self.redis,
            self.redis_url,
            default_timeout_s=self.redis_timeout_s + self.block_ms / 1000,
        )
