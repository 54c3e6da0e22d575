"""The router when a version fails for real (taken out of Triton): the circuit breaker opens,
answers `circuit_open` without calling the model, half-opens and closes once the version is
back; the prediction cache answers without the model, is dropped on a deployment change, and
answers as a fallback while the model fails."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from router_testing import (
    V1,
    V2,
    WAIT_S,
    Dependencies,
    circuit_state,
    deploy,
    probabilities,
    records,
    refused,
    register_copy,
    reload,
    request,
    router,
    triton_requests_after,
    unloaded,
)
from structlog.testing import capture_logs
from support import eventually

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.router.v1 import router_service_pb2 as router_pb
from modelserve.type.v1 import prediction_record_pb2

pytestmark = pytest.mark.triton


def _predictions(**labels: str) -> float:
    """The router's `modelserve_router_predictions_total` for exactly these labels."""
    return REGISTRY.get_sample_value("modelserve_router_predictions_total", labels) or 0.0


class TestCircuitBreaker:
    async def test_opens_after_consecutive_failures_and_skips_the_model(
        self, dependencies: Dependencies
    ) -> None:
        """After `failure_threshold` failed calls the version's breaker opens: answers come
        from the fallback chain marked `circuit_open`, and Triton, with the version back,
        sees none of them."""
        deps = dependencies
        await deploy(deps, "breaker-open", V2)
        with capture_logs() as logs:
            async with router(
                deps, circuit_breaker={"failure_threshold": 3, "cool_down_s": 600}
            ) as (stub, app):
                healthy = await stub.Predict(request("breaker-open"))
                assert (healthy.model_version, healthy.degraded) == (V2, False)
                async with unloaded(deps, V2):
                    failed = [await stub.Predict(request("breaker-open")) for _ in range(3)]
                    assert circuit_state(V2) == 2
                    opened = await stub.Predict(request("breaker-open"))
                # A second router, whose breaker of V2 is closed, brackets the five requests
                # with one call each, which Triton counts.
                async with router(deps) as (fresh, _):

                    async def call() -> object:
                        answer = await fresh.Predict(request("breaker-open"))
                        assert (answer.model_version, answer.degraded) == (V2, False)
                        return answer

                    before = await triton_requests_after(deps, V2, call)
                    skipped = [await stub.Predict(request("breaker-open")) for _ in range(5)]
                    after = await triton_requests_after(deps, V2, call)
                await app.prediction_log.flush()
        for answer in failed:
            assert (answer.route_reason, answer.degraded) == ("default_output", True)
            assert f"{V2} failed: TRITON_UNAVAILABLE" in answer.degraded_reason
        for answer in [opened, *skipped]:
            assert (answer.route_reason, answer.model_version, answer.degraded) == (
                "default_output",
                "",
                True,
            )
            assert answer.degraded_reason.startswith(f"{V2} circuit_open;")
        logged = await records(deps, skipped[0].request_id)
        assert [(r.degraded, r.degraded_reason) for r in logged] == [
            (True, skipped[0].degraded_reason)
        ]
        # No version answered (the declared defaults); the request was routed to V2.
        assert [(r.model_version, r.routed_version) for r in logged] == [("", V2)]
        # The metric says the same: V2 was chosen, the declared defaults answered.
        degraded = {"endpoint": "breaker-open", "code": "OK", "degraded": "true"}
        assert _predictions(**degraded, routed_version=V2, model_version="") == len(failed) + 6
        assert _predictions(**degraded, routed_version="", model_version="") == 0
        assert after == before + 1
        opened_events = [e for e in logs if e["event"] == "circuit_opened"]
        assert [(e["model_version"], e["failures"]) for e in opened_events] == [(V2, 3)]

    async def test_half_opens_and_closes_after_recovery(self, dependencies: Dependencies) -> None:
        """After the cool-down one probe goes through: while the version is still out it fails
        and reopens the breaker; once the version is back a probe succeeds, the breaker closes
        and every request reaches the model again."""
        deps = dependencies
        await deploy(deps, "breaker-recover", V2)
        with capture_logs() as logs:
            async with router(
                deps, circuit_breaker={"failure_threshold": 2, "cool_down_s": 1.0}
            ) as (stub, _):
                assert (await stub.Predict(request("breaker-recover"))).degraded is False
                async with unloaded(deps, V2):
                    for _ in range(2):
                        failed = await stub.Predict(request("breaker-recover"))
                        assert "failed: TRITON_UNAVAILABLE" in failed.degraded_reason
                    refused = await stub.Predict(request("breaker-recover"))
                    assert "circuit_open" in refused.degraded_reason
                    probe: list[router_pb.PredictResponse] = []

                    async def probed() -> bool:
                        answer = await stub.Predict(request("breaker-recover"))
                        probe.append(answer)
                        return "failed: TRITON_UNAVAILABLE" in answer.degraded_reason

                    await eventually(probed, "a probe after the cool-down", within_s=WAIT_S)
                    after_probe = await stub.Predict(request("breaker-recover"))
                    assert "circuit_open" in after_probe.degraded_reason
                    assert circuit_state(V2) == 2

                async def closed() -> bool:
                    answer = await stub.Predict(request("breaker-recover"))
                    return answer.model_version == V2 and not answer.degraded

                await eventually(closed, "the breaker closing after recovery", within_s=WAIT_S)
                assert circuit_state(V2) == 0
                answers = [await stub.Predict(request("breaker-recover")) for _ in range(3)]
                assert {(a.model_version, a.degraded) for a in answers} == {(V2, False)}
        transitions = [e["event"] for e in logs if e["event"].startswith("circuit_")]
        assert transitions[:3] == ["circuit_opened", "circuit_half_opened", "circuit_opened"]
        assert transitions[-2:] == ["circuit_half_opened", "circuit_closed"]
        assert all("circuit_open" in a.degraded_reason for a in probe[:-1])


class TestPredictionCache:
    async def test_hit_skips_the_model_and_a_deployment_change_drops_it(
        self, dependencies: Dependencies
    ) -> None:
        """A repeated input answers from the cache (`route_reason: cache`, Triton not called);
        a new deployment revision empties the cache, so the next one calls the model again."""
        deps = dependencies
        await deploy(deps, "cached", V1)
        again = request("cached", "c-1002", 77.0)
        markers = iter(request("cached", "c-1002", 1000.0 + n) for n in range(3))
        with capture_logs() as logs:
            async with router(
                deps, endpoints={"cached": {"cache_max_entries": 100, "cache_ttl_s": 600}}
            ) as (stub, app):

                async def marker() -> object:
                    # An input not seen before: a miss, which calls the model.
                    answer = await stub.Predict(next(markers))
                    assert answer.route_reason == "single_target"
                    return answer

                start = await triton_requests_after(deps, V1, marker)
                first = await stub.Predict(again)
                hit = await stub.Predict(again)
                assert await triton_requests_after(deps, V1, marker) == start + 2
                await app.prediction_log.flush()
                logged = await records(deps, hit.request_id)

                revision = app.routes.snapshot.routes["cached"].revision
                await deploy(deps, "cached", V1, salt="new-revision")

                def changed() -> bool:
                    return app.routes.snapshot.routes["cached"].revision > revision

                await eventually(changed, "the new revision reaching the router", within_s=WAIT_S)
                after_change = await stub.Predict(again)
                assert await triton_requests_after(deps, V1, marker) == start + 4
        assert first.route_reason == "single_target"
        assert (hit.route_reason, hit.model_version, hit.degraded) == ("cache", V1, False)
        np.testing.assert_array_equal(probabilities(hit), probabilities(first))
        assert [(r.route_reason, r.model_version, r.status) for r in logged] == [
            ("cache", V1, prediction_record_pb2.PREDICTION_STATUS_OK)
        ]
        assert list(logged[0].outputs) == list(hit.outputs)
        assert after_change.route_reason == "single_target"
        dropped = [e for e in logs if e["event"] == "prediction_cache_dropped"]
        assert [(e["endpoint"], e["entries"]) for e in dropped] == [("cached", 3)]

    async def test_cached_answer_when_the_model_fails(self, dependencies: Dependencies) -> None:
        """With the version out of Triton, an input it answered before is answered from the
        cache past its TTL (`cached_prediction`, degraded, the version that made it); an
        input never seen goes on down the chain to the default outputs."""
        deps = dependencies
        await deploy(deps, "cached-fallback", V2)
        seen = request("cached-fallback", "c-1003", 310.0)
        never_seen = request("cached-fallback", "c-1003", 311.0)
        async with router(
            deps,
            endpoints={
                "cached-fallback": {"cache_max_entries": 10, "cache_ttl_s": 0, "cache_stale_s": 600}
            },
        ) as (stub, app):
            answered = await stub.Predict(seen)
            # A TTL of 0: the cache never answers in place of the model.
            assert (await stub.Predict(seen)).route_reason == "single_target"
            async with unloaded(deps, V2):
                cached = await stub.Predict(seen)
                defaulted = await stub.Predict(never_seen)
            await app.prediction_log.flush()
        assert (answered.model_version, answered.degraded) == (V2, False)
        assert (cached.route_reason, cached.model_version, cached.degraded) == (
            "cached_prediction",
            V2,
            True,
        )
        assert cached.degraded_reason.startswith(f"{V2} failed: TRITON_UNAVAILABLE;")
        assert f"answered by a cached prediction of {V2}" in cached.degraded_reason
        np.testing.assert_array_equal(probabilities(cached), probabilities(answered))
        assert (defaulted.route_reason, defaulted.degraded) == ("default_output", True)
        logged = await records(deps, cached.request_id)
        assert [(r.route_reason, r.model_version, r.degraded, r.status) for r in logged] == [
            ("cached_prediction", V2, True, prediction_record_pb2.PREDICTION_STATUS_OK)
        ]


class TestFallbackChain:
    async def test_fallback_version_first_then_cached_then_defaults(
        self, dependencies: Dependencies
    ) -> None:
        """While the chosen version fails and then has its breaker open, the fallback version
        answers before the cache and the default outputs could, and the reason says what
        happened to the chosen version."""
        deps = dependencies
        await deploy(deps, "chain", V2, fallback_version=V1)
        seen = request("chain", "c-1004", 55.0)
        async with router(
            deps,
            endpoints={"chain": {"cache_max_entries": 10, "cache_ttl_s": 0}},
            circuit_breaker={"failure_threshold": 1, "cool_down_s": 600},
        ) as (stub, _):
            assert (await stub.Predict(seen)).model_version == V2
            async with unloaded(deps, V2):
                failed = await stub.Predict(seen)
                skipped = await stub.Predict(seen)
        for answer in (failed, skipped):
            assert (answer.route_reason, answer.model_version, answer.degraded) == (
                "fallback",
                V1,
                True,
            )
            assert answer.degraded_reason.endswith(f"; answered by fallback {V1}")
        assert failed.degraded_reason.startswith(f"{V2} failed: TRITON_UNAVAILABLE;")
        assert skipped.degraded_reason.startswith(f"{V2} circuit_open;")


class TestNoReadyTarget:
    async def test_the_chain_answers_while_no_target_is_ready(
        self, dependencies: Dependencies
    ) -> None:
        """When inference holds no traffic target READY (as between Triton dying and its
        reload), the fallback chain still answers: the fallback version, a cached answer of
        the chosen version, the declared defaults, each degraded with `not_ready` in the
        reason; with no chain the request is refused VERSION_NOT_READY."""
        deps = dependencies
        version = await register_copy(deps, "fraud-not-ready")
        await reload(deps, version)
        await deploy(deps, "not-ready-fallback", version, fallback_version=V1)
        await deploy(deps, "not-ready-cached", version)
        await deploy(deps, "not-ready-bare", version, default_outputs=False)
        seen = request("not-ready-cached", "c-1005", 77.0)
        async with router(
            deps, endpoints={"not-ready-cached": {"cache_max_entries": 10, "cache_ttl_s": 0}}
        ) as (stub, app):
            answered = await stub.Predict(seen)
            await deps.inference.UnloadModelVersion(
                inference_pb.UnloadModelVersionRequest(name=version), timeout=WAIT_S
            )
            await eventually(
                lambda: version not in app.routes.snapshot.ready,
                "the version no longer READY in the router",
                within_s=WAIT_S,
            )
            by_fallback = await stub.Predict(request("not-ready-fallback", "c-1005", 77.0))
            by_cache = await stub.Predict(seen)
            by_default = await stub.Predict(request("not-ready-cached", "c-1005", 78.0))
            error = await refused(stub.Predict(request("not-ready-bare", "c-1005", 77.0)))
            await app.prediction_log.flush()
        assert (answered.model_version, answered.degraded) == (version, False)
        assert (by_fallback.route_reason, by_fallback.model_version, by_fallback.degraded) == (
            "fallback",
            V1,
            True,
        )
        assert by_fallback.degraded_reason == f"{version} not_ready; answered by fallback {V1}"
        assert (by_cache.route_reason, by_cache.model_version, by_cache.degraded) == (
            "cached_prediction",
            version,
            True,
        )
        np.testing.assert_array_equal(probabilities(by_cache), probabilities(answered))
        assert (by_default.route_reason, by_default.degraded) == ("default_output", True)
        assert by_default.degraded_reason.startswith(f"{version} not_ready;")
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "VERSION_NOT_READY",
        )
        logged = await records(deps, by_default.request_id)
        assert [(r.route_reason, r.degraded, r.status) for r in logged] == [
            ("default_output", True, prediction_record_pb2.PREDICTION_STATUS_OK)
        ]
