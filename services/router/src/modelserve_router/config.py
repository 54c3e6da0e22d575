"""Settings of the router (env prefix MODELSERVE_ROUTER_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.config import ServiceSettings


class RouterSettings(ServiceSettings):
    """The router's settings."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_ROUTER_")

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis for the prediction log (and, with `feature_reader: redis`, for features)."""
    prediction_stream: str = "modelserve:predictions"
    """The Redis Stream that receives one PredictionRecord per request."""
    prediction_stream_max_len: int = Field(default=1_000_000, ge=1000)
    """Approximate cap on the stream's length."""
    feature_reader: Literal["service", "redis"] = "redis"
    """`redis`: features straight from Redis (one pipeline); `service`: through the feature
    service. The benchmark in loadtests/RESULTS.md picked `redis`."""
    model_runner: Literal["service", "triton"] = "triton"
    """`triton`: straight to the Triton endpoint that inference publishes for a READY version;
    `service`: through the inference service. The benchmark picked `triton`."""
    registry_target: str | None = None
    """The registry's `host:port`; resolved through discovery (service `registry`) when unset."""
    feature_target: str | None = None
    """The feature service's `host:port`; discovery (service `feature`) when unset."""
    inference_target: str | None = None
    """The inference service's `host:port`; discovery (service `inference`) when unset."""
    ready_poll_ms: int = Field(default=500, ge=10)
    """How often inference is asked which versions are READY (only those get traffic). A
    deployment whose targets are none of them asks again at once."""
    watch_backoff_max_s: float = Field(default=5.0, gt=0)
    """Longest wait between reconnects of the deployment watch while the registry is away
    (the wait doubles from 50 ms); the last snapshot keeps serving meanwhile."""
    shadow_max_in_flight: int = Field(default=64, ge=1)
    """Most shadow copies running at once; a copy beyond it is dropped and counted."""
    shadow_timeout_s: float = Field(default=2.0, gt=0)
    """Deadline of one shadow copy."""
    request_timeout_s: float = Field(default=2.0, gt=0)
    """Deadline for one Predict when the caller sets none."""
    feature_timeout_s: float = Field(default=0.5, gt=0)
    """Deadline of the feature read."""
    inference_timeout_s: float = Field(default=1.5, gt=0)
    """Deadline of the model call."""
