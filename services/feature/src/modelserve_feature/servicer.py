"""FeatureService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from typing import Any

import grpc

from modelserve.feature.v1 import feature_service_pb2 as pb
from modelserve.feature.v1 import feature_service_pb2_grpc as pb_grpc
from modelserve_feature.store import OnlineFeatures
from modelserve_features.redis_store import EntityKey
from modelserve_runtime.convert import value_from_proto, value_to_proto


class FeatureServicer(pb_grpc.FeatureServiceServicer):
    """Translates FeatureService calls to OnlineFeatures."""

    def __init__(self, features: OnlineFeatures) -> None:
        self._features = features

    async def GetOnlineFeatures(
        self, request: pb.GetOnlineFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetOnlineFeaturesResponse:
        entities = [EntityKey(e.entity_type, e.entity_id) for e in request.entities]
        rows = await self._features.read(entities, list(request.features))
        response = pb.GetOnlineFeaturesResponse()
        for entity, values in zip(request.entities, rows, strict=True):
            result = response.results.add(entity=entity)
            for ref, value in values.items():
                result.values[str(ref)].CopyFrom(value_to_proto(value))
                result.statuses[str(ref)] = (
                    pb.FEATURE_STATUS_MISSING if value is None else pb.FEATURE_STATUS_PRESENT
                )
        return response

    async def WriteFeatures(
        self, request: pb.WriteFeaturesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.WriteFeaturesResponse:
        writes = [
            (
                EntityKey(w.entity.entity_type, w.entity.entity_id),
                {name: value_from_proto(v) for name, v in w.values.items()},
            )
            for w in request.writes
        ]
        return pb.WriteFeaturesResponse(values_written=await self._features.write(writes))
