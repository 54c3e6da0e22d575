"""Settings of the router (env prefix MODELSERVE_ROUTER_)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from modelserve_runtime.auth import AuthSettings
from modelserve_runtime.config import ClientTlsSettings, ServiceSettings
from modelserve_runtime.redis_connect import RedisConnection, with_redis_url


class EndpointSettings(BaseModel):
    """Per-endpoint caching and limits. An entry of `endpoints` takes every field it leaves
    out from `endpoint_defaults`."""

    model_config = {"frozen": True, "extra": "forbid"}

    cache_max_entries: int = Field(default=0, ge=0)
    """Most answers the endpoint's prediction cache holds (least recently used go first);
    0: no cache, no cached-prediction fallback."""
    cache_ttl_s: float = Field(default=60.0, ge=0)
    """How long a cached answer answers a request with the same version and model input
    without calling the model; 0: cached answers only serve the fallback chain."""
    cache_stale_s: float = Field(default=600.0, ge=0)
    """How long past `cache_ttl_s` a cached answer may still answer, degraded, when the
    version fails."""
    max_in_flight: int | None = Field(default=None, ge=1)
    """Most requests of the endpoint at once; one more is refused at once with
    RESOURCE_EXHAUSTED (`ENDPOINT_OVERLOADED`). None: no limit."""
    in_flight_retry_after_s: float = Field(default=0.1, gt=0)
    """The retry delay (google.rpc.RetryInfo) of a request refused by `max_in_flight`."""
    coalesce_budget_ms: float | None = Field(default=None, ge=0)
    """With `COALESCE` on, how long the first request of a batch for this endpoint's versions
    may wait for requests already in the router; None: the router's `COALESCE_BUDGET_MS`."""


class CircuitBreakerSettings(BaseModel):
    """The circuit breaker of each model version."""

    model_config = {"frozen": True, "extra": "forbid"}

    enabled: bool = True
    """Off: every request calls its version, however often it has just failed."""
    failure_threshold: int = Field(default=5, ge=1)
    """Consecutive failed calls (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
    INTERNAL) of a version that open its breaker."""
    cool_down_s: float = Field(default=5.0, gt=0)
    """How long an open breaker refuses calls before it lets one probe through."""


class RateLimitSettings(BaseModel):
    """A token bucket per caller (API key principal; `anonymous` when auth is off)."""

    model_config = {"frozen": True, "extra": "forbid"}

    requests_per_s: float | None = Field(default=None, gt=0)
    """Tokens added per second; None: the caller is not limited."""
    burst: int = Field(default=20, ge=1)
    """Most tokens saved up: the requests a caller may send at once after a quiet spell."""


class RouterSettings(ServiceSettings):
    """The router's settings."""

    model_config = SettingsConfigDict(env_prefix="MODELSERVE_ROUTER_")

    redis: RedisConnection = Field(default_factory=RedisConnection)
    """Redis for the prediction log, precomputed predictions (hybrid lookup) and, with
    `feature_reader: redis`, features: standalone, Sentinel or Cluster, credentials and TLS
    (`REDIS__*`), as the feature service reaches it."""
    redis_url: str | None = None
    """Shorthand for a standalone Redis at this URL (`redis.url`); unset: `redis` decides."""
    prediction_stream: str = "modelserve:predictions"
    """The Redis Stream that receives one PredictionRecord per request."""
    prediction_stream_max_len: int = Field(default=1_000_000, ge=1000)
    """Approximate cap on the stream's length."""
    prediction_log_buffer: int = Field(default=10_000, ge=1)
    """Most records held in memory while Redis is slow or away; past it new records are
    dropped, counted and logged."""
    prediction_log_linger_ms: float = Field(default=5.0, ge=0, le=1000)
    """How long the first record after a quiet spell waits for others to share its Redis
    pipeline; 0: written at once, one pipeline per record at low rates."""
    prediction_log_retry_max_s: float = Field(default=2.0, gt=0)
    """Longest wait between attempts to write buffered records while Redis is away (the
    wait starts at 50 ms and doubles)."""
    prediction_log_flush_timeout_s: float = Field(default=5.0, ge=0)
    """How long a stopping router tries to write the records it still holds; what is left
    then is counted and logged as dropped."""
    feature_reader: Literal["service", "redis"] = "redis"
    """`redis`: features straight from Redis (one pipeline); `service`: through the feature
    service. The benchmark in loadtests/RESULTS.md picked `redis`."""
    model_runner: Literal["service", "triton"] = "triton"
    """`triton`: straight to the Triton endpoint that inference publishes for a READY version;
    `service`: through the inference service. The benchmark picked `triton`."""
    triton_protocol: Literal["http", "grpc"] = "http"
    """How the `triton` model runner calls Triton: `http`, its HTTP/REST endpoint with binary
    tensors (when inference publishes one for the version; else gRPC), or `grpc`. Same
    answers, errors and trace either way; the benchmark picked `http` (a fraction of the
    gRPC client's CPU per call)."""
    triton_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    """TLS of the `triton` model runner's calls, for Tritons that serve gRPC over TLS (NVIDIA's
    `--grpc-use-ssl`): the CA, a client certificate for mutual TLS, the server name. On, the
    runner always calls Triton's gRPC endpoint (its HTTP one has no TLS), whatever
    `triton_protocol` says."""
    coalesce: bool = True
    """Micro-batching: concurrent model calls for one version go to the model as one batched
    call (what is waiting is sent as soon as a slot is free; see `coalesce_*`), and each
    caller gets its own rows back. A request refused for its input fails alone."""
    coalesce_max_batch_rows: int = Field(default=256, ge=1)
    """Most rows in one coalesced call (keep it at most Triton's max batch size)."""
    coalesce_max_batches: int = Field(default=1, ge=1)
    """Coalesced calls in flight per version at once; requests beyond them wait and ride
    together in the next one."""
    coalesce_budget_ms: float = Field(default=0.0, ge=0)
    """How long the first request of a batch may wait, when nothing is in flight, for the
    requests of its version already in the router (never for requests not yet sent: a
    request alone never waits); 0 (the default) never waits. Endpoints may set their own
    (`coalesce_budget_ms` in `endpoints` / `endpoint_defaults`)."""
    registry_target: str | None = None
    """The registry's `host:port`; resolved through discovery (service `registry`) when unset."""
    feature_target: str | None = None
    """The feature service's `host:port`; discovery (service `feature`) when unset."""
    inference_target: str | None = None
    """The inference service's `host:port`; discovery (service `inference`) when unset."""
    registry_api_key: SecretStr | None = None
    """API key sent to the registry (as `x-api-key`) when its auth is on; a `viewer` key is
    enough to follow deployments (or, over mutual TLS, the registry's `server.tls.client_roles`
    may give the router's certificate that role). Never logged."""
    inference_api_key: SecretStr | None = None
    """API key sent to the inference service, for an inference behind a gateway that checks
    keys. Never logged."""
    registry_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    """TLS of the calls to the registry (`registry_tls.enabled`, CA, client certificate for a
    registry that requires one); off: plaintext."""
    inference_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    """TLS of the calls to the inference service; off: plaintext."""
    feature_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings)
    """TLS of the calls to the feature service (`feature_reader: service`); off: plaintext."""
    ready_poll_ms: int | None = None
    """Retired: READY versions now come from inference's WatchModelStates stream. Still
    accepted, and ignored, so that settings files written for older routers keep loading."""
    watch_timeout_s: float = Field(default=3600.0, gt=0)
    """Deadline of one WatchDeployments or WatchModelStates stream; when it passes the stream
    is opened again (the channels' short default deadline would end it at once)."""
    watch_backoff_max_s: float = Field(default=5.0, gt=0)
    """Longest wait between reconnects of the deployment watch while the registry is away,
    and of the model-state watch while inference is (the wait doubles from 50 ms); the last
    snapshot keeps serving meanwhile."""
    shadow_max_in_flight: int = Field(default=64, ge=1)
    """Most shadow copies running at once; a copy beyond it is dropped and counted."""
    shadow_timeout_s: float = Field(default=2.0, gt=0)
    """Deadline of one shadow copy."""
    request_timeout_s: float = Field(default=2.0, gt=0)
    """Deadline for one Predict when the caller sets none."""
    feature_timeout_s: float = Field(default=0.5, gt=0)
    """Deadline of the feature read."""
    inference_timeout_s: float = Field(default=1.5, gt=0)
    """Deadline of the model call, counted from when the request queues for it (behind a
    coalesced call in flight); when it passes the call is UNAVAILABLE and the fallback chain
    answers."""
    endpoint_defaults: EndpointSettings = Field(default_factory=EndpointSettings)
    """Caching and limits of every endpoint without its own entry in `endpoints`."""
    endpoints: dict[str, EndpointSettings] = Field(default_factory=dict)
    """Endpoint id -> its own caching and limits, e.g. as JSON in `<P>ENDPOINTS`:
    `{"fraud": {"cache_max_entries": 10000, "max_in_flight": 200}}`."""
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)
    """The circuit breaker of each model version."""
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    """The token bucket of every caller without its own entry in `principal_rate_limits`."""
    principal_rate_limits: dict[str, RateLimitSettings] = Field(default_factory=dict)
    """Principal -> its own bucket (fields left out come from `rate_limit`), e.g.
    `{"batch-scorer": {"requests_per_s": 500, "burst": 1000}}`."""
    auth: AuthSettings = Field(default_factory=AuthSettings)
    """API keys of callers, as the registry checks them; off: every caller is `anonymous`."""

    @model_validator(mode="after")
    def _redis_url_is_standalone(self) -> RouterSettings:
        """`redis_url` and `redis` must not contradict each other."""
        self.redis_connection()
        return self

    def redis_connection(self) -> RedisConnection:
        """`redis` with `redis_url` applied, and the socket timeout defaulting to
        `feature_timeout_s` (the longest any Redis read on the request path may take);
        ValueError naming `redis_url` when that makes it invalid."""
        return with_redis_url(self.redis, self.redis_url, default_timeout_s=self.feature_timeout_s)

    def endpoint(self, name: str) -> EndpointSettings:
        """The settings of one endpoint: its entry over the defaults."""
        own = self.endpoints.get(name)
        if own is None:
            return self.endpoint_defaults
        return self.endpoint_defaults.model_copy(update=own.model_dump(exclude_unset=True))

    @property
    def endpoint_limits_in_use(self) -> bool:
        """Whether any endpoint may have a prediction cache, an in-flight limit or a batching
        budget of its own (when none may, requests skip that bookkeeping entirely)."""
        return any(
            e.cache_max_entries > 0
            or e.max_in_flight is not None
            or e.coalesce_budget_ms is not None
            for e in [self.endpoint_defaults, *(self.endpoint(n) for n in self.endpoints)]
        )

    def principal_rate_limit(self, principal: str) -> RateLimitSettings:
        """The bucket of one principal: its entry over `rate_limit`."""
        own = self.principal_rate_limits.get(principal)
        if own is None:
            return self.rate_limit
        return self.rate_limit.model_copy(update=own.model_dump(exclude_unset=True))

    @property
    def rate_limits_in_use(self) -> bool:
        """Whether any caller has a token bucket."""
        return any(
            r.requests_per_s is not None
            for r in [
                self.rate_limit,
                *(self.principal_rate_limit(p) for p in self.principal_rate_limits),
            ]
        )
