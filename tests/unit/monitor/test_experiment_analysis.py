"""A/B analysis on seeded simulations: false positives near alpha, power, no early verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from modelserve_monitor.aggregate import VersionAggregate
from modelserve_monitor.experiment import ExperimentMetric, ExperimentVerdict, analyse, sample_of
from modelserve_monitor.significance import MeanSample, Proportion

RUNS = 400


def _proportions(rng: np.random.Generator, n: int, *rates: float) -> list[tuple[str, Proportion]]:
    return [(f"arm{k}", Proportion(int(rng.binomial(n, rate)), n)) for k, rate in enumerate(rates)]


def _means(rng: np.random.Generator, n: int, *means: float) -> list[tuple[str, MeanSample]]:
    arms = []
    for k, mean in enumerate(means):
        values = rng.normal(mean, 1.0, n)
        arms.append((f"arm{k}", MeanSample(n, float(values.sum()), float((values**2).sum()))))
    return arms


def _significant_share(verdicts: list[ExperimentVerdict]) -> float:
    return sum(v is ExperimentVerdict.SIGNIFICANT for v in verdicts) / len(verdicts)


class TestFixedHorizonVerdicts:
    def test_equal_error_rates_are_significant_about_alpha_of_the_time(self) -> None:
        """400 A/A experiments at 5 % errors, 2000 requests per arm: about 5 % significant."""
        rng = np.random.default_rng(10)
        verdicts = [
            analyse(_proportions(rng, 2000, 0.05, 0.05), ExperimentMetric.ERROR_RATE, 2000, 0.05)[0]
            for _ in range(RUNS)
        ]
        assert ExperimentVerdict.COLLECTING not in verdicts
        assert 0.02 <= _significant_share(verdicts) <= 0.085

    def test_a_real_error_rate_difference_is_found(self) -> None:
        """5 % against 7 % errors with 4000 requests per arm is found in at least 90 % of runs."""
        rng = np.random.default_rng(11)
        verdicts = [
            analyse(_proportions(rng, 4000, 0.05, 0.07), ExperimentMetric.ERROR_RATE, 4000, 0.05)[0]
            for _ in range(RUNS)
        ]
        assert _significant_share(verdicts) >= 0.9

    def test_means_keep_alpha_and_find_a_quarter_standard_deviation(self) -> None:
        """Welch on means: about alpha false positives, and a 0.25 sd shift found with 500 per
        arm (power about 0.94)."""
        rng = np.random.default_rng(12)
        metric = ExperimentMetric.OUTCOME_MEAN
        same = [analyse(_means(rng, 500, 0.0, 0.0), metric, 500, 0.05)[0] for _ in range(RUNS)]
        moved = [analyse(_means(rng, 500, 0.0, 0.25), metric, 500, 0.05)[0] for _ in range(RUNS)]
        assert 0.02 <= _significant_share(same) <= 0.085
        assert _significant_share(moved) >= 0.88

    def test_more_arms_split_alpha_so_the_family_keeps_it(self) -> None:
        """Three arms equal to the control: each comparison at alpha / 3, so the chance that
        any of the three is significant stays near alpha instead of nearly three times it."""
        rng = np.random.default_rng(13)
        metric = ExperimentMetric.PREDICTION_MEAN
        results = [analyse(_means(rng, 300, 0, 0, 0, 0), metric, 300, 0.05) for _ in range(RUNS)]
        assert {
            arm.comparison.alpha for _, _, _, arms in results for arm in arms[1:] if arm.comparison
        } == {0.05 / 3}
        assert _significant_share([verdict for verdict, *_ in results]) <= 0.085

    def test_nothing_is_compared_before_every_arm_has_its_samples(self) -> None:
        """One arm short of the sample size: COLLECTING with the progress, and no comparison,
        even where the difference is already obvious."""
        arms = [("a", Proportion(10, 1000)), ("b", Proportion(400, 999))]
        verdict, progress, reason, report = analyse(arms, ExperimentMetric.ERROR_RATE, 1000, 0.05)
        assert verdict is ExperimentVerdict.COLLECTING
        assert progress == pytest.approx(0.999)
        assert [arm.comparison for arm in report] == [None, None]
        assert [arm.value for arm in report] == [0.01, pytest.approx(400 / 999)]
        assert reason.startswith("COLLECTING: 100 % of the 1000 requests per arm (short: b 999)")


class TestSamples:
    def test_an_arms_error_rate_counts_what_the_fallbacks_answered(self) -> None:
        """ERROR_RATE: an arm's requests that failed, or that its fallback chain answered
        (degraded: the arm's version did not answer them), over its requests."""
        arm = VersionAggregate(requests=100, errors=1, degraded=4)
        assert sample_of(ExperimentMetric.ERROR_RATE, arm) == Proportion(5, 100)
