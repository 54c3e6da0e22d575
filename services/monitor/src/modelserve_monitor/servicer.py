"""MonitorService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from typing import Any

import grpc

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve_monitor.stats import EndpointStats


class MonitorServicer(pb_grpc.MonitorServiceServicer):
    """Translates MonitorService calls to EndpointStats."""

    def __init__(self, stats: EndpointStats) -> None:
        self._stats = stats

    async def GetEndpointStats(
        self, request: pb.GetEndpointStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetEndpointStatsResponse:
        summary = self._stats.summary(request.endpoint)
        return pb.GetEndpointStatsResponse(
            endpoint=summary.endpoint,
            request_count=summary.request_count,
            versions=[
                pb.VersionStats(
                    model_version=v.model_version,
                    request_count=v.request_count,
                    error_count=v.error_count,
                    degraded_count=v.degraded_count,
                    latency_p50_ms=v.latency_p50_ms,
                    latency_p95_ms=v.latency_p95_ms,
                    latency_p99_ms=v.latency_p99_ms,
                )
                for v in summary.versions
            ],
        )
