"""Settings of the inference service (env prefix MODELSERVE_INFERENCE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.config import ServiceSettings


class InferenceSettings(ServiceSettings):
    """The inference service's settings."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_INFERENCE_")

    triton_mode: Literal["local", "remote"] = "local"
    """`local`: start tritonserver as a child process; `remote`: use `triton_url`."""
    triton_url: str = "127.0.0.1:8001"
    """Triton's gRPC endpoint in remote mode."""
    triton_work_dir: Path = Path(".run/triton")
    """Local mode: where the backend directory, model repository and Triton's log live."""
    triton_grpc_port: int = Field(default=0, ge=0, le=65535)
    """Local mode: Triton's gRPC port; 0 picks a free one."""
    triton_trace_endpoint: str | None = None
    """Local mode: `host:port` of an OTLP/HTTP receiver for Triton's own spans; none: off."""
    triton_trace_export_delay_ms: int = Field(default=1000, ge=10)
    """Local mode: how often Triton sends its batched spans (Triton's own default is 5000)."""
    triton_start_timeout_s: float = Field(default=120.0, gt=0)
    """Local mode: how long Triton may take to become ready."""
    registry_target: str | None = None
    """The registry's `host:port`; resolved through discovery (service `registry`) when unset."""
    max_batch_size: int = Field(default=256, ge=1)
    """Largest batch Triton's dynamic batcher forms per version."""
    max_queue_delay_us: int = Field(default=0, ge=0)
    """How long the dynamic batcher waits to fill a batch; 0 measured best at low load."""
    infer_timeout_s: float = Field(default=2.0, gt=0)
    """Deadline of each call into Triton."""
    load_timeout_s: float = Field(default=120.0, gt=0)
    """Deadline of each model load into Triton."""
    max_queue_size: int = Field(default=0, ge=0)
    """Requests the dynamic batcher may queue per version; more get RESOURCE_EXHAUSTED at once.
    0: unbounded (the default: measured with Triton 2.51, any queue policy makes concurrent
    requests stall in 500 ms steps; deadlines bound the wait instead)."""
    warmup_batch_sizes: tuple[Annotated[int, Field(ge=1)], ...] = (1, 8, 64)
    """Batch sizes of the warmup requests run on each version before it turns READY; sizes
    above `max_batch_size` are run at `max_batch_size`."""
    reject_non_finite: bool = True
    """Refuse NaN and infinity in floating-point inputs (INVALID_ARGUMENT naming the input)."""
    triton_poll_interval_s: float = Field(default=1.0, gt=0)
    """How often the supervisor asks Triton whether it is live (a local child that exits is
    noticed at once)."""
    triton_stats_interval_s: float = Field(default=5.0, gt=0)
    """How often Triton's per-version statistics are read for /metrics."""
