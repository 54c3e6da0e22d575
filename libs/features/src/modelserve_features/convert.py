"""Feature values and views to and from their protobuf messages."""

from __future__ import annotations

from datetime import timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from modelserve.feature.v1 import feature_view_pb2 as view_pb
from modelserve_features.views import FeatureDtype, FeatureSpec, FeatureView
from modelserve_runtime.convert import value_from_proto, value_to_proto
from modelserve_runtime.errors import InvalidArgumentError

__all__ = [
    "timestamp_from_us",
    "timestamp_us",
    "value_from_proto",
    "value_to_proto",
    "view_from_proto",
    "view_to_proto",
]

DTYPES: dict[view_pb.FeatureDtype.ValueType, FeatureDtype] = {
    view_pb.FEATURE_DTYPE_INT64: FeatureDtype.INT64,
    view_pb.FEATURE_DTYPE_DOUBLE: FeatureDtype.DOUBLE,
    view_pb.FEATURE_DTYPE_STRING: FeatureDtype.STRING,
    view_pb.FEATURE_DTYPE_BOOL: FeatureDtype.BOOL,
    view_pb.FEATURE_DTYPE_FLOAT_VECTOR: FeatureDtype.FLOAT_VECTOR,
}
_DTYPE_PROTOS = {v: k for k, v in DTYPES.items()}


def timestamp_us(timestamp: Timestamp) -> int:
    """A Timestamp in microseconds since the epoch."""
    return timestamp.seconds * 1_000_000 + timestamp.nanos // 1000


def timestamp_from_us(us: int) -> Timestamp:
    """Microseconds since the epoch as a Timestamp."""
    result = Timestamp()
    result.FromMicroseconds(us)
    return result


def view_from_proto(message: view_pb.FeatureView, view_name: str) -> FeatureView:
    """The definition in `message` (output-only fields ignored) named `view_name`;
    InvalidArgumentError naming `feature_view.features[i].dtype` when a dtype is unset."""
    features: list[FeatureSpec] = []
    for i, spec in enumerate(message.features):
        dtype = DTYPES.get(spec.dtype)
        if dtype is None:
            raise InvalidArgumentError.for_field(
                f"feature_view.features[{i}].dtype", "must be set to a known dtype"
            )
        features.append(
            FeatureSpec(
                name=spec.name,
                dtype=dtype,
                default=value_from_proto(spec.default_value)
                if spec.HasField("default_value")
                else None,
                description=spec.description,
            )
        )
    return FeatureView(
        name=view_name,
        entity_type=message.entity_type,
        features=tuple(features),
        max_age_s=message.max_age.ToTimedelta().total_seconds()
        if message.HasField("max_age")
        else 0.0,
        owner=message.owner,
        description=message.description,
    )


def view_to_proto(view: FeatureView) -> view_pb.FeatureView:
    """The view as a FeatureView message."""
    message = view_pb.FeatureView(
        name=f"featureViews/{view.name}",
        entity_type=view.entity_type,
        owner=view.owner,
        description=view.description,
        version=view.version,
        create_time=timestamp_from_us(view.create_time_us),
        update_time=timestamp_from_us(view.update_time_us),
    )
    if view.max_age_s:
        message.max_age.FromTimedelta(timedelta(seconds=view.max_age_s))
    for spec in view.features:
        feature = message.features.add(
            name=spec.name, dtype=_DTYPE_PROTOS[spec.dtype], description=spec.description
        )
        if spec.default is not None:
            feature.default_value.CopyFrom(value_to_proto(spec.default))
    return message
