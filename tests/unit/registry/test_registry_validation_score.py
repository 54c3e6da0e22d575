"""The validation-set scores against scikit-learn's own metrics on the same data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve_registry.validation import score

RNG = np.random.default_rng(3)
LABELS = RNG.integers(0, 2, size=200)
POSITIVE = np.clip(LABELS * 0.6 + RNG.random(200) * 0.5, 0.01, 0.99)
PROBABILITIES = np.stack([1 - POSITIVE, POSITIVE], axis=1).astype(np.float32)


def test_accuracy_takes_the_most_likely_class() -> None:
    expected = accuracy_score(LABELS, PROBABILITIES.argmax(axis=1))
    assert score(pb.VALIDATION_METRIC_ACCURACY, LABELS, PROBABILITIES) == pytest.approx(expected)


def test_a_single_probability_column_is_the_positive_class() -> None:
    """[N] and [N, 1] outputs are read as the positive class's probability."""
    expected = roc_auc_score(LABELS, POSITIVE)
    for shaped in (POSITIVE, POSITIVE[:, None]):
        assert score(pb.VALIDATION_METRIC_ROC_AUC, LABELS, shaped) == pytest.approx(expected)
    assert score(pb.VALIDATION_METRIC_ACCURACY, LABELS, POSITIVE) == pytest.approx(
        accuracy_score(LABELS, POSITIVE >= 0.5)
    )


def test_log_loss_and_mean_absolute_error() -> None:
    assert score(pb.VALIDATION_METRIC_LOG_LOSS, LABELS, PROBABILITIES) == pytest.approx(
        log_loss(LABELS, PROBABILITIES), rel=1e-6
    )
    values = RNG.normal(size=200)
    predicted = values + 0.25
    assert score(
        pb.VALIDATION_METRIC_MEAN_ABSOLUTE_ERROR, values, predicted[:, None]
    ) == pytest.approx(0.25)
