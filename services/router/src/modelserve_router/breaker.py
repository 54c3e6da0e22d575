"""Circuit breakers per model version: a version that keeps failing in inference is not called
for a cool-down, then one probe request decides whether it serves again."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import grpc
import structlog
from prometheus_client import Gauge

from modelserve_runtime.errors import ModelServeError, UnavailableError

log = structlog.get_logger()

CIRCUIT_STATE = Gauge(
    "modelserve_router_circuit_state",
    "Circuit breaker state per model version: 0 closed, 1 half-open, 2 open.",
    ["model_version"],
    # With several router processes: each has its own breakers, so one series per process.
    multiprocess_mode="liveall",
)

Clock = Callable[[], float]


class BreakerState(enum.IntEnum):
    """Where a breaker stands; the value is what the gauge shows."""

    CLOSED = 0
    """Calls go through; consecutive failures are counted."""
    HALF_OPEN = 1
    """The cool-down is over: one probe call is let through, the others are refused."""
    OPEN = 2
    """Calls are refused until the cool-down is over."""


class Admission(enum.Enum):
    """What a breaker says to one call."""

    CALL = "call"
    """Closed: call the version."""
    PROBE = "probe"
    """Half-open: this call is the one probe whose outcome closes or reopens the breaker."""
    REFUSED = "refused"
    """Open (or a probe is already out): do not call the version."""


class CircuitOpenError(UnavailableError):
    """The version's breaker is open: the version was not called."""

    default_reason = "CIRCUIT_OPEN"


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failed calls of one version; after
    `cool_down_s` it lets one probe through (half-open): its success closes the breaker,
    its failure opens it for another cool-down.

    Consecutive failures rather than a failure rate over a window: it needs no per-call
    bookkeeping, reacts within a known number of calls whatever the traffic, and a version
    that fails only some of the time keeps answering the rest (the fallback chain covers
    its failures one by one). Outcomes of calls admitted before the breaker last opened are
    ignored, so a slow failure that lands late cannot reopen a breaker a probe just closed.
    """

    __slots__ = (
        "_clock",
        "_cool_down_s",
        "_failure_threshold",
        "_on_change",
        "_opened_at",
        "_probing",
        "failures",
        "model_version",
        "state",
    )

    def __init__(
        self,
        model_version: str,
        *,
        failure_threshold: int,
        cool_down_s: float,
        clock: Clock = time.monotonic,
        on_change: Callable[[CircuitBreaker, BreakerState], None] | None = None,
    ) -> None:
        self.model_version = model_version
        self._failure_threshold = failure_threshold
        self._cool_down_s = cool_down_s
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self.failures = 0
        """Consecutive failures while closed."""
        self._opened_at = 0.0
        self._probing = False

    def admit(self) -> Admission:
        """Whether the next call may go to the version (and whether it is the probe)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Admission.CALL
        if state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self._cool_down_s:
                return Admission.REFUSED
            self._move(BreakerState.HALF_OPEN)
        if self._probing:
            return Admission.REFUSED
        self._probing = True
        return Admission.PROBE

    def succeeded(self, admission: Admission) -> None:
        """The admitted call answered."""
        if self.state is BreakerState.CLOSED:
            self.failures = 0
        elif admission is Admission.PROBE and self.state is BreakerState.HALF_OPEN:
            self._probing = False
            self.failures = 0
            self._move(BreakerState.CLOSED)

    def failed(self, admission: Admission) -> None:
        """The admitted call failed in a way that counts against the version."""
        if self.state is BreakerState.CLOSED:
            self.failures += 1
            if self.failures >= self._failure_threshold:
                self._open()
        elif admission is Admission.PROBE and self.state is BreakerState.HALF_OPEN:
            self._probing = False
            self._open()

    def abandoned(self, admission: Admission) -> None:
        """The admitted call ended in a way that says nothing about the version (the caller
        left, the input was refused): a probe's turn passes to the next call."""
        if admission is Admission.PROBE and self.state is BreakerState.HALF_OPEN:
            self._probing = False

    def retry_in_s(self) -> float:
        """How long until the breaker lets a probe through (0 once it would)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._cool_down_s - self._clock())

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._move(BreakerState.OPEN)

    def _move(self, state: BreakerState) -> None:
        previous, self.state = self.state, state
        if self._on_change is not None:
            self._on_change(self, previous)


class CircuitBreakers:
    """One breaker per model version, made on first use; each transition is logged and
    shown on the `modelserve_router_circuit_state` gauge."""

    def __init__(
        self, *, failure_threshold: int, cool_down_s: float, clock: Clock = time.monotonic
    ) -> None:
        self._failure_threshold = failure_threshold
        self._cool_down_s = cool_down_s
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, model_version: str) -> CircuitBreaker:
        """The version's breaker."""
        breaker = self._breakers.get(model_version)
        if breaker is None:
            breaker = self._breakers[model_version] = CircuitBreaker(
                model_version,
                failure_threshold=self._failure_threshold,
                cool_down_s=self._cool_down_s,
                clock=self._clock,
                on_change=self._changed,
            )
            CIRCUIT_STATE.labels(model_version).set(BreakerState.CLOSED)
        return breaker

    def state(self, model_version: str) -> BreakerState:
        """The version's breaker state (closed for a version never called)."""
        breaker = self._breakers.get(model_version)
        return BreakerState.CLOSED if breaker is None else breaker.state

    def _changed(self, breaker: CircuitBreaker, previous: BreakerState) -> None:
        CIRCUIT_STATE.labels(breaker.model_version).set(breaker.state)
        if breaker.state is BreakerState.OPEN:
            log.warning(
                "circuit_opened",
                model_version=breaker.model_version,
                previous=previous.name.lower(),
                failures=breaker.failures,
                cool_down_s=self._cool_down_s,
            )
        elif breaker.state is BreakerState.HALF_OPEN:
            log.info("circuit_half_opened", model_version=breaker.model_version)
        else:
            log.info("circuit_closed", model_version=breaker.model_version)


_FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
    }
)


def counts_against_version(error: BaseException) -> bool:
    """Whether a failed model call is the version's failure: UNAVAILABLE, DEADLINE_EXCEEDED,
    RESOURCE_EXHAUSTED, INTERNAL, or an unexpected exception (which the caller would see as
    INTERNAL). A refused input (INVALID_ARGUMENT, also when Triton said so behind an
    UNAVAILABLE), a version that is not READY and a caller that left say nothing about the
    version's health."""
    if isinstance(error, ModelServeError):
        if error.metadata.get("upstream_code") == grpc.StatusCode.INVALID_ARGUMENT.name:
            return False
        return error.code in _FAILURE_CODES
    # CancelledError (the caller left) is a BaseException, not an Exception.
    return isinstance(error, Exception)
