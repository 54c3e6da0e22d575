"""Settings of the registry service (env prefix MODELSERVE_REGISTRY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.auth import AuthSettings
from modelserve_runtime.config import ServerSettings, ServiceSettings

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
