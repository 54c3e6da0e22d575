"""Drift tests on histograms: PSI, Kolmogorov-Smirnov (against scipy) and chi-square."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]  # scipy ships no stubs

from modelserve_monitor.drift import DriftTest, chi_square, kolmogorov_smirnov, psi
from modelserve_monitor.histogram import Histogram


def _histogram(values: np.ndarray) -> Histogram:
    return Histogram.of(float(v) for v in values)


class TestNumericDrift:
    def test_same_distribution_is_not_drift(self) -> None:
        """Two samples of one normal distribution pass PSI and KS at the default thresholds."""
        rng = np.random.default_rng(7)
        baseline, window = _histogram(rng.normal(0, 1, 1000)), _histogram(rng.normal(0, 1, 2000))
        assert not psi(baseline, window, 0.2).drifted
        assert not kolmogorov_smirnov(baseline, window, 0.01).drifted

    def test_one_standard_deviation_shift_is_drift(self) -> None:
        """A sample shifted by one standard deviation fails both PSI and KS."""
        rng = np.random.default_rng(7)
        baseline, window = _histogram(rng.normal(0, 1, 1000)), _histogram(rng.normal(1, 1, 2000))
        result = psi(baseline, window, 0.2)
        assert result.test is DriftTest.PSI
        assert result.drifted
        assert result.statistic > 0.5
        assert kolmogorov_smirnov(baseline, window, 0.01).drifted

    def test_ks_agrees_with_scipy(self) -> None:
        """The histogram KS distance and p-value are close to scipy's on the raw values."""
        rng = np.random.default_rng(11)
        a, b = rng.normal(0, 1, 1000), rng.normal(0.15, 1, 1500)
        ours = kolmogorov_smirnov(_histogram(a), _histogram(b), 0.01)
        theirs = stats.ks_2samp(a, b)
        assert ours.statistic == pytest.approx(theirs.statistic, abs=0.01)
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=0.5, abs=1e-3)

    def test_empty_window_is_not_drift(self) -> None:
        """Without values on one side KS reports p = 1, not drift."""
        result = kolmogorov_smirnov(_histogram(np.ones(10)), Histogram.empty(), 0.01)
        assert (result.p_value, result.drifted) == (1.0, False)


class TestCategoricalDrift:
    def test_changed_category_shares_are_drift(self) -> None:
        """50/50 moving to 60/40 over a thousand values fails the chi-square test."""
        result = chi_square({"a": 500, "b": 500}, {"a": 600, "b": 400}, 0.01)
        assert result.test is DriftTest.CHI_SQUARE
        assert result.drifted
        assert result.p_value < 1e-4

    def test_same_shares_are_not_drift(self) -> None:
        """Equal shares pass, with the threshold reported."""
        result = chi_square({"a": 500, "b": 500}, {"a": 1010, "b": 990}, 0.01)
        assert not result.drifted
        assert result.threshold == 0.01
