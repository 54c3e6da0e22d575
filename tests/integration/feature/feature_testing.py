"""Builders shared by the feature service tests: views, writes, reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_view_pb2 as view_pb
from modelserve.type.v1 import feature_value_pb2 as value_pb
from modelserve_feature.config import FeatureSettings
from modelserve_runtime.errors import DecodedError, decode_rpc_error


def settings(redis_url: str, **overrides: object) -> FeatureSettings:
    """Feature service settings on `redis_url`."""
    return FeatureSettings(redis_url=redis_url, **overrides)  # type: ignore[arg-type]


def double(value: float) -> value_pb.FeatureValue:
    """A double FeatureValue."""
    return value_pb.FeatureValue(double_value=value)


def customer_view(
    max_age_s: int = 0, **extra: view_pb.FeatureDtype.ValueType
) -> view_pb.FeatureView:
    """View `customer` of `customer` entities: avg_amount_30d (double), chargebacks_90d
    (int64, default 0), segment (string), vip (bool), embedding (float vector), plus `extra`."""
    view = view_pb.FeatureView(
        name="featureViews/customer",
        entity_type="customer",
        owner="risk-team",
        features=[
            view_pb.FeatureSpec(name="avg_amount_30d", dtype=view_pb.FEATURE_DTYPE_DOUBLE),
            view_pb.FeatureSpec(
                name="chargebacks_90d",
                dtype=view_pb.FEATURE_DTYPE_INT64,
                default_value=value_pb.FeatureValue(int64_value=0),
            ),
            view_pb.FeatureSpec(name="segment", dtype=view_pb.FEATURE_DTYPE_STRING),
            view_pb.FeatureSpec(name="vip", dtype=view_pb.FEATURE_DTYPE_BOOL),
            view_pb.FeatureSpec(name="embedding", dtype=view_pb.FEATURE_DTYPE_FLOAT_VECTOR),
            *(view_pb.FeatureSpec(name=n, dtype=d) for n, d in extra.items()),
        ],
    )
    if max_age_s:
        view.max_age.CopyFrom(Duration(seconds=max_age_s))
    return view


def entity(entity_id: str, entity_type: str = "customer") -> pb.EntityKey:
    """An EntityKey."""
    return pb.EntityKey(entity_type=entity_type, entity_id=entity_id)


def at(when: datetime) -> Timestamp:
    """A Timestamp."""
    timestamp = Timestamp()
    timestamp.FromDatetime(when)
    return timestamp


def ago(seconds: float) -> Timestamp:
    """The Timestamp `seconds` before now."""
    return at(datetime.now(UTC) - timedelta(seconds=seconds))


def write(
    entity_id: str,
    values: dict[str, value_pb.FeatureValue],
    *,
    view: str = "featureViews/customer",
    event_time: Timestamp | None = None,
    entity_type: str = "customer",
) -> pb.EntityFeatureWrite:
    """One EntityFeatureWrite."""
    result = pb.EntityFeatureWrite(
        entity=entity(entity_id, entity_type), values=values, feature_view=view
    )
    if event_time is not None:
        result.event_time.CopyFrom(event_time)
    return result


def rpc_error(info: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> DecodedError:
    """The decoded status of a failed call."""
    return decode_rpc_error(info.value)
