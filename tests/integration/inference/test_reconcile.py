"""The reconcile loop with a real registry, a real inference service and a real Triton: the
deployments decide what Triton holds, without anyone calling LoadModelVersion."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time

import grpc
import numpy as np
import pytest
from inference_testing import RunningInference, refused
from reconcile_testing import (
    LOAD_S,
    REMOVED,
    RestartableRegistry,
    StateRecorder,
    answer,
    expected,
    held_states,
    ready,
    reconciling_settings,
    recording,
    tiny_onnx,
)
from structlog.testing import capture_logs
from support import eventually, running

from modelserve.inference.v1 import inference_service_pb2 as pb
from modelserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelserve_inference import server as inference_server
from modelserve_inference.config import InferenceSettings
from modelserve_inference.reconcile import Reconciler
from modelserve_triton.runner import TritonRunner

pytestmark = pytest.mark.triton

#: How long an unwanted version stays loaded; long enough that a change and its undo made
#: one after the other fall inside it on a busy machine.
GRACE_S = 1.5
RETRY_INITIAL_S = 0.25
RETRY_MAX_S = 1.0


@pytest.fixture(scope="module")
def inference_settings(
    tmp_path_factory: pytest.TempPathFactory, registry: RestartableRegistry
) -> InferenceSettings:
    """Reconcile on (the default) with a short grace and short retry and reconnect waits."""
    return reconciling_settings(
        tmp_path_factory,
        registry,
        unload_grace_s=GRACE_S,
        load_retry_initial_s=RETRY_INITIAL_S,
        load_retry_max_s=RETRY_MAX_S,
        watch_backoff_max_s=0.5,
        warmup_batch_sizes=(1, 8),
    )


@pytest.fixture
def reconciler(inference_service: RunningInference) -> Reconciler:
    """The service's reconcile loop."""
    assert inference_service.app.reconciler is not None
    return inference_service.app.reconciler


class TestDeploymentsDecide:
    async def test_a_new_deployment_makes_its_version_ready(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """Creating a deployment loads its version into Triton, READY on the service's Triton
        endpoint and answering, without anyone calling LoadModelVersion."""
        stub = inference_service.stub
        await registry.create_model("alpha")
        v1 = await registry.upload("alpha", tiny_onnx(1.0))

        await registry.deploy("alpha", {v1: 100})

        await ready(stub, v1)
        listed = await stub.ListModelVersions(pb.ListModelVersionsRequest())
        (shown,) = [v for v in listed.model_versions if v.name == v1]
        assert shown.triton_endpoint == inference_service.app.versions.triton_endpoint
        np.testing.assert_allclose(await answer(stub, v1), expected(1.0))

    async def test_shadow_and_fallback_versions_are_held_too(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """A traffic target at 0 percent, a shadow version and the fallback version are all
        loaded: each can be asked to answer."""
        stub = inference_service.stub
        await registry.create_model("gamma")
        v1, v2, v3, v4 = [await registry.upload("gamma", tiny_onnx(w)) for w in (1, 2, 3, 4)]

        await registry.deploy("gamma", {v1: 100, v2: 0}, shadow=[v3], fallback=v4)

        await ready(stub, v1, v2, v3, v4)
        for name, weight in ((v1, 1.0), (v2, 2.0), (v3, 3.0), (v4, 4.0)):
            np.testing.assert_allclose(await answer(stub, name), expected(weight))

    async def test_a_second_version_loads_while_the_first_keeps_serving(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """Adding a version to the traffic loads it beside the first, which stays READY and
        answers every request meanwhile."""
        stub = inference_service.stub
        await registry.create_model("beta")
        v1 = await registry.upload("beta", tiny_onnx(1.0))
        await registry.deploy("beta", {v1: 100})
        await ready(stub, v1)
        v2 = await registry.upload("beta", tiny_onnx(2.0))
        answered = 0
        stop = asyncio.Event()

        async def keep_asking() -> None:
            nonlocal answered
            while not stop.is_set():
                np.testing.assert_allclose(await answer(stub, v1), expected(1.0))
                answered += 1

        async with recording(stub) as states:
            asking = asyncio.create_task(keep_asking())
            await registry.deploy("beta", {v1: 90, v2: 10})
            await ready(stub, v2)
            stop.set()
            await asking

        assert states.states(v2) == ["LOADING", "WARMING", "READY"]
        assert set(states.states(v1)) <= {"READY"}
        assert answered > 0
        np.testing.assert_allclose(await answer(stub, v2), expected(2.0))


class TestTritonRestart:
    async def test_deployed_versions_come_back_and_one_deployed_meanwhile_loads_after(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """After kill -9 of tritonserver the supervisor reloads the deployed version (LOADING
        with the reason, then READY), and a version deployed while Triton was down is loaded
        once it is back, with no failed attempt meanwhile."""
        stub = inference_service.stub
        await registry.create_model("omicron")
        v1, v2 = [await registry.upload("omicron", tiny_onnx(w)) for w in (1, 2)]
        await registry.deploy("omicron", {v1: 100})
        await ready(stub, v1)
        triton = inference_service.app.triton
        assert triton is not None and triton.pid is not None

        async with recording(stub) as states:
            os.kill(triton.pid, signal.SIGKILL)
            await eventually(lambda: states.last(v1) == "LOADING", "v1 LOADING")
            await registry.deploy("omicron", {v1: 50, v2: 50})
            await eventually(
                lambda: states.last(v1) == "READY" and states.last(v2) == "READY",
                "both READY",
                within_s=LOAD_S,
            )

        assert states.of(v1)[0].reason.startswith("triton restarting: ")
        assert states.states(v1) == ["LOADING", "WARMING", "READY"]
        assert states.states(v2) == ["LOADING", "WARMING", "READY"]
        np.testing.assert_allclose(await answer(stub, v1), expected(1.0))
        np.testing.assert_allclose(await answer(stub, v2), expected(2.0))


class TestUnwantedVersions:
    async def test_a_version_no_deployment_references_is_unloaded_after_the_grace(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """Taking a version out of every deployment (two of them) unloads it once the grace
        period has passed: UNLOADING, then removed, and Triton no longer has it."""
        stub = inference_service.stub
        await registry.create_model("delta")
        v1, v2 = [await registry.upload("delta", tiny_onnx(w)) for w in (1, 2)]
        await registry.deploy("delta", {v1: 50, v2: 50})
        await registry.deploy("delta-shadow", {v1: 100}, shadow=[v2])
        await ready(stub, v1, v2)

        async with recording(stub) as states:
            await registry.deploy("delta", {v1: 100})
            await registry.deploy("delta-shadow", {v1: 100})
            last_gone = time.monotonic()
            await eventually(lambda: states.last(v2) == REMOVED, "v2 removed", within_s=LOAD_S)

        (unloading,) = [e for e in states.of(v2) if e.state == "UNLOADING"]
        assert states.states(v2) == ["UNLOADING", REMOVED]
        assert unloading.at - last_gone >= GRACE_S
        assert (await held_states(stub)).get(v1) == "READY"
        assert v2 not in await held_states(stub)
        assert not await _triton_has(inference_service, "delta", 2)
        np.testing.assert_allclose(await answer(stub, v1), expected(1.0))

    async def test_a_version_back_within_the_grace_is_never_reloaded(
        self,
        inference_service: RunningInference,
        registry: RestartableRegistry,
        reconciler: Reconciler,
    ) -> None:
        """A rollback that comes straight back (v1 -> v2 -> v1) finds v1 still READY: it is
        neither unloaded nor loaded again, however long one waits."""
        stub = inference_service.stub
        await registry.create_model("epsilon")
        v1, v2 = [await registry.upload("epsilon", tiny_onnx(w)) for w in (1, 2)]
        await registry.deploy("epsilon", {v1: 100})
        await ready(stub, v1)

        async with recording(stub) as states:
            await registry.deploy("epsilon", {v2: 100})
            await eventually(lambda: v1 not in reconciler.wanted(), "v1 unwanted")
            unwanted_at = time.monotonic()
            await registry.deploy("epsilon", {v1: 100})
            await eventually(lambda: v1 in reconciler.wanted(), "v1 wanted again")
            back_after = time.monotonic() - unwanted_at
            # v2 may have been loaded meanwhile; then it goes after its own grace period.
            await eventually(
                lambda: (
                    time.monotonic() > unwanted_at + 2 * GRACE_S
                    and states.last(v2) in ("", REMOVED)
                ),
                "two grace periods, and v2 gone",
                within_s=LOAD_S,
            )

        assert back_after < GRACE_S
        assert states.states(v1) == []
        assert (await held_states(stub)).get(v1) == "READY"
        np.testing.assert_allclose(await answer(stub, v1), expected(1.0))


class TestPinning:
    async def test_a_pinned_version_stays_until_unloaded(
        self,
        inference_service: RunningInference,
        registry: RestartableRegistry,
        reconciler: Reconciler,
    ) -> None:
        """LoadModelVersion pins a version no deployment references: it outlives the grace
        period; UnloadModelVersion of it while a deployment references it is refused
        (FAILED_PRECONDITION) but releases the pin, so it goes once the deployment moves on."""
        stub = inference_service.stub
        await registry.create_model("theta")
        v1, v2 = [await registry.upload("theta", tiny_onnx(w)) for w in (1, 2)]

        loaded = await stub.LoadModelVersion(pb.LoadModelVersionRequest(name=v1))
        pinned_at = time.monotonic()
        await eventually(
            lambda: time.monotonic() - pinned_at > 2 * GRACE_S, "twice the grace period"
        )
        still = await held_states(stub)
        await registry.deploy("theta", {v1: 100})
        await eventually(lambda: reconciler.wanted().get(v1) == "deployments/theta", "deployed")
        error = await refused(stub.UnloadModelVersion(pb.UnloadModelVersionRequest(name=v1)))
        async with recording(stub) as states:
            await registry.deploy("theta", {v2: 100})
            await eventually(lambda: states.last(v1) == REMOVED, "v1 removed", within_s=LOAD_S)

        assert loaded.model_version.state == pb.MODEL_VERSION_STATE_READY
        assert still.get(v1) == "READY"
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "VERSION_IN_USE"
        assert error.metadata == {"name": v1, "deployments": "deployments/theta"}
        await ready(stub, v2)

    async def test_pins_survive_a_restart(
        self,
        inference_settings: InferenceSettings,
        registry: RestartableRegistry,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> None:
        """A version pinned by LoadModelVersion (no deployment references it) is kept in
        `pins.json` in the work directory; a service started again over that directory loads
        it by itself, READY and answering; UnloadModelVersion takes it off the list."""
        settings = inference_settings.model_copy(
            update={"triton_work_dir": tmp_path_factory.mktemp("triton-pins")}
        )
        pins = settings.triton_work_dir / "pins.json"
        await registry.create_model("sigma")
        v1 = await registry.upload("sigma", tiny_onnx(3.0))
        async with running(inference_server.build_server, settings) as (_, channel, _app):
            stub = pb_grpc.InferenceServiceStub(channel)
            await stub.LoadModelVersion(pb.LoadModelVersionRequest(name=v1))
            kept = json.loads(pins.read_text())
        async with running(inference_server.build_server, settings) as (_, channel, _app):
            stub = pb_grpc.InferenceServiceStub(channel)
            await ready(stub, v1)
            answered = await answer(stub, v1)
            await stub.UnloadModelVersion(pb.UnloadModelVersionRequest(name=v1))
            released = json.loads(pins.read_text())
        assert kept == [v1]
        np.testing.assert_allclose(answered, expected(3.0))
        assert released == []


class TestWatchModelStates:
    async def test_states_stream_from_loading_to_ready_then_unloading_and_removal(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """A watcher first gets every held version, then LOADING, WARMING and READY (with the
        Triton endpoint, which no other state carries) of a deployed version, and UNLOADING
        and its removal once no deployment references it; a new watcher starts from the
        state as it is."""
        stub = inference_service.stub
        endpoint = inference_service.app.versions.triton_endpoint
        await registry.create_model("eta")
        v1, v2 = [await registry.upload("eta", tiny_onnx(w)) for w in (1, 2)]

        async with recording(stub) as states:
            initial = {v.name for v in states.initial or []}
            await registry.deploy("eta", {v1: 100})
            await eventually(lambda: states.last(v1) == "READY", "v1 READY", within_s=LOAD_S)
            await registry.deploy("eta", {v2: 100})
            await eventually(lambda: states.last(v1) == REMOVED, "v1 removed", within_s=LOAD_S)
            await eventually(lambda: states.last(v2) == "READY", "v2 READY", within_s=LOAD_S)
        async with recording(stub) as later:
            pass

        assert v1 not in initial and v2 not in initial
        assert states.states(v1) == ["LOADING", "WARMING", "READY", "UNLOADING", REMOVED]
        assert [e.endpoint for e in states.of(v1)] == ["", "", endpoint, "", ""]
        assert states.states(v2) == ["LOADING", "WARMING", "READY"]
        shown = {v.name: v for v in later.initial or []}
        assert v1 not in shown
        assert shown[v2].state == pb.MODEL_VERSION_STATE_READY
        assert shown[v2].triton_endpoint == endpoint


class TestRegistryOutage:
    async def test_held_versions_stay_and_changes_made_meanwhile_arrive_after(
        self,
        inference_service: RunningInference,
        registry: RestartableRegistry,
        reconciler: Reconciler,
    ) -> None:
        """With the registry stopped, what is held stays READY and answers; once it is back
        (same data, same port) the watch resumes after the last sequence it saw, and the
        revisions made since are all applied."""
        stub = inference_service.stub
        await registry.create_model("kappa")
        v1, v2, v3 = [await registry.upload("kappa", tiny_onnx(w)) for w in (1, 2, 3)]
        await registry.deploy("kappa-steady", {v1: 100})
        await registry.deploy("kappa", {v1: 100})
        await ready(stub, v1)
        seen = await registry.last_sequence("kappa")
        await eventually(lambda: reconciler.sequence >= seen, "the revision applied")
        before = reconciler.sequence

        with capture_logs() as logs:
            await registry.stop()
            await eventually(
                lambda: any(e["event"] == "deployment_watch_lost" for e in logs),
                "inference noticing the registry is gone",
            )
            during = await held_states(stub)
            during_answer = await answer(stub, v1)
            await registry.start()
            await registry.deploy("kappa", {v1: 50, v2: 50})
            await registry.deploy("kappa-shadow", {v1: 100}, shadow=[v3])
            last = await registry.last_sequence("kappa-shadow")
            await ready(stub, v1, v2, v3)
            await eventually(lambda: reconciler.sequence >= last, "every revision applied")

        reopened = [e["after_sequence"] for e in logs if e["event"] == "deployment_watch_opening"]
        applied = [
            (e["deployment"], e["revision"])
            for e in logs
            if e["event"] == "deployment_revision_applied"
        ]
        assert during.get(v1) == "READY"
        np.testing.assert_allclose(during_answer, expected(1.0))
        assert reopened and set(reopened) == {before}
        # Only what was made since: a watch started over would resend every deployment
        # (kappa-steady, unchanged, included).
        assert applied == [("deployments/kappa", 2), ("deployments/kappa-shadow", 1)]
        np.testing.assert_allclose(await answer(stub, v3), expected(3.0))


class TestFailures:
    async def test_a_broken_artifact_fails_with_the_reason_and_is_retried_with_backoff(
        self, inference_service: RunningInference, registry: RestartableRegistry
    ) -> None:
        """A version Triton cannot load is FAILED with Triton's reason and loaded again after
        waits that double (not in a hot loop); the good version deployed beside it, and another
        model deployed meanwhile, are READY and keep answering."""
        stub = inference_service.stub
        await registry.create_model("zeta")
        await registry.create_model("iota")
        good = await registry.upload("zeta", tiny_onnx(1.0))
        broken = await registry.upload("zeta", tiny_onnx(1.0, rows_of_w=4))
        other = await registry.upload("iota", tiny_onnx(5.0))

        async with recording(stub) as states:
            await registry.deploy("zeta", {good: 100, broken: 0})
            await registry.deploy("iota", {other: 100})
            await eventually(
                lambda: states.states(broken).count("FAILED") >= 3,
                "three failed loads of the broken version",
                within_s=LOAD_S,
            )
            await ready(stub, good, other)
            np.testing.assert_allclose(await answer(stub, good), expected(1.0))
            np.testing.assert_allclose(await answer(stub, other), expected(5.0))

        failed = [e for e in states.of(broken) if e.state == "FAILED"]
        assert "version 2 is at UNAVAILABLE state" in failed[0].reason
        assert "Incompatible dimensions" in failed[0].reason
        assert "\nAt:" not in failed[0].reason
        waits = _waits_before_retry(states, broken)
        assert len(waits) >= 2
        assert waits[0] >= RETRY_INITIAL_S - 0.05
        assert waits[1] >= 2 * RETRY_INITIAL_S - 0.05
        assert set(states.states(good)) <= {"LOADING", "WARMING", "READY"}
        assert states.states(good)[-1] == "READY"
        assert states.states(good).count("READY") == 1


def _waits_before_retry(states: StateRecorder, name: str) -> list[float]:
    """Seconds from each FAILED of the version to the LOADING that follows it."""
    events = states.of(name)
    return [
        later.at - event.at
        for event, later in itertools.pairwise(events)
        if event.state == "FAILED" and later.state == "LOADING"
    ]


async def _triton_has(inference_service: RunningInference, model: str, version: int) -> bool:
    """Whether the service's Triton itself reports the version ready."""
    triton = TritonRunner(inference_service.app.versions.triton_endpoint)
    try:
        return await triton.is_model_ready(model, version, timeout_s=5)
    finally:
        await triton.close()
