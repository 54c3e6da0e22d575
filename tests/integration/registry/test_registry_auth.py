"""API-key auth on the registry: missing and wrong keys, the role matrix, the audited principal."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from registry_testing import (
    ROLE_HOLDER,
    AuthRegistry,
    Metadata,
    create_model,
    failure,
    set_traffic,
    stream,
    tiny_onnx,
    upload_requests,
    upload_version,
)

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_registry.access import REGISTRY_POLICY
from modelserve_registry.artifacts import LocalArtifactStore
from modelserve_registry.config import RegistrySettings
from modelserve_registry.domain import Registry, parse_version_name
from modelserve_registry.rollout import MonitorGate, RolloutController
from modelserve_registry.servicer import RegistryServicer
from modelserve_registry.store import SqliteRegistryStore
from modelserve_runtime.auth import ApiKeyAuthenticator, AuthInterceptor, Role, new_api_key
from modelserve_runtime.channels import create_channel
from modelserve_runtime.errors import DecodedError, decode_rpc_error
from modelserve_runtime.server import build_grpc_server

V1 = "models/fraud/versions/1"
SERVICE = "/modelserve.registry.v1.RegistryService/"
ROLLOUT = "deployments/fraud/rollouts/1"


async def unreachable() -> grpc.aio.Channel:
    """A monitor channel that the test never gets to use."""
    raise AssertionError("no rollout runs in this test")


async def first_message(call: grpc.aio.UnaryStreamCall[object, object]) -> None:
    """Reads one message of a server stream, then ends it."""
    await asyncio.wait_for(call.read(), 5.0)
    call.cancel()


Call = Callable[["pb_grpc.RegistryServiceAsyncStub", Metadata, str], Awaitable[object]]

#: One call of every RegistryService RPC, as a principal (`who` makes names unique).
CALLS: dict[str, Call] = {
    "GetModel": lambda s, m, who: s.GetModel(pb.GetModelRequest(name="models/fraud"), metadata=m),
    "ListModels": lambda s, m, who: s.ListModels(pb.ListModelsRequest(), metadata=m),
    "GetModelVersion": lambda s, m, who: s.GetModelVersion(
        pb.GetModelVersionRequest(name=V1), metadata=m
    ),
    "ListModelVersions": lambda s, m, who: s.ListModelVersions(
        pb.ListModelVersionsRequest(parent="models/fraud"), metadata=m
    ),
    "ReadModelVersionArtifact": lambda s, m, who: first_message(
        s.ReadModelVersionArtifact(pb.ReadModelVersionArtifactRequest(name=V1), metadata=m)
    ),
    "GetDeployment": lambda s, m, who: s.GetDeployment(
        pb.GetDeploymentRequest(name="deployments/fraud"), metadata=m
    ),
    "ListDeploymentRevisions": lambda s, m, who: s.ListDeploymentRevisions(
        pb.ListDeploymentRevisionsRequest(name="deployments/fraud"), metadata=m
    ),
    "WatchDeployments": lambda s, m, who: first_message(
        s.WatchDeployments(pb.WatchDeploymentsRequest(), metadata=m)
    ),
    "ListAuditEvents": lambda s, m, who: s.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=m),
    "CreateModel": lambda s, m, who: create_model(s, f"m-{who}", metadata=m),
    "CreateModelVersion": lambda s, m, who: upload_version(s, metadata=m),
    "UpdateDeployment": lambda s, m, who: set_traffic(
        s, f"deployments/d-{who}", (V1, 100), metadata=m
    ),
    "RollbackDeployment": lambda s, m, who: s.RollbackDeployment(
        pb.RollbackDeploymentRequest(name="deployments/fraud"), metadata=m
    ),
    "TransitionModelVersionStage": lambda s, m, who: s.TransitionModelVersionStage(
        pb.TransitionModelVersionStageRequest(name=V1, stage=pb.STAGE_PRODUCTION), metadata=m
    ),
    "SetModelVersionAlias": lambda s, m, who: s.SetModelVersionAlias(
        pb.SetModelVersionAliasRequest(name=V1, alias=f"a-{who}"), metadata=m
    ),
    "ApproveModelVersion": lambda s, m, who: s.ApproveModelVersion(
        pb.ApproveModelVersionRequest(name=V1), metadata=m
    ),
    "UpdateModel": lambda s, m, who: s.UpdateModel(
        pb.UpdateModelRequest(model=pb.Model(name="models/fraud", description=who)), metadata=m
    ),
    "DeleteModel": lambda s, m, who: s.DeleteModel(
        pb.DeleteModelRequest(name=f"models/gone-{who}"), metadata=m
    ),
    "UpdateModelVersion": lambda s, m, who: s.UpdateModelVersion(
        pb.UpdateModelVersionRequest(model_version=pb.ModelVersion(name=V1, description=who)),
        metadata=m,
    ),
    "ValidateModelVersion": lambda s, m, who: s.ValidateModelVersion(
        pb.ValidateModelVersionRequest(name=V1), metadata=m
    ),
    "StartRollout": lambda s, m, who: s.StartRollout(
        pb.StartRolloutRequest(deployment="deployments/fraud", candidate_version=V1), metadata=m
    ),
    "GetRollout": lambda s, m, who: s.GetRollout(pb.GetRolloutRequest(name=ROLLOUT), metadata=m),
    "ListRollouts": lambda s, m, who: s.ListRollouts(
        pb.ListRolloutsRequest(parent="deployments/fraud"), metadata=m
    ),
    "PauseRollout": lambda s, m, who: s.PauseRollout(
        pb.PauseRolloutRequest(name=ROLLOUT), metadata=m
    ),
    "ResumeRollout": lambda s, m, who: s.ResumeRollout(
        pb.ResumeRolloutRequest(name=ROLLOUT), metadata=m
    ),
    "AbortRollout": lambda s, m, who: s.AbortRollout(
        pb.AbortRolloutRequest(name=ROLLOUT), metadata=m
    ),
}
READS = {
    "GetModel",
    "ListModels",
    "GetModelVersion",
    "ListModelVersions",
    "ReadModelVersionArtifact",
    "GetDeployment",
    "ListDeploymentRevisions",
    "WatchDeployments",
    "ListAuditEvents",
    "GetRollout",
    "ListRollouts",
}
DEPLOYS = {
    "CreateModel",
    "CreateModelVersion",
    "UpdateDeployment",
    "RollbackDeployment",
    "TransitionModelVersionStage",
    "SetModelVersionAlias",
    "UpdateModel",
    "UpdateModelVersion",
    "ValidateModelVersion",
    "StartRollout",
    "PauseRollout",
    "ResumeRollout",
    "AbortRollout",
}
#: `predict` is the router's data-plane role: the registry is closed to it, reads included.
ALLOWED: dict[Role, set[str]] = {
    Role.PREDICT: set(),
    Role.VIEWER: READS,
    Role.DEPLOYER: READS | DEPLOYS,
    Role.APPROVER: READS | {"ApproveModelVersion"},
    Role.ADMIN: set(CALLS),
}


async def outcome(call: Awaitable[object]) -> DecodedError | None:
    """The decoded error a call ends with, or None when it succeeds."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return decode_rpc_error(exc)
    return None


#: What gRPC's Python client reports when it writes into a client-streaming call that the
#: server has just refused (seen about once in 400 refused uploads): the client's own
#: INTERNAL, standing in for the server's status, which is lost.
CLIENT_WRITE_RACE = (grpc.StatusCode.INTERNAL, "Internal error from Core")


async def server_outcome(make_call: Callable[[], Awaitable[object]]) -> DecodedError | None:
    """`outcome`, made again (up to three times) while the client lost the server's answer to
    CLIENT_WRITE_RACE, so the matrix checks what the registry answered."""
    for _ in range(3):
        error = await outcome(make_call())
        if error is None or (error.code, error.message) != CLIENT_WRITE_RACE:
            return error
    return error


class TestAuthentication:
    async def test_missing_key_is_unauthenticated(self, secured: AuthRegistry) -> None:
        """A call without a key is UNAUTHENTICATED with API_KEY_MISSING."""
        error = await failure(secured.stub.ListModels(pb.ListModelsRequest()))
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING")

    @pytest.mark.parametrize(
        "bad",
        ["nonsense", "msk_0123456789abcdef_" + "x" * 43, "Bearer", ""],
    )
    async def test_wrong_key_is_unauthenticated(self, secured: AuthRegistry, bad: str) -> None:
        """A malformed, unknown or wrong key is UNAUTHENTICATED, and so is an empty one."""
        error = await failure(
            secured.stub.ListModels(pb.ListModelsRequest(), metadata=(("x-api-key", bad),))
        )
        assert error.code is grpc.StatusCode.UNAUTHENTICATED

    async def test_right_key_id_with_wrong_secret_is_unauthenticated(
        self, secured: AuthRegistry
    ) -> None:
        """A known key id with another secret does not authenticate."""
        real = secured.keys["ada"]
        forged = real[: real.rindex("_") + 1] + "A" * 43
        error = await failure(
            secured.stub.ListModels(pb.ListModelsRequest(), metadata=(("x-api-key", forged),))
        )
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")

    async def test_both_headers_carry_a_key(self, secured: AuthRegistry) -> None:
        """`authorization: Bearer <key>` and `x-api-key: <key>` both authenticate."""
        key = secured.keys["vera"]
        for metadata in ((("authorization", f"Bearer {key}"),), (("x-api-key", key),)):
            await secured.stub.ListModels(pb.ListModelsRequest(), metadata=metadata)

    async def test_health_needs_no_key(self, secured: AuthRegistry) -> None:
        """Health checks stay open, so orchestrators and Consul need no key."""
        health = health_pb2_grpc.HealthStub(secured.channel)
        response = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    async def test_refused_upload_records_nothing(self, secured: AuthRegistry) -> None:
        """An upload without a key is refused before its bytes are read, leaving no version."""
        error = await failure(
            secured.stub.CreateModelVersion(stream(upload_requests(tiny_onnx(weight=5.0))))
        )
        assert error.code is grpc.StatusCode.UNAUTHENTICATED
        listed = await secured.stub.ListModelVersions(
            pb.ListModelVersionsRequest(parent="models/fraud"), metadata=secured.bearer("vera")
        )
        assert [v.name for v in listed.model_versions] == [V1]

    async def test_keys_never_reach_the_logs(self, secured: AuthRegistry) -> None:
        """Neither a good nor a bad key appears in any log line of the call."""
        good = secured.keys["dan"]
        bad = good[:-4] + "AAAA"
        with structlog.testing.capture_logs() as logs:
            await set_traffic(
                secured.stub, "deployments/fraud", (V1, 100), metadata=secured.bearer("dan")
            )
            await failure(
                secured.stub.ListModels(pb.ListModelsRequest(), metadata=(("x-api-key", bad),))
            )
        assert logs
        text = repr(logs)
        assert good not in text and bad not in text
        assert good.split("_", 2)[2] not in text  # the secret may itself hold "_"


class TestRoleMatrix:
    def test_every_rpc_has_a_role_entry(self) -> None:
        """Every RegistryService RPC is in the role table and in this matrix."""
        methods = set(pb.DESCRIPTOR.services_by_name["RegistryService"].methods_by_name)
        assert {m.removeprefix(SERVICE) for m in REGISTRY_POLICY} == methods
        assert set(CALLS) == methods

    @pytest.mark.parametrize("role", list(Role))
    async def test_role_matrix(self, secured: AuthRegistry, role: Role) -> None:
        """Each role may call exactly its RPCs; any other answers PERMISSION_DENIED naming the
        roles that would do."""
        principal = ROLE_HOLDER[role]
        for method, call in CALLS.items():
            error = await server_outcome(
                functools.partial(call, secured.stub, secured.bearer(principal), principal)
            )
            if method in ALLOWED[role]:
                assert error is None or error.code not in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ), (role, method, error)
            else:
                assert error is not None, (role, method)
                assert (error.code, error.reason) == (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "ROLE_REQUIRED",
                ), (role, method)
                assert "admin" in error.metadata["required_roles"]

    async def test_denied_change_changes_nothing(self, secured: AuthRegistry) -> None:
        """A viewer's deployment change is refused and neither revision nor audit moves."""
        vera = secured.bearer("vera")
        before = await secured.stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=vera)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await set_traffic(secured.stub, "deployments/fraud", (V1, 100), metadata=vera)
        assert decode_rpc_error(info.value).code is grpc.StatusCode.PERMISSION_DENIED
        after = await secured.stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=vera)
        assert after == before


class TestPrincipalInAudit:
    async def test_the_key_holder_is_the_recorded_principal(self, secured: AuthRegistry) -> None:
        """Changes made with a key are audited and revisioned under that key's principal."""
        dan = secured.bearer("dan")
        await upload_version(secured.stub, tiny_onnx(weight=2.0), metadata=dan)
        await set_traffic(
            secured.stub,
            "deployments/fraud",
            ("models/fraud/versions/2", 100),
            reason="retrain",
            metadata=dan,
        )
        events = await secured.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=2), metadata=dan
        )
        assert [(e.action, e.principal) for e in events.audit_events] == [
            ("UpdateDeployment", "dan"),
            ("CreateModelVersion", "dan"),
        ]
        revisions = await secured.stub.ListDeploymentRevisions(
            pb.ListDeploymentRevisionsRequest(name="deployments/fraud"), metadata=dan
        )
        assert [r.principal for r in revisions.revisions] == ["dan", "ada"]


class TestUnlistedMethod:
    async def test_method_without_roles_is_refused_even_to_admin(self, tmp_path: Path) -> None:
        """A method missing from the role table is PERMISSION_DENIED for every key, admin's too."""
        key, record = new_api_key("ada", {Role.ADMIN}, n=16)
        settings = RegistrySettings(production_traffic_only=False, data_dir=tmp_path / "registry")
        policy = {m: r for m, r in REGISTRY_POLICY.items() if not m.endswith("/ListModels")}
        store = SqliteRegistryStore(settings.db_path)
        registry = Registry(
            store,
            LocalArtifactStore(settings.artifacts_dir),
            max_artifact_bytes=1 << 20,
            read_chunk_bytes=1 << 10,
        )
        rollouts = RolloutController(
            store,
            MonitorGate(unreachable, timeout_s=1.0),
            notify=registry.notify_deployment_change,
            get_deployment=registry.get_deployment,
            parse_version=parse_version_name,
            production_only=False,
            tick_s=1.0,
        )

        def register(server: grpc.aio.Server) -> list[str]:
            pb_grpc.add_RegistryServiceServicer_to_server(
                RegistryServicer(registry, rollouts), server
            )
            return []

        auth = AuthInterceptor(ApiKeyAuthenticator([record]), policy)
        server = build_grpc_server("registry", settings, register, inner_interceptors=[auth])
        await server.server.start()
        await store.open()
        try:
            async with create_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.RegistryServiceStub(channel)
                metadata = (("x-api-key", key),)
                error = await failure(stub.ListModels(pb.ListModelsRequest(), metadata=metadata))
                assert (error.code, error.reason) == (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "METHOD_NOT_ALLOWED",
                )
                error = await failure(
                    stub.GetModel(pb.GetModelRequest(name="models/fraud"), metadata=metadata)
                )
                assert error.code is grpc.StatusCode.NOT_FOUND
        finally:
            await server.server.stop(0)
            await store.close()
