"""FeatureService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve_feature.store import OnlineFeatures
from modelserve_features.convert import (
    timestamp_from_us,
    timestamp_us,
    value_from_proto,
    value_to_proto,
    view_from_proto,
    view_to_proto,
)
from modelserve_features.online import FeatureStatus, FeatureWrite
from modelserve_features.redis_store import EntityKey

_STATUSES = {
    FeatureStatus.PRESENT: pb.FEATURE_STATUS_PRESENT,
    FeatureStatus.MISSING: pb.FEATURE_STATUS_MISSING,
    FeatureStatus.EXPIRED: pb.FEATURE_STATUS_EXPIRED,
    FeatureStatus.DEFAULTED: pb.FEATURE_STATUS_DEFAULTED,
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
        entities = [EntityKey(e.entity_type, e.entity_id) for e in request.entities]
        rows = await self._features.read(
            entities, list(request.features), timeout_s=context.time_remaining()
        )
        response = pb.GetOnlineFeaturesResponse()
        for entity, values in zip(request.entities, rows, strict=True):
            result = response.results.add(entity=entity)
            for ref, read in values.items():
                key = str(ref)
                result.values[key].CopyFrom(value_to_proto(read.value))
                result.statuses[key] = _STATUSES[read.status]
                if read.event_time_us is not None:
                    result.event_times[key].CopyFrom(timestamp_from_us(read.event_time_us))
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
        result = await self._features.apply_view(view, force=request.force)
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
