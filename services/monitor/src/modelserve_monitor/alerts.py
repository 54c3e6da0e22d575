"""Alert rules on the windowed figures: pending, firing after a for-duration, resolved.

Every change of an alert is appended to a Redis Stream in the same atomic step that saves
the alerts, numbered 1, 2, 3, ... (the entry id `{sequence}-0`), so WatchAlerts and the
webhooks read the alerts and the changes consistently and resume after any sequence.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

import redis.asyncio as redis
import structlog
from prometheus_client import Gauge

from modelserve_monitor.aggregate import SEP
from modelserve_monitor.config import AlertRuleSettings, AlertSettings
from modelserve_monitor.monitor import Clock, Monitor, VersionSummary
from modelserve_monitor.store import PREFIX, Window
from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
)

log = structlog.get_logger()

ALERTS = Gauge(
    "modelserve_monitor_alerts",
    "Alerts by rule, endpoint, version and state (1 when in that state).",
    ["rule", "endpoint", "version", "severity", "state"],
)

_ALERTS_KEY = f"{PREFIX}:alerts"
_EVENTS_KEY = f"{PREFIX}:alert_events"
#: Most changes one stream read returns.
_READ_COUNT = 100


class Severity(Enum):
    """How urgent an alert is."""

    WARNING = "warning"
    CRITICAL = "critical"


class Signal(Enum):
    """What a rule measures in its window."""

    LATENCY_P99_MS = "latency_p99_ms"
    ERROR_RATE = "error_rate"
    PREDICTION_MEAN_SHIFT = "prediction_mean_shift"
    FEATURE_PSI = "feature_psi"


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
    "feature_drift": Signal.FEATURE_PSI,
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
        return cls.from_dict(json.loads(raw))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        data = {**data, "severity": Severity(data["severity"]), "state": AlertState(data["state"])}
        return cls(**data)


class AlertEventType(Enum):
    """What an AlertEvent reports."""

    CURRENT = "current"
    SYNCED = "synced"
    CHANGED = "changed"
    DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """An alert as it stands (CURRENT), the end of those (SYNCED), or one change of an alert.

    `sequence` numbers the changes; CURRENT and SYNCED carry the newest change the snapshot
    includes. `previous_state` is the state before the change, None when the rule had no
    alert for the version; `time` is when the evaluation that made the change ran.
    """

    sequence: int
    type: AlertEventType
    alert: Alert | None
    previous_state: AlertState | None = None
    time: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready values (the webhook's body, and the stream's entry)."""
        alert = None
        if self.alert is not None:
            alert = asdict(self.alert)
            alert["severity"], alert["state"] = self.alert.severity.value, self.alert.state.value
        return {
            "sequence": self.sequence,
            "type": self.type.value,
            "previous_state": self.previous_state.value if self.previous_state else None,
            "time": self.time,
            "alert": alert,
        }

    @classmethod
    def from_entry(cls, sequence: int, fields: Mapping[bytes, bytes]) -> AlertEvent:
        """The change stored in a stream entry."""
        data = json.loads(fields[b"event"])
        previous = data["previous_state"]
        return cls(
            sequence=sequence,
            type=AlertEventType(data["type"]),
            alert=Alert.from_dict(data["alert"]),
            previous_state=AlertState(previous) if previous else None,
            time=data["time"],
        )


# Saves the alerts and appends their changes in one atomic step. A change's entry id is
# `{sequence}-0`, the sequence one past the stream's last id (kept by Redis even when the
# entries themselves were trimmed).
_SAVE_ALERTS = """
redis.call('DEL', KEYS[1])
local n_alerts = tonumber(ARGV[2])
local i = 3
for _ = 1, n_alerts do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local sequence = 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then
      sequence = tonumber(string.match(info[j + 1], '^(%d+)'))
    end
  end
end
local sequences = {}
for k = i, #ARGV do
  sequence = sequence + 1
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], sequence .. '-0', 'event', ARGV[k])
  sequences[#sequences + 1] = sequence
end
return sequences
"""


def _sequence(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


class AlertLog:
    """The alerts (a Redis hash) and the stream of their changes."""

    def __init__(self, client: redis.Redis, *, max_events: int) -> None:
        self._redis = client
        self._max_events = max_events
        self._save: Any = client.register_script(_SAVE_ALERTS)

    async def alerts(self) -> list[Alert]:
        """Every alert kept, ordered by rule, endpoint and version."""
        return _sorted(await self._redis.hgetall(_ALERTS_KEY))

    async def save(self, alerts: list[Alert], changes: list[AlertEvent]) -> list[AlertEvent]:
        """Replaces the alerts and appends the changes, atomically; returns them numbered."""
        args: list[str | int] = [self._max_events, len(alerts)]
        for a in alerts:
            args += [a.key, a.to_json()]
        for change in changes:
            data = change.to_dict()
            del data["sequence"]
            args.append(json.dumps(data))
        sequences = await self._save(keys=[_ALERTS_KEY, _EVENTS_KEY], args=args)
        return [replace(c, sequence=int(n)) for c, n in zip(changes, sequences, strict=True)]

    async def snapshot(self) -> tuple[list[Alert], int]:
        """The alerts and the sequence of the newest change they include, read together."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(_ALERTS_KEY)
            pipe.xrevrange(_EVENTS_KEY, count=1)
            raw, newest = await pipe.execute()
        return _sorted(raw), _sequence(newest[0][0]) if newest else 0

    async def bounds(self) -> tuple[int, int]:
        """The sequences of the oldest change kept and of the newest; (0, 0) when none."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xrange(_EVENTS_KEY, count=1)
            pipe.xrevrange(_EVENTS_KEY, count=1)
            oldest, newest = await pipe.execute()
        if not newest:
            return 0, 0
        return _sequence(oldest[0][0]), _sequence(newest[0][0])

    async def changes_after(self, sequence: int, *, block_ms: int | None) -> list[AlertEvent]:
        """The changes after `sequence`, oldest first; waits up to `block_ms` for one."""
        response: Any = await self._redis.xread(
            {_EVENTS_KEY: f"{sequence}-0"}, count=_READ_COUNT, block=block_ms
        )
        if not response:
            return []
        entries = next(iter(response.values())) if isinstance(response, Mapping) else response[0][1]
        return [AlertEvent.from_entry(_sequence(i), fields) for i, fields in entries]


def _sorted(raw: Mapping[Any, bytes | str]) -> list[Alert]:
    return sorted((Alert.from_json(v) for v in raw.values()), key=lambda a: a.key)


def trimmed_error(after: int, oldest: int) -> FailedPreconditionError:
    """The changes after `after` are no longer all kept: the oldest left is `oldest`."""
    return FailedPreconditionError(
        f"alert changes after {after} are no longer kept (the oldest is {oldest});"
        " watch again from 0 for the alerts as they stand",
        reason="ALERT_EVENTS_TRIMMED",
        metadata={"after_sequence": str(after), "oldest_sequence": str(oldest)},
    )


class AlertEvaluator:
    """Evaluates every rule for every version and keeps the alerts in Redis.

    A rule whose condition holds makes a PENDING alert; one that still holds `for_s`
    later FIRING; when the condition stops holding, a PENDING alert is dropped and a
    FIRING one RESOLVED (kept until the condition holds again, which starts a new
    PENDING alert). Every change is logged for WatchAlerts and the webhooks. Run one
    evaluator per Redis: replicas would race on transitions.
    """

    def __init__(
        self,
        log: AlertLog,
        monitor: Monitor,
        rules: tuple[AlertRule, ...],
        clock: Clock,
        *,
        block_ms: int = 1000,
    ) -> None:
        self._log = log
        self._monitor = monitor
        self._rules = rules
        self._clock = clock
        self._block_ms = block_ms
        self._closing = asyncio.Event()

    async def evaluate(self) -> list[Alert]:
        """Evaluates every rule once; returns the alerts as they stand after it."""
        now = self._clock()
        alerts = {a.key: a for a in await self.alerts()}
        changes: list[AlertEvent] = []
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
                    change = _change(current, updated, now)
                    if change is not None:
                        changes.append(change)
        for change in await self._save(list(alerts.values()), changes):
            if change.alert is not None:
                dropped = change.type is AlertEventType.DROPPED
                log.info(
                    "alert_changed",
                    sequence=change.sequence,
                    rule=change.alert.rule,
                    endpoint=change.alert.endpoint,
                    version=change.alert.model_version,
                    state="inactive" if dropped else change.alert.state.value,
                    value=change.alert.value,
                )
        return sorted(alerts.values(), key=lambda a: a.key)

    async def watch(self, endpoint: str, after_sequence: int) -> AsyncIterator[AlertEvent]:
        """The alerts as they stand (after_sequence 0), then every change after the last
        sequence sent, as it is made; only those of `endpoint` when given.

        Ends when `close_watches` is called. InvalidArgumentError for a negative sequence
        or one that was never given; FailedPreconditionError (`ALERT_EVENTS_TRIMMED`)
        when changes after it are no longer kept, now or while the watcher lags behind.
        """
        if after_sequence < 0:
            raise InvalidArgumentError.for_field("after_sequence", "must not be negative")
        cursor = after_sequence
        if after_sequence == 0:
            alerts, cursor = await self._log.snapshot()
            for alert in alerts:
                if not endpoint or alert.endpoint == endpoint:
                    yield AlertEvent(cursor, AlertEventType.CURRENT, alert)
            yield AlertEvent(cursor, AlertEventType.SYNCED, None)
        else:
            oldest, newest = await self._log.bounds()
            if after_sequence > newest:
                raise InvalidArgumentError.for_field(
                    "after_sequence", f"is past the newest alert change ({newest})"
                )
            if oldest > after_sequence + 1:
                raise trimmed_error(after_sequence, oldest)
        while not self._closing.is_set():
            for change in await self._log.changes_after(cursor, block_ms=self._block_ms):
                if change.sequence != cursor + 1:
                    raise trimmed_error(cursor, change.sequence)
                cursor = change.sequence
                if not endpoint or (change.alert and change.alert.endpoint == endpoint):
                    yield change

    def close_watches(self) -> None:
        """Ends every watch within one `block_ms` (at shutdown)."""
        self._closing.set()

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
        return await self._log.alerts()

    async def _value(self, rule: AlertRule, endpoint: str, summary: VersionSummary) -> float | None:
        if rule.signal is Signal.LATENCY_P99_MS:
            return summary.latency_p99_ms if summary.request_count else None
        if rule.signal is Signal.ERROR_RATE:
            # A version failing behind its fallbacks fails all the same: its callers get
            # degraded answers.
            failed = summary.error_count + summary.degraded_count
            return failed / summary.request_count if summary.request_count else None
        if rule.signal is Signal.FEATURE_PSI:
            if summary.request_count < rule.min_requests:
                return None  # the rule cannot hold: spare the PSI of every feature
            largest = await self._monitor.largest_feature_psi(
                endpoint, summary.model_version, rule.window
            )
            return None if largest is None else largest[1]
        baseline_mean = await self._monitor.baseline_prediction_mean(
            endpoint, summary.model_version
        )
        if baseline_mean is None or not summary.predictions.count:
            return None
        return abs(summary.predictions.mean - baseline_mean)

    async def _save(self, alerts: list[Alert], changes: list[AlertEvent]) -> list[AlertEvent]:
        numbered = await self._log.save(alerts, changes)
        ALERTS.clear()
        for a in alerts:
            ALERTS.labels(a.rule, a.endpoint, a.model_version, a.severity.value, a.state.value).set(
                1
            )
        return numbered


def _change(current: Alert | None, updated: Alert | None, now: float) -> AlertEvent | None:
    """The change from `current` to `updated` (sequence not yet given); None when none."""
    if updated is None:
        if current is None:
            return None
        return AlertEvent(0, AlertEventType.DROPPED, current, current.state, now)
    if current is None:
        return AlertEvent(0, AlertEventType.CHANGED, updated, None, now)
    if current.state is updated.state:
        return None
    return AlertEvent(0, AlertEventType.CHANGED, updated, current.state, now)


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
