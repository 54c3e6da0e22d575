"""Settings of the inference service (env prefix MODELSERVE_INFERENCE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
