"""Two-sample significance tests on the monitor's counters and histograms (no raw values kept).

Proportions (error rate, accuracy) are compared with the pooled two-proportion z-test;
means of values (predictions, outcome values, absolute errors) with Welch's t-test from
count, sum and sum of squares; latency with Mann-Whitney U computed from the two
histograms, whose values are known only to their bucket: values in one bucket count as
ties, which the tie correction of the variance accounts for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from scipy import stats  # type: ignore[import-untyped]  # scipy ships no stubs

from modelserve_monitor.histogram import Histogram


class ComparisonTest(Enum):
    """The tests behind a comparison of two versions."""

    TWO_PROPORTION_Z = "two_proportion_z"
    MANN_WHITNEY_U = "mann_whitney_u"
    KOLMOGOROV_SMIRNOV = "kolmogorov_smirnov"
    WELCH_T = "welch_t"


class Alternative(Enum):
    """What the test looks for: the first sample larger (one-sided), or any difference."""

    GREATER = "greater"
    TWO_SIDED = "two-sided"


@dataclass(frozen=True, slots=True)
class SignificanceResult:
    """A test statistic and its p-value."""

    statistic: float
    p_value: float


@dataclass(frozen=True, slots=True)
class Proportion:
    """`successes` out of `count` (errors of requests, correct labels of labels)."""

    successes: int
    count: int

    @property
    def share(self) -> float:
        return self.successes / self.count if self.count else 0.0


@dataclass(frozen=True, slots=True)
class MeanSample:
    """Values known by their count, sum and sum of squares."""

    count: int
    total: float
    square_total: float

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def variance(self) -> float:
        """The unbiased sample variance; 0 with fewer than two values."""
        if self.count < 2:
            return 0.0
        # The sums lose precision for values far from zero; clamp the rounding below zero.
        return max(0.0, (self.square_total - self.total * self.mean) / (self.count - 1))


def _p_value(z: float, alternative: Alternative) -> float:
    if alternative is Alternative.GREATER:
        return float(stats.norm.sf(z))
    return float(min(1.0, 2.0 * stats.norm.sf(abs(z))))


def two_proportion_z(a: Proportion, b: Proportion, alternative: Alternative) -> SignificanceResult:
    """Pooled two-proportion z-test of share(a) - share(b).

    An empty sample gives z = 0 and p = 1; a pooled share of 0 or 1 (no spread: the two
    cannot differ) gives z = 0, so p = 0.5 one-sided and 1 two-sided.
    """
    if not a.count or not b.count:
        return SignificanceResult(0.0, 1.0)
    pooled = (a.successes + b.successes) / (a.count + b.count)
    se = math.sqrt(pooled * (1 - pooled) * (1 / a.count + 1 / b.count))
    z = (a.share - b.share) / se if se else 0.0
    return SignificanceResult(z, _p_value(z, alternative))


def proportion_difference_interval(
    a: Proportion, b: Proportion, alpha: float
) -> tuple[float, float]:
    """The Wald (unpooled) confidence interval of share(a) - share(b) at level 1 - alpha."""
    difference = a.share - b.share
    if not a.count or not b.count:
        return difference, difference
    se = math.sqrt(a.share * (1 - a.share) / a.count + b.share * (1 - b.share) / b.count)
    half = float(stats.norm.ppf(1 - alpha / 2)) * se
    return difference - half, difference + half


def _welch(a: MeanSample, b: MeanSample) -> tuple[float, float]:
    """The standard error of mean(a) - mean(b) and the Welch-Satterthwaite degrees of freedom."""
    va, vb = a.variance / a.count, b.variance / b.count
    se = math.sqrt(va + vb)
    if not se:
        return 0.0, float(a.count + b.count - 2)
    df = (va + vb) ** 2 / (va**2 / (a.count - 1) + vb**2 / (b.count - 1))
    return se, df


def welch_t(a: MeanSample, b: MeanSample, alternative: Alternative) -> SignificanceResult:
    """Welch's t-test of mean(a) - mean(b), as scipy's `ttest_ind(equal_var=False)`.

    t is 0 and p is 1 with fewer than two values on a side. With no spread on either side,
    equal means give p = 1 and different means p = 0 (or 1, one-sided, when a is smaller).
    """
    if a.count < 2 or b.count < 2:
        return SignificanceResult(0.0, 1.0)
    difference = a.mean - b.mean
    se, df = _welch(a, b)
    if not se:
        if difference == 0:
            return SignificanceResult(0.0, 1.0)
        worse = difference > 0 or alternative is Alternative.TWO_SIDED
        return SignificanceResult(math.copysign(math.inf, difference), 0.0 if worse else 1.0)
    t = difference / se
    if alternative is Alternative.GREATER:
        return SignificanceResult(t, float(stats.t.sf(t, df)))
    return SignificanceResult(t, float(min(1.0, 2.0 * stats.t.sf(abs(t), df))))


def mean_difference_interval(a: MeanSample, b: MeanSample, alpha: float) -> tuple[float, float]:
    """Welch's confidence interval of mean(a) - mean(b) at level 1 - alpha."""
    difference = a.mean - b.mean
    if a.count < 2 or b.count < 2:
        return -math.inf, math.inf
    se, df = _welch(a, b)
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    return difference - half, difference + half


@dataclass(frozen=True, slots=True)
class MannWhitney:
    """Mann-Whitney U of sample a, the continuity-corrected z of the test, and its p-value."""

    u: float
    z: float
    p_value: float
    count_a: int
    count_b: int

    @property
    def probability_greater(self) -> float:
        """The common-language effect size: P(a > b) + P(a = b) / 2, from the buckets."""
        pairs = self.count_a * self.count_b
        return self.u / pairs if pairs else 0.5


def mann_whitney_u(a: Histogram, b: Histogram, alternative: Alternative) -> MannWhitney:
    """Mann-Whitney U of a against b from two histograms with the same buckets.

    U counts the pairs (x from a, y from b) with x > y, plus half of the pairs in the same
    bucket: values of different buckets are ordered exactly (buckets never overlap), and
    values of one bucket, whose order is unknown, count as ties. The p-value is the normal
    approximation with the tie-corrected variance and a continuity correction, as scipy's
    `mannwhitneyu(method="asymptotic")` computes it on the values rounded to their bucket.
    """
    buckets = sorted(set(a.counts) | set(b.counts))
    n_a, n_b = sum(a.counts.values()), sum(b.counts.values())
    n = n_a + n_b
    if not n_a or not n_b:
        return MannWhitney(0.0, 0.0, 1.0, n_a, n_b)
    u, below_b, ties = 0.0, 0, 0
    for bucket in buckets:
        in_a, in_b = a.counts.get(bucket, 0), b.counts.get(bucket, 0)
        u += in_a * (below_b + in_b / 2)
        below_b += in_b
        tied = in_a + in_b
        ties += tied**3 - tied
    mean = n_a * n_b / 2
    variance = n_a * n_b / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        return MannWhitney(u, 0.0, 1.0, n_a, n_b)
    if alternative is Alternative.GREATER:
        z = (u - mean - 0.5) / math.sqrt(variance)
        return MannWhitney(u, z, float(stats.norm.sf(z)), n_a, n_b)
    # Two-sided: the larger of the two U's, the tail doubled; z keeps the sign of a's side.
    z = (max(u, n_a * n_b - u) - mean - 0.5) / math.sqrt(variance)
    p = min(1.0, 2 * float(stats.norm.sf(z)))
    return MannWhitney(u, z if u >= mean else -z, p, n_a, n_b)
