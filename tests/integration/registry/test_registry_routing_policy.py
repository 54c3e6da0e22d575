"""A deployment's routing policy (sticky routing key, salt, shadow versions) through a real server."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from registry_testing import RunningRegistry, create_model, failure, set_traffic, upload_version

from modelserve.registry.v1 import registry_service_pb2 as pb
from modelserve.type.v1 import tensor_pb2

V1, V2, V3 = (f"models/fraud/versions/{n}" for n in (1, 2, 3))
FRAUD = "deployments/fraud"


def mask(*paths: str) -> FieldMask:
    return FieldMask(paths=list(paths))


def probabilities(*values: float, shape: tuple[int, ...] = (1, 2)) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        name="probabilities",
        datatype=tensor_pb2.DATA_TYPE_FP32,
        shape=list(shape),
        contents=tensor_pb2.TensorContents(fp32_contents=list(values)),
    )


async def update(
    registry: RunningRegistry, deployment: pb.Deployment, *paths: str
) -> pb.Deployment:
    response = await registry.stub.UpdateDeployment(
        pb.UpdateDeploymentRequest(deployment=deployment, update_mask=mask(*paths))
    )
    return response.deployment


@pytest.fixture
async def fraud(registry: RunningRegistry) -> RunningRegistry:
    """Three versions of `fraud` and deployment `fraud` sending everything to version 1."""
    await create_model(registry.stub)
    for _ in range(3):
        await upload_version(registry.stub)
    await set_traffic(registry.stub, FRAUD, (V1, 100))
    return registry


class TestRoutingPolicy:
    async def test_policy_is_stored_returned_and_watched(self, fraud: RunningRegistry) -> None:
        """Routing key, salt and shadow versions come back from Get and in the revision a
        watcher receives."""
        await update(
            fraud,
            pb.Deployment(
                name=FRAUD,
                traffic=[
                    pb.TrafficTarget(model_version=V1, percent=90),
                    pb.TrafficTarget(model_version=V2, percent=10),
                ],
                routing_key="customer",
                salt="spring-test",
                shadow=[V3],
            ),
        )
        got = (await fraud.stub.GetDeployment(pb.GetDeploymentRequest(name=FRAUD))).deployment
        assert (got.routing_key, got.salt, list(got.shadow)) == ("customer", "spring-test", [V3])
        watch = fraud.stub.WatchDeployments(pb.WatchDeploymentsRequest(name=FRAUD))
        first = await watch.read()
        watch.cancel()
        assert isinstance(first, pb.WatchDeploymentsResponse)
        assert first.revision.deployment.revision == 2
        assert list(first.revision.deployment.shadow) == [V3]

    async def test_update_mask_keeps_fields_it_does_not_name(self, fraud: RunningRegistry) -> None:
        """A mask of `shadow` changes the shadows and keeps traffic, routing key and salt, and an
        empty mask keeps policy fields the request leaves unset."""
        await update(
            fraud,
            pb.Deployment(name=FRAUD, routing_key="user", salt="s1"),
            "routing_key",
            "salt",
        )
        after = await update(fraud, pb.Deployment(name=FRAUD, shadow=[V2]), "shadow")
        assert [(t.model_version, t.percent) for t in after.traffic] == [(V1, 100)]
        assert (after.routing_key, after.salt, list(after.shadow)) == ("user", "s1", [V2])
        plain = await set_traffic(fraud.stub, FRAUD, (V1, 50), (V3, 50))
        assert (plain.routing_key, plain.salt, list(plain.shadow)) == ("user", "s1", [V2])

    async def test_rollback_restores_the_policy(self, fraud: RunningRegistry) -> None:
        """Rolling back restores the routing policy of the revision along with its traffic."""
        await update(fraud, pb.Deployment(name=FRAUD, shadow=[V2]), "shadow")
        response = await fraud.stub.RollbackDeployment(pb.RollbackDeploymentRequest(name=FRAUD))
        assert list(response.deployment.shadow) == []
        assert response.deployment.revision == 3

    async def test_same_policy_is_no_change(self, fraud: RunningRegistry) -> None:
        """Sending the policy the deployment already has makes no revision."""
        first = await update(fraud, pb.Deployment(name=FRAUD, routing_key="user"), "routing_key")
        again = await update(fraud, pb.Deployment(name=FRAUD, routing_key="user"), "routing_key")
        assert first.revision == again.revision == 2

    @pytest.mark.parametrize(
        ("deployment", "field"),
        [
            (pb.Deployment(name=FRAUD, routing_key="Customer!"), "deployment.routing_key"),
            (pb.Deployment(name=FRAUD, salt="x" * 129), "deployment.salt"),
            (pb.Deployment(name=FRAUD, shadow=["fraud/2"]), "deployment.shadow[0]"),
            (pb.Deployment(name=FRAUD, shadow=[V1]), "deployment.shadow[0]"),
            (pb.Deployment(name=FRAUD, shadow=[V2, V2]), "deployment.shadow[1]"),
        ],
    )
    async def test_bad_policy_is_refused_and_changes_nothing(
        self, fraud: RunningRegistry, deployment: pb.Deployment, field: str
    ) -> None:
        """A bad routing key, salt or shadow list is INVALID_ARGUMENT naming the field, and the
        deployment keeps its revision."""
        error = await failure(update(fraud, deployment, "routing_key", "salt", "shadow"))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert field in {v.field for v in error.violations}
        got = (await fraud.stub.GetDeployment(pb.GetDeploymentRequest(name=FRAUD))).deployment
        assert got.revision == 1

    async def test_unknown_shadow_version_is_not_found(self, fraud: RunningRegistry) -> None:
        """A shadow version that does not exist is NOT_FOUND, and nothing changes."""
        error = await failure(
            update(fraud, pb.Deployment(name=FRAUD, shadow=["models/fraud/versions/9"]), "shadow")
        )
        assert error.code is grpc.StatusCode.NOT_FOUND
        got = (await fraud.stub.GetDeployment(pb.GetDeploymentRequest(name=FRAUD))).deployment
        assert (got.revision, list(got.shadow)) == (1, [])

    async def test_fallback_chain_is_stored(self, fraud: RunningRegistry) -> None:
        """A fallback version and default outputs come back as sent and survive a later change
        of the traffic alone."""
        default = probabilities(1.0, 0.0)
        await update(
            fraud,
            pb.Deployment(name=FRAUD, fallback_version=V2, default_outputs=[default]),
            "fallback_version",
            "default_outputs",
        )
        after = await set_traffic(fraud.stub, FRAUD, (V3, 100))
        assert after.fallback_version == V2
        assert list(after.default_outputs) == [default]

    @pytest.mark.parametrize(
        ("deployment", "field"),
        [
            (pb.Deployment(name=FRAUD, fallback_version="v2"), "deployment.fallback_version"),
            (
                pb.Deployment(name=FRAUD, fallback_version=V2, shadow=[V2]),
                "deployment.fallback_version",
            ),
            (
                pb.Deployment(name=FRAUD, default_outputs=[probabilities(1.0)]),
                "deployment.default_outputs[0].shape",
            ),
            (
                pb.Deployment(
                    name=FRAUD, default_outputs=[probabilities(1.0, 0.0), probabilities(0.5, 0.5)]
                ),
                "deployment.default_outputs[1].name",
            ),
            (
                pb.Deployment(name=FRAUD, default_outputs=[tensor_pb2.Tensor(name="x", shape=[1])]),
                "deployment.default_outputs[0].datatype",
            ),
        ],
    )
    async def test_bad_fallback_chain_is_refused(
        self, fraud: RunningRegistry, deployment: pb.Deployment, field: str
    ) -> None:
        """A malformed fallback version or default output is INVALID_ARGUMENT naming the field,
        and the deployment keeps its revision."""
        error = await failure(
            update(fraud, deployment, "shadow", "fallback_version", "default_outputs")
        )
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert field in {v.field for v in error.violations}
        got = (await fraud.stub.GetDeployment(pb.GetDeploymentRequest(name=FRAUD))).deployment
        assert got.revision == 1

    async def test_unknown_fallback_version_is_not_found(self, fraud: RunningRegistry) -> None:
        """A fallback version that does not exist is NOT_FOUND, and nothing changes."""
        error = await failure(
            update(
                fraud,
                pb.Deployment(name=FRAUD, fallback_version="models/fraud/versions/9"),
                "fallback_version",
            )
        )
        assert error.code is grpc.StatusCode.NOT_FOUND

    async def test_creating_without_traffic_is_refused(self, registry: RunningRegistry) -> None:
        """A mask without `traffic` cannot create a deployment: INVALID_ARGUMENT naming traffic."""
        error = await failure(
            registry.stub.UpdateDeployment(
                pb.UpdateDeploymentRequest(
                    deployment=pb.Deployment(name=FRAUD, routing_key="user"),
                    update_mask=mask("routing_key"),
                    allow_missing=True,
                )
            )
        )
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "deployment.traffic" in {v.field for v in error.violations}
