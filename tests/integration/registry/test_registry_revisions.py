"""Deployment revisions, rollback and WatchDeployments through a real server on real SQLite."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from registry_testing import (
    RunningRegistry,
    create_model,
    failure,
    set_traffic,
    tiny_onnx,
    upload_version,
)
from support import running

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import build_server

V1, V2, V3 = (f"models/fraud/versions/{n}" for n in (1, 2, 3))
FRAUD = "deployments/fraud"
#: The longest a test waits for a message that must come; never a fixed sleep.
READ_TIMEOUT_S = 5.0


async def three_versions(stub: pb_grpc.RegistryServiceAsyncStub) -> None:
    await create_model(stub)
    for weight in (1.0, 2.0, 3.0):
        await upload_version(stub, tiny_onnx(weight=weight))


def traffic_of(deployment: pb.Deployment) -> set[tuple[str, int]]:
    return {(t.model_version, t.percent) for t in deployment.traffic}


async def revisions(
    stub: pb_grpc.RegistryServiceAsyncStub, name: str = FRAUD
) -> list[pb.DeploymentRevision]:
    response = await stub.ListDeploymentRevisions(pb.ListDeploymentRevisionsRequest(name=name))
    return list(response.revisions)


async def next_revision(
    call: grpc.aio.UnaryStreamCall[pb.WatchDeploymentsRequest, pb.WatchDeploymentsResponse],
) -> pb.DeploymentRevision:
    message = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
    assert isinstance(message, pb.WatchDeploymentsResponse)
    return message.revision


class TestRevisions:
    async def test_every_change_is_a_new_immutable_revision(
        self, registry: RunningRegistry
    ) -> None:
        """Each change adds a revision, listed newest first with its reason and principal, and
        earlier revisions never change."""
        stub = registry.stub
        await three_versions(stub)
        await set_traffic(stub, FRAUD, (V1, 100), reason="launch")
        before = await revisions(stub)
        await set_traffic(stub, FRAUD, (V1, 80), (V2, 20), reason="canary")
        await set_traffic(stub, FRAUD, (V2, 20), (V1, 80), reason="same split, no change")
        listed = await revisions(stub)
        assert [r.deployment.revision for r in listed] == [2, 1]
        assert [r.reason for r in listed] == ["canary", "launch"]
        assert {r.principal for r in listed} == {"anonymous"}
        assert traffic_of(listed[0].deployment) == {(V1, 80), (V2, 20)}
        assert listed[1] == before[0]
        assert listed[0].sequence > listed[1].sequence

    async def test_revisions_page_backwards(self, registry: RunningRegistry) -> None:
        """page_size and next_page_token walk the revisions newest first, each exactly once."""
        stub = registry.stub
        await three_versions(stub)
        for version in (V1, V2, V3, V1, V2):
            await set_traffic(stub, FRAUD, (version, 100))
        seen: list[int] = []
        token = ""
        while True:
            page = await stub.ListDeploymentRevisions(
                pb.ListDeploymentRevisionsRequest(name=FRAUD, page_size=2, page_token=token)
            )
            seen += [r.deployment.revision for r in page.revisions]
            token = page.next_page_token
            if not token:
                break
        assert seen == [5, 4, 3, 2, 1]

    async def test_bad_listing_requests(self, registry: RunningRegistry) -> None:
        """An unknown deployment is NOT_FOUND; a foreign page token is INVALID_ARGUMENT."""
        stub = registry.stub
        error = await failure(
            stub.ListDeploymentRevisions(pb.ListDeploymentRevisionsRequest(name=FRAUD))
        )
        assert error.code is grpc.StatusCode.NOT_FOUND
        await three_versions(stub)
        for version in (V1, V2):
            await set_traffic(stub, FRAUD, (version, 100))
        await set_traffic(stub, "deployments/churn", (V1, 100))
        page = await stub.ListDeploymentRevisions(
            pb.ListDeploymentRevisionsRequest(name=FRAUD, page_size=1)
        )
        error = await failure(
            stub.ListDeploymentRevisions(
                pb.ListDeploymentRevisionsRequest(
                    name="deployments/churn", page_token=page.next_page_token
                )
            )
        )
        assert [v.field for v in error.violations] == ["page_token"]


class TestRollback:
    async def test_rollback_restores_the_previous_revision_exactly(
        self, registry: RunningRegistry
    ) -> None:
        """A rollback makes a new revision whose traffic is exactly the previous revision's."""
        stub = registry.stub
        await three_versions(stub)
        first = await set_traffic(stub, FRAUD, (V1, 80), (V2, 20))
        await set_traffic(stub, FRAUD, (V3, 100))
        response = await stub.RollbackDeployment(
            pb.RollbackDeploymentRequest(name=FRAUD, reason="v3 errors")
        )
        rolled = response.deployment
        assert rolled.revision == 3
        assert list(rolled.traffic) == list(first.traffic)
        current = await stub.GetDeployment(pb.GetDeploymentRequest(name=FRAUD))
        assert current.deployment == rolled
        newest = (await revisions(stub))[0]
        assert (newest.restored_revision, newest.reason) == (1, "v3 errors")

    async def test_rollback_to_a_named_revision(self, registry: RunningRegistry) -> None:
        """`revision` picks which earlier revision's traffic comes back."""
        stub = registry.stub
        await three_versions(stub)
        for version in (V1, V2, V3):
            await set_traffic(stub, FRAUD, (version, 100))
        response = await stub.RollbackDeployment(
            pb.RollbackDeploymentRequest(name=FRAUD, revision=1)
        )
        assert (response.deployment.revision, traffic_of(response.deployment)) == (4, {(V1, 100)})
        again = await stub.RollbackDeployment(pb.RollbackDeploymentRequest(name=FRAUD))
        assert (again.deployment.revision, traffic_of(again.deployment)) == (5, {(V3, 100)})

    async def test_refused_rollbacks_change_nothing(self, registry: RunningRegistry) -> None:
        """No earlier revision is FAILED_PRECONDITION, an unknown one NOT_FOUND, a negative one
        INVALID_ARGUMENT, an unknown deployment NOT_FOUND; none adds a revision."""
        stub = registry.stub
        await three_versions(stub)
        await set_traffic(stub, FRAUD, (V1, 100))
        error = await failure(stub.RollbackDeployment(pb.RollbackDeploymentRequest(name=FRAUD)))
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "NO_PREVIOUS_REVISION",
        )
        error = await failure(
            stub.RollbackDeployment(pb.RollbackDeploymentRequest(name=FRAUD, revision=7))
        )
        assert (error.code, error.reason) == (
            grpc.StatusCode.NOT_FOUND,
            "DEPLOYMENT_REVISION_NOT_FOUND",
        )
        error = await failure(
            stub.RollbackDeployment(pb.RollbackDeploymentRequest(name=FRAUD, revision=-1))
        )
        assert [v.field for v in error.violations] == ["revision"]
        error = await failure(
            stub.RollbackDeployment(pb.RollbackDeploymentRequest(name="deployments/churn"))
        )
        assert error.reason == "DEPLOYMENT_NOT_FOUND"
        assert [r.deployment.revision for r in await revisions(stub)] == [1]


def _update(
    version: str, *, expected_revision: int | None, mask: tuple[str, ...] = ()
) -> pb.UpdateDeploymentRequest:
    request = pb.UpdateDeploymentRequest(
        deployment=pb.Deployment(
            name=FRAUD, traffic=[pb.TrafficTarget(model_version=version, percent=100)]
        ),
        allow_missing=True,
    )
    request.update_mask.paths.extend(mask)
    if expected_revision is not None:
        request.expected_revision = expected_revision
    return request


class TestExpectedRevision:
    async def test_a_change_made_against_an_old_revision_is_aborted(
        self, registry: RunningRegistry
    ) -> None:
        """Two writers read revision 1; the first one's change lands as revision 2, the second
        one's is ABORTED naming the current revision, and changes nothing. 0 creates only a
        deployment that does not exist yet."""
        stub = registry.stub
        await three_versions(stub)
        created = await stub.UpdateDeployment(_update(V1, expected_revision=0))
        assert created.deployment.revision == 1
        again = await failure(stub.UpdateDeployment(_update(V2, expected_revision=0)))

        first = await stub.UpdateDeployment(_update(V2, expected_revision=1))
        second = await failure(stub.UpdateDeployment(_update(V3, expected_revision=1)))
        # Whole (`*`) and merged writes are held to it alike.
        whole = await failure(stub.UpdateDeployment(_update(V3, expected_revision=1, mask=("*",))))
        merged = await failure(
            stub.UpdateDeployment(_update(V3, expected_revision=1, mask=("traffic",)))
        )
        third = await stub.UpdateDeployment(_update(V3, expected_revision=2, mask=("traffic",)))
        unconditional = await stub.UpdateDeployment(_update(V1, expected_revision=None))

        assert first.deployment.revision == 2
        for error in (again, second, whole, merged):
            assert (error.code, error.reason) == (grpc.StatusCode.ABORTED, "CONCURRENT_CHANGE")
        assert (again.metadata["revision"], again.metadata["expected_revision"]) == ("1", "0")
        assert (second.metadata["revision"], second.metadata["expected_revision"]) == ("2", "1")
        assert "read it again and retry" in second.message
        assert (third.deployment.revision, traffic_of(third.deployment)) == (3, {(V3, 100)})
        assert unconditional.deployment.revision == 4
        assert [r.deployment.revision for r in await revisions(stub)] == [4, 3, 2, 1]

    async def test_a_deployment_expected_at_a_revision_must_exist(
        self, registry: RunningRegistry
    ) -> None:
        """With `allow_missing`, a change expecting revision 3 of a deployment that does not
        exist is ABORTED (it is not created); a negative revision is INVALID_ARGUMENT."""
        stub = registry.stub
        await three_versions(stub)
        missing = await failure(stub.UpdateDeployment(_update(V1, expected_revision=3)))
        negative = await failure(stub.UpdateDeployment(_update(V1, expected_revision=-1)))

        assert (missing.code, missing.metadata["revision"]) == (grpc.StatusCode.ABORTED, "0")
        assert "does not exist" in missing.message
        assert [v.field for v in negative.violations] == ["expected_revision"]
        absent = await failure(stub.GetDeployment(pb.GetDeploymentRequest(name=FRAUD)))
        assert absent.code is grpc.StatusCode.NOT_FOUND

    async def test_rollback_against_an_old_revision_is_aborted(
        self, registry: RunningRegistry
    ) -> None:
        stub = registry.stub
        await three_versions(stub)
        for version in (V1, V2, V3):
            await set_traffic(stub, FRAUD, (version, 100))
        stale = await failure(
            stub.RollbackDeployment(pb.RollbackDeploymentRequest(name=FRAUD, expected_revision=2))
        )
        zero = await failure(
            stub.RollbackDeployment(pb.RollbackDeploymentRequest(name=FRAUD, expected_revision=0))
        )
        rolled = await stub.RollbackDeployment(
            pb.RollbackDeploymentRequest(name=FRAUD, expected_revision=3)
        )

        assert (stale.code, stale.reason, stale.metadata["revision"]) == (
            grpc.StatusCode.ABORTED,
            "CONCURRENT_CHANGE",
            "3",
        )
        assert [v.field for v in zero.violations] == ["expected_revision"]
        assert (rolled.deployment.revision, traffic_of(rolled.deployment)) == (4, {(V2, 100)})


class TestWatchDeployments:
    async def test_reconnecting_watcher_gets_exactly_the_missed_revisions(
        self, registry: RunningRegistry
    ) -> None:
        """A watcher that disconnects and resumes with its last sequence gets every revision
        made meanwhile, in order, once each, and then the live ones."""
        stub = registry.stub
        await three_versions(stub)
        await set_traffic(stub, FRAUD, (V1, 100))
        watch = stub.WatchDeployments(pb.WatchDeploymentsRequest(name=FRAUD))
        current = await next_revision(watch)
        assert (current.deployment.revision, traffic_of(current.deployment)) == (1, {(V1, 100)})
        await set_traffic(stub, FRAUD, (V2, 100))
        live = await next_revision(watch)
        assert live.deployment.revision == 2
        watch.cancel()

        await set_traffic(stub, FRAUD, (V3, 100))
        await set_traffic(stub, "deployments/churn", (V1, 100))
        await stub.RollbackDeployment(pb.RollbackDeploymentRequest(name=FRAUD))

        resumed = stub.WatchDeployments(
            pb.WatchDeploymentsRequest(name=FRAUD, after_sequence=live.sequence)
        )
        missed = [await next_revision(resumed), await next_revision(resumed)]
        assert [r.deployment.revision for r in missed] == [3, 4]
        assert traffic_of(missed[0].deployment) == {(V3, 100)}
        assert missed[1].restored_revision == 2
        await set_traffic(stub, FRAUD, (V1, 100))
        # The next message is the new revision: nothing else was queued before it.
        assert (await next_revision(resumed)).deployment.revision == 5
        resumed.cancel()

    async def test_watching_everything_starts_with_each_current_revision(
        self, registry: RunningRegistry
    ) -> None:
        """Without a name and a sequence, the watch opens with the newest revision of every
        deployment, in the order they were made, then follows all of them."""
        stub = registry.stub
        await three_versions(stub)
        await set_traffic(stub, FRAUD, (V1, 100))
        await set_traffic(stub, "deployments/churn", (V2, 100))
        await set_traffic(stub, FRAUD, (V3, 100))
        watch = stub.WatchDeployments(pb.WatchDeploymentsRequest())
        opening = [await next_revision(watch), await next_revision(watch)]
        assert [(r.deployment.name, r.deployment.revision) for r in opening] == [
            ("deployments/churn", 1),
            (FRAUD, 2),
        ]
        await set_traffic(stub, "deployments/churn", (V1, 100))
        follow = await next_revision(watch)
        assert (follow.deployment.name, follow.deployment.revision) == ("deployments/churn", 2)
        assert follow.sequence > opening[-1].sequence
        watch.cancel()

    async def test_resuming_after_a_restart_misses_nothing(
        self, registry_settings: RegistrySettings
    ) -> None:
        """Sequences are durable: a watcher resuming against a restarted registry gets the
        revisions made while it was away."""
        async with running(build_server, registry_settings) as (_, channel, _app):
            stub = pb_grpc.RegistryServiceStub(channel)
            await three_versions(stub)
            await set_traffic(stub, FRAUD, (V1, 100))
            watch = stub.WatchDeployments(pb.WatchDeploymentsRequest())
            last = await next_revision(watch)
            watch.cancel()
            await set_traffic(stub, FRAUD, (V2, 100))
        async with running(build_server, registry_settings) as (_, channel, _app):
            stub = pb_grpc.RegistryServiceStub(channel)
            resumed = stub.WatchDeployments(
                pb.WatchDeploymentsRequest(after_sequence=last.sequence)
            )
            assert traffic_of((await next_revision(resumed)).deployment) == {(V2, 100)}
            resumed.cancel()

    @pytest.mark.parametrize(
        ("request_", "field"),
        [
            (pb.WatchDeploymentsRequest(name="fraud"), "name"),
            (pb.WatchDeploymentsRequest(after_sequence=-1), "after_sequence"),
        ],
    )
    async def test_bad_watch_request_is_invalid(
        self, registry: RunningRegistry, request_: pb.WatchDeploymentsRequest, field: str
    ) -> None:
        """A malformed name or a negative sequence ends the watch with INVALID_ARGUMENT."""

        async def first() -> object:
            async for message in registry.stub.WatchDeployments(request_):
                return message
            return None

        error = await failure(first())
        assert [v.field for v in error.violations] == [field]
