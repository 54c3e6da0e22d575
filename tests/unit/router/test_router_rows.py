"""The model row the router assembles from features, for an input that refuses NaN and
infinity (the default) and for one whose signature lets it take them."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_features.online import FeatureResult, FeatureStatus
from modelserve_features.request_time import RequestFacts
from modelserve_features.views import FeatureRef
from modelserve_router.predict import VersionPlan, assemble_row
from modelserve_runtime.errors import InvalidArgumentError

REFS = ("customer:avg", "customer:count", "request:amount")
FACTS = RequestFacts(event_time=datetime(2026, 1, 1, tzinfo=UTC))
#: `customer:count` has no stored value at all.
STORED = {FeatureRef("customer", "avg"): FeatureResult(2.5, FeatureStatus.PRESENT)}


def _signature(allow_non_finite: bool) -> registry_pb.Signature:
    return registry_pb.Signature(
        inputs=[
            tensor_pb2.TensorSpec(
                name="features",
                datatype=tensor_pb2.DATA_TYPE_FP32,
                shape=[-1, 3],
                allow_non_finite=allow_non_finite,
            )
        ],
        feature_refs=list(REFS),
    )


class TestRows:
    def test_by_default_a_missing_value_is_zero_and_nan_is_refused(self) -> None:
        plan = VersionPlan.of(_signature(False))

        row, _, statuses = assemble_row(
            plan.refs, STORED, {"amount": 10.0}, FACTS, allow_non_finite=plan.allow_non_finite
        )
        with pytest.raises(InvalidArgumentError) as refused:
            assemble_row(plan.refs, STORED, {"amount": math.nan}, FACTS, allow_non_finite=False)

        assert row == [2.5, 0.0, 10.0]
        assert statuses["customer:count"] is FeatureStatus.MISSING
        assert [(v.field, v.description) for v in refused.value.violations] == [
            ("features.amount", "must be a finite number")
        ]

    def test_an_input_that_takes_nan_gets_nan_for_a_missing_value(self) -> None:
        """The signature's `allow_non_finite` reaches the plan: a stored feature without a
        value becomes NaN, the model's own missing value, and the caller's NaN and infinity
        pass; a value that is no number at all is still refused."""
        plan = VersionPlan.of(_signature(True))

        row, _, _ = assemble_row(
            plan.refs, STORED, {"amount": math.inf}, FACTS, allow_non_finite=plan.allow_non_finite
        )
        nan_row, _, _ = assemble_row(
            plan.refs, STORED, {"amount": math.nan}, FACTS, allow_non_finite=True
        )
        with pytest.raises(InvalidArgumentError) as refused:
            assemble_row(plan.refs, STORED, {"amount": "ten"}, FACTS, allow_non_finite=True)

        assert plan.allow_non_finite
        assert row[0] == 2.5 and math.isnan(row[1]) and row[2] == math.inf
        assert math.isnan(nan_row[2])
        assert [(v.field, v.description) for v in refused.value.violations] == [
            ("features.amount", "must be a number")
        ]
