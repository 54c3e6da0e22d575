"""The audit trail: every change recorded with who, when, what and why, listed by resource."""

from __future__ import annotations

import grpc
from registry_testing import (
    RunningRegistry,
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

V1, V2 = "models/fraud/versions/1", "models/fraud/versions/2"


async def audit(stub: pb_grpc.RegistryServiceAsyncStub, resource: str = "") -> list[pb.AuditEvent]:
    response = await stub.ListAuditEvents(pb.ListAuditEventsRequest(resource=resource))
    return list(response.audit_events)


class TestAuditTrail:
    async def test_every_change_is_recorded(self, registry: RunningRegistry) -> None:
        """Creating a model and versions, deploying and rolling back each leave one event with
        principal, time, action, resource, reason and what changed, newest first."""
        stub = registry.stub
        await create_model(stub, reason="new fraud model")
        requests = upload_requests(tiny_onnx())
        requests[0].upload.reason = "first training run"
        await stub.CreateModelVersion(stream(requests))
        await upload_version(stub, tiny_onnx(weight=2.0))
        await set_traffic(stub, "deployments/fraud", (V1, 100), reason="launch")
        await set_traffic(stub, "deployments/fraud", (V2, 100), reason="retrained")
        await stub.RollbackDeployment(
            pb.RollbackDeploymentRequest(name="deployments/fraud", reason="worse precision")
        )
        events = await audit(stub)
        assert [(e.action, e.resource, e.reason) for e in events] == [
            ("RollbackDeployment", "deployments/fraud", "worse precision"),
            ("UpdateDeployment", "deployments/fraud", "retrained"),
            ("UpdateDeployment", "deployments/fraud", "launch"),
            ("CreateModelVersion", V2, ""),
            ("CreateModelVersion", V1, "first training run"),
            ("CreateModel", "models/fraud", "new fraud model"),
        ]
        assert {e.principal for e in events} == {"anonymous"}
        assert all(e.create_time.seconds > 0 for e in events)
        assert [int(e.name.split("/")[1]) for e in events] == list(range(6, 0, -1))
        rollback = events[0]
        assert rollback.details["restored_revision"] == "1"
        assert rollback.details["revision"] == "3"
        assert '"version": 1' in rollback.details["traffic"]
        assert events[4].details["sha256"]

    async def test_filter_by_resource_includes_children(self, registry: RunningRegistry) -> None:
        """Filtering by `models/fraud` also finds its versions; by a deployment, only it."""
        stub = registry.stub
        await create_model(stub)
        await create_model(stub, "churn")
        await upload_version(stub)
        await upload_version(stub, parent="models/churn")
        await set_traffic(stub, "deployments/fraud", (V1, 100))
        assert [e.resource for e in await audit(stub, "models/fraud")] == [V1, "models/fraud"]
        assert [e.resource for e in await audit(stub, "deployments/fraud")] == ["deployments/fraud"]
        assert await audit(stub, "models/fraud/versions/9") == []
        assert await audit(stub, "models/fr") == []

    async def test_pages_walk_the_trail_once(self, registry: RunningRegistry) -> None:
        """page_size and next_page_token return every event exactly once, newest first; a token
        is only valid for the filter it came from."""
        stub = registry.stub
        await create_model(stub)
        for _ in range(4):
            await upload_version(stub)
        names: list[str] = []
        token = ""
        while True:
            page = await stub.ListAuditEvents(
                pb.ListAuditEventsRequest(resource="models/fraud", page_size=2, page_token=token)
            )
            names += [e.name for e in page.audit_events]
            token = page.next_page_token
            if not token:
                break
            last_token = token
        assert names == [f"auditEvents/{n}" for n in range(5, 0, -1)]
        error = await failure(
            stub.ListAuditEvents(pb.ListAuditEventsRequest(page_token=last_token))
        )
        assert (error.code, [v.field for v in error.violations]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ["page_token"],
        )

    async def test_refused_and_empty_changes_leave_no_event(
        self, registry: RunningRegistry
    ) -> None:
        """A refused request and an update that changes nothing record nothing."""
        stub = registry.stub
        await create_model(stub)
        await upload_version(stub)
        await set_traffic(stub, "deployments/fraud", (V1, 100))
        before = await audit(stub)
        await failure(create_model(stub))
        await failure(set_traffic(stub, "deployments/fraud", (V1, 90)))
        await failure(set_traffic(stub, "deployments/fraud", (V2, 100)))
        await set_traffic(stub, "deployments/fraud", (V1, 100), reason="no change")
        assert await audit(stub) == before
