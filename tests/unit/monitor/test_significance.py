"""The two-sample tests from counters and histograms, against scipy on the raw samples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]  # scipy ships no stubs

from modelserve_monitor.histogram import Histogram, bucket_mid, bucket_of
from modelserve_monitor.significance import (
    Alternative,
    MeanSample,
    Proportion,
    mann_whitney_u,
    mean_difference_interval,
    proportion_difference_interval,
    two_proportion_z,
    welch_t,
)


def _sample(values: np.ndarray) -> MeanSample:
    return MeanSample(len(values), float(values.sum()), float((values**2).sum()))


class TestTwoProportionZ:
    @pytest.mark.parametrize(("a", "b"), [((60, 1000), (40, 1000)), ((13, 400), (29, 900))])
    def test_matches_the_chi_square_test_of_the_two_by_two_table(
        self, a: tuple[int, int], b: tuple[int, int]
    ) -> None:
        """z squared is Pearson's chi-square without correction, so the two-sided p-values
        agree; the one-sided p-value is half of it on the side of the difference."""
        table = [[a[0], a[1] - a[0]], [b[0], b[1] - b[0]]]
        reference = stats.chi2_contingency(table, correction=False)
        first, second = Proportion(*a), Proportion(*b)
        two_sided = two_proportion_z(first, second, Alternative.TWO_SIDED)
        assert two_sided.statistic**2 == pytest.approx(reference.statistic)
        assert two_sided.p_value == pytest.approx(reference.pvalue)
        greater = two_proportion_z(first, second, Alternative.GREATER)
        expected = reference.pvalue / 2 if first.share > second.share else 1 - reference.pvalue / 2
        assert greater.p_value == pytest.approx(expected)

    def test_no_spread_is_no_evidence(self) -> None:
        """No errors on either side (or an empty side) cannot show a difference."""
        assert two_proportion_z(Proportion(0, 500), Proportion(0, 500), Alternative.TWO_SIDED) == (
            two_proportion_z(Proportion(3, 10), Proportion(0, 0), Alternative.TWO_SIDED)
        )
        result = two_proportion_z(Proportion(0, 500), Proportion(0, 500), Alternative.GREATER)
        assert (result.statistic, result.p_value) == (0.0, 0.5)

    def test_interval_covers_the_true_difference_at_its_level(self) -> None:
        """Over 2000 seeded experiments the 95 % interval holds the true difference about
        95 % of the time."""
        rng = np.random.default_rng(1)
        covered = 0
        for _ in range(2000):
            a, b = rng.binomial(1500, 0.06), rng.binomial(1500, 0.04)
            lower, upper = proportion_difference_interval(
                Proportion(int(a), 1500), Proportion(int(b), 1500), 0.05
            )
            covered += lower <= 0.02 <= upper
        assert 0.93 <= covered / 2000 <= 0.97


class TestWelch:
    @pytest.mark.parametrize("alternative", [Alternative.GREATER, Alternative.TWO_SIDED])
    def test_matches_scipy_on_the_raw_values(self, alternative: Alternative) -> None:
        """t and p from count, sum and sum of squares equal scipy's Welch test on the values."""
        rng = np.random.default_rng(2)
        a, b = rng.normal(10.3, 2.0, 400), rng.normal(10.0, 3.0, 700)
        ours = welch_t(_sample(a), _sample(b), alternative)
        theirs = stats.ttest_ind(a, b, equal_var=False, alternative=alternative.value)
        assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-6)
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-6)

    def test_interval_matches_scipy(self) -> None:
        """The interval of the difference of means equals scipy's Welch interval."""
        rng = np.random.default_rng(3)
        a, b = rng.exponential(1.0, 300), rng.exponential(1.2, 500)
        lower, upper = mean_difference_interval(_sample(a), _sample(b), 0.01)
        reference = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.99)
        assert (lower, upper) == (
            pytest.approx(reference.low, rel=1e-6),
            pytest.approx(reference.high, rel=1e-6),
        )

    def test_identical_constant_samples_are_no_evidence(self) -> None:
        """No spread and equal means give p = 1; too few values give p = 1 too."""
        constant = MeanSample(10, 5.0, 2.5)
        assert welch_t(constant, constant, Alternative.TWO_SIDED).p_value == 1.0
        assert welch_t(MeanSample(1, 1.0, 1.0), constant, Alternative.GREATER).p_value == 1.0


def _histogram(values: np.ndarray) -> Histogram:
    return Histogram.of(float(v) for v in values)


def _rounded(values: np.ndarray) -> np.ndarray:
    """Each value replaced by its bucket's midpoint: what the histogram knows of it."""
    return np.array([bucket_mid(bucket_of(float(v))) for v in values])


class TestMannWhitney:
    @pytest.mark.parametrize("alternative", [Alternative.GREATER, Alternative.TWO_SIDED])
    def test_equals_scipy_on_the_values_rounded_to_their_buckets(
        self, alternative: Alternative
    ) -> None:
        """From the histograms, U and p are exactly scipy's asymptotic test (tie and
        continuity corrections) on the values rounded to their buckets."""
        rng = np.random.default_rng(4)
        a, b = rng.lognormal(3.05, 0.3, 800), rng.lognormal(3.0, 0.3, 1200)
        ours = mann_whitney_u(_histogram(a), _histogram(b), alternative)
        theirs = stats.mannwhitneyu(
            _rounded(a), _rounded(b), alternative=alternative.value, method="asymptotic"
        )
        assert ours.u == pytest.approx(theirs.statistic, rel=1e-12)
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)

    def test_is_close_to_scipy_on_the_raw_values(self) -> None:
        """Bucketing (about 6 % wide) moves U by well under 1 % of the pairs and keeps the
        p-value's order of magnitude."""
        rng = np.random.default_rng(5)
        a, b = rng.lognormal(3.04, 0.3, 2000), rng.lognormal(3.0, 0.3, 2000)
        ours = mann_whitney_u(_histogram(a), _histogram(b), Alternative.GREATER)
        theirs = stats.mannwhitneyu(a, b, alternative="greater", method="asymptotic")
        assert ours.u / (2000 * 2000) == pytest.approx(theirs.statistic / (2000 * 2000), abs=0.005)
        assert np.log10(ours.p_value) == pytest.approx(np.log10(theirs.pvalue), abs=0.5)
        assert 0.5 < ours.probability_greater < 0.6

    def test_same_distribution_is_not_significant_and_empty_is_no_evidence(self) -> None:
        """Samples of one distribution give a large p; an empty side gives p = 1."""
        rng = np.random.default_rng(6)
        a, b = rng.lognormal(3.0, 0.3, 1000), rng.lognormal(3.0, 0.3, 1000)
        assert mann_whitney_u(_histogram(a), _histogram(b), Alternative.GREATER).p_value > 0.05
        empty = mann_whitney_u(_histogram(a), Histogram.empty(), Alternative.GREATER)
        assert (empty.p_value, empty.probability_greater) == (1.0, 0.5)


class TestInterpolatedQuantile:
    def test_median_is_finer_than_a_bucket(self) -> None:
        """Spreading a bucket's values evenly puts the median within 0.5 % of the exact one,
        where the bucket midpoint can be 3 % off."""
        values = np.random.default_rng(7).lognormal(3.0, 0.3, 5000)
        histogram = _histogram(values)
        assert histogram.interpolated_quantile(0.5) == pytest.approx(np.median(values), rel=0.005)
        assert histogram.interpolated_quantile(0.99) == pytest.approx(
            np.quantile(values, 0.99), rel=0.01
        )
