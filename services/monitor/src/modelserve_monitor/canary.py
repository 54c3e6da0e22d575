"""Canary judgement: a canary version against the stable version over the same window.

Five checks, each asking "is the canary worse?": error rate (two-proportion z-test; failed
requests and those the fallback chain answered, `VersionAggregate.failures`),
latency (Mann-Whitney U from the latency histograms), prediction distribution
(Kolmogorov-Smirnov on the prediction histograms), and, when outcomes were recorded,
accuracy of labels (two-proportion z-test) and mean absolute error of values (Welch's t).
A check FAILs when its p-value is below its share of alpha and the canary is worse by
more than the check's tolerance, so a large sample alone does not fail a harmless change.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from modelserve_monitor.aggregate import VersionAggregate
from modelserve_monitor.drift import kolmogorov_smirnov
from modelserve_monitor.significance import (
    Alternative,
    ComparisonTest,
    MeanSample,
    Proportion,
    mann_whitney_u,
    two_proportion_z,
    welch_t,
)
from modelserve_monitor.store import AggregateStore, Window
from modelserve_runtime.errors import FieldViolation, InvalidArgumentError

Clock = Callable[[], float]

_WINDOW_WORDS = {
    Window.ONE_MINUTE: "the last minute",
    Window.FIVE_MINUTES: "the last 5 minutes",
    Window.ONE_HOUR: "the last hour",
}


@dataclass(frozen=True, slots=True)
class CanaryThresholds:
    """When a canary fails, and how many samples a judgement needs (see CanarySettings)."""

    alpha: float = 0.01
    min_requests: int = 500
    min_outcomes: int = 100
    max_error_rate_increase: float = 0.0
    max_latency_increase: float = 0.1
    max_prediction_shift: float = 0.1
    max_accuracy_decrease: float = 0.0
    max_absolute_error_increase: float = 0.0

    def violations(self) -> list[FieldViolation]:
        """What is wrong with these thresholds, as violations of `thresholds.<field>`."""
        found = []
        if not 0 < self.alpha < 1:
            found.append(FieldViolation("thresholds.alpha", "must be between 0 and 1"))
        for name in ("min_requests", "min_outcomes"):
            if getattr(self, name) < 1:
                found.append(FieldViolation(f"thresholds.{name}", "must be at least 1"))
        for name in (
            "max_error_rate_increase",
            "max_latency_increase",
            "max_prediction_shift",
            "max_accuracy_decrease",
            "max_absolute_error_increase",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                found.append(FieldViolation(f"thresholds.{name}", "must be 0 or more"))
        return found


class CanaryVerdict(Enum):
    """The verdict of a judgement, or of one of its checks."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    NOT_APPLICABLE = "not_applicable"


@dataclass(frozen=True, slots=True)
class CanaryCheck:
    """The evidence of one check: figures, effect, test, verdict and the reason in words."""

    name: str
    test: ComparisonTest
    verdict: CanaryVerdict
    canary_value: float
    stable_value: float
    effect: float
    tolerance: float
    statistic: float
    p_value: float
    alpha: float
    canary_count: int
    stable_count: int
    min_count: int
    reason: str


@dataclass(frozen=True, slots=True)
class CanaryJudgement:
    """The verdict (PASS, FAIL or INCONCLUSIVE), why, and every check."""

    endpoint: str
    canary_version: str
    stable_version: str
    window: Window
    verdict: CanaryVerdict
    reason: str
    checks: list[CanaryCheck]
    thresholds: CanaryThresholds
    judged_at: float


@dataclass(frozen=True, slots=True)
class _Evidence:
    """What a check measured, before the verdict."""

    canary_value: float
    stable_value: float
    effect: float
    statistic: float
    p_value: float
    detail: str


@dataclass(frozen=True, slots=True)
class _Plan:
    """A check to run: its samples, the minimum, the tolerance, how to measure."""

    name: str
    test: ComparisonTest
    canary_count: int
    stable_count: int
    min_count: int
    tolerance: float
    applicable: bool
    what: str
    measure: Callable[[], _Evidence]


def _percent(share: float) -> str:
    return f"{share * 100:.2f} %"


def _number(value: float) -> str:
    return f"{value:.4g}"


class CanaryJudge:
    """Judges a canary against the stable version from the figures in the store."""

    def __init__(
        self, store: AggregateStore, defaults: CanaryThresholds, clock: Clock = time.time
    ) -> None:
        self._store = store
        self._defaults = defaults
        self._clock = clock

    @property
    def defaults(self) -> CanaryThresholds:
        return self._defaults

    async def judge(
        self,
        endpoint: str,
        canary_version: str,
        stable_version: str,
        window: Window,
        overrides: Mapping[str, Any] | None = None,
    ) -> CanaryJudgement:
        """Compares the canary with the stable version over `window` (TOTAL means one hour).

        `overrides` replace fields of the configured thresholds. InvalidArgumentError names
        every missing or wrong field. A version without records is judged on zero samples
        (INCONCLUSIVE), as it is while a rollout has just started.
        """
        thresholds = dataclasses.replace(self._defaults, **(overrides or {}))
        violations = [
            FieldViolation(name, "is required")
            for name, value in (
                ("endpoint", endpoint),
                ("canary_version", canary_version),
                ("stable_version", stable_version),
            )
            if not value
        ]
        if canary_version and canary_version == stable_version:
            violations.append(FieldViolation("canary_version", "must differ from stable_version"))
        violations += thresholds.violations()
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        if window is Window.TOTAL:
            window = Window.ONE_HOUR
        now = self._clock()
        canary = await self._store.window(endpoint, canary_version, window, now)
        stable = await self._store.window(endpoint, stable_version, window, now)
        plans = _plans(canary, stable, thresholds)
        applicable = [p for p in plans if p.applicable]
        alpha = thresholds.alpha / len(applicable)
        checks = [_run(plan, alpha) for plan in plans]
        failed = [c for c in checks if c.verdict is CanaryVerdict.FAIL]
        short = [c for c in checks if c.verdict is CanaryVerdict.INCONCLUSIVE]
        if failed:
            verdict = CanaryVerdict.FAIL
            reason = "FAIL: " + "; ".join(f"{c.name}: {c.reason}" for c in failed)
        elif short:
            verdict = CanaryVerdict.INCONCLUSIVE
            reason = "INCONCLUSIVE: " + "; ".join(f"{c.name}: {c.reason}" for c in short)
        else:
            verdict = CanaryVerdict.PASS
            reason = (
                f"PASS: {len(applicable)} checks found {canary_version} no worse than"
                f" {stable_version} on {canary.requests} and {stable.requests} requests in"
                f" {_WINDOW_WORDS[window]}"
            )
        return CanaryJudgement(
            endpoint=endpoint,
            canary_version=canary_version,
            stable_version=stable_version,
            window=window,
            verdict=verdict,
            reason=reason,
            checks=checks,
            thresholds=thresholds,
            judged_at=now,
        )


def _plans(
    canary: VersionAggregate, stable: VersionAggregate, thresholds: CanaryThresholds
) -> list[_Plan]:
    def error_rate() -> _Evidence:
        c, s = (
            Proportion(canary.failures, canary.requests),
            Proportion(stable.failures, stable.requests),
        )
        result = two_proportion_z(c, s, Alternative.GREATER)
        return _Evidence(
            c.share,
            s.share,
            c.share - s.share,
            result.statistic,
            result.p_value,
            f"error rate {_percent(c.share)} vs {_percent(s.share)}"
            f" ({(c.share - s.share) * 100:+.2f} points)",
        )

    def latency() -> _Evidence:
        c = canary.latency_ms.interpolated_quantile(0.5)
        s = stable.latency_ms.interpolated_quantile(0.5)
        result = mann_whitney_u(canary.latency_ms, stable.latency_ms, Alternative.GREATER)
        effect = c / s - 1 if s else 0.0
        return _Evidence(
            c,
            s,
            effect,
            result.z,
            result.p_value,
            f"median latency {_number(c)} ms vs {_number(s)} ms ({effect * 100:+.1f} %),"
            f" P(canary slower) = {result.probability_greater:.3f}",
        )

    def predictions() -> _Evidence:
        c, s = canary.predictions, stable.predictions
        result = kolmogorov_smirnov(s, c, 1.0)
        return _Evidence(
            c.mean,
            s.mean,
            result.statistic,
            result.statistic,
            result.p_value,
            f"prediction distributions {result.statistic:.3f} apart (KS D),"
            f" mean {_number(c.mean)} vs {_number(s.mean)}",
        )

    def accuracy() -> _Evidence:
        c, s = Proportion(canary.correct, canary.labels), Proportion(stable.correct, stable.labels)
        result = two_proportion_z(s, c, Alternative.GREATER)
        return _Evidence(
            c.share,
            s.share,
            s.share - c.share,
            result.statistic,
            result.p_value,
            f"accuracy {_percent(c.share)} vs {_percent(s.share)}"
            f" ({(c.share - s.share) * 100:+.2f} points)",
        )

    def absolute_error() -> _Evidence:
        c = MeanSample(canary.values, canary.absolute_error_sum, canary.absolute_error_square_sum)
        s = MeanSample(stable.values, stable.absolute_error_sum, stable.absolute_error_square_sum)
        result = welch_t(c, s, Alternative.GREATER)
        # Relative; any error is infinitely worse than none.
        effect = c.mean / s.mean - 1 if s.mean else (math.inf if c.mean else 0.0)
        return _Evidence(
            c.mean,
            s.mean,
            effect,
            result.statistic,
            result.p_value,
            f"mean absolute error {_number(c.mean)} vs {_number(s.mean)} ({effect * 100:+.1f} %)",
        )

    requests = (canary.requests, stable.requests, thresholds.min_requests)
    predictions_seen = bool(canary.predictions.total or stable.predictions.total)
    return [
        _Plan(
            "error_rate",
            ComparisonTest.TWO_PROPORTION_Z,
            *requests,
            thresholds.max_error_rate_increase,
            True,
            "requests",
            error_rate,
        ),
        _Plan(
            "latency",
            ComparisonTest.MANN_WHITNEY_U,
            *requests,
            thresholds.max_latency_increase,
            True,
            "requests",
            latency,
        ),
        _Plan(
            "prediction_distribution",
            ComparisonTest.KOLMOGOROV_SMIRNOV,
            canary.predictions.total,
            stable.predictions.total,
            thresholds.min_requests,
            thresholds.max_prediction_shift,
            predictions_seen,
            "predictions",
            predictions,
        ),
        _Plan(
            "accuracy",
            ComparisonTest.TWO_PROPORTION_Z,
            canary.labels,
            stable.labels,
            thresholds.min_outcomes,
            thresholds.max_accuracy_decrease,
            bool(canary.labels or stable.labels),
            "labelled outcomes",
            accuracy,
        ),
        _Plan(
            "absolute_error",
            ComparisonTest.WELCH_T,
            canary.values,
            stable.values,
            thresholds.min_outcomes,
            thresholds.max_absolute_error_increase,
            bool(canary.values or stable.values),
            "value outcomes",
            absolute_error,
        ),
    ]


def _run(plan: _Plan, alpha: float) -> CanaryCheck:
    def check(verdict: CanaryVerdict, reason: str, evidence: _Evidence | None) -> CanaryCheck:
        return CanaryCheck(
            name=plan.name,
            test=plan.test,
            verdict=verdict,
            canary_value=evidence.canary_value if evidence else 0.0,
            stable_value=evidence.stable_value if evidence else 0.0,
            effect=evidence.effect if evidence else 0.0,
            tolerance=plan.tolerance,
            statistic=evidence.statistic if evidence else 0.0,
            p_value=evidence.p_value if evidence else 1.0,
            alpha=alpha if plan.applicable else 0.0,
            canary_count=plan.canary_count,
            stable_count=plan.stable_count,
            min_count=plan.min_count,
            reason=reason,
        )

    if not plan.applicable:
        return check(CanaryVerdict.NOT_APPLICABLE, f"no {plan.what} for either version", None)
    evidence = plan.measure() if plan.canary_count and plan.stable_count else None
    # No evidence means an empty side, which is always below the minimum (at least 1).
    if evidence is None or min(plan.canary_count, plan.stable_count) < plan.min_count:
        reason = (
            f"too few {plan.what}: canary {plan.canary_count}, stable {plan.stable_count},"
            f" {plan.min_count} each needed"
        )
        return check(CanaryVerdict.INCONCLUSIVE, reason, evidence)
    significant = evidence.p_value < alpha
    beyond = evidence.effect > plan.tolerance
    test = f"p = {evidence.p_value:.3g}"
    if significant and beyond:
        reason = (
            f"{evidence.detail}: worse, {test} < {alpha:.3g} and the effect"
            f" {evidence.effect:.4g} exceeds the tolerated {plan.tolerance:.4g}"
        )
        return check(CanaryVerdict.FAIL, reason, evidence)
    if significant:
        why = f"{test} < {alpha:.3g} but the effect {evidence.effect:.4g} is within {plan.tolerance:.4g}"
    else:
        why = f"{test} is not below {alpha:.3g}"
    return check(CanaryVerdict.PASS, f"{evidence.detail}: {why}", evidence)
