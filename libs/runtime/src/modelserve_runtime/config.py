"""Typed service settings from environment variables and an optional YAML file."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    FilePath,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from modelserve_runtime.auth import Role

#: Environment variable naming a YAML settings file; a service's own `--config` wins.
CONFIG_FILE_ENV = "MODELSERVE_CONFIG"


class ConfigError(Exception):
    """A setting is missing or wrong; the message names each bad setting."""


def _check_key_pair(cert_file: Path, key_file: Path) -> None:
    """Refuses files that are not a PEM certificate and its own private key."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"cert_file {cert_file} and key_file {key_file} are not a PEM certificate and its "
            f"private key: {exc}"
        ) from None


def _check_ca_file(field: str, path: Path) -> None:
    """Refuses a file that holds no PEM certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{field} {path} holds no PEM CA certificate: {exc}") from None


class ServerTlsSettings(BaseModel):
    """TLS, and optionally mutual TLS, of the gRPC server; plaintext unless `cert_file` is set.

    The files are read once, at start: a renewed certificate takes a restart.
    """

    model_config = {"frozen": True, "extra": "forbid"}

    cert_file: FilePath | None = None
    """PEM certificate (chain) the server presents; set (with `key_file`): the server speaks
    only TLS. Unset: plaintext."""
    key_file: FilePath | None = None
    """PEM private key of `cert_file`."""
    client_ca_file: FilePath | None = None
    """PEM CA certificate(s) of the clients; set: every client must present a certificate
    signed by one of them (mutual TLS), or its connection fails before any call is made.
    gRPC Python cannot ask for a client certificate without requiring one, so there is no
    "optional client certificate" mode."""
    client_roles: dict[str, Annotated[frozenset[Role], Field(min_length=1)]] = Field(
        default_factory=dict
    )
    """Subject CN of a client certificate -> the roles of a call that comes with it and with
    no API key, where auth is on (router, registry); e.g. `{"router": ["viewer"]}`. A CN not
    listed needs a key. Needs `client_ca_file`."""

    @model_validator(mode="after")
    def _complete(self) -> ServerTlsSettings:
        if self.cert_file is not None and self.key_file is None:
            raise ValueError("cert_file is set without key_file (its private key)")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file (the server certificate)")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError(
                "client_ca_file is set without cert_file and key_file: client certificates "
                "are checked only over TLS"
            )
        if self.client_roles and self.client_ca_file is None:
            raise ValueError(
                "client_roles is set without client_ca_file: only a client certificate the "
                "server verified names a principal"
            )
        if self.cert_file is not None and self.key_file is not None:
            _check_key_pair(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            _check_ca_file("client_ca_file", self.client_ca_file)
        return self

    @property
    def enabled(self) -> bool:
        """Whether the server speaks TLS."""
        return self.cert_file is not None


class ClientTlsSettings(BaseModel):
    """TLS of the calls to one other service; plaintext unless `enabled`."""

    model_config = {"frozen": True, "extra": "forbid"}

    enabled: bool = False
    """Speak TLS to the service and check its certificate."""
    ca_file: FilePath | None = None
    """PEM CA certificate(s) that signed the service's certificate; unset: the CAs that gRPC
    trusts by default."""
    cert_file: FilePath | None = None
    """PEM client certificate, for a service that requires one (`server.tls.client_ca_file`)."""
    key_file: FilePath | None = None
    """PEM private key of `cert_file`."""
    server_name: str | None = None
    """The name the service's certificate must carry when it is not the target's host (an
    address without a SAN of its own); unset: the target's host."""

    @model_validator(mode="after")
    def _complete(self) -> ClientTlsSettings:
        files = (self.ca_file, self.cert_file, self.key_file)
        if not self.enabled and (any(f is not None for f in files) or self.server_name):
            raise ValueError("TLS settings are given but enabled is false: set enabled")
        if self.cert_file is not None and self.key_file is None:
            raise ValueError("cert_file is set without key_file (its private key)")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file (the client certificate)")
        if self.cert_file is not None and self.key_file is not None:
            _check_key_pair(self.cert_file, self.key_file)
        if self.ca_file is not None:
            _check_ca_file("ca_file", self.ca_file)
        return self


class ServerSettings(BaseModel):
    """How the gRPC server listens and stops."""

    model_config = {"frozen": True, "extra": "forbid"}

    host: str = "127.0.0.1"
    """Interface to bind; `0.0.0.0` in containers."""
    port: int = Field(default=0, ge=0, le=65535)
    """Port to bind; 0 picks a free one (tests)."""
    http_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the service's HTTP/1.1 front door: every RPC of the service over the Connect
    protocol (`POST /<package.Service>/<Method>`, JSON or protobuf bodies), and on the
    services that serve the Open Inference Protocol (router, inference) its HTTP/REST
    binding (KServe v2 JSON, with Triton's binary tensor extension); through the same
    checks, API keys, tracing, logs and metrics as the gRPC port, on `host`, with the same
    TLS. None: gRPC only; 0 picks a free one. With several `workers` it must be fixed (not
    0), as `port`."""
    http_cors_origins: tuple[str, ...] = ()
    """Origins (`https://app.example.com`, scheme, host and port as a browser sends them)
    whose pages may call the HTTP port from a browser (CORS: Connect's web clients, the Open
    Inference Protocol's REST binding): preflights are answered, and answers carry
    `Access-Control-Allow-Origin` and expose their headers. `*` allows every origin (avoid in
    production). Empty: no CORS, browsers refuse calls from other origins."""
    grace_period_s: float = Field(default=10.0, ge=0)
    """On SIGTERM, how long in-flight RPCs may run before they are cancelled."""
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest request or response message accepted; larger ones get RESOURCE_EXHAUSTED."""
    max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    """In-flight RPC limit, on the gRPC port and, on its own, on the HTTP port; further calls
    are refused with RESOURCE_EXHAUSTED (HTTP 429) before any handler runs. None: no limit."""
    tls: ServerTlsSettings = Field(default_factory=ServerTlsSettings)
    """TLS and mutual TLS; off (plaintext) by default."""
    workers: int = Field(default=1, ge=1, le=64)
    """Processes serving the port (SO_REUSEPORT: the kernel spreads *connections* over them,
    so one client channel stays on one worker; many callers spread), for the services that
    allow it: router and feature (stateless), and inference (the first process owns Triton;
    the others serve inference calls from a mirror of its versions). More than 1 needs a
    fixed `port`; the first process starts the others once it serves (and again when one
    exits), registers in discovery and serves the metrics of every process (counters and
    histograms summed; gauges per process), and stops the others when it stops (they also
    stop if it dies).
    In-memory state (caches, breakers, rate limits) is per process."""
    workers_ready_timeout_s: float = Field(default=60.0, gt=0)
    """With several workers: how long the first process waits, after its own checks pass, for
    every other worker to listen and pass its checks; until then no process reports SERVING
    (a client that connected earlier would keep all its calls on the processes up first). A
    worker not ready by then is logged (`workers_not_ready`), the service serves without it,
    and it serves once ready."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The event loop the service runs on: uvloop, or asyncio's own (the benchmarks compare
    both)."""
    gc_threshold: int = Field(default=50_000, ge=1)
    """Allocations between collections of the garbage collector's youngest generation once
    the service is up (start-up objects are frozen out of collections then); Python's own
    default, 700, made the router collect hundreds of times a second under load."""
    min_ping_interval_ms: int = Field(default=5_000, ge=1)
    """The shortest interval between a client's HTTP/2 keepalive pings that the server
    accepts; a client pinging more often is sent GOAWAY ("too many pings"), which fails every
    call on its connection. The project's clients ping every 30 s while a call is open (a
    quiet WatchDeployments stream, say); gRPC's own default here is 5 minutes, under which
    such a stream and every call beside it died after about 90 s."""


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


def settings_problems(exc: ValidationError, env_prefix: str) -> list[str]:
    """Each problem of settings read from the environment, naming the variable and the
    setting: `MODELSERVE_ROUTER_SERVER__PORT (server.port): Input should be ...`."""
    problems = []
    for err in exc.errors():
        if not err["loc"]:
            problems.append(err["msg"])
            continue
        path = ".".join(str(p) for p in err["loc"])
        env_name = env_prefix + "__".join(str(p) for p in err["loc"]).upper()
        problems.append(f"{env_name} ({path}): {err['msg']}")
    return problems


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
        problems = settings_problems(exc, str(cls.model_config.get("env_prefix", "")))
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from None
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop(CONFIG_FILE_ENV, None)
            else:
                os.environ[CONFIG_FILE_ENV] = previous
