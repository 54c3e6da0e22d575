"""Token buckets per caller and the in-flight limit per endpoint, on an injected clock."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modelserve_router.config import RouterSettings
from modelserve_router.limits import CallerRateLimits, InFlightLimit, Rate, TokenBucket
from modelserve_runtime.errors import ResourceExhaustedError


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class TestTokenBucket:
    def test_burst_then_wait_for_the_next_token(self) -> None:
        """A full bucket gives `burst` tokens at once; the next request learns exactly how
        long until a token is back, and gets it then."""
        clock = Clock()
        bucket = TokenBucket(Rate(per_s=2.0, burst=3), clock=clock)
        assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
        assert bucket.take() == pytest.approx(0.5)
        clock.now += 0.2
        assert bucket.take() == pytest.approx(0.3)
        clock.now += 0.3
        assert bucket.take() == 0.0
        assert bucket.take() == pytest.approx(0.5)

    def test_refill_stops_at_burst(self) -> None:
        """A long quiet spell saves up no more than `burst` tokens."""
        clock = Clock()
        bucket = TokenBucket(Rate(per_s=10.0, burst=2), clock=clock)
        bucket.take()
        clock.now += 3600
        assert [bucket.take() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]

    def test_refused_requests_take_nothing(self) -> None:
        """Refusals do not dig the bucket deeper: waiting the announced delay is enough."""
        clock = Clock()
        bucket = TokenBucket(Rate(per_s=1.0, burst=1), clock=clock)
        bucket.take()
        for _ in range(10):
            assert bucket.take() == pytest.approx(1.0)
        clock.now += 1.0
        assert bucket.take() == 0.0


class TestCallerRateLimits:
    def test_each_principal_has_its_own_bucket_and_rate(self) -> None:
        """One caller running dry leaves the others their tokens; a principal's own rate
        replaces the default, and None exempts it."""
        clock = Clock()
        limits = CallerRateLimits(Rate(1.0, 1), {"batch": Rate(1.0, 3), "ops": None}, clock=clock)
        limits.take("alice")
        with pytest.raises(ResourceExhaustedError) as refused:
            limits.take("alice")
        assert refused.value.reason == "RATE_LIMITED"
        assert refused.value.retry_delay_s == pytest.approx(1.0)
        assert refused.value.metadata == {"principal": "alice"}
        limits.take("bob")
        for _ in range(3):
            limits.take("batch")
        with pytest.raises(ResourceExhaustedError):
            limits.take("batch")
        for _ in range(100):
            limits.take("ops")

    def test_no_default_limits_only_named_principals(self) -> None:
        """Without a default rate only principals with their own rate are limited."""
        limits = CallerRateLimits(None, {"batch": Rate(1.0, 1)}, clock=Clock())
        for _ in range(100):
            limits.take("anonymous")
        limits.take("batch")
        with pytest.raises(ResourceExhaustedError):
            limits.take("batch")


class TestInFlightLimit:
    def test_refuses_beyond_the_limit_until_one_leaves(self) -> None:
        """The limit-th request enters, the next is refused with the configured retry delay,
        and one leaving makes room again."""
        limit = InFlightLimit("fraud", 2, retry_after_s=0.25)
        limit.enter()
        limit.enter()
        with pytest.raises(ResourceExhaustedError) as refused:
            limit.enter()
        assert (refused.value.reason, refused.value.retry_delay_s) == (
            "ENDPOINT_OVERLOADED",
            0.25,
        )
        assert limit.count == 2
        limit.leave()
        limit.enter()
        assert limit.count == 2


class TestSettings:
    def test_entries_take_what_they_leave_out_from_the_defaults(self) -> None:
        """An endpoint or principal entry overrides only the fields it names."""
        settings = RouterSettings.model_validate(
            {
                "endpoint_defaults": {"cache_ttl_s": 5, "max_in_flight": 10},
                "endpoints": {"fraud": {"cache_max_entries": 100}},
                "rate_limit": {"requests_per_s": 50, "burst": 5},
                "principal_rate_limits": {"batch": {"burst": 500}, "ops": {"requests_per_s": None}},
            }
        )
        fraud = settings.endpoint("fraud")
        assert (fraud.cache_max_entries, fraud.cache_ttl_s, fraud.max_in_flight) == (100, 5, 10)
        assert settings.endpoint("other").cache_max_entries == 0
        batch = settings.principal_rate_limit("batch")
        assert (batch.requests_per_s, batch.burst) == (50, 500)
        assert settings.principal_rate_limit("ops").requests_per_s is None
        assert settings.endpoint_limits_in_use and settings.rate_limits_in_use

    def test_everything_off_by_default(self) -> None:
        """With no settings there is no cache, no in-flight limit and no rate limit."""
        settings = RouterSettings()
        assert not settings.endpoint_limits_in_use
        assert not settings.rate_limits_in_use
        assert not settings.auth.enabled
        assert settings.circuit_breaker.enabled

    def test_an_endpoint_budget_turns_on_per_endpoint_state_and_must_not_be_negative(
        self,
    ) -> None:
        """An endpoint's own micro-batching budget alone makes the router keep per-endpoint
        state (where the budget lives); a negative one is refused, naming the field."""
        settings = RouterSettings.model_validate(
            {"endpoints": {"fraud": {"coalesce_budget_ms": 5}}}
        )
        assert settings.endpoint("fraud").coalesce_budget_ms == 5
        assert settings.endpoint("other").coalesce_budget_ms is None
        assert settings.endpoint_limits_in_use

        with pytest.raises(ValidationError, match="coalesce_budget_ms"):
            RouterSettings.model_validate({"endpoints": {"fraud": {"coalesce_budget_ms": -1}}})
