"""A/B experiments: arms compared with the first (control) arm on one metric, without peeking.

The sample size per arm is fixed in advance by the caller. Until every arm has reached it
the report says COLLECTING with the progress and compares nothing: a test looked at
again and again as data arrives finds a "significant" difference far more often than
its alpha says. Once every arm has its samples, each arm is compared with the control at
alpha divided by the number of comparisons (Bonferroni), with a confidence interval of
the difference at the same level.

An experiment can be started first (`start`): each arm's counters then are recorded as its
zero point, and a report for the experiment counts only what came after, so a control
version that served all traffic before the test brings none of it into the fixed sample.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from modelserve_monitor.aggregate import VersionAggregate
from modelserve_monitor.significance import (
    Alternative,
    ComparisonTest,
    MeanSample,
    Proportion,
    mean_difference_interval,
    proportion_difference_interval,
    two_proportion_z,
    welch_t,
)
from modelserve_monitor.store import AggregateStore, ExperimentStart, Window
from modelserve_runtime.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
)

Clock = Callable[[], float]

#: The experiment's significance level when the caller gives none.
DEFAULT_ALPHA = 0.05

#: An experiment id: the caller's (the registry uses the rollout's name).
_EXPERIMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_MODEL_VERSION = re.compile(r"models/[a-z][a-z0-9-]{0,62}/versions/[1-9][0-9]{0,17}")


class ExperimentMetric(Enum):
    """What an experiment compares; the unit in brackets is one sample."""

    ERROR_RATE = "error rate"  # [request]
    ACCURACY = "accuracy"  # [labelled outcome]
    OUTCOME_MEAN = "mean outcome value"  # [value outcome]
    ABSOLUTE_ERROR = "mean absolute error"  # [value outcome]
    PREDICTION_MEAN = "mean prediction"  # [prediction]


_UNITS = {
    ExperimentMetric.ERROR_RATE: "requests",
    ExperimentMetric.ACCURACY: "labelled outcomes",
    ExperimentMetric.OUTCOME_MEAN: "value outcomes",
    ExperimentMetric.ABSOLUTE_ERROR: "value outcomes",
    ExperimentMetric.PREDICTION_MEAN: "predictions",
}


class ExperimentVerdict(Enum):
    """Where an experiment stands."""

    COLLECTING = "collecting"
    SIGNIFICANT = "significant"
    NOT_SIGNIFICANT = "not_significant"


@dataclass(frozen=True, slots=True)
class ArmComparison:
    """One arm against the control: difference, its confidence interval, the test."""

    test: ComparisonTest
    difference: float
    relative_difference: float
    ci_lower: float
    ci_upper: float
    statistic: float
    p_value: float
    alpha: float
    significant: bool


@dataclass(frozen=True, slots=True)
class ExperimentArm:
    """One arm: its samples, progress, value, and (once decided) its comparison."""

    model_version: str
    sample_count: int
    progress: float
    value: float
    comparison: ArmComparison | None


@dataclass(frozen=True, slots=True)
class ExperimentReport:
    """The state of an experiment: verdict, progress, the reason in words, every arm."""

    endpoint: str
    metric: ExperimentMetric
    window: Window
    sample_size: int
    alpha: float
    verdict: ExperimentVerdict
    progress: float
    reason: str
    arms: list[ExperimentArm]


Sample = Proportion | MeanSample


def sample_of(metric: ExperimentMetric, aggregate: VersionAggregate) -> Sample:
    """The metric's samples in a version's figures."""
    if metric is ExperimentMetric.ERROR_RATE:
        # An arm whose requests the fallback chain answered did not answer them either.
        return Proportion(aggregate.failures, aggregate.requests)
    if metric is ExperimentMetric.ACCURACY:
        return Proportion(aggregate.correct, aggregate.labels)
    if metric is ExperimentMetric.OUTCOME_MEAN:
        return MeanSample(aggregate.values, aggregate.value_sum, aggregate.value_square_sum)
    if metric is ExperimentMetric.ABSOLUTE_ERROR:
        return MeanSample(
            aggregate.values, aggregate.absolute_error_sum, aggregate.absolute_error_square_sum
        )
    return MeanSample(
        aggregate.predictions.total, aggregate.predictions.sum, aggregate.prediction_square_sum
    )


def _value(sample: Sample) -> float:
    return sample.share if isinstance(sample, Proportion) else sample.mean


def compare(arm: Sample, control: Sample, alpha: float) -> ArmComparison:
    """An arm against the control at level alpha: two-sided test and confidence interval.

    Proportions: the pooled two-proportion z-test, with the Wald (unpooled) interval of the
    difference, so at the border the two can disagree. Means: Welch's t-test and interval.
    """
    if isinstance(arm, Proportion) and isinstance(control, Proportion):
        test = ComparisonTest.TWO_PROPORTION_Z
        result = two_proportion_z(arm, control, Alternative.TWO_SIDED)
        lower, upper = proportion_difference_interval(arm, control, alpha)
    elif isinstance(arm, MeanSample) and isinstance(control, MeanSample):
        test = ComparisonTest.WELCH_T
        result = welch_t(arm, control, Alternative.TWO_SIDED)
        lower, upper = mean_difference_interval(arm, control, alpha)
    else:
        raise TypeError("an arm and its control must be samples of one kind")
    difference = _value(arm) - _value(control)
    base = _value(control)
    return ArmComparison(
        test=test,
        difference=difference,
        relative_difference=difference / base if base else 0.0,
        ci_lower=lower,
        ci_upper=upper,
        statistic=result.statistic,
        p_value=result.p_value,
        alpha=alpha,
        significant=result.p_value < alpha,
    )


def analyse(
    arms: Sequence[tuple[str, Sample]], metric: ExperimentMetric, sample_size: int, alpha: float
) -> tuple[ExperimentVerdict, float, str, list[ExperimentArm]]:
    """The verdict, progress, reason and arms of an experiment; the first arm is the control."""
    unit = _UNITS[metric]
    progress = {name: min(1.0, sample.count / sample_size) for name, sample in arms}
    overall = min(progress.values())
    if overall < 1:
        behind = ", ".join(
            f"{name} {sample.count}" for name, sample in arms if sample.count < sample_size
        )
        reason = (
            f"COLLECTING: {overall * 100:.0f} % of the {sample_size} {unit} per arm"
            f" (short: {behind}); nothing is compared before every arm has them"
        )
        report = [
            ExperimentArm(name, sample.count, progress[name], _value(sample), None)
            for name, sample in arms
        ]
        return ExperimentVerdict.COLLECTING, overall, reason, report
    (control_name, control), treatments = arms[0], arms[1:]
    each = alpha / len(treatments)
    report = [ExperimentArm(control_name, control.count, 1.0, _value(control), None)]
    found = []
    for name, sample in treatments:
        comparison = compare(sample, control, each)
        report.append(ExperimentArm(name, sample.count, 1.0, _value(sample), comparison))
        if comparison.significant:
            found.append(
                f"{name} {metric.value} {_value(sample):.4g} vs {_value(control):.4g}"
                f" ({comparison.difference:+.4g}, {(1 - each) * 100:.4g} % CI"
                f" [{comparison.ci_lower:.4g}, {comparison.ci_upper:.4g}],"
                f" p = {comparison.p_value:.3g} < {each:.3g})"
            )
    if found:
        return ExperimentVerdict.SIGNIFICANT, 1.0, "SIGNIFICANT: " + "; ".join(found), report
    reason = (
        f"NOT_SIGNIFICANT: no arm's {metric.value} differs from {control_name}'s at"
        f" p < {each:.3g} with at least {sample_size} {unit} per arm"
    )
    return ExperimentVerdict.NOT_SIGNIFICANT, 1.0, reason, report


class ExperimentAnalysis:
    """Reports A/B experiments from the figures in the store."""

    def __init__(self, store: AggregateStore, clock: Clock = time.time) -> None:
        self._store = store
        self._clock = clock

    async def start(
        self, endpoint: str, arms: Sequence[str], experiment_id: str
    ) -> ExperimentStart:
        """Records each arm's counters now as the experiment's zero point; an experiment
        started before keeps its first start (`started` False). InvalidArgumentError names
        every wrong field; FailedPreconditionError when it was started with other arms."""
        violations = _arm_violations(endpoint, arms)
        named = not any(v.field == "arms" for v in violations)
        if named and not all(_MODEL_VERSION.fullmatch(arm) for arm in arms):
            violations.append(
                FieldViolation("arms", "each must be models/{model}/versions/{version}")
            )
        if not experiment_id:
            violations.append(FieldViolation("experiment_id", "is required"))
        elif not _EXPERIMENT_ID.fullmatch(experiment_id):
            violations.append(
                FieldViolation(
                    "experiment_id",
                    "must be 1-128 letters, digits, '.', '_', '-' or '/', starting with a"
                    " letter or digit",
                )
            )
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        start = await self._store.start_experiment(endpoint, experiment_id, arms, self._clock())
        if sorted(start.arms) != sorted(arms):
            raise FailedPreconditionError(
                f"experiment {experiment_id} of {endpoint} was started with the arms"
                f" {', '.join(start.arms)}",
                reason="EXPERIMENT_ARMS_DIFFER",
                metadata={
                    "endpoint": endpoint,
                    "experiment_id": experiment_id,
                    "arms": ",".join(start.arms),
                },
            )
        return start

    async def report(
        self,
        endpoint: str,
        arms: Sequence[str],
        metric: ExperimentMetric | None,
        sample_size: int,
        alpha: float,
        window: Window,
        experiment_id: str = "",
    ) -> ExperimentReport:
        """The experiment's state; `alpha` 0 means DEFAULT_ALPHA, TOTAL means since each
        version was first counted, or with `experiment_id` since the experiment started.
        InvalidArgumentError names every wrong field; NotFoundError when the experiment was
        not started for the endpoint or has no such arm."""
        violations = _arm_violations(endpoint, arms)
        if experiment_id and window is not Window.TOTAL:
            violations.append(
                FieldViolation("window", "must be unspecified when experiment_id is set")
            )
        if metric is None:
            violations.append(FieldViolation("metric", "is required"))
        if sample_size < 2:
            violations.append(FieldViolation("sample_size", "must be at least 2"))
        if not 0 <= alpha < 1:
            violations.append(FieldViolation("alpha", "must be between 0 and 1"))
        if violations or metric is None:
            raise InvalidArgumentError.from_violations(violations)
        alpha = alpha or DEFAULT_ALPHA
        if experiment_id:
            await self._check_started(endpoint, arms, experiment_id)
            counters = [
                await self._store.since_experiment_start(endpoint, arm, experiment_id)
                for arm in arms
            ]
        else:
            now = self._clock()
            counters = [await self._store.window(endpoint, arm, window, now) for arm in arms]
        samples = [(arm, sample_of(metric, c)) for arm, c in zip(arms, counters, strict=True)]
        verdict, progress, reason, report = analyse(samples, metric, sample_size, alpha)
        return ExperimentReport(
            endpoint=endpoint,
            metric=metric,
            window=window,
            sample_size=sample_size,
            alpha=alpha,
            verdict=verdict,
            progress=progress,
            reason=reason,
            arms=report,
        )

    async def _check_started(self, endpoint: str, arms: Sequence[str], experiment_id: str) -> None:
        started = await self._store.experiment_arms(endpoint, experiment_id)
        metadata = {"endpoint": endpoint, "experiment_id": experiment_id}
        if started is None:
            raise NotFoundError(
                f"experiment {experiment_id} was not started for endpoint {endpoint}",
                reason="EXPERIMENT_NOT_FOUND",
                metadata=metadata,
            )
        missing = [arm for arm in arms if arm not in started]
        if missing:
            raise NotFoundError(
                f"experiment {experiment_id} of endpoint {endpoint} has no arm"
                f" {', '.join(missing)} (its arms: {', '.join(started)})",
                reason="EXPERIMENT_ARM_NOT_FOUND",
                metadata=metadata | {"arms": ",".join(missing)},
            )


def _arm_violations(endpoint: str, arms: Sequence[str]) -> list[FieldViolation]:
    """What is wrong with an experiment's endpoint and arms."""
    violations = []
    if not endpoint:
        violations.append(FieldViolation("endpoint", "is required"))
    if len(arms) < 2:
        violations.append(FieldViolation("arms", "needs two or more versions"))
    elif any(not arm for arm in arms):
        violations.append(FieldViolation("arms", "must not hold an empty version"))
    elif len(set(arms)) != len(arms):
        violations.append(FieldViolation("arms", "must not name a version twice"))
    return violations
