"""Settings of the feature service (env prefix MODELSERVE_FEATURE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.config import ServiceSettings


class FeatureSettings(ServiceSettings):
    """The feature service's settings."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_FEATURE_")

    redis_url: str = "redis://127.0.0.1:6379/0"
    """The online store."""
    redis_timeout_s: float = Field(default=1.0, gt=0)
    """Deadline of each Redis round trip (a caller's shorter deadline wins)."""
    max_entities: int = Field(default=1000, ge=1)
    """Most entities in one GetOnlineFeatures call, and most writes in one batch."""
    max_features: int = Field(default=500, ge=1)
    """Most features in one GetOnlineFeatures call."""
    cache_ttl_s: float = Field(default=0.0, ge=0)
    """How long a read entity's values are reused in-process; 0 (the default) turns the cache off."""
    cache_max_entries: int = Field(default=100_000, ge=1)
    """Most entity x view hashes the cache holds (least recently used go first)."""
    health_interval_s: float = Field(default=1.0, gt=0)
    """How often Redis is pinged to keep the health status current."""
