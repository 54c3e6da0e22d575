"""Settings of the registry service (env prefix MODELSERVE_REGISTRY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.auth import AuthSettings
from modelserve_runtime.config import ClientTlsSettings, ServerSettings, ServiceSettings

MIB = 1024 * 1024


class RegistrySettings(ServiceSettings):
    """The registry service's settings."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_REGISTRY_")

    data_dir: Path = Path(".run/registry")
    """Where the registry keeps its SQLite database and its artifact directory."""
    max_artifact_bytes: int = Field(default=512 * MIB, ge=1)
    """Largest artifact one upload may stream; a larger one gets RESOURCE_EXHAUSTED."""
    read_chunk_bytes: int = Field(default=1 * MIB, ge=1)
    """Size of each chunk ReadModelVersionArtifact sends back."""
    auth: AuthSettings = Field(default_factory=AuthSettings)
    """API keys and roles; off by default so a local `make up` needs no keys."""
    production_traffic_only: bool = True
    """UpdateDeployment and rollouts give a share of traffic only to PRODUCTION versions
    (FAILED_PRECONDITION `NOT_IN_PRODUCTION` otherwise). The laptop stack of `make up` turns it
    off: it runs without API keys, so nobody could approve a version."""
    require_validation: bool = True
    """Entering PRODUCTION needs a passing validation run (FAILED_PRECONDITION
    `VALIDATION_REQUIRED` otherwise)."""
    inference_target: str | None = None
    """The inference service's `host:port` that validations load and run versions on;
    discovery (service `inference`) when unset."""
    monitor_target: str | None = None
    """The monitor's `host:port` that rollout gates read; discovery (service `monitor`) when
    unset."""
    inference_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    """TLS of the calls to the inference service (validations); off: plaintext."""
    monitor_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    """TLS of the calls to the monitor (rollout gates); off: plaintext."""
    validation_tolerance: float = Field(default=0.01, ge=0)
    """How much worse than the PRODUCTION version a candidate may score on the validation set
    and still pass (absolute, in the metric's unit)."""
    validation_batch_rows: int = Field(default=256, ge=1)
    """Rows of the validation set sent in one Infer call (at most inference's max batch size)."""
    validation_load_timeout_s: float = Field(default=300.0, gt=0)
    """How long inference may take to load a version for a validation."""
    validation_infer_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline of each Infer call of a validation."""
    rollout_tick_s: float = Field(default=1.0, gt=0)
    """How often the rollout controller looks for steps whose interval has passed."""
    gate_timeout_s: float = Field(default=5.0, gt=0)
    """Deadline of each call a rollout gate makes to the monitor."""

    @property
    def db_path(self) -> Path:
        """The SQLite database file."""
        return self.data_dir / "registry.db"

    @property
    def artifacts_dir(self) -> Path:
        """The root of the content-addressed artifact directory."""
        return self.data_dir / "artifacts"

    @field_validator("read_chunk_bytes")
    @classmethod
    def _chunk_fits_in_a_message(cls, value: int, info: ValidationInfo) -> int:
        # A chunk plus its few bytes of framing must stay under the server's message limit;
        # `server` is a base-class field, so it is validated before this one.
        server = info.data.get("server")
        if isinstance(server, ServerSettings) and value > server.max_message_bytes - 1024:
            raise ValueError(
                f"must be at least 1024 bytes below server.max_message_bytes "
                f"({server.max_message_bytes})"
            )
        return value
