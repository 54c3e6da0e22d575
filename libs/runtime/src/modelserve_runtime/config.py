"""Typed service settings from environment variables and an optional YAML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import AliasChoices, BaseModel, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

#: Environment variable naming a YAML settings file; a service's own `--config` wins.
CONFIG_FILE_ENV = "MODELSERVE_CONFIG"


class ConfigError(Exception):
    """A setting is missing or wrong; the message names each bad setting."""


class ServerSettings(BaseModel):
    """How the gRPC server listens and stops."""

    model_config = {"frozen": True, "extra": "forbid"}

    host: str = "127.0.0.1"
    """Interface to bind; `0.0.0.0` in containers."""
    port: int = Field(default=0, ge=0, le=65535)
    """Port to bind; 0 picks a free one (tests)."""
    grace_period_s: float = Field(default=10.0, ge=0)
    """On SIGTERM, how long in-flight RPCs may run before they are cancelled."""
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest request or response message accepted; larger ones get RESOURCE_EXHAUSTED."""
    max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    """In-flight RPC limit; further calls are refused with RESOURCE_EXHAUSTED. None: no limit."""


class TelemetrySettings(BaseModel):
    """Logs and metrics."""

    model_config = {"frozen": True, "extra": "forbid"}

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest log level written."""
    log_format: Literal["json", "console", "auto"] = "auto"
    """`json` lines, the `console` renderer, or `auto`: console on a terminal, else json."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the Prometheus text endpoint (/metrics); None: no endpoint."""


class DiscoverySettings(BaseModel):
    """How services find each other."""

    model_config = {"frozen": True, "extra": "forbid"}

    mode: Literal["static", "consul"] = "static"
    """`static`: addresses from `static`; `consul`: register and resolve through Consul."""
    static: dict[str, str] = Field(default_factory=dict)
    """Service name -> `host:port`, for static mode (and as a fallback target list)."""
    consul_host: str = "127.0.0.1"
    """Consul agent host."""
    consul_port: int = Field(default=8500, ge=1, le=65535)
    """Consul agent HTTP port."""
    consul_token: str | None = None
    """Consul ACL token; read from the environment or a file, never logged."""
    advertise_host: str | None = None
    """Address other services use to reach this one; the bind host when unset."""
    consul_timeout_s: float = Field(default=2.0, gt=0)
    """Deadline of each call to the Consul agent."""


class ServiceSettings(BaseSettings):
    """Settings every service shares; each service subclasses it with its own prefix."""

    model_config = SettingsConfigDict(
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        populate_by_name=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    """The gRPC server."""
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    """Logs and metrics."""
    discovery: DiscoverySettings = Field(default_factory=DiscoverySettings)
    """Service discovery."""
    otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "otlp_endpoint"),
    )
    """OTLP/gRPC collector for traces (the standard OTEL_EXPORTER_OTLP_ENDPOINT); none: no export."""

    @model_validator(mode="after")
    def _consul_needs_a_reachable_address(self) -> ServiceSettings:
        """A wildcard bind address cannot be what Consul hands to other services."""
        advertised = self.discovery.advertise_host or self.server.host
        if self.discovery.mode == "consul" and advertised in ("0.0.0.0", "::", ""):
            raise ValueError(
                f"discovery.advertise_host must be set to a routable address in consul mode "
                f"(the bind host is {self.server.host!r})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit values, then environment, then the YAML file, then defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = os.environ.get(CONFIG_FILE_ENV)
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        sources.append(file_secret_settings)
        return tuple(sources)


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def load_settings(cls: type[SettingsT], config_file: Path | None = None) -> SettingsT:
    """Loads and validates settings once at start; raises ConfigError naming each bad one."""
    previous = os.environ.get(CONFIG_FILE_ENV)
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        os.environ[CONFIG_FILE_ENV] = str(config_file)
    elif previous and not Path(previous).is_file():
        raise ConfigError(f"{CONFIG_FILE_ENV}={previous}: no such file")
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = []
        for err in exc.errors():
            if not err["loc"]:
                problems.append(err["msg"])
                continue
            path = ".".join(str(p) for p in err["loc"])
            env_name = prefix + "__".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{env_name} ({path}): {err['msg']}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from None
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop(CONFIG_FILE_ENV, None)
            else:
                os.environ[CONFIG_FILE_ENV] = previous
