"""Stages, approvals and aliases of versions, with real keys so principals are distinct."""

from __future__ import annotations

import grpc
import pytest
from registry_testing import (
    AuthRegistry,
    RunningRegistry,
    failure,
    set_traffic,
    tiny_onnx,
    upload_version,
)

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc

V1, V2 = "models/fraud/versions/1", "models/fraud/versions/2"


async def transition(
    stub: pb_grpc.RegistryServiceAsyncStub,
    name: str,
    stage: pb.Stage.ValueType,
    metadata: tuple[tuple[str, str], ...],
) -> pb.ModelVersion:
    response = await stub.TransitionModelVersionStage(
        pb.TransitionModelVersionStageRequest(name=name, stage=stage, reason="why"),
        metadata=metadata,
    )
    return response.model_version


async def approve(
    stub: pb_grpc.RegistryServiceAsyncStub, name: str, metadata: tuple[tuple[str, str], ...]
) -> pb.ModelVersion:
    response = await stub.ApproveModelVersion(
        pb.ApproveModelVersionRequest(name=name, reason="metrics look right"), metadata=metadata
    )
    return response.model_version


async def stage_of(registry: AuthRegistry, name: str) -> pb.Stage.ValueType:
    response = await registry.stub.GetModelVersion(
        pb.GetModelVersionRequest(name=name), metadata=registry.bearer("vera")
    )
    return response.model_version.stage


class TestStages:
    async def test_new_version_starts_in_development(self, registry: RunningRegistry) -> None:
        """An uploaded version is in DEVELOPMENT with no aliases and no approvals."""
        await registry.stub.CreateModel(pb.CreateModelRequest(model_id="fraud"))
        version = await upload_version(registry.stub)
        assert (version.stage, list(version.aliases), list(version.approvals)) == (
            pb.STAGE_DEVELOPMENT,
            [],
            [],
        )

    async def test_production_after_another_approvers_approval(self, secured: AuthRegistry) -> None:
        """A STAGING version approved by someone else enters PRODUCTION, then may be ARCHIVED."""
        approved = await approve(secured.stub, V1, secured.bearer("april"))
        assert [(a.principal, a.reason) for a in approved.approvals] == [
            ("april", "metrics look right")
        ]
        promoted = await transition(secured.stub, V1, pb.STAGE_PRODUCTION, secured.bearer("dan"))
        assert promoted.stage == pb.STAGE_PRODUCTION
        # It still serves deployments/fraud: archiving it is refused until the traffic moves.
        serving = await failure(
            transition(secured.stub, V1, pb.STAGE_ARCHIVED, secured.bearer("dan"))
        )
        assert (serving.code, serving.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "VERSION_SERVING",
        )
        assert serving.metadata["deployment"] == "deployments/fraud"
        dan = secured.bearer("dan")
        await upload_version(secured.stub, tiny_onnx(weight=2.0), metadata=dan)
        await set_traffic(secured.stub, "deployments/fraud", (V2, 100), metadata=dan)
        archived = await transition(secured.stub, V1, pb.STAGE_ARCHIVED, dan)
        assert archived.stage == pb.STAGE_ARCHIVED

    async def test_production_without_approval_is_refused(self, secured: AuthRegistry) -> None:
        """Without an approval, entering PRODUCTION is FAILED_PRECONDITION naming the unmet
        condition, and the stage stays STAGING."""
        error = await failure(
            transition(secured.stub, V1, pb.STAGE_PRODUCTION, secured.bearer("dan"))
        )
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "APPROVAL_REQUIRED",
        )
        assert error.metadata["unmet_condition"] == (
            "approval by an approver other than the requester"
        )
        assert await stage_of(secured, V1) == pb.STAGE_STAGING

    async def test_self_approval_is_refused(self, secured: AuthRegistry) -> None:
        """A principal that approved a version cannot be the one to move it into PRODUCTION."""
        sam = secured.bearer("sam")
        await approve(secured.stub, V1, sam)
        error = await failure(transition(secured.stub, V1, pb.STAGE_PRODUCTION, sam))
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "APPROVAL_REQUIRED",
        )
        assert "requester cannot approve itself" in error.message
        assert error.metadata["requester"] == "sam"
        assert await stage_of(secured, V1) == pb.STAGE_STAGING
        await approve(secured.stub, V1, secured.bearer("april"))
        promoted = await transition(secured.stub, V1, pb.STAGE_PRODUCTION, sam)
        assert promoted.stage == pb.STAGE_PRODUCTION

    @pytest.mark.parametrize(
        ("path", "target"),
        [
            ((), pb.STAGE_PRODUCTION),
            ((), pb.STAGE_DEVELOPMENT),
            ((pb.STAGE_STAGING,), pb.STAGE_STAGING),
            ((pb.STAGE_ARCHIVED,), pb.STAGE_STAGING),
            ((pb.STAGE_ARCHIVED,), pb.STAGE_DEVELOPMENT),
        ],
    )
    async def test_skipping_or_going_back_is_refused(
        self,
        secured: AuthRegistry,
        path: tuple[pb.Stage.ValueType, ...],
        target: pb.Stage.ValueType,
    ) -> None:
        """Stages move one step forward or to ARCHIVED; anything else is FAILED_PRECONDITION."""
        ada = secured.bearer("ada")
        version = await upload_version(secured.stub, tiny_onnx(weight=2.0), metadata=ada)
        for stage in path:
            await transition(secured.stub, version.name, stage, ada)
        before = await stage_of(secured, version.name)
        error = await failure(transition(secured.stub, version.name, target, ada))
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "INVALID_STAGE_TRANSITION",
        )
        assert await stage_of(secured, version.name) == before

    async def test_unspecified_stage_is_invalid(self, secured: AuthRegistry) -> None:
        """A request without a stage is INVALID_ARGUMENT on `stage`."""
        error = await failure(
            transition(secured.stub, V1, pb.STAGE_UNSPECIFIED, secured.bearer("dan"))
        )
        assert [v.field for v in error.violations] == ["stage"]

    async def test_only_staging_versions_are_approved(self, secured: AuthRegistry) -> None:
        """Approving a version outside STAGING is FAILED_PRECONDITION and records nothing."""
        version = await upload_version(secured.stub, metadata=secured.bearer("dan"))
        error = await failure(approve(secured.stub, version.name, secured.bearer("april")))
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_IN_STAGING")
        got = await secured.stub.GetModelVersion(
            pb.GetModelVersionRequest(name=version.name), metadata=secured.bearer("april")
        )
        assert list(got.model_version.approvals) == []

    async def test_stage_changes_and_approvals_are_audited(self, secured: AuthRegistry) -> None:
        """Approvals and stage moves appear in the audit trail under their principals."""
        await approve(secured.stub, V1, secured.bearer("april"))
        await transition(secured.stub, V1, pb.STAGE_PRODUCTION, secured.bearer("dan"))
        events = await secured.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(resource=V1, page_size=2), metadata=secured.bearer("vera")
        )
        assert [(e.action, e.principal, dict(e.details)) for e in events.audit_events] == [
            (
                "TransitionModelVersionStage",
                "dan",
                {"from_stage": "STAGING", "stage": "PRODUCTION"},
            ),
            ("ApproveModelVersion", "april", {"approved_for": "PRODUCTION"}),
        ]


class TestAliases:
    async def test_alias_moves_between_versions(self, secured: AuthRegistry) -> None:
        """Setting an alias points it at one version, taking it from the one before."""
        dan = secured.bearer("dan")
        await upload_version(secured.stub, tiny_onnx(weight=2.0), metadata=dan)
        first = await secured.stub.SetModelVersionAlias(
            pb.SetModelVersionAliasRequest(name=V1, alias="champion"), metadata=dan
        )
        assert list(first.model_version.aliases) == ["champion"]
        await secured.stub.SetModelVersionAlias(
            pb.SetModelVersionAliasRequest(name=V2, alias="challenger"), metadata=dan
        )
        moved = await secured.stub.SetModelVersionAlias(
            pb.SetModelVersionAliasRequest(name=V2, alias="champion", reason="won the A/B"),
            metadata=dan,
        )
        assert list(moved.model_version.aliases) == ["challenger", "champion"]
        old = await secured.stub.GetModelVersion(pb.GetModelVersionRequest(name=V1), metadata=dan)
        assert list(old.model_version.aliases) == []
        events = await secured.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(resource=V2, page_size=1), metadata=dan
        )
        [event] = events.audit_events
        assert (event.action, event.reason, event.details["previous_version"]) == (
            "SetModelVersionAlias",
            "won the A/B",
            V1,
        )

    async def test_bad_alias_requests(self, secured: AuthRegistry) -> None:
        """A malformed alias is INVALID_ARGUMENT on `alias`; an unknown version NOT_FOUND."""
        dan = secured.bearer("dan")
        error = await failure(
            secured.stub.SetModelVersionAlias(
                pb.SetModelVersionAliasRequest(name=V1, alias="Champion!"), metadata=dan
            )
        )
        assert [v.field for v in error.violations] == ["alias"]
        error = await failure(
            secured.stub.SetModelVersionAlias(
                pb.SetModelVersionAliasRequest(name="models/fraud/versions/9", alias="x"),
                metadata=dan,
            )
        )
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_VERSION_NOT_FOUND")
