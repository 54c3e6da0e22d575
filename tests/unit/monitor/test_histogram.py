"""The log-linear histogram: buckets hold their values, quantiles are close, merging adds."""

from __future__ import annotations

import numpy as np
import pytest

from modelserve_monitor.histogram import Histogram, bucket_bounds, bucket_of


class TestBuckets:
    @pytest.mark.parametrize("value", [0.001, 0.5, 1.0, 1.5, 3.99, 100.0, 12345.6, -0.3, -7.0])
    def test_a_bucket_holds_its_value(self, value: float) -> None:
        """Every value lies within the bounds of the bucket it is put in."""
        lower, upper = bucket_bounds(bucket_of(value))
        assert lower <= value <= upper
        assert (upper - lower) <= abs(value) / 16 + 1e-12

    def test_zero_and_tiny_values_share_the_zero_bucket(self) -> None:
        """Zero and magnitudes below 2**-30 fall in bucket 0."""
        assert bucket_of(0.0) == bucket_of(1e-12) == bucket_of(-1e-12) == 0

    def test_buckets_are_ordered_like_their_values(self) -> None:
        """A larger value never gets a smaller bucket index, across zero too."""
        values = np.sort(np.random.default_rng(3).normal(0, 100, 2000))
        indexes = [bucket_of(float(v)) for v in values]
        assert indexes == sorted(indexes)


class TestHistogram:
    def test_quantiles_are_within_the_bucket_error(self) -> None:
        """p50, p95 and p99 are within 4 % of numpy's percentiles of the same values."""
        values = np.random.default_rng(42).integers(500, 40_000, size=5000) / 1000.0
        histogram = Histogram.of(float(v) for v in values)
        for q in (0.50, 0.95, 0.99):
            assert histogram.quantile(q) == pytest.approx(np.percentile(values, q * 100), rel=0.04)
        assert histogram.mean == pytest.approx(float(values.mean()))

    def test_merging_equals_counting_together(self) -> None:
        """Two windows merged by adding counters equal one histogram of all the values."""
        rng = np.random.default_rng(1)
        first, second = rng.normal(5, 2, 300), rng.normal(6, 1, 200)
        merged = Histogram.of(float(v) for v in first)
        other = Histogram.of(float(v) for v in second)
        merged.merge(other.counts, other.total, other.sum)
        together = Histogram.of(float(v) for v in np.concatenate([first, second]))
        assert merged.counts == together.counts
        assert merged.total == together.total == 500
        assert merged.sum == pytest.approx(together.sum)

    def test_subtracting_undoes_merging(self) -> None:
        """Taking away a histogram merged in before leaves the other one, without the buckets
        only the taken-away values had."""
        rng = np.random.default_rng(2)
        first, second = rng.normal(5, 2, 300), rng.normal(50, 1, 200)
        later = Histogram.of(float(v) for v in np.concatenate([first, second]))
        earlier = Histogram.of(float(v) for v in first)
        later.subtract(earlier)
        alone = Histogram.of(float(v) for v in second)
        assert later.counts == alone.counts
        assert later.total == alone.total == 200
        assert later.sum == pytest.approx(alone.sum)
        assert later.quantile(0.5) == alone.quantile(0.5)

    def test_empty_histogram_answers_zero(self) -> None:
        """An empty histogram has mean and quantiles 0 rather than failing."""
        assert Histogram.empty().quantile(0.99) == 0.0
        assert Histogram.empty().mean == 0.0
