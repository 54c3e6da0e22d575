"""Overload limits that refuse early instead of queueing: a token bucket per caller and an
in-flight limit per endpoint, both answering RESOURCE_EXHAUSTED with a retry delay."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter

from modelserve_runtime.errors import ResourceExhaustedError

REFUSED = Counter(
    "modelserve_router_overload_refusals_total",
    "Predict calls refused with RESOURCE_EXHAUSTED before any work, by limit.",
    ["limit"],
)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Rate:
    """`per_s` tokens a second, at most `burst` saved up."""

    per_s: float
    burst: int


class TokenBucket:
    """Holds up to `burst` tokens, refilled at `rate_per_s`; each request takes one."""

    __slots__ = ("_burst", "_clock", "_rate", "_tokens", "_updated")

    def __init__(self, rate: Rate, *, clock: Clock = time.monotonic) -> None:
        self._rate = rate.per_s
        self._burst = float(rate.burst)
        self._clock = clock
        self._tokens = self._burst
        self._updated = clock()

    def take(self) -> float:
        """Takes a token and returns 0.0, or, when none is left, takes nothing and returns
        how many seconds until one is."""
        now = self._clock()
        tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self._rate


class CallerRateLimits:
    """A token bucket per principal: its own rate when it has one in `rates`, else
    `default` (None there: that caller is not limited)."""

    def __init__(
        self,
        default: Rate | None,
        rates: Mapping[str, Rate | None],
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self._default = default
        self._rates = dict(rates)
        self._clock = clock
        self._buckets: dict[str, TokenBucket | None] = {}

    def take(self, principal: str) -> None:
        """Takes one of the principal's tokens; ResourceExhaustedError (reason
        RATE_LIMITED, with the wait until the next token) when it has none."""
        try:
            bucket = self._buckets[principal]
        except KeyError:
            # Principals are the configured keys' holders, or `anonymous`: a bounded set.
            rate = self._rates.get(principal, self._default)
            bucket = self._buckets[principal] = (
                None if rate is None else TokenBucket(rate, clock=self._clock)
            )
        if bucket is None:
            return
        wait_s = bucket.take()
        if wait_s > 0.0:
            REFUSED.labels("rate").inc()
            raise ResourceExhaustedError(
                f"{principal} is over its request rate; retry in {wait_s:.3f} s",
                reason="RATE_LIMITED",
                metadata={"principal": principal},
                retry_delay_s=wait_s,
            )


class InFlightLimit:
    """At most `limit` requests of one endpoint at a time; the next one is refused at once
    with `retry_after_s` as its retry delay."""

    __slots__ = ("count", "endpoint", "limit", "retry_after_s")

    def __init__(self, endpoint: str, limit: int, retry_after_s: float) -> None:
        self.endpoint = endpoint
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.count = 0
        """Requests of the endpoint in flight now."""

    def enter(self) -> None:
        """Counts a request in; ResourceExhaustedError (reason ENDPOINT_OVERLOADED) when
        the endpoint is full."""
        if self.count >= self.limit:
            REFUSED.labels("in_flight").inc()
            raise ResourceExhaustedError(
                f"endpoint {self.endpoint} has {self.count} requests in flight, its limit",
                reason="ENDPOINT_OVERLOADED",
                metadata={"endpoint": self.endpoint, "max_in_flight": str(self.limit)},
                retry_delay_s=self.retry_after_s,
            )
        self.count += 1

    def leave(self) -> None:
        """Counts a request out."""
        self.count -= 1
