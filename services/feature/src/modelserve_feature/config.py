"""Settings of the feature service (env prefix MODELSERVE_FEATURE_)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from modelserve_features.online import MAX_EVENT_TIME_AHEAD_S
from modelserve_runtime.config import ServiceSettings
from modelserve_runtime.redis_connect import RedisConnection, with_redis_url


class FeatureSettings(ServiceSettings):
    """The feature service's settings."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_FEATURE_")

    redis: RedisConnection = Field(default_factory=RedisConnection)
    """The online store: standalone, Sentinel or Cluster, credentials and TLS (`REDIS__*`)."""
    redis_url: str | None = None
    """Shorthand for a standalone Redis at this URL (`redis.url`); unset: `redis` decides."""
    redis_timeout_s: float = Field(default=1.0, gt=0)
    """Deadline of each Redis round trip (a caller's shorter deadline wins); also the socket
    timeout unless `redis.timeout_s` is set."""
    max_entities: int = Field(default=1000, ge=1)
    """Most entities in one GetOnlineFeatures call, and most writes in one batch."""
    max_features: int = Field(default=500, ge=1)
    """Most features in one GetOnlineFeatures call."""
    cache_ttl_s: float = Field(default=0.0, ge=0)
    """How long a read entity's values are reused in-process; 0 (the default) turns the cache off."""
    cache_max_entries: int = Field(default=100_000, ge=1)
    """Most entity x view hashes the cache holds (least recently used go first)."""
    max_event_time_ahead_s: float = Field(default=MAX_EVENT_TIME_AHEAD_S, ge=0)
    """How far after this service's clock a write's event time may be; a later one is
    INVALID_ARGUMENT (it would outrank every true write until then)."""
    health_interval_s: float = Field(default=1.0, gt=0)
    """How often Redis is pinged to keep the health status current."""

    @model_validator(mode="after")
    def _redis_url_is_standalone(self) -> FeatureSettings:
        """`redis_url` and `redis` must not contradict each other."""
        self.redis_connection()
        return self

    def redis_connection(self) -> RedisConnection:
        """`redis` with `redis_url` applied, and the socket timeout defaulting to
        `redis_timeout_s`; ValueError naming `redis_url` when that makes it invalid."""
        return with_redis_url(self.redis, self.redis_url, default_timeout_s=self.redis_timeout_s)
