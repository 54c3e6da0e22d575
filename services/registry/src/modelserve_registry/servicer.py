"""RegistryService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_registry.convert import (
    deployment_to_proto,
    format_from_proto,
    model_to_proto,
    model_version_to_proto,
    signature_from_proto,
)
from modelserve_registry.domain import Registry
from modelserve_registry.resources import TrafficShare, VersionUpload


async def _upload_messages(
    requests: AsyncIterator[pb.CreateModelVersionRequest],
) -> AsyncIterator[VersionUpload | bytes]:
    """The upload stream in domain terms: metadata, or a chunk (empty for an empty message)."""
    async for request in requests:
        if request.WhichOneof("payload") == "upload":
            upload = request.upload
            yield VersionUpload(
                parent=upload.parent,
                description=upload.model_version.description,
                format=format_from_proto(upload.model_version.format),
                signature=signature_from_proto(upload.model_version.signature),
                sha256=upload.sha256,
            )
        else:
            yield request.chunk


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    """Translates RegistryService calls to the Registry."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def CreateModel(
        self, request: pb.CreateModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateModelResponse:
        model = await self._registry.create_model(request.model_id, request.model.description)
        return pb.CreateModelResponse(model=model_to_proto(model))

    async def CreateModelVersion(
        self,
        request_iterator: AsyncIterator[pb.CreateModelVersionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CreateModelVersionResponse:
        version = await self._registry.create_model_version(_upload_messages(request_iterator))
        return pb.CreateModelVersionResponse(model_version=model_version_to_proto(version))

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelVersionResponse:
        version = await self._registry.get_model_version(request.name)
        return pb.GetModelVersionResponse(model_version=model_version_to_proto(version))

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelVersionsResponse:
        page = await self._registry.list_model_versions(
            request.parent, request.page_size, request.page_token
        )
        return pb.ListModelVersionsResponse(
            model_versions=[model_version_to_proto(v) for v in page.versions],
            next_page_token=page.next_page_token,
        )

    async def ReadModelVersionArtifact(
        self,
        request: pb.ReadModelVersionArtifactRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ReadModelVersionArtifactResponse]:
        async for chunk in self._registry.read_artifact(request.name):
            yield pb.ReadModelVersionArtifactResponse(chunk=chunk)

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetDeploymentResponse:
        deployment = await self._registry.get_deployment(request.name)
        return pb.GetDeploymentResponse(deployment=deployment_to_proto(deployment))

    async def UpdateDeployment(
        self, request: pb.UpdateDeploymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UpdateDeploymentResponse:
        deployment = await self._registry.update_deployment(
            request.deployment.name,
            [TrafficShare(t.model_version, t.percent) for t in request.deployment.traffic],
            list(request.update_mask.paths),
            allow_missing=request.allow_missing,
        )
        return pb.UpdateDeploymentResponse(deployment=deployment_to_proto(deployment))
