"""RegistryService RPCs: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_registry.convert import (
    audit_event_to_proto,
    default_output_from_proto,
    deployment_to_proto,
    format_from_proto,
    model_to_proto,
    model_version_to_proto,
    revision_to_proto,
    signature_from_proto,
    stage_from_proto,
)
from modelserve_registry.domain import Registry
from modelserve_registry.resources import Actor, TrafficShare, VersionUpload
from modelserve_registry.rollout import RolloutController, rollout_to_proto
from modelserve_runtime.auth import current_principal


def _actor(reason: str) -> Actor:
    """The caller of the RPC being handled, as the auth interceptor identified it."""
    return Actor(current_principal(), reason)


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
                reason=upload.reason,
                extras=pb.ModelVersion(
                    sample_inputs=upload.model_version.sample_inputs,
                    metrics=upload.model_version.metrics,
                    lineage=upload.model_version.lineage,
                    tags=upload.model_version.tags,
                ).SerializeToString(),
            )
        else:
            yield request.chunk


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    """Translates RegistryService calls to the Registry."""

    def __init__(self, registry: Registry, rollouts: RolloutController) -> None:
        self._registry = registry
        self._rollouts = rollouts

    async def CreateModel(
        self, request: pb.CreateModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateModelResponse:
        model = await self._registry.create_model(
            request.model_id,
            request.model.description,
            _actor(request.reason),
            labels=dict(request.model.labels),
            validation_set=request.model.validation_set,
        )
        return pb.CreateModelResponse(model=model_to_proto(model))

    async def CreateModelVersion(
        self,
        request_iterator: AsyncIterator[pb.CreateModelVersionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CreateModelVersionResponse:
        version = await self._registry.create_model_version(
            _upload_messages(request_iterator), current_principal()
        )
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
            actor=_actor(request.reason),
            routing_key=request.deployment.routing_key,
            salt=request.deployment.salt,
            shadow=list(request.deployment.shadow),
            fallback_version=request.deployment.fallback_version,
            default_outputs=[
                default_output_from_proto(t) for t in request.deployment.default_outputs
            ],
            inference=request.deployment.inference,
            hybrid=request.deployment.hybrid,
            strategy=request.deployment.strategy,
            expected_revision=(
                request.expected_revision if request.HasField("expected_revision") else None
            ),
        )
        return pb.UpdateDeploymentResponse(deployment=deployment_to_proto(deployment))

    async def ListDeploymentRevisions(
        self,
        request: pb.ListDeploymentRevisionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ListDeploymentRevisionsResponse:
        page = await self._registry.list_deployment_revisions(
            request.name, request.page_size, request.page_token
        )
        return pb.ListDeploymentRevisionsResponse(
            revisions=[revision_to_proto(r) for r in page.items],
            next_page_token=page.next_page_token,
        )

    async def RollbackDeployment(
        self, request: pb.RollbackDeploymentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RollbackDeploymentResponse:
        deployment = await self._registry.rollback_deployment(
            request.name,
            request.revision,
            _actor(request.reason),
            expected_revision=(
                request.expected_revision if request.HasField("expected_revision") else None
            ),
        )
        return pb.RollbackDeploymentResponse(deployment=deployment_to_proto(deployment))

    async def WatchDeployments(
        self, request: pb.WatchDeploymentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchDeploymentsResponse]:
        async for revision in self._registry.watch_deployments(
            request.name, request.after_sequence
        ):
            yield pb.WatchDeploymentsResponse(revision=revision_to_proto(revision))

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAuditEventsResponse:
        page = await self._registry.list_audit_events(
            request.resource, request.page_size, request.page_token
        )
        return pb.ListAuditEventsResponse(
            audit_events=[audit_event_to_proto(e) for e in page.items],
            next_page_token=page.next_page_token,
        )

    async def TransitionModelVersionStage(
        self,
        request: pb.TransitionModelVersionStageRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.TransitionModelVersionStageResponse:
        version = await self._registry.transition_stage(
            request.name, stage_from_proto(request.stage), _actor(request.reason)
        )
        return pb.TransitionModelVersionStageResponse(model_version=model_version_to_proto(version))

    async def ApproveModelVersion(
        self, request: pb.ApproveModelVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ApproveModelVersionResponse:
        version = await self._registry.approve_model_version(request.name, _actor(request.reason))
        return pb.ApproveModelVersionResponse(model_version=model_version_to_proto(version))

    async def SetModelVersionAlias(
        self, request: pb.SetModelVersionAliasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetModelVersionAliasResponse:
        version = await self._registry.set_alias(
            request.name, request.alias, _actor(request.reason)
        )
        return pb.SetModelVersionAliasResponse(model_version=model_version_to_proto(version))

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelResponse:
        model = await self._registry.get_model(request.name)
        return pb.GetModelResponse(model=model_to_proto(model))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        page = await self._registry.list_models(request.page_size, request.page_token)
        return pb.ListModelsResponse(
            models=[model_to_proto(m) for m in page.items], next_page_token=page.next_page_token
        )

    async def UpdateModel(
        self, request: pb.UpdateModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UpdateModelResponse:
        model = await self._registry.update_model(
            request.model.name,
            list(request.update_mask.paths),
            _actor(request.reason),
            description=request.model.description,
            labels=dict(request.model.labels),
            validation_set=request.model.validation_set,
        )
        return pb.UpdateModelResponse(model=model_to_proto(model))

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteModelResponse:
        await self._registry.delete_model(request.name, request.force, _actor(request.reason))
        return pb.DeleteModelResponse()

    async def UpdateModelVersion(
        self, request: pb.UpdateModelVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UpdateModelVersionResponse:
        version = await self._registry.update_model_version(
            request.model_version.name,
            list(request.update_mask.paths),
            _actor(request.reason),
            description=request.model_version.description,
            tags=dict(request.model_version.tags),
        )
        return pb.UpdateModelVersionResponse(model_version=model_version_to_proto(version))

    async def ValidateModelVersion(
        self, request: pb.ValidateModelVersionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ValidateModelVersionResponse:
        version = await self._registry.validate_model_version(request.name, _actor(request.reason))
        return pb.ValidateModelVersionResponse(
            validation=model_version_to_proto(version).validation
        )

    async def StartRollout(
        self, request: pb.StartRolloutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StartRolloutResponse:
        rollout = await self._rollouts.start(
            request.deployment,
            request.candidate_version,
            request.strategy if request.HasField("strategy") else None,
            _actor(request.reason),
        )
        return pb.StartRolloutResponse(rollout=rollout_to_proto(rollout))

    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetRolloutResponse:
        return pb.GetRolloutResponse(
            rollout=rollout_to_proto(await self._rollouts.get(request.name))
        )

    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListRolloutsResponse:
        page = await self._rollouts.list(request.parent, request.page_size, request.page_token)
        return pb.ListRolloutsResponse(
            rollouts=[rollout_to_proto(r) for r in page.items],
            next_page_token=page.next_page_token,
        )

    async def PauseRollout(
        self, request: pb.PauseRolloutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PauseRolloutResponse:
        rollout = await self._rollouts.pause(request.name, _actor(request.reason))
        return pb.PauseRolloutResponse(rollout=rollout_to_proto(rollout))

    async def ResumeRollout(
        self, request: pb.ResumeRolloutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ResumeRolloutResponse:
        rollout = await self._rollouts.resume(request.name, _actor(request.reason))
        return pb.ResumeRolloutResponse(rollout=rollout_to_proto(rollout))

    async def AbortRollout(
        self, request: pb.AbortRolloutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AbortRolloutResponse:
        rollout = await self._rollouts.abort(request.name, _actor(request.reason))
        return pb.AbortRolloutResponse(rollout=rollout_to_proto(rollout))
