"""Alert rules on the windowed figures: pending, firing after a for-duration, resolved."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, replace
from enum import Enum

import redis.asyncio as redis
import structlog
from prometheus_client import Gauge

from modelserve_monitor.aggregate import SEP
from modelserve_monitor.config import AlertRuleSettings, AlertSettings
from modelserve_monitor.monitor import Clock, Monitor, VersionSummary
from modelserve_monitor.store import PREFIX, Window
from modelserve_runtime.errors import FieldViolation, InvalidArgumentError

log = structlog.get_logger()

ALERTS = Gauge(
    "modelserve_monitor_alerts",
    "Alerts by rule, endpoint, version and state (1 when in that state).",
    ["rule", "endpoint", "version", "severity", "state"],
)

_ALERTS_KEY = f"{PREFIX}:alerts"


class Severity(Enum):
    """How urgent an alert is."""

    WARNING = "warning"
    CRITICAL = "critical"


class Signal(Enum):
    """What a rule measures in its window."""

    LATENCY_P99_MS = "latency_p99_ms"
    ERROR_RATE = "error_rate"
    PREDICTION_MEAN_SHIFT = "prediction_mean_shift"


class AlertState(Enum):
    """Where an alert is in its life."""

    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class AlertRule:
    """Alert `name` when `signal` over `window` exceeds `threshold` for `for_s` seconds."""

    name: str
    signal: Signal
    threshold: float
    severity: Severity
    for_s: float
    window: Window = Window.FIVE_MINUTES
    min_requests: int = 1


#: What each configurable rule measures.
RULE_SIGNALS = {
    "model_latency_high": Signal.LATENCY_P99_MS,
    "error_rate_high": Signal.ERROR_RATE,
    "prediction_drift": Signal.PREDICTION_MEAN_SHIFT,
}


def rules_from(settings: AlertSettings) -> tuple[AlertRule, ...]:
    """The alert rules the settings configure."""
    windows = {"1m": Window.ONE_MINUTE, "5m": Window.FIVE_MINUTES, "1h": Window.ONE_HOUR}
    rules = []
    for name, signal in RULE_SIGNALS.items():
        rule: AlertRuleSettings = getattr(settings, name)
        rules.append(
            AlertRule(
                name=name,
                signal=signal,
                threshold=rule.threshold,
                severity=Severity(rule.severity),
                for_s=rule.for_s,
                window=windows[rule.window],
                min_requests=rule.min_requests,
            )
        )
    return tuple(rules)


#: Page size of ListAlerts when none is asked for, and the most it gives.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert of a rule for a version: its state, the value seen last, and when things happened."""

    rule: str
    endpoint: str
    model_version: str
    severity: Severity
    state: AlertState
    value: float
    threshold: float
    active_since: float
    fired_at: float | None
    resolved_at: float | None

    @property
    def key(self) -> str:
        return SEP.join((self.rule, self.endpoint, self.model_version))

    def to_json(self) -> str:
        data = asdict(self)
        data["severity"], data["state"] = self.severity.value, self.state.value
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Alert:
        data = json.loads(raw)
        data["severity"], data["state"] = Severity(data["severity"]), AlertState(data["state"])
        return cls(**data)


class AlertEvaluator:
    """Evaluates every rule for every version and keeps the alerts in Redis.

    A rule whose condition holds makes a PENDING alert; one that still holds `for_s`
    later FIRING; when the condition stops holding, a PENDING alert is dropped and a
    FIRING one RESOLVED (kept until the condition holds again, which starts a new
    PENDING alert). Run one evaluator per Redis: replicas would race on transitions.
    """

    def __init__(
        self, client: redis.Redis, monitor: Monitor, rules: tuple[AlertRule, ...], clock: Clock
    ) -> None:
        self._redis = client
        self._monitor = monitor
        self._rules = rules
        self._clock = clock

    async def evaluate(self) -> list[Alert]:
        """Evaluates every rule once; returns the alerts as they stand after it."""
        now = self._clock()
        alerts = {a.key: a for a in await self.alerts()}
        for endpoint in await self._monitor.endpoints():
            for model_version in await self._monitor.versions(endpoint):
                windows: dict[Window, VersionSummary] = {}
                for rule in self._rules:
                    if rule.window not in windows:
                        windows[rule.window] = await self._monitor.version_window(
                            endpoint, model_version, rule.window
                        )
                    summary = windows[rule.window]
                    value = await self._value(rule, endpoint, summary)
                    holds = (
                        summary.request_count >= rule.min_requests
                        and value is not None
                        and value > rule.threshold
                    )
                    key = SEP.join((rule.name, endpoint, model_version))
                    current = alerts.get(key)
                    updated = _transition(current, rule, endpoint, model_version, value, holds, now)
                    if updated is None:
                        alerts.pop(key, None)
                    else:
                        alerts[key] = updated
                    if (updated and updated.state) != (current and current.state):
                        log.info(
                            "alert_changed",
                            rule=rule.name,
                            endpoint=endpoint,
                            version=model_version,
                            state=updated.state.value if updated else "inactive",
                            value=value,
                        )
        await self._save(list(alerts.values()))
        return sorted(alerts.values(), key=lambda a: a.key)

    async def list_alerts(
        self,
        *,
        endpoint: str = "",
        state: AlertState | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Alert], str]:
        """A page of the alerts, filtered by endpoint and state, and the next page's token."""
        violations = []
        if page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative"))
        if page_token and not page_token.isdigit():
            violations.append(FieldViolation("page_token", "is not a token this service gave"))
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start = int(page_token or 0)
        selected = [
            a
            for a in await self.alerts()
            if (not endpoint or a.endpoint == endpoint) and (state is None or a.state is state)
        ]
        page = selected[start : start + size]
        more = start + size < len(selected)
        return page, str(start + size) if more else ""

    async def alerts(self) -> list[Alert]:
        """Every alert kept, ordered by rule, endpoint and version."""
        raw = await self._redis.hgetall(_ALERTS_KEY)
        return sorted((Alert.from_json(v) for v in raw.values()), key=lambda a: a.key)

    async def _value(self, rule: AlertRule, endpoint: str, summary: VersionSummary) -> float | None:
        if rule.signal is Signal.LATENCY_P99_MS:
            return summary.latency_p99_ms if summary.request_count else None
        if rule.signal is Signal.ERROR_RATE:
            return summary.error_count / summary.request_count if summary.request_count else None
        baseline_mean = await self._monitor.baseline_prediction_mean(
            endpoint, summary.model_version
        )
        if baseline_mean is None or not summary.predictions.count:
            return None
        return abs(summary.predictions.mean - baseline_mean)

    async def _save(self, alerts: list[Alert]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(_ALERTS_KEY)
            if alerts:
                pipe.hset(_ALERTS_KEY, mapping={a.key: a.to_json() for a in alerts})
            await pipe.execute()
        ALERTS.clear()
        for a in alerts:
            ALERTS.labels(a.rule, a.endpoint, a.model_version, a.severity.value, a.state.value).set(
                1
            )


def _transition(
    current: Alert | None,
    rule: AlertRule,
    endpoint: str,
    model_version: str,
    value: float | None,
    holds: bool,
    now: float,
) -> Alert | None:
    """The alert after one evaluation; None when there is none."""
    seen = value if value is not None else 0.0
    if not holds:
        if current is None or current.state is AlertState.PENDING:
            return None
        if current.state is AlertState.FIRING:
            return replace(current, state=AlertState.RESOLVED, value=seen, resolved_at=now)
        return current
    if current is None or current.state is AlertState.RESOLVED:
        current = Alert(
            rule=rule.name,
            endpoint=endpoint,
            model_version=model_version,
            severity=rule.severity,
            state=AlertState.PENDING,
            value=seen,
            threshold=rule.threshold,
            active_since=now,
            fired_at=None,
            resolved_at=None,
        )
    if current.state is AlertState.PENDING and now - current.active_since >= rule.for_s:
        return replace(current, state=AlertState.FIRING, value=seen, fired_at=now)
    return replace(current, value=seen)


async def evaluate_forever(evaluator: AlertEvaluator, interval_s: float) -> None:
    """Evaluates every `interval_s`; a Redis failure is logged and retried at the next turn."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await evaluator.evaluate()
        except redis.RedisError as exc:
            log.warning("alert_evaluation_failed", error=str(exc))
