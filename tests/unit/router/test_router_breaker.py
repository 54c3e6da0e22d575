"""The circuit breaker's state machine on an injected clock, and which failures count."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from modelserve_router.breaker import (
    Admission,
    BreakerState,
    CircuitBreaker,
    CircuitBreakers,
    counts_against_version,
)
from modelserve_runtime.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelServeError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

V1 = "models/fraud/versions/1"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, threshold: int = 3, cool_down_s: float = 10.0) -> CircuitBreaker:
    return CircuitBreaker(V1, failure_threshold=threshold, cool_down_s=cool_down_s, clock=clock)


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        admission = b.admit()
        assert admission is not Admission.REFUSED
        b.failed(admission)


class TestCircuitBreaker:
    def test_opens_after_threshold_consecutive_failures(self) -> None:
        """Threshold-1 failures leave it closed; the threshold-th opens it and calls are
        refused from then on."""
        clock = Clock()
        b = breaker(clock)
        fail(b, 2)
        assert (b.state, b.admit()) == (BreakerState.CLOSED, Admission.CALL)
        fail(b, 1)
        assert b.state is BreakerState.OPEN
        assert b.admit() is Admission.REFUSED

    def test_success_resets_the_count(self) -> None:
        """Failures count only while consecutive: a success in between starts over."""
        b = breaker(Clock())
        fail(b, 2)
        b.succeeded(b.admit())
        fail(b, 2)
        assert b.state is BreakerState.CLOSED
        fail(b, 1)
        assert b.state is BreakerState.OPEN

    def test_half_opens_after_cool_down_with_a_single_probe(self) -> None:
        """Before the cool-down ends calls are refused; after it exactly one probe is let
        through while the others are refused."""
        clock = Clock()
        b = breaker(clock, cool_down_s=10.0)
        fail(b, 3)
        clock.now += 9.9
        assert b.admit() is Admission.REFUSED
        assert b.retry_in_s() == pytest.approx(0.1)
        clock.now += 0.1
        assert b.admit() is Admission.PROBE
        assert b.state is BreakerState.HALF_OPEN
        assert b.admit() is Admission.REFUSED

    def test_probe_success_closes(self) -> None:
        """A successful probe closes the breaker and calls flow again."""
        clock = Clock()
        b = breaker(clock)
        fail(b, 3)
        clock.now += 10
        probe = b.admit()
        b.succeeded(probe)
        assert (b.state, b.failures, b.admit()) == (BreakerState.CLOSED, 0, Admission.CALL)

    def test_probe_failure_reopens_for_another_cool_down(self) -> None:
        """A failed probe opens the breaker again, counting the cool-down from the probe."""
        clock = Clock()
        b = breaker(clock)
        fail(b, 3)
        clock.now += 10
        b.failed(b.admit())
        assert b.state is BreakerState.OPEN
        clock.now += 9.9
        assert b.admit() is Admission.REFUSED
        clock.now += 0.1
        assert b.admit() is Admission.PROBE

    def test_abandoned_probe_passes_the_turn(self) -> None:
        """A probe that says nothing (the caller left) keeps the breaker half-open and lets
        the next call probe."""
        clock = Clock()
        b = breaker(clock)
        fail(b, 3)
        clock.now += 10
        b.abandoned(b.admit())
        assert b.state is BreakerState.HALF_OPEN
        assert b.admit() is Admission.PROBE

    def test_late_outcomes_of_earlier_calls_are_ignored(self) -> None:
        """Calls admitted while closed that end after the breaker opened change nothing: a
        late success does not close it, a late failure does not restart its cool-down."""
        clock = Clock()
        b = breaker(clock)
        early = [b.admit() for _ in range(5)]
        for admission in early[:3]:
            b.failed(admission)
        assert b.state is BreakerState.OPEN
        b.succeeded(early[3])
        assert b.state is BreakerState.OPEN
        clock.now += 10
        probe = b.admit()
        b.failed(early[4])
        assert b.state is BreakerState.HALF_OPEN
        b.succeeded(probe)
        assert b.state is BreakerState.CLOSED


def _gauge(version: str) -> float | None:
    return REGISTRY.get_sample_value("modelserve_router_circuit_state", {"model_version": version})


class TestCircuitBreakers:
    def test_transitions_are_logged_and_exported(self) -> None:
        """Each transition logs an event naming the version and sets the gauge: 0 closed,
        2 open, 1 half-open."""
        clock = Clock()
        version = "models/breaker-gauge/versions/1"
        breakers = CircuitBreakers(failure_threshold=2, cool_down_s=5, clock=clock)
        with capture_logs() as logs:
            b = breakers.get(version)
            assert _gauge(version) == 0
            fail(b, 2)
            assert _gauge(version) == 2
            clock.now += 5
            probe = b.admit()
            assert _gauge(version) == 1
            b.succeeded(probe)
            assert _gauge(version) == 0
        assert [(e["event"], e["model_version"]) for e in logs] == [
            ("circuit_opened", version),
            ("circuit_half_opened", version),
            ("circuit_closed", version),
        ]
        assert breakers.get(version) is b
        assert breakers.state("models/never/versions/1") is BreakerState.CLOSED


class TestWhatCounts:
    @pytest.mark.parametrize(
        "error",
        [
            UnavailableError("triton down"),
            DeadlineExceededError("slow"),
            ResourceExhaustedError("queue full"),
            TimeoutError(),
            RuntimeError("bug"),
        ],
    )
    def test_failures_of_the_version(self, error: BaseException) -> None:
        """UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and unexpected errors count."""
        assert counts_against_version(error)

    @pytest.mark.parametrize(
        "error",
        [
            InvalidArgumentError("bad input"),
            UnavailableError("triton refused", metadata={"upstream_code": "INVALID_ARGUMENT"}),
            FailedPreconditionError("not READY"),
            NotFoundError("gone"),
            ModelServeError("unknown"),
            asyncio.CancelledError(),
        ],
    )
    def test_not_failures_of_the_version(self, error: BaseException) -> None:
        """A refused input (also behind an UNAVAILABLE from Triton), a version that is not
        there and a caller that left do not count."""
        assert not counts_against_version(error)
