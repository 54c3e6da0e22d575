"""How a service reaches Redis: standalone, Sentinel or Cluster, with ACL credentials and TLS.

`RedisConnection` is the settings block a service embeds (the feature service's `REDIS__*`);
`connect` turns it into a `redis.asyncio` client: a `Redis` (standalone), a `Redis` whose
connections go to the master the Sentinels name (sentinel), or a `RedisCluster` (cluster).
Building a client opens no connection; the first command does, so a service learns whether
Redis answers from its readiness PING.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode
from redis.asyncio import Redis, RedisCluster, SSLConnection
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

#: What `connect` returns: one client type for standalone and sentinel, another for cluster.
RedisClient: TypeAlias = Redis | RedisCluster

RedisMode = Literal["standalone", "sentinel", "cluster"]

_SCHEMES = ("redis", "rediss", "unix")


class RedisTls(BaseModel):
    """TLS to Redis (in sentinel mode to the Sentinels too). The server's certificate is always
    verified: against `ca_file`, or the system's trusted CAs without one."""

    model_config = {"frozen": True, "extra": "forbid"}

    enabled: bool = False
    """Speak TLS; a `rediss://` url turns it on by itself."""
    ca_file: FilePath | None = None
    """PEM file of the CA(s) that signed the server's certificate; none: the system's CAs."""
    cert_file: FilePath | None = None
    """PEM client certificate, for a server that checks clients (`tls-auth-clients yes`)."""
    key_file: FilePath | None = None
    """PEM private key of `cert_file` (not needed when `cert_file` holds the key too)."""
    check_hostname: bool = True
    """Require the certificate to name the host connected to (DNS name or IP address)."""

    @model_validator(mode="after")
    def _key_needs_a_certificate(self) -> RedisTls:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("tls.key_file is set without tls.cert_file (the client certificate)")
        return self


def _address(node: str) -> tuple[str, int]:
    """`host:port` or `[v6 address]:port` as (host, port); ValueError when it is neither."""
    host, sep, port = node.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{node!r} is not host:port")
    return host, int(port)


class RedisConnection(BaseModel):
    """Where Redis is and how to log in; `mode` says which of the other fields apply."""

    model_config = {"frozen": True, "extra": "forbid"}

    mode: RedisMode = "standalone"
    """`standalone`: one server at `url`; `sentinel`: the master that the Sentinels at `nodes`
    name for `master_name`, found again after a failover; `cluster`: a Redis Cluster, found
    from any of its `nodes`."""
    url: str = "redis://127.0.0.1:6379/0"
    """Standalone only: `redis://[user:password@]host:port/db`, `rediss://...` for TLS, or
    `unix:///path/to/redis.sock`."""
    nodes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Sentinel and cluster modes: `host:port` of each Sentinel, or of some cluster nodes
    (one is enough, the client learns the rest); a comma-separated list or a JSON array."""
    master_name: str = ""
    """Sentinel mode: the name the Sentinels monitor the master under (`mymaster`)."""
    db: int = Field(default=0, ge=0)
    """Sentinel mode: the database number (standalone: the url's path; a cluster has only 0)."""
    username: str | None = None
    """ACL user to log in as (`AUTH username password`); none: the `default` user."""
    password: SecretStr | None = None
    """Password of `username` (or `requirepass`); never logged."""
    password_file: FilePath | None = None
    """A file holding the password (a mounted secret); its trailing newline is ignored."""
    sentinel_username: str | None = None
    """Sentinel mode: ACL user on the Sentinels themselves, when they require one."""
    sentinel_password: SecretStr | None = None
    """Sentinel mode: password on the Sentinels (their `requirepass`); none: no AUTH."""
    tls: RedisTls = Field(default_factory=RedisTls)
    """TLS settings."""
    timeout_s: float = Field(default=1.0, gt=0)
    """Socket connect and read timeout of every connection (to Sentinels too)."""
    retries: int = Field(default=0, ge=0)
    """How many times a command that failed on a broken connection or a timeout is sent again;
    0 fails fast (a caller's deadline is short, and health reports the outage)."""

    @field_validator("nodes", mode="before")
    @classmethod
    def _split_nodes(cls, value: Any) -> Any:
        """From the environment: `h1:26379,h2:26379` or `["h1:26379", "h2:26379"]`."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("nodes")
    @classmethod
    def _nodes_are_addresses(cls, value: list[str]) -> list[str]:
        for i, node in enumerate(value):
            try:
                _address(node)
            except ValueError as exc:
                raise ValueError(f"nodes[{i}]: {exc}") from None
        return value

    @field_validator("url")
    @classmethod
    def _url_is_redis(cls, value: str) -> str:
        scheme = urlparse(value).scheme
        if scheme not in _SCHEMES:
            raise ValueError(
                f"{value!r} is not a redis://, rediss:// or unix:// URL (got scheme {scheme!r})"
            )
        try:
            parse_url(value)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _fields_fit_the_mode(self) -> RedisConnection:
        given = self.model_fields_set
        problems: list[str] = []
        if self.password is not None and self.password_file is not None:
            problems.append("password and password_file are both set: set one")
        if self.mode == "standalone":
            problems += [
                f"{name} is for sentinel or cluster mode, and mode is standalone"
                for name in ("nodes", "master_name", "sentinel_username", "sentinel_password")
                if name in given
            ]
            if "db" in given:
                problems.append("db is for sentinel mode: in standalone mode the url names it")
            parsed = urlparse(self.url)
            if parsed.password and (self.password is not None or self.password_file is not None):
                problems.append("the url holds a password and password (or password_file) is set")
            if parsed.username and self.username is not None:
                problems.append("the url names a user and username is set")
            if parsed.scheme == "unix" and self.tls.enabled:
                problems.append("tls.enabled is set but the url is a unix socket")
        else:
            if "url" in given:
                problems.append(f"url is for standalone mode; {self.mode} mode uses nodes")
            if not self.nodes:
                problems.append(f"{self.mode} mode needs nodes: one host:port or more")
        if self.mode == "sentinel" and not self.master_name:
            problems.append("sentinel mode needs master_name (what the Sentinels monitor)")
        if self.mode == "cluster":
            problems += [
                f"{name} is for sentinel mode, and mode is cluster"
                for name in ("master_name", "sentinel_username", "sentinel_password")
                if name in given
            ]
            if self.db != 0:
                problems.append("db must be 0 in cluster mode (a cluster has only database 0)")
        if not self.tls_on and any((self.tls.ca_file, self.tls.cert_file, self.tls.key_file)):
            problems.append(
                "tls files are set but TLS is off: set tls.enabled (or use a rediss:// url)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def tls_on(self) -> bool:
        """Whether connections speak TLS."""
        return self.tls.enabled or (self.mode == "standalone" and self.url.startswith("rediss:"))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """`nodes` as (host, port) pairs."""
        return [_address(node) for node in self.nodes]

    def password_value(self) -> str | None:
        """The password, read from `password_file` when that is where it is."""
        if self.password_file is not None:
            return Path(self.password_file).read_text().rstrip("\r\n")
        return None if self.password is None else self.password.get_secret_value()

    def describe(self) -> str:
        """Where this connects, for logs: no password, not even one inside the url."""
        tls = " tls" if self.tls_on else ""
        if self.mode == "standalone":
            parsed = urlparse(self.url)
            where = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
            return f"standalone {where}{tls}"
        master = f" master {self.master_name}" if self.mode == "sentinel" else ""
        return f"{self.mode}{master} via {','.join(self.nodes)}{tls}"


def _tls_options(tls: RedisTls) -> dict[str, Any]:
    return {
        "ssl_ca_certs": None if tls.ca_file is None else str(tls.ca_file),
        "ssl_certfile": None if tls.cert_file is None else str(tls.cert_file),
        "ssl_keyfile": None if tls.key_file is None else str(tls.key_file),
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": tls.check_hostname,
    }


class SentinelMaster(Redis):
    """The client of a Sentinel-managed master; closing it closes the Sentinel clients too."""

    sentinels: Sentinel | None = None
    """The Sentinel clients that find the master."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


def connect(settings: RedisConnection) -> RedisClient:
    """A client for `settings` (no connection is opened until the first command)."""
    options: dict[str, Any] = {
        "username": settings.username,
        "password": settings.password_value(),
        "socket_timeout": settings.timeout_s,
        "socket_connect_timeout": settings.timeout_s,
        "retry": Retry(NoBackoff(), settings.retries),
    }
    tls = _tls_options(settings.tls) if settings.tls_on else {}
    if settings.mode == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in settings.addresses],
            ssl=settings.tls_on,
            **options,
            **tls,
        )
    if settings.mode == "sentinel":
        sentinel_options: dict[str, Any] = {
            "username": settings.sentinel_username,
            "password": (
                None
                if settings.sentinel_password is None
                else settings.sentinel_password.get_secret_value()
            ),
            "socket_timeout": settings.timeout_s,
            "socket_connect_timeout": settings.timeout_s,
            "retry": Retry(NoBackoff(), settings.retries),
        }
        if settings.tls_on:
            sentinel_options.update(ssl=True, **tls)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            settings.addresses,
            sentinel_kwargs=sentinel_options,
            db=settings.db,
            ssl=settings.tls_on,
            **options,
            **tls,
        )
        client: SentinelMaster = sentinel.master_for(
            settings.master_name, redis_class=SentinelMaster
        )
        client.sentinels = sentinel
        return client
    if settings.tls_on and not settings.url.startswith("rediss:"):
        options["connection_class"] = SSLConnection
    return Redis.from_url(settings.url, **options, **tls)


async def ping(client: RedisClient) -> None:
    """PING the server, or in a cluster every primary (a plain cluster PING asks one node
    only, which would hide a dead shard); raises the client's error when one does not answer."""
    if isinstance(client, RedisCluster):
        await client.ping(target_nodes=RedisCluster.PRIMARIES)
    else:
        await client.ping()


def with_redis_url(
    redis: RedisConnection, redis_url: str | None, *, default_timeout_s: float
) -> RedisConnection:
    """A service's `redis` settings with its `redis_url` shorthand applied and the socket
    timeout defaulting to `default_timeout_s` (unless `redis.timeout_s` is set). ValueError
    when the two contradict each other (the shorthand with another mode, or two different
    URLs) or when the result is invalid, naming `redis_url`."""
    if redis_url is not None:
        if redis.mode != "standalone":
            raise ValueError(
                f"redis_url is the shorthand for standalone mode, and redis.mode is "
                f"{redis.mode!r}: unset redis_url and list the servers in redis.nodes"
            )
        if "url" in redis.model_fields_set and redis.url != redis_url:
            raise ValueError("redis_url and redis.url are both set and differ: set one")
    given = redis.model_dump(exclude_unset=True)
    if redis_url is not None:
        given["url"] = redis_url
    given.setdefault("timeout_s", default_timeout_s)
    try:
        return RedisConnection.model_validate(given)
    except ValidationError as exc:
        problems = "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in exc.errors())
        raise ValueError(f"redis_url: {problems}") from None
