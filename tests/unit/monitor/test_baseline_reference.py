"""A version's feature baseline built from its model's validation set, or the reason it cannot be."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import feature_value_pb2 as fv_pb
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_monitor.aggregate import SEP, VersionAggregate, contribution
from modelserve_monitor.baseline import validation_reference
from modelserve_monitor.store import BaselineSource
from modelserve_runtime.convert import numpy_to_tensor

REFS = ("request:amount", "customer:age", "request:is_mobile")
NOW = 1_767_225_600.0


def _version(
    refs: tuple[str, ...] = REFS, input_name: str = "features"
) -> registry_pb.ModelVersion:
    return registry_pb.ModelVersion(
        name="models/fraud/versions/1",
        signature=registry_pb.Signature(
            inputs=[
                tensor_pb2.TensorSpec(
                    name=input_name, datatype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, len(refs)]
                )
            ],
            feature_refs=list(refs),
        ),
    )


def _model(inputs: np.ndarray | None, name: str = "features") -> registry_pb.Model:
    model = registry_pb.Model(name="models/fraud")
    if inputs is not None:
        model.validation_set.CopyFrom(
            registry_pb.ValidationSet(
                inputs=[numpy_to_tensor(name, inputs)],
                labels=numpy_to_tensor("labels", np.zeros(len(inputs), dtype=np.int64)),
                output="probabilities",
                metric=registry_pb.VALIDATION_METRIC_ACCURACY,
            )
        )
    return model


def _rows(n: int = 500) -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.column_stack(
        [rng.normal(100, 30, n), rng.integers(1, 3000, n), rng.integers(0, 2, n)]
    ).astype(np.float32)


class TestValidationReference:
    def test_counters_are_those_the_same_rows_would_add_as_records(self) -> None:
        """Each column becomes the counters that records carrying the same values as the
        version's feature_refs add to the first-records baseline: count, values, exact sum,
        histogram; a 0/1 column also counts true/false."""
        rows = _rows()
        decision, increments = validation_reference(_version(), _model(rows), NOW)
        assert decision.source is BaselineSource.VALIDATION_SET
        assert (decision.rows, decision.decided_at) == (500, NOW)
        from_set = VersionAggregate()
        from_set.add_hash({k.encode(): repr(v).encode() for k, v in increments})
        from_records = VersionAggregate()
        sums: Counter[str] = Counter()
        for i, row in enumerate(rows.astype(np.float64)):
            record = rec_pb.PredictionRecord(endpoint="fraud", model_version="v", request_id=str(i))
            for ref, value in zip(REFS, row, strict=True):
                record.features[ref].CopyFrom(fv_pb.FeatureValue(double_value=float(value)))
            for name, amount in contribution(record, f"{i}-0").detail:
                sums[name] += amount
        from_records.add_hash({k.encode(): repr(v).encode() for k, v in sums.items()})
        for ref in REFS:
            expected, got = from_records.features[ref], from_set.features[ref]
            assert (got.count, got.missing) == (expected.count, expected.missing) == (500, 0)
            assert got.values.counts == expected.values.counts
            assert got.values.total == expected.values.total == 500
            assert got.values.mean == pytest.approx(float(rows[:, REFS.index(ref)].mean()))
        mobile = from_set.features["request:is_mobile"]
        ones = int(rows[:, 2].sum())
        assert mobile.categories == {"true": ones, "false": 500 - ones}
        assert not mobile.categorical
        assert from_set.features["request:amount"].categories == {}

    def test_non_finite_values_count_as_missing(self) -> None:
        """NaN and infinity in the set are missing values, as in records."""
        rows = _rows(10).astype(np.float64)
        rows[0, 0], rows[1, 0] = np.nan, np.inf
        _, increments = validation_reference(_version(), _model(rows), NOW)
        aggregate = VersionAggregate()
        aggregate.add_hash({k.encode(): repr(v).encode() for k, v in increments})
        amount = aggregate.features["request:amount"]
        assert (amount.count, amount.missing, amount.values.total) == (10, 2, 8)

    def test_one_feature_may_be_a_plain_column(self) -> None:
        """A set of shape [rows] serves a version with one feature."""
        rows = np.arange(6, dtype=np.float64)
        decision, increments = validation_reference(
            _version(("request:amount",)), _model(rows), NOW
        )
        assert decision.rows == 6
        assert (f"f{SEP}request:amount{SEP}vn", 6) in increments

    @pytest.mark.parametrize(
        ("version", "model", "reason"),
        [
            (_version(), _model(None), "the model has no validation set"),
            (_version(()), _model(_rows()), "the version's signature has no feature_refs"),
            (_version(input_name="x"), _model(_rows()), "the validation set has no input 'x'"),
            (
                _version(REFS[:2]),
                _model(_rows()),
                "has shape [500, 3], not [rows, 2] for the 2 feature_refs",
            ),
            (
                _version(),
                _model(np.array([[b"a", b"b", b"c"]], dtype=object)),
                "is not numeric",
            ),
        ],
    )
    def test_a_set_that_does_not_fit_keeps_the_first_records(
        self, version: registry_pb.ModelVersion, model: registry_pb.Model, reason: str
    ) -> None:
        """Without a set, or with one whose first input does not match the feature_refs, the
        decision is first_records with the reason, and no counters."""
        decision, increments = validation_reference(version, model, NOW)
        assert decision.source is BaselineSource.FIRST_RECORDS
        assert reason in decision.reason
        assert (decision.rows, increments) == (0, [])
