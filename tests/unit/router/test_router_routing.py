"""Version choice: single target, weighted split, sticky assignment, READY filtering; the READY
set as inference's state stream changes it; a deployment's hybrid lookup."""

from __future__ import annotations

import random
from collections import Counter

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from modelserve.inference.v1 import inference_service_pb2 as inference_pb
from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve_router.routing import (
    HybridLookup,
    Route,
    ServedVersion,
    ServingChange,
    Target,
    apply_serving_change,
    choose,
    routing_keys,
)
from modelserve_router.sources import serving_change
from modelserve_runtime.errors import FailedPreconditionError

V1, V2, V3 = (f"models/fraud/versions/{n}" for n in (1, 2, 3))
READY = {v: ServedVersion(v) for v in (V1, V2, V3)}
#: 99.9th percentile of chi-square with one degree of freedom.
CHI2_1DF_999 = 10.83


def canary(routing_key: str = "", salt: str = "") -> Route:
    return Route("fraud", 1, (Target(V1, 90), Target(V2, 10)), routing_key, salt)


def chi_square(counts: Counter[str], expected: dict[str, float]) -> float:
    return sum((counts[v] - e) ** 2 / e for v, e in expected.items())


class TestChoose:
    def test_single_target(self) -> None:
        """A deployment with one target with traffic answers from it as `single_target`."""
        route = Route("fraud", 1, (Target(V1, 100), Target(V2, 0)))
        choice = choose(route, READY, {})
        assert (choice.model_version, choice.reason) == (V1, "single_target")

    def test_weighted_split_within_chi_square(self) -> None:
        """A 90/10 split over 10,000 requests matches its weights within a chi-square test."""
        rng = random.Random(7)
        counts = Counter(choose(canary(), READY, {}, rng).model_version for _ in range(10_000))
        assert chi_square(counts, {V1: 9000, V2: 1000}) < CHI2_1DF_999
        assert {choose(canary(), READY, {}, rng).reason for _ in range(10)} == {"weighted"}

    def test_sticky_assignment_is_stable_and_weighted(self) -> None:
        """With a routing key each id always gets the same version, the split still follows the
        weights, and a request without the key falls back to `weighted`."""
        route = canary(routing_key="customer", salt="s1")
        first = {f"c-{i}": choose(route, READY, {"customer": f"c-{i}"}) for i in range(10_000)}
        again = {c: choose(route, READY, {"customer": c}) for c in list(first)[:500]}
        assert all(again[c] == first[c] for c in again)
        assert {c.reason for c in first.values()} == {"sticky"}
        counts = Counter(c.model_version for c in first.values())
        assert chi_square(counts, {V1: 9000, V2: 1000}) < CHI2_1DF_999
        assert choose(route, READY, {"user": "u-1"}).reason == "weighted"

    def test_salt_reshuffles(self) -> None:
        """A different salt moves some ids to the other arm; the same salt never does."""
        a = canary(routing_key="customer", salt="a")
        b = canary(routing_key="customer", salt="b")
        ids = [f"c-{i}" for i in range(2000)]
        moved = sum(
            choose(a, READY, {"customer": c}) != choose(b, READY, {"customer": c}) for c in ids
        )
        assert moved > 0

    def test_user_id_is_the_user_key(self) -> None:
        """`routing_key: user` hashes the request's user id, not an entity id."""
        route = canary(routing_key="user", salt="s")
        keys = routing_keys("u-42", {"customer": "c-1"})
        assert choose(route, READY, keys) == choose(route, READY, {"user": "u-42"})
        assert choose(route, READY, keys).reason == "sticky"

    def test_only_ready_versions_get_traffic(self) -> None:
        """A target inference does not report READY gets nothing; its weight goes to the rest."""
        ready = {V2: READY[V2]}
        picks = {choose(canary(), ready, {}, random.Random(i)).model_version for i in range(200)}
        assert picks == {V2}

    @pytest.mark.parametrize(
        ("route", "ready", "reason"),
        [
            (Route("fraud", 1, (Target(V1, 90), Target(V2, 10))), {}, "VERSION_NOT_READY"),
            (Route("fraud", 1, ()), READY, "NO_TRAFFIC_TARGET"),
        ],
    )
    def test_nothing_to_route_to(
        self, route: Route, ready: dict[str, ServedVersion], reason: str
    ) -> None:
        """No READY target, or no target at all, is FAILED_PRECONDITION with its reason."""
        with pytest.raises(FailedPreconditionError) as info:
            choose(route, ready, {})
        assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.reason == reason


class TestServingChanges:
    def test_whole_state_replaces_later_changes_merge(self) -> None:
        """The first message of a stream replaces the READY set (a version it lacks is gone);
        a later one adds its READY versions (a new endpoint replacing the old) and drops every
        other one, leaving the rest untouched."""
        known = {V1: ServedVersion(V1, "old:1"), V2: ServedVersion(V2, "old:1")}
        initial = apply_serving_change(
            known, ServingChange(((V1, ServedVersion(V1, "new:1")),), initial=True)
        )
        assert initial == {V1: ServedVersion(V1, "new:1")}
        merged = apply_serving_change(
            initial,
            ServingChange(((V3, ServedVersion(V3, "new:1")), (V1, None), (V2, None))),
        )
        assert merged == {V3: ServedVersion(V3, "new:1")}
        assert apply_serving_change(merged, ServingChange()) == merged

    def test_a_later_state_of_the_same_version_wins(self) -> None:
        """A message naming a version twice leaves it as its last state says."""
        back = ServingChange(((V1, None), (V1, ServedVersion(V1, "new:1"))))
        assert apply_serving_change({}, back) == {V1: ServedVersion(V1, "new:1")}
        gone = ServingChange(((V1, ServedVersion(V1, "new:1")), (V1, None)))
        assert apply_serving_change({V1: ServedVersion(V1, "old:1")}, gone) == {}

    def test_only_ready_is_routable(self) -> None:
        """From a WatchModelStates message, READY versions come with their Triton endpoint;
        LOADING, WARMING, FAILED, UNLOADING and removed ones are not routable."""
        states = [
            (V1, inference_pb.MODEL_VERSION_STATE_READY),
            (V2, inference_pb.MODEL_VERSION_STATE_LOADING),
            (V3, inference_pb.MODEL_VERSION_STATE_WARMING),
            ("models/fraud/versions/4", inference_pb.MODEL_VERSION_STATE_FAILED),
            ("models/fraud/versions/5", inference_pb.MODEL_VERSION_STATE_UNLOADING),
        ]
        message = inference_pb.WatchModelStatesResponse(
            model_versions=[
                inference_pb.LoadedModelVersion(
                    name=name,
                    state=state,
                    triton_endpoint="127.0.0.1:8001",
                    triton_model_name="fraud",
                    triton_model_version=int(name.rsplit("/", 1)[1]),
                )
                for name, state in states
            ],
            removed_names=["models/fraud/versions/6"],
            initial=True,
        )
        change = serving_change(message)
        assert change.initial
        assert change.versions == (
            (V1, ServedVersion(V1, "127.0.0.1:8001", "fraud", 1)),
            *((name, None) for name, _ in states[1:]),
            ("models/fraud/versions/6", None),
        )


class TestHybridRoute:
    def test_enabled_lookup_becomes_the_route_s(self) -> None:
        """An enabled hybrid lookup is carried with its entity type and max age in seconds; a
        disabled one, even with values set, is none."""
        deployment = registry_pb.Deployment(
            name="deployments/fraud",
            revision=3,
            traffic=[registry_pb.TrafficTarget(model_version=V1, percent=100)],
            hybrid=registry_pb.HybridLookup(
                enabled=True, max_age=Duration(seconds=90, nanos=500_000_000), entity_type="card"
            ),
        )
        assert Route.from_proto(deployment).hybrid == HybridLookup("card", 90.5)
        deployment.hybrid.enabled = False
        assert Route.from_proto(deployment).hybrid is None
