"""Settings of the inference service (env prefix MODELSERVE_INFERENCE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.config import ClientTlsSettings, ServiceSettings
from modelserve_triton.process import check_extra_args


class InferenceSettings(ServiceSettings):
    """The inference service's settings."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_INFERENCE_")

    triton_mode: Literal["local", "remote"] = "local"
    """`local`: start tritonserver as a child process; `remote`: use `triton_url`."""
    triton_url: str = "127.0.0.1:8001"
    """Triton's gRPC endpoint in remote mode."""
    triton_protocol: Literal["http", "grpc"] = "http"
    """How `Infer` and the Open Inference Protocol facade send requests to Triton: over its
    HTTP endpoint (binary tensors; when it is known: always in local mode, with
    `triton_http_url` in remote mode) or over gRPC. Model control is always gRPC."""
    triton_http_url: str | None = None
    """Triton's HTTP endpoint (`host:port`) in remote mode, published with each READY version
    for the router's direct path (which prefers it); none: only the gRPC one is published."""
    triton_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    """Remote mode: TLS of the calls to a Triton that serves gRPC over TLS (`--grpc-use-ssl`):
    the CA, a client certificate for mutual TLS, the server name. On, every call goes by gRPC
    and no HTTP endpoint is published (Triton's HTTP has no TLS), so routers call the gRPC
    one, with their own `triton_tls`."""
    triton_work_dir: Path = Path(".run/triton")
    """Local mode: where the backend directory, model repository and Triton's log live."""
    triton_grpc_port: int = Field(default=0, ge=0, le=65535)
    """Local mode: Triton's gRPC port; 0 picks a free one."""
    triton_http_port: int = Field(default=0, ge=0, le=65535)
    """Local mode: Triton's HTTP port; 0 picks a free one."""
    triton_trace_endpoint: str | None = None
    """Local mode: `host:port` of an OTLP/HTTP receiver for Triton's own spans; none: off."""
    triton_trace_export_delay_ms: int = Field(default=1000, ge=10)
    """Local mode: how often Triton sends its batched spans (Triton's own default is 5000)."""
    triton_start_timeout_s: float = Field(default=120.0, gt=0)
    """Local mode: how long Triton may take to become ready."""
    triton_extra_args: tuple[str, ...] = ()
    """Local mode: more tritonserver flags, appended after modelserve's own (for a GPU, say,
    `--cuda-memory-pool-byte-size=0:268435456` or `--model-load-gpu-limit=0:0.8`). Flags that
    modelserve sets itself (repository, model control, ports, addresses, TLS, readiness) are
    refused."""
    registry_target: str | None = None
    """The registry's `host:port`; resolved through discovery (service `registry`) when unset."""
    registry_api_key: SecretStr | None = None
    """The API key inference sends to the registry when the registry has auth on (a key with
    the `viewer` role is enough: inference only reads versions and watches deployments)."""
    registry_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    """TLS of the calls to the registry (CA, client certificate for a registry that requires
    one); off: plaintext."""
    reconcile: bool = True
    """Follow the registry's WatchDeployments and make Triton hold exactly the versions the
    deployments reference (traffic targets, shadow and fallback versions) plus those pinned by
    LoadModelVersion. Off: Triton holds only what LoadModelVersion loads."""
    pins_file: Path | None = None
    """Where the versions pinned by LoadModelVersion are kept (a JSON list), so that the
    service, restarted, loads them again by itself; none: `pins.json` in `triton_work_dir`.
    With `reconcile` on (the pins are the reconcile loop's)."""
    unload_grace_s: float = Field(default=10.0, ge=0)
    """How long a version no deployment references any more stays loaded before it is
    unloaded, so that a rollback coming right back finds it still READY."""
    max_concurrent_loads: int = Field(default=2, ge=1)
    """How many models the reconcile loop loads at once (all wanted versions of one model go
    to Triton in one load)."""
    load_retry_initial_s: float = Field(default=1.0, gt=0)
    """How long the reconcile loop waits before loading a FAILED version again; the wait
    doubles after each failure, up to `load_retry_max_s`."""
    load_retry_max_s: float = Field(default=60.0, gt=0)
    """The longest wait between two loads of a version that keeps failing."""
    watch_backoff_max_s: float = Field(default=5.0, gt=0)
    """The longest wait between two attempts to reconnect WatchDeployments (from 0.05 s,
    doubling); each reconnect resumes after the last revision seen."""
    watch_timeout_s: float = Field(default=3600.0, gt=0)
    """Deadline of one WatchDeployments stream; it is reopened, resuming, when it passes."""
    backend: Literal["python", "onnxruntime"] = "python"
    """Triton backend for deployments that do not choose one: `python` runs the ONNX file with
    onnxruntime inside the python backend; `onnxruntime` is Triton's native backend, which
    the nvidia-pytriton wheel does not ship."""
    device: Literal["cpu", "gpu"] = "cpu"
    """Where model instances run for deployments that do not choose: `cpu`, or `gpu` through
    onnxruntime's CUDA provider (the python backend needs onnxruntime-gpu installed beside
    Triton; a version that cannot get a GPU goes FAILED with the reason)."""
    gpus: tuple[Annotated[int, Field(ge=0)], ...] = ()
    """GPUs (CUDA device numbers) that `device: gpu` uses for deployments that name none;
    empty: every GPU Triton sees."""
    max_batch_size: int = Field(default=256, ge=1)
    """Largest batch Triton's dynamic batcher forms per version, unless the deployment says."""
    max_queue_delay_us: int = Field(default=0, ge=0)
    """How long the dynamic batcher waits to fill a batch, unless the deployment says; 0
    measured best at low load."""
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
    coalesce_in_flight: int = Field(default=1, ge=0)
    """Calls into Triton per version and model instance beyond which requests (Infer and
    ModelInfer) wait and go together, coalesced into one batched call, as soon as one
    returns; a request that finds a free call goes at once, alone. 0: every request goes at
    once, alone. Off whenever `max_queue_size` > 0 (Triton's bounded queue must see every
    request to refuse what does not fit)."""
    triton_poll_interval_s: float = Field(default=1.0, gt=0)
    """How often the supervisor asks Triton whether it is live (a local child that exits is
    noticed at once)."""
    triton_stats_interval_s: float = Field(default=5.0, gt=0)
    """How often Triton's per-version statistics are read for /metrics."""

    @field_validator("triton_extra_args")
    @classmethod
    def _extra_args_are_flags_of_our_own(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        check_extra_args(value)
        return value

    @model_validator(mode="after")
    def _tls_is_for_a_remote_triton(self) -> InferenceSettings:
        """The Triton started in local mode listens on 127.0.0.1 in plaintext."""
        if self.triton_tls.enabled and self.triton_mode != "remote":
            raise ValueError(
                "triton_tls is for a remote Triton (triton_mode: remote); the local one "
                "listens on 127.0.0.1 only"
            )
        return self
