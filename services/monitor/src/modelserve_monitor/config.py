"""Settings of the monitor service (env prefix MODELSERVE_MONITOR_)."""

from __future__ import annotations

import os
import socket

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.config import ServiceSettings
from modelserve_runtime.prediction_log import DEFAULT_STREAM


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


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
    max_latency_samples: int = Field(default=10_000, ge=1)
    """Latencies kept per endpoint and version; percentiles cover the most recent ones."""
    max_remembered_records: int = Field(default=100_000, ge=1)
    """Record keys remembered to count a redelivered or re-appended record only once."""
