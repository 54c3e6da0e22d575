"""Which Redis a command reaches: the one the service that owns the data reaches.

The feature store's Redis is the feature service's (`MODELSERVE_FEATURE_REDIS__*`: mode,
Sentinel or cluster nodes, master name, credentials, TLS; or the `MODELSERVE_FEATURE_REDIS_URL`
shorthand), and the Redis of precomputed predictions and streams is the router's
(`MODELSERVE_ROUTER_REDIS__*`, `MODELSERVE_ROUTER_REDIS_URL`). So a command run beside a
service, with its environment, reaches a Sentinel-managed master or a cluster as the service
does. A command line's `--redis-url` names a standalone server instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from modelserve_runtime.config import ConfigError, settings_problems
from modelserve_runtime.redis_connect import RedisConnection, with_redis_url

Owner = Literal["feature", "router"]

#: A job's `--redis-url`: the router's Redis (precomputed predictions, prediction streams).
RouterRedisUrl = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        envvar="MODELSERVE_REDIS_URL",
        help="The router's Redis (precomputed predictions, streams) as a standalone url;"
        " default: the router's settings (MODELSERVE_ROUTER_REDIS__*, _REDIS_URL), else"
        " redis://127.0.0.1:6379/0.",
        show_default=False,
    ),
]
#: A job's `--feature-redis-url`: the feature store's Redis.
FeatureRedisUrl = Annotated[
    str | None,
    typer.Option(
        "--feature-redis-url",
        envvar="MODELSERVE_FEATURE_REDIS_URL",
        help="The feature store's Redis as a standalone url; default: the feature service's"
        " settings (MODELSERVE_FEATURE_REDIS__*), else the router's Redis.",
        show_default=False,
    ),
]


class _ServiceRedis(BaseSettings):
    redis: RedisConnection = RedisConnection()
    redis_url: str | None = None


class _FeatureRedis(_ServiceRedis):
    model_config = SettingsConfigDict(
        env_prefix="MODELSERVE_FEATURE_", env_nested_delimiter="__", extra="ignore"
    )


class _RouterRedis(_ServiceRedis):
    model_config = SettingsConfigDict(
        env_prefix="MODELSERVE_ROUTER_", env_nested_delimiter="__", extra="ignore"
    )


_SETTINGS: dict[Owner, type[_ServiceRedis]] = {"feature": _FeatureRedis, "router": _RouterRedis}


def _prefix(owner: Owner) -> str:
    return f"MODELSERVE_{owner.upper()}_"


def configured(owner: Owner) -> bool:
    """Whether the environment says anything about `owner`'s Redis."""
    prefix = _prefix(owner)
    return any(
        name == prefix + "REDIS_URL" or name.startswith(prefix + "REDIS__") for name in os.environ
    )


def _with_file(cls: type[_ServiceRedis], config_file: Path) -> type[_ServiceRedis]:
    """`cls` reading the service's YAML settings file too, below the environment, as the
    service itself reads it."""

    class FromFile(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (
                init_settings,
                env_settings,
                YamlConfigSettingsSource(settings_cls, yaml_file=config_file),
                file_secret_settings,
            )

    return FromFile


def service_redis(
    owner: Owner, url: str | None, *, timeout_s: float, config_file: Path | None = None
) -> RedisConnection:
    """`owner`'s Redis as its settings in the environment (and in `config_file`, the
    service's YAML settings file, below the environment) say, with `url` (a command line's
    `--redis-url`) as the standalone server when given, and `timeout_s` as the socket timeout
    unless the settings set one. ConfigError naming the variable or the file when they are
    invalid."""
    prefix = _prefix(owner)
    cls = _SETTINGS[owner]
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        cls = _with_file(cls, config_file)
    try:
        settings = cls()
        return with_redis_url(
            settings.redis,
            url if url is not None else settings.redis_url,
            default_timeout_s=timeout_s,
        )
    except ValidationError as exc:
        raise ConfigError("; ".join(settings_problems(exc, prefix))) from None
    except ValueError as exc:
        raise ConfigError(f"the {owner} service's Redis settings: {exc}") from None
