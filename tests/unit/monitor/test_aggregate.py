"""What a prediction record contributes: identity, counters, prediction and feature values."""

from __future__ import annotations

import pytest

from modelserve.type.v1 import feature_value_pb2 as fv_pb
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_monitor.aggregate import (
    _COUNTS,
    _SUMS,
    SEP,
    VALUE_LIMIT,
    VersionAggregate,
    contribution,
    label_of,
    prediction_of,
)


def _record(**kwargs: object) -> rec_pb.PredictionRecord:
    record = rec_pb.PredictionRecord(
        request_id="r1", endpoint="fraud", model_version="models/fraud/versions/1", latency_us=2500
    )
    for name, value in kwargs.items():
        setattr(record, name, value)
    return record


def _probabilities(*rows: tuple[float, float]) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        name="probabilities",
        datatype=tensor_pb2.DATA_TYPE_FP32,
        shape=[len(rows), 2],
        contents=tensor_pb2.TensorContents(fp32_contents=[v for row in rows for v in row]),
    )


class TestContribution:
    def test_prediction_is_the_positive_class_probability(self) -> None:
        """With two values per row the prediction is the second (positive class) one."""
        record = _record()
        record.outputs.append(_probabilities((0.25, 0.75)))
        assert prediction_of(record) == pytest.approx(0.75)

    def test_prediction_of_a_single_output_is_its_first_value(self) -> None:
        """A regression output (one value per row) is its own prediction."""
        record = _record()
        record.outputs.append(
            tensor_pb2.Tensor(
                name="y",
                datatype=tensor_pb2.DATA_TYPE_FP64,
                shape=[1, 1],
                contents=tensor_pb2.TensorContents(fp64_contents=[3.5]),
            )
        )
        assert prediction_of(record) == 3.5

    def test_identity_is_endpoint_version_and_request_id(self) -> None:
        """A record is identified by endpoint, version and request id, or its entry id without one."""
        assert contribution(_record(), "1-0").identity == SEP.join(
            ("fraud", "models/fraud/versions/1", "r1")
        )
        assert contribution(_record(request_id=""), "7-1").identity.endswith(f"{SEP}entry:7-1")

    def test_shadow_copy_is_counted_but_not_joined_to_outcomes(self) -> None:
        """A shadow record keeps its own identity (its version) but offers no request id for
        the outcome join, which belongs to the answer the caller got; it pairs with that
        answer by its request id instead."""
        shadow = contribution(_record(shadow=True, model_version="models/fraud/versions/2"), "1-0")
        assert shadow.identity == SEP.join(("fraud", "models/fraud/versions/2", "r1"))
        assert (shadow.request_id, shadow.shadow_request_id) == ("", "r1")
        answer = contribution(_record(), "1-1")
        assert (answer.request_id, answer.shadow_request_id) == ("r1", "")

    @pytest.mark.parametrize("answered_by", ["", "models/fraud/versions/1"])
    def test_a_degraded_answer_counts_for_the_version_it_was_routed_to(
        self, answered_by: str
    ) -> None:
        """Routed to v2, answered by the fallback chain (the declared default outputs, or the
        fallback version v1): the request, its latency and its degradation are v2's, so a
        failing canary shows them; the outputs are not v2's, so no prediction or label."""
        record = _record(
            model_version=answered_by,
            routed_version="models/fraud/versions/2",
            degraded=True,
            degraded_reason="models/fraud/versions/2 failed: UPSTREAM_TIMEOUT; ...",
        )
        record.outputs.append(_probabilities((0.5, 0.5)))
        part = contribution(record, "1-0")
        assert part.model_version == "models/fraud/versions/2"
        assert part.identity == SEP.join(("fraud", "models/fraud/versions/2", "r1"))
        assert ("n", 1) in part.core and ("deg", 1) in part.core
        assert (part.prediction, part.label) == (None, None)
        assert not [name for name, _ in part.core if name.startswith("p_")]
        assert not [name for name, _ in part.detail if name.startswith(f"p{SEP}")]

    def test_a_record_from_before_routed_version_counts_for_its_model_version(self) -> None:
        """Records written before `routed_version` existed count as they always did."""
        record = _record()
        record.outputs.append(_probabilities((0.25, 0.75)))
        part = contribution(record, "1-0")
        assert (part.model_version, part.prediction) == ("models/fraud/versions/1", 0.75)

    def test_label_is_the_argmax_of_many_classes_else_the_prediction_at_one_half(self) -> None:
        """Three or more values per row: the argmax; two: the positive-class probability at
        0.5 (a tie at 0.5 is 1, as outcomes read it); one value: that value at 0.5."""
        record = _record()
        record.outputs.append(
            tensor_pb2.Tensor(
                datatype=tensor_pb2.DATA_TYPE_FP32,
                shape=[1, 3],
                contents=tensor_pb2.TensorContents(fp32_contents=[0.2, 0.1, 0.7]),
            )
        )
        assert label_of(record) == 2
        tie = _record()
        tie.outputs.append(_probabilities((0.5, 0.5)))
        assert label_of(tie) == 1
        single = _record()
        single.outputs.append(
            tensor_pb2.Tensor(
                datatype=tensor_pb2.DATA_TYPE_FP64,
                shape=[1, 1],
                contents=tensor_pb2.TensorContents(fp64_contents=[0.49]),
            )
        )
        assert label_of(single) == 0
        assert label_of(_record()) is None

    def test_non_finite_values_are_missing_not_counted(self) -> None:
        """A NaN prediction is no prediction and an infinite feature is a missing value, so
        no counter is ever asked to add them (Redis refuses, which would stall the log)."""
        record = _record()
        record.outputs.append(_probabilities((float("nan"), float("nan"))))
        record.features["amount"].CopyFrom(fv_pb.FeatureValue(double_value=float("inf")))
        part = contribution(record, "1-0")
        assert (part.prediction, part.label) == (None, None)
        names = {name for name, _ in (*part.core, *part.detail)}
        assert not {"p_n", "p_sum", "p_sq"} & names
        assert f"f{SEP}amount{SEP}miss" in names

    def test_huge_values_are_added_bounded(self) -> None:
        """A finite value beyond VALUE_LIMIT is added as ±VALUE_LIMIT, sign kept, so that its
        square and any sum of them stay finite; its histogram bucket is the last one."""
        record = _record()
        record.outputs.append(
            tensor_pb2.Tensor(
                name="score",
                datatype=tensor_pb2.DATA_TYPE_FP64,
                shape=[1],
                contents=tensor_pb2.TensorContents(fp64_contents=[1.7e308]),
            )
        )
        record.features["amount"].CopyFrom(fv_pb.FeatureValue(double_value=-1.7e308))
        part = contribution(record, "1-0")
        increments = dict((*part.core, *part.detail))
        assert part.prediction == VALUE_LIMIT
        assert increments["p_sum"] == VALUE_LIMIT
        assert increments["p_sq"] == VALUE_LIMIT**2
        assert increments[f"f{SEP}amount{SEP}sum"] == -VALUE_LIMIT
        assert part.label == 1

    def test_infinite_sum_read_back_does_not_fail(self) -> None:
        """A sum stored before values were bounded can read back as infinity (Redis adds in
        long double): the hash still reads, its counts intact."""
        aggregate = VersionAggregate()
        aggregate.add_hash(
            {
                b"n": b"2",
                f"f{SEP}amount{SEP}vn".encode(): b"2",
                f"f{SEP}amount{SEP}sum".encode(): b"2e308",
            }
        )
        assert aggregate.requests == 2
        assert aggregate.features["amount"].values.total == 2

    def test_record_without_endpoint_is_refused(self) -> None:
        """A record with no endpoint is a ValueError (the consumer counts it as malformed)."""
        with pytest.raises(ValueError, match="endpoint"):
            contribution(_record(endpoint=""), "1-0")

    def test_counters_read_back_into_an_aggregate(self) -> None:
        """The increments of records, added up as Redis would, read back as the same figures."""
        records = []
        for i, amount in enumerate((10.0, 20.0, None)):
            record = _record(request_id=f"r{i}")
            if i == 2:
                record.status = rec_pb.PREDICTION_STATUS_ERROR
            record.outputs.append(_probabilities((0.9, 0.1)))
            record.features["amount"].CopyFrom(
                fv_pb.FeatureValue() if amount is None else fv_pb.FeatureValue(double_value=amount)
            )
            record.features["country"].CopyFrom(fv_pb.FeatureValue(string_value="NL"))
            records.append(record)
        counters: dict[str, float] = {}
        for i, record in enumerate(records):
            part = contribution(record, f"{i}-0")
            for name, value in (*part.core, *part.detail):
                counters[name] = counters.get(name, 0) + value
        aggregate = VersionAggregate()
        aggregate.add_hash({k.encode(): repr(v).encode() for k, v in counters.items()})
        assert (aggregate.requests, aggregate.errors, aggregate.degraded) == (3, 1, 0)
        assert aggregate.latency_ms.total == 3
        assert aggregate.predictions.mean == pytest.approx(0.1)
        assert aggregate.prediction_square_sum == pytest.approx(3 * 0.1**2)
        amount = aggregate.features["amount"]
        assert (amount.count, amount.missing, amount.values.total) == (3, 1, 2)
        assert amount.values.mean == pytest.approx(15.0)
        assert aggregate.features["country"].categories == {"NL": 3}
        assert aggregate.features["country"].categorical


def _aggregate(records: list[rec_pb.PredictionRecord], scale: int) -> dict[str, float]:
    """The counters of some records as Redis adds them up, with every outcome and shadow-pair
    counter set to a multiple of `scale` (binary fractions, so sums are exact)."""
    outcomes_and_pairs = ("o_", "sh_")
    counters: dict[str, float] = {
        name: 3 * scale for name in _COUNTS if name.startswith(outcomes_and_pairs)
    }
    counters |= {name: 0.5 * scale for name in _SUMS if name.startswith(outcomes_and_pairs)}
    for i, record in enumerate(records):
        part = contribution(record, f"{i}-0")
        for name, value in (*part.core, *part.detail):
            counters[name] = counters.get(name, 0) + value
    return counters


def _read(counters: dict[str, float]) -> VersionAggregate:
    aggregate = VersionAggregate()
    aggregate.add_hash({k.encode(): repr(v).encode() for k, v in counters.items()})
    return aggregate


class TestSubtract:
    def test_subtracting_earlier_counters_leaves_what_came_after(self) -> None:
        """Counters read later minus the same counters read earlier equal the counters of
        what came in between: every count, sum, histogram bucket and feature, and nothing
        (no bucket, category or feature) that only the earlier records had."""
        before, after = [], []
        for i in range(6):
            record = _record(request_id=f"r{i}", latency_us=2500 if i < 3 else 40000)
            record.status = rec_pb.PREDICTION_STATUS_ERROR if i in (1, 4) else record.status
            record.degraded = i == 2
            record.outputs.append(_probabilities((0.75, 0.25) if i < 3 else (0.5, 0.5)))
            record.features["amount"].CopyFrom(fv_pb.FeatureValue(double_value=10.0 * (i + 1)))
            if i < 3:
                record.features["country"].CopyFrom(fv_pb.FeatureValue(string_value="NL"))
            (before if i < 3 else after).append(record)
        earlier = _aggregate(before, 1)
        between = _aggregate(after, 2)
        later = {k: earlier.get(k, 0) + between.get(k, 0) for k in earlier.keys() | between.keys()}
        result = _read(later)
        result.subtract(_read(earlier))
        assert result == _read(between)
        assert (result.requests, result.errors, result.degraded, result.labels) == (3, 1, 0, 6)
        assert result.value_square_sum == 1.0
        assert set(result.features) == {"amount"}
