"""Drift tests between a baseline and a window, computed from mergeable histograms and counts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt
from scipy import special, stats  # type: ignore[import-untyped]  # scipy ships no stubs

from modelserve_monitor.histogram import Histogram, bucket_mid

#: PSI compares the share of values in this many bins, cut at the baseline's quantiles.
PSI_BINS = 10
#: Shares are floored at this value so an empty bin does not make PSI infinite.
_PSI_FLOOR = 1e-4


class DriftTest(Enum):
    """The statistical tests the monitor runs."""

    PSI = "psi"
    KOLMOGOROV_SMIRNOV = "ks"
    CHI_SQUARE = "chi_square"


@dataclass(frozen=True, slots=True)
class DriftThresholds:
    """When a test says drift: PSI above `psi`, or a p-value below `p_value`."""

    psi: float = 0.2
    p_value: float = 0.01


@dataclass(frozen=True, slots=True)
class DriftStatistic:
    """One test's statistic, p-value (0 for PSI), the threshold that applied and its verdict."""

    test: DriftTest
    statistic: float
    p_value: float
    threshold: float
    drifted: bool


def psi(baseline: Histogram, window: Histogram, threshold: float) -> DriftStatistic:
    """Population stability index over PSI_BINS bins cut at the baseline's quantiles."""
    edges = sorted({baseline.quantile(q) for q in np.linspace(0, 1, PSI_BINS + 1)[1:-1]})
    expected = _binned(baseline, edges)
    actual = _binned(window, edges)
    value = float(np.sum((actual - expected) * np.log(actual / expected)))
    return DriftStatistic(DriftTest.PSI, value, 0.0, threshold, value > threshold)


def _binned(histogram: Histogram, edges: list[float]) -> npt.NDArray[np.float64]:
    counts = np.zeros(len(edges) + 1)
    for index, count in histogram.counts.items():
        counts[int(np.searchsorted(edges, bucket_mid(index), side="left"))] += count
    total = counts.sum()
    shares = counts / total if total else counts
    return np.maximum(shares, _PSI_FLOOR)


def kolmogorov_smirnov(baseline: Histogram, window: Histogram, alpha: float) -> DriftStatistic:
    """Two-sample KS on the histograms: D is the largest gap of the two CDFs at bucket edges.

    The p-value is the asymptotic Kolmogorov distribution with Stephens' small-sample
    correction, as `scipy.stats.ks_2samp(method="asymp")` uses for large samples.
    """
    n, m = sum(baseline.counts.values()), sum(window.counts.values())
    if not n or not m:
        return DriftStatistic(DriftTest.KOLMOGOROV_SMIRNOV, 0.0, 1.0, alpha, False)
    buckets = sorted(set(baseline.counts) | set(window.counts))
    cdf_base = np.cumsum([baseline.counts.get(b, 0) for b in buckets]) / n
    cdf_window = np.cumsum([window.counts.get(b, 0) for b in buckets]) / m
    d = float(np.max(np.abs(cdf_base - cdf_window)))
    en = math.sqrt(n * m / (n + m))
    p_value = float(min(1.0, max(0.0, special.kolmogorov((en + 0.12 + 0.11 / en) * d))))
    return DriftStatistic(DriftTest.KOLMOGOROV_SMIRNOV, d, p_value, alpha, p_value < alpha)


def chi_square(
    baseline: Mapping[str, int], window: Mapping[str, int], alpha: float
) -> DriftStatistic:
    """Chi-square test of homogeneity of the category counts of baseline and window."""
    categories = sorted(set(baseline) | set(window))
    table = np.array(
        [[baseline.get(c, 0) for c in categories], [window.get(c, 0) for c in categories]]
    )
    if len(categories) < 2 or not table[0].sum() or not table[1].sum():
        return DriftStatistic(DriftTest.CHI_SQUARE, 0.0, 1.0, alpha, False)
    result = stats.chi2_contingency(table, correction=False)
    statistic, p_value = float(result.statistic), float(result.pvalue)
    return DriftStatistic(DriftTest.CHI_SQUARE, statistic, p_value, alpha, p_value < alpha)
