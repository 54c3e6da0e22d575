"""FeatureService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve_feature.store import OnlineFeatures
from modelserve_features.convert import (
    timestamp_us,
    value_from_proto,
    view_from_proto,
    view_to_proto,
)
from modelserve_features.online import FeatureStatus, FeatureWrite, ReadValue
from modelserve_features.redis_store import EntityKey
from modelserve_features.views import FeatureDtype
from modelserve_runtime.errors import InvalidArgumentError

_STATUSES = {
    FeatureStatus.PRESENT: pb.FEATURE_STATUS_PRESENT,
    FeatureStatus.MISSING: pb.FEATURE_STATUS_MISSING,
    FeatureStatus.EXPIRED: pb.FEATURE_STATUS_EXPIRED,
    FeatureStatus.DEFAULTED: pb.FEATURE_STATUS_DEFAULTED,
}


#: The FeatureValue field holding each scalar dtype's values. A read value is of its feature's
#: dtype (values are checked when written, and a stored value of another dtype reads as not
#: stored), so it is set by name: `setattr` costs about 110 ns a value where a setter function
#: per dtype cost 160. A vector, a message, is extended in place.
_FIELDS: dict[FeatureDtype, str] = {
    FeatureDtype.INT64: "int64_value",
    FeatureDtype.DOUBLE: "double_value",
    FeatureDtype.STRING: "string_value",
    FeatureDtype.BOOL: "bool_value",
}
_VECTOR = FeatureDtype.FLOAT_VECTOR


def _fill(result: pb.EntityFeatures, row: Sequence[ReadValue]) -> None:
    """One entity's values, statuses and event times into its EntityFeatures.

    Each map entry is filled where it is (`get_or_create`) rather than built as a message and
    copied in: measured against building the maps as dicts and passing them to the
    constructor, or `update`, this is the cheapest way upb offers (about 13 µs for twenty
    values with their event times)."""
    values, statuses, event_times = result.values, result.statuses, result.event_times
    for feature, value, status, event_time_us in row:
        key = feature.key
        target = values.get_or_create(key)
        if value is not None:
            if feature.dtype is _VECTOR:
                target.float_vector_value.values.extend(cast(tuple[float, ...], value))
            else:
                setattr(target, _FIELDS[feature.dtype], value)
        statuses[key] = _STATUSES[status]
        if event_time_us is not None:
            seconds, micros = divmod(event_time_us, 1_000_000)
            stamp = event_times.get_or_create(key)
            stamp.seconds = seconds
            stamp.nanos = micros * 1000


def _fill_lists(result: pb.EntityFeatures, row: Sequence[ReadValue]) -> None:
    """One entity's values, statuses and event times as FEATURE_LAYOUT_LISTS lays them out:
    three lists in the row's (the request's) order, no feature reference sent back."""
    values = result.ordered_values
    statuses: list[pb.FeatureStatus.ValueType] = []
    event_times: list[int] = []
    for feature, value, status, event_time_us in row:
        target = values.add()
        if value is not None:
            if feature.dtype is _VECTOR:
                target.float_vector_value.values.extend(cast(tuple[float, ...], value))
            else:
                setattr(target, _FIELDS[feature.dtype], value)
        statuses.append(_STATUSES[status])
        event_times.append(0 if event_time_us is None else event_time_us)
    result.ordered_statuses.extend(statuses)
    result.ordered_event_times_us.extend(event_times)


_LAYOUTS = {
    pb.FEATURE_LAYOUT_UNSPECIFIED: _fill,
    pb.FEATURE_LAYOUT_MAPS: _fill,
    pb.FEATURE_LAYOUT_LISTS: _fill_lists,
}


def _writes(writes: Any) -> list[FeatureWrite]:
    return [
        FeatureWrite(
            entity=EntityKey(w.entity.entity_type, w.entity.entity_id),
            view=w.feature_view,
            values={name: value_from_proto(v) for name, v in w.values.items()},
            event_time_us=timestamp_us(w.event_time) if w.HasField("event_time") else None,
        )
        for w in writes
    ]


class FeatureServicer(pb_grpc.FeatureServiceServicer):
    """Translates FeatureService calls to OnlineFeatures."""

    def __init__(self, features: OnlineFeatures) -> None:
        self._features = features

    async def GetOnlineFeatures(
        self, request: pb.GetOnlineFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetOnlineFeaturesResponse:
        fill = _LAYOUTS.get(request.layout)
        if fill is None:
            raise InvalidArgumentError.for_field(
                "layout", f"{request.layout} is not a FeatureLayout (MAPS or LISTS)"
            )
        entities = [EntityKey(e.entity_type, e.entity_id) for e in request.entities]
        rows = await self._features.read(
            entities, request.features, timeout_s=context.time_remaining()
        )
        response = pb.GetOnlineFeaturesResponse()
        results = response.results
        for entity, row in zip(request.entities, rows, strict=True):
            fill(results.add(entity=entity), row)
        return response

    async def WriteFeatures(
        self, request: pb.WriteFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.WriteFeaturesResponse:
        result = await self._features.write(
            _writes(request.writes), timeout_s=context.time_remaining()
        )
        return pb.WriteFeaturesResponse(
            values_written=result.written, values_skipped_stale=result.stale
        )

    async def BulkWriteFeatures(
        self,
        request_iterator: AsyncIterator[pb.BulkWriteFeaturesRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.BulkWriteFeaturesResponse:
        async def batches() -> AsyncIterator[list[FeatureWrite]]:
            async for request in request_iterator:
                yield _writes(request.writes)

        result = await self._features.bulk_write(batches())
        return pb.BulkWriteFeaturesResponse(
            batches=result.batches,
            values_written=result.written,
            values_skipped_stale=result.stale,
        )

    async def ApplyFeatureView(
        self, request: pb.ApplyFeatureViewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ApplyFeatureViewResponse:
        view = view_from_proto(request.feature_view, request.feature_view.name)
        result = await self._features.apply_view(
            view,
            force=request.force,
            expected_version=(
                request.expected_version if request.HasField("expected_version") else None
            ),
        )
        return pb.ApplyFeatureViewResponse(
            feature_view=view_to_proto(result.view), changed=result.changed
        )

    async def GetFeatureView(
        self, request: pb.GetFeatureViewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetFeatureViewResponse:
        view = await self._features.get_view(request.name, request.version)
        return pb.GetFeatureViewResponse(feature_view=view_to_proto(view))

    async def ListFeatureViews(
        self, request: pb.ListFeatureViewsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListFeatureViewsResponse:
        page = await self._features.list_views(request.page_size, request.page_token)
        return pb.ListFeatureViewsResponse(
            feature_views=[view_to_proto(v) for v in page.views],
            next_page_token=page.next_page_token,
        )

    async def DeleteFeatureView(
        self, request: pb.DeleteFeatureViewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteFeatureViewResponse:
        await self._features.delete_view(request.name)
        return pb.DeleteFeatureViewResponse()
