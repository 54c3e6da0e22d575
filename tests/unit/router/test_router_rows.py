"""The model row the router assembles from features, for an input that refuses NaN and
infinity (the default) and for one whose signature lets it take them."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import tensor_pb2
from modelserve_features.online import FeatureResult, FeatureStatus
from modelserve_features.request_time import RequestFacts
from modelserve_features.views import FeatureRef
from modelserve_router.predict import VersionPlan, assemble_row, check_range
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


def _plan(datatype: tensor_pb2.DataType.ValueType) -> VersionPlan:
    signature = _signature(False)
    signature.inputs[0].datatype = datatype
    return VersionPlan.of(signature)


class TestRange:
    def test_a_finite_value_the_input_dtype_cannot_hold_is_refused_by_name(self) -> None:
        """1.7e308 is a finite double but infinity as FP32, and 2**63 is beyond INT64: each is
        refused naming the feature (the caller's as `features.<name>`, a stored one by its
        ref), rather than cast into a value nobody sent. NaN is `assemble_row`'s to judge."""
        fp32, int64 = _plan(tensor_pb2.DATA_TYPE_FP32), _plan(tensor_pb2.DATA_TYPE_INT64)
        version = "models/m/versions/1"

        check_range(fp32, [float(np.finfo(np.float32).max), -3.4e38, math.nan], version)
        check_range(int64, [2.0**62, -(2.0**62), 0.0], version)
        with pytest.raises(InvalidArgumentError) as as_fp32:
            check_range(fp32, [1.7e308, 1.0, -1e39], version)
        with pytest.raises(InvalidArgumentError) as as_int64:
            check_range(int64, [0.0, 2.0**63, 0.0], version)

        assert [(v.field, v.description) for v in as_fp32.value.violations] == [
            ("customer:avg", "1.7e+308 is outside the range of models/m/versions/1's float32 input"),
            ("features.amount", "-1e+39 is outside the range of models/m/versions/1's float32 input"),
        ]  # fmt: skip
        assert [v.field for v in as_int64.value.violations] == ["customer:count"]

    def test_an_input_that_is_not_a_number_type_has_no_range_to_keep(self) -> None:
        """A BOOL or BYTES input: numpy has no range for them (asking once failed every
        request), and any number casts."""
        for datatype in (tensor_pb2.DATA_TYPE_BOOL, tensor_pb2.DATA_TYPE_BYTES):
            plan = _plan(datatype)
            assert plan.input_range == (-math.inf, math.inf)
            check_range(plan, [1.7e308, -1e39, 0.0], "models/m/versions/1")
