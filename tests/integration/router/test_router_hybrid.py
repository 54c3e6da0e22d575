"""Hybrid lookup at the router: a fresh prediction that a batch job stored in Redis for the
request's entity answers without calling the model (Triton's own statistics say so); a stale,
missing, unreadable one, or one made by another version, leaves the answer to the model; a
deployment that turns the lookup off stops it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import redis.asyncio as aioredis
from google.protobuf import field_mask_pb2
from google.protobuf.duration_pb2 import Duration
from router_testing import (
    V1,
    V2,
    WAIT_S,
    Dependencies,
    deploy,
    probabilities,
    records,
    request,
    router,
    triton_requests_after,
)
from structlog.testing import capture_logs
from support import eventually

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve.type.v1 import prediction_record_pb2
from modelserve_runtime.convert import tensor_to_numpy
from modelserve_runtime.precomputed import precomputed_key, write_precomputed

pytestmark = pytest.mark.triton

#: What the batch job stored: values no model answer would have, so a test can tell them apart.
LABELS = np.array([1, 0], dtype=np.int64)
PROBABILITIES = np.array([[0.125, 0.875], [0.75, 0.25]], dtype=np.float32)


def hybrid(max_age_s: int) -> registry_pb.HybridLookup:
    return registry_pb.HybridLookup(
        enabled=True, max_age=Duration(seconds=max_age_s), entity_type="customer"
    )


async def precompute(
    client: aioredis.Redis,
    endpoint: str,
    customers: list[str],
    *,
    by: str = V1,
    computed_at: datetime | None = None,
) -> None:
    rows = len(customers)
    await write_precomputed(
        client,
        endpoint=endpoint,
        entity_type="customer",
        model_version=by,
        entity_ids=customers,
        outputs={"label": LABELS[:rows], "probabilities": PROBABILITIES[:rows]},
        computed_at=computed_at,
    )


def label(response: Any) -> npt.NDArray[Any]:
    tensor = next(o for o in response.outputs if o.name == "label")
    return np.asarray(tensor_to_numpy(tensor))


class TestHybridLookup:
    async def test_fresh_prediction_answers_without_the_model(
        self, dependencies: Dependencies, store: aioredis.Redis
    ) -> None:
        """A fresh prediction of the chosen version answers (`precomputed`, that version, not
        degraded), is logged like any answer, and Triton runs nothing for it."""
        deps = dependencies
        await deploy(deps, "hybrid-fresh", V1, hybrid=hybrid(600))
        await precompute(store, "hybrid-fresh", ["c-1001", "c-1002"])
        markers = iter(request("hybrid-fresh", "c-1003", 500.0 + n) for n in range(2))
        async with router(deps) as (stub, app):

            async def marker() -> object:
                # Nothing is stored for c-1003: the model answers.
                answer = await stub.Predict(next(markers))
                assert answer.route_reason == "single_target"
                return answer

            before = await triton_requests_after(deps, V1, marker)
            answers = [
                await stub.Predict(request("hybrid-fresh", customer))
                for customer in ["c-1001", "c-1002"] * 3
            ]
            after = await triton_requests_after(deps, V1, marker)
            await app.prediction_log.flush()
            logged = await records(deps, answers[0].request_id)
        assert after == before + 1
        for i, answer in enumerate(answers):
            assert (answer.route_reason, answer.model_version, answer.degraded) == (
                "precomputed",
                V1,
                False,
            )
            np.testing.assert_array_equal(probabilities(answer), PROBABILITIES[i % 2 : i % 2 + 1])
            np.testing.assert_array_equal(label(answer), LABELS[i % 2 : i % 2 + 1])
        assert [(r.route_reason, r.model_version, r.routed_version, r.status) for r in logged] == [
            ("precomputed", V1, V1, prediction_record_pb2.PREDICTION_STATUS_OK)
        ]
        assert list(logged[0].outputs) == list(answers[0].outputs)

    async def test_stale_missing_unreadable_or_other_version_goes_online(
        self, dependencies: Dependencies, store: aioredis.Redis
    ) -> None:
        """A prediction older than `max_age`, none at all, bytes that are no prediction, and a
        fresh prediction of a version the request is not routed to all leave the answer to
        the model, which Triton counts."""
        deps = dependencies
        await deploy(deps, "hybrid-online", V1, hybrid=hybrid(60))
        await precompute(
            store, "hybrid-online", ["c-1001"], computed_at=datetime.now(UTC) - timedelta(hours=2)
        )
        await precompute(store, "hybrid-online", ["c-1003"], by=V2)
        await store.set(
            precomputed_key("hybrid-online", "customer", "c-1004"), b"\xffnot-a-message"
        )
        markers = iter(request("hybrid-online", "c-1005", 700.0 + n) for n in range(2))
        with capture_logs() as logs:
            async with router(deps) as (stub, _):

                async def marker() -> object:
                    return await stub.Predict(next(markers))

                before = await triton_requests_after(deps, V1, marker)
                answers = {
                    customer: await stub.Predict(request("hybrid-online", customer))
                    for customer in ("c-1001", "c-1002", "c-1003", "c-1004")
                }
                after = await triton_requests_after(deps, V1, marker)
        assert after == before + 5
        for answer in answers.values():
            assert (answer.route_reason, answer.model_version) == ("single_target", V1)
            assert not np.array_equal(probabilities(answer), PROBABILITIES[:1])
        unusable = [e for e in logs if e["event"] == "precomputed_unusable"]
        assert [e["entity_id"] for e in unusable] == ["c-1004"]

    async def test_turning_hybrid_off_stops_it(
        self, dependencies: Dependencies, store: aioredis.Redis
    ) -> None:
        """Once a deployment revision turns the lookup off, the model answers the entity that
        a fresh prediction answered before."""
        deps = dependencies
        await deploy(deps, "hybrid-toggle", V1, hybrid=hybrid(600))
        await precompute(store, "hybrid-toggle", ["c-1001"])
        async with router(deps) as (stub, app):
            on = await stub.Predict(request("hybrid-toggle", "c-1001"))
            # Fields a request leaves unset are kept, so the mask names the one turned off.
            await deps.registry.UpdateDeployment(
                registry_pb.UpdateDeploymentRequest(
                    deployment=registry_pb.Deployment(
                        name="deployments/hybrid-toggle", hybrid=registry_pb.HybridLookup()
                    ),
                    update_mask=field_mask_pb2.FieldMask(paths=["hybrid"]),
                )
            )
            await eventually(
                lambda: app.routes.snapshot.routes["hybrid-toggle"].hybrid is None,
                "the revision without hybrid lookup reaching the router",
                within_s=WAIT_S,
            )
            off = await stub.Predict(request("hybrid-toggle", "c-1001"))
        assert (on.route_reason, on.model_version) == ("precomputed", V1)
        assert (off.route_reason, off.model_version) == ("single_target", V1)
        assert not np.array_equal(probabilities(off), PROBABILITIES[:1])
